"""Extractors: forward hooks on any nn.Module -> pooled activations -> a store."""
