"""Model components for the Mamba-ASR recipes."""

import logging

# SpeechBrain warns "torchvision is not available - cannot save figures" whenever its train_logger is
# imported without torchvision, an optional dependency for logging figures, which no recipe here does.
logging.getLogger("speechbrain.utils.train_logger").addFilter(
    lambda record: "torchvision is not available" not in record.getMessage()
)
