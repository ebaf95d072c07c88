"""Analyses: store (or arrays) -> numbers."""
