"""Tokenizers and text: calibration and evaluation corpora."""
