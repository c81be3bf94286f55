"""The networks the yamls build: front-end, speech encoders, decoders, the encoder-decoder model, MADEON LMs."""
