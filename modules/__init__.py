"""Model components for the Mamba-ASR recipes."""
