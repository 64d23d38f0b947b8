"""Drafters for speculative decoding: cheap guesses of the next tokens, which the model verifies."""
