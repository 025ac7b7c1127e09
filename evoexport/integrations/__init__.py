"""Integrations with the libraries that run the language model (transformers today)."""
