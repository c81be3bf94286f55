"""Model components for the Mamba-ASR recipes."""

import logging

# SpeechBrain warns "torchvision is not available - cannot save figures" whenever its train_logger is
# imported without torchvision, an optional dependency for logging figures, which no recipe here does.
logging.getLogger("speechbrain.utils.train_logger").addFilter(
    lambda record: "torchvision is not available" not in record.getMessage()
)

# The CTC recipes' word LM is the ARPA file modules/training/ngram.py writes (small, loads in well under a
# second), and the demo's vocabulary is small by design: SpeechBrain's two warnings about that fire on
# every such run and say nothing a user must act on.
logging.getLogger("speechbrain.decoders.ctc").addFilter(
    lambda record: "Using arpa instead of binary LM file" not in record.getMessage()
)
logging.getLogger("speechbrain.integrations.decoders.kenlm_scorer").addFilter(
    lambda record: "unigrams passed as vocabulary" not in record.getMessage()
)
