"""Reproducible experiments of the two papers."""
