"""Helpers for tests of code that takes store data (ours, and users' own analyses).

:func:`probe_objective_gradient` is an independent float64 oracle of a fitted
:class:`probekit.analyses.LinearProbe`'s optimality: the gradient of its objective, written out by hand.

:class:`ArrayActivations` wraps an in-memory array in the interface of a lazy store dataset
(:class:`probekit.store.Activations`: ``shape``, ``n_rows``, ``iter_chunks``, indexing), so an
analysis can be checked on its streamed path against a float64 oracle without writing a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["ArrayActivations", "probe_objective_gradient"]


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


def probe_objective_gradient(probe: Any, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of ``(C sum_i loss_i + ||W||^2 / 2) / (C n)`` at a fitted LinearProbe, in standardised
    space, float64 (softmax cross-entropy; one logistic output for two classes, like scikit-learn).
    A probe fitted to ``tol`` has every entry at most ``tol`` in absolute value."""
    Z = (X - probe.scaler_mean_) / probe.scaler_scale_
    W = probe.coef_ * probe.scaler_scale_
    b = probe.intercept_ + probe.coef_ @ probe.scaler_mean_
    idx = np.searchsorted(probe.classes_, y)
    n, K = Z.shape[0], probe.classes_.size
    logits = Z @ W.T + b
    if K == 2:
        P = (1.0 / (1.0 + np.exp(-logits[:, 0])) - idx)[:, None]
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        P = e / e.sum(axis=1, keepdims=True) - np.eye(K)[idx]
    return np.concatenate([(P.T @ Z / n + W / (probe.C_ * n)).ravel(), P.sum(axis=0) / n])
