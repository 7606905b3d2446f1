"""Memorisation and quality measures for fine-tuned SDXL models (``sdxl-ambient memorization`` / ``quality``)."""
