"""Helpers for tests of code that takes store data (ours, and users' own analyses).

:class:`ArrayActivations` wraps an in-memory array in the interface of a lazy store dataset
(:class:`probekit.store.Activations`: ``shape``, ``n_rows``, ``iter_chunks``, indexing), so an
analysis can be checked on its streamed path against a float64 oracle without writing a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["ArrayActivations"]


class ArrayActivations:
    """An array seen through the lazy-dataset interface; ``iter_chunks`` yields ``default_rows`` rows."""

    def __init__(self, a: np.ndarray, default_rows: int = 64) -> None:
        self._a = a
        self.shape = a.shape
        self.dtype = a.dtype
        self.n_rows = a.shape[0]
        self.default_rows = default_rows

    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        rows = rows or self.default_rows
        for s in range(0, self.n_rows, rows):
            yield s, self._a[s:s + rows]

    def __getitem__(self, k: Any) -> np.ndarray:
        return self._a[k]

    def __len__(self) -> int:
        return self.n_rows
