"""Handwritten digits (scikit-learn ``load_digits``): data split, a small CNN and its teacher training."""
