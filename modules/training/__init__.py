"""Training plumbing shared by the recipes: recipe base, hparam checks, checkpoints, bad data, tokenizers, n-gram LM."""
