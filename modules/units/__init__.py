"""Discrete speech units for MADEON: feature extractors, k-means, cached unit manifests, unit text and joint SentencePiece."""
