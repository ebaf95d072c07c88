"""Built-in datasets and data loading."""
