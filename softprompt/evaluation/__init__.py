"""Evaluation: loss, perplexity, rank classification, exact match and ROUGE-L, and adapter inspection."""
