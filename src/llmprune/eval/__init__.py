"""Evaluation: perplexity with the papers' protocol."""
