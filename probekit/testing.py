"""Helpers for tests: a pytest gate on a model's background reliance, and helpers for tests of code that
takes store data (ours, and users' own analyses).

:func:`assert_no_background_shortcut` audits a model on a folder of images with foregrounds (as
``probekit audit`` does) and raises ``AssertionError`` with the verdict sentence when the model relies on
the background, or when the audit could not judge it (a gate never passes a model it could not judge).

:func:`probe_objective_gradient` is an independent float64 oracle of a fitted
:class:`probekit.analyses.LinearProbe`'s optimality: the gradient of its objective, written out by hand.

:class:`ArrayActivations` wraps an in-memory array in the interface of a lazy store dataset
(:class:`probekit.store.Activations`: ``shape``, ``n_rows``, ``iter_chunks``, indexing), so an
analysis can be checked on its streamed path against a float64 oracle without writing a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ArrayActivations", "assert_no_background_shortcut", "probe_objective_gradient"]


def assert_no_background_shortcut(
    model: Any,
    data: Any,
    *,
    masks: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    foreground: str | None = None,
    weights: str | os.PathLike | None = None,
    name: str = "model",
    out: str | os.PathLike | None = None,
    n_inits: int = 0,
    **audit_kwargs: Any,
) -> dict[str, Any]:
    """Fail the calling test when ``model`` relies on the background of ``data``'s images.

    Runs :func:`probekit.audit_model` (the verdict of ``probekit audit``) and reads the model's shortcut
    finding: ``flagged`` true raises ``AssertionError`` with the verdict sentence; ``flagged`` null (the
    audit could not judge it, e.g. too few objects or no class folders) raises ``AssertionError`` with the
    reason, since a gate must not pass a model it could not judge. Other findings (background-sensitive,
    representation) do not fail it; they are in the returned document.

    Parameters
    ----------
    model : MODEL spec (``timm:NAME``, ``package.module:callable``, ...) or torch.nn.Module
        A classifier whose output has one score per class of the folder.
    data : str, PathLike or probekit.datasets.Counterfactuals
        The image folder (``DIR/<class>/<image>``), or counterfactuals already built on one (their folder,
        seed, number of backgrounds and test fraction are used; give no masks / boxes then).
    masks, boxes, foreground : the foreground, as for :func:`probekit.audit_model`
    weights : checkpoint of ``model``
    name : the model's name in the messages and the report
    out : folder for the store, ``audit.json`` and ``report.html``. By default a temporary folder, removed
        when the model passes and kept (its path in the message) when it fails.
    n_inits : seeded initialisations extracted as the representation's reference; 0 by default, since
        only the shortcut is asserted (the representation finding then reads "not judged").
    **audit_kwargs : passed to :func:`probekit.audit_model` (``n_backgrounds``, ``seed``, ``device``, ...)

    Returns
    -------
    dict
        The audit document (docs/REPORT_SCHEMA.md), when the model passes.
    """
    from .datasets import Counterfactuals
    from .model_audit import audit_model
    from .report import model_verdicts

    if isinstance(data, Counterfactuals):
        if masks is not None or boxes is not None or foreground is not None:
            raise ValueError("assert_no_background_shortcut: the counterfactuals already hold their foreground; "
                             "give no masks=, boxes= or foreground= with them.")
        for key, value in (("seed", data.seed), ("n_backgrounds", data.n_backgrounds),
                           ("test_fraction", data.test_fraction)):
            audit_kwargs.setdefault(key, value)
        if data.folder.mode != "masks":  # the mask check rebuilds the folder from its path and options
            audit_kwargs.setdefault("mask_check", 0)
        data = data.folder
    audit_kwargs.setdefault("progress", False)
    temporary = out is None
    folder = Path(tempfile.mkdtemp(prefix="probekit-audit-")) if temporary else Path(out)
    result = audit_model(model, data, masks=masks, boxes=boxes, foreground=foreground, weights=weights,
                         name=name, out=folder, n_inits=n_inits, **audit_kwargs)
    doc = result.data
    v = next(v for v in model_verdicts(doc) if v.model == name)
    where = f" (report: {folder / 'report.html'})"
    if v.status == "flagged":
        raise AssertionError(f"{v.verdict}{where}")
    if v.status == "not_judged":
        raise AssertionError(f"The audit could not judge whether {name} relies on the background: "
                             f"{v.reason}{where}")
    if temporary:
        shutil.rmtree(folder, ignore_errors=True)
    return doc


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
