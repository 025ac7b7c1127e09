"""Integrations with the libraries that run the language model: transformers' LLaVA
(hf_llava.py) and LLaVA-OneVision (hf_onevision.py), and what they share (common.py)."""
