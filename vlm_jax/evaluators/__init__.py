"""Evaluators: zero-shot classification (more in later issues)."""
