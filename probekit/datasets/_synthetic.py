"""The two papers' synthetic data models, as arrays and as built-in datasets.

* **Structured feature model** (Zhang et al., ICML 2024, "feature contamination"): a core feature
  vector that carries the label and a background vector drawn independently of it, mixed into input
  space by a matrix ``V`` with orthonormal rows, ``x = [x_core, x_bg] V``. The OOD set keeps
  ``x_core`` and ``y`` and flips the background's sign, so every difference between ID and OOD lies
  in the background subspace, whose basis (``V``'s last rows) is known exactly.
* **XOR-like clusters** (Tsoy & Konstantinov, ICML 2024, "simplicity bias"): four tight clusters,
  class 0 at ``±mu e1`` and class 1 at ``±mu e2`` (symmetric) or at ``±mu (cos a, sin a)`` (skewed).

Everything is numpy and seeded; no model code lives here (the trainers are in
:mod:`probekit.experiments`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import DataError
from ..vocab import CROSSED_SPLIT, crossed_split_name
from ._registry import old_n_stress

__all__ = [
    "StructuredDataset",
    "StructuredFeatures",
    "XORDataset",
    "gen_skew_data",
    "gen_sym_data",
    "make_structured",
    "structured_basis",
    "xor_axes",
]

# Stream ids: each purpose draws from its own seeded stream, so adding a split never changes another.
_STREAM_BASIS, _STREAM_TRAIN, _STREAM_TEST, _STREAM_CROSSED = 0, 1, 2, 3


def _check_positive_int(name: str, value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(
            f"The {name!r} parameter of {where} must be an int >= {minimum}. Got {value!r} instead."
        )
    return int(value)


def structured_basis(d_core: int = 32, d_bg: int = 32, d: int = 256, *, seed: int = 0) -> np.ndarray:
    """The mixing matrix ``V`` of the structured feature model.

    ``V`` has orthonormal rows: it is ``Vt`` of the thin SVD of a ``(d_core + d_bg, d)`` standard
    Gaussian matrix. Rows ``[:d_core]`` span the core subspace of input space, rows ``[d_core:]`` the
    background subspace.

    Returns
    -------
    V : ndarray of shape (d_core + d_bg, d)
    """
    d_core = _check_positive_int("d_core", d_core, "structured_basis")
    d_bg = _check_positive_int("d_bg", d_bg, "structured_basis")
    d = _check_positive_int("d", d, "structured_basis")
    if d < d_core + d_bg:
        raise DataError(
            f"The 'd' parameter of structured_basis must be >= d_core + d_bg = {d_core + d_bg} so that "
            f"V can have orthonormal rows. Got {d} instead."
        )
    rng = np.random.default_rng([seed, _STREAM_BASIS])
    g = rng.standard_normal((d_core + d_bg, d))
    _, _, vt = np.linalg.svd(g, full_matrices=False)
    return vt


@dataclass(frozen=True)
class StructuredFeatures:
    """One draw of the structured feature model.

    Attributes
    ----------
    X : ndarray of shape (n, d)
        ID inputs ``[x_core, x_bg] V``.
    X_ood : ndarray of shape (n, d)
        OOD inputs ``[x_core, x_bg_ood] V``: same core and label, shifted background.
    y : ndarray of shape (n,)
        Labels in {-1, +1} (the paper's convention; the datasets expose ``(y + 1) // 2``).
    x_core, x_bg, x_bg_ood : ndarray
        The feature coordinates, of shapes (n, d_core), (n, d_bg), (n, d_bg).
    V : ndarray of shape (d_core + d_bg, d)
        The mixing matrix with orthonormal rows.
    """

    X: np.ndarray
    X_ood: np.ndarray
    y: np.ndarray
    x_core: np.ndarray
    x_bg: np.ndarray
    x_bg_ood: np.ndarray
    V: np.ndarray

    @property
    def d_core(self) -> int:
        return int(self.x_core.shape[1])

    @property
    def core_basis(self) -> np.ndarray:
        """Orthonormal basis of the core subspace of input space, shape (d_core, d)."""
        return self.V[: self.d_core]

    @property
    def bg_basis(self) -> np.ndarray:
        """Orthonormal basis of the background subspace of input space, shape (d_bg, d)."""
        return self.V[self.d_core :]


def _sample_core(rng: np.random.Generator, y: np.ndarray, d_core: int, nonlinear: bool) -> np.ndarray:
    n = len(y)
    if nonlinear:
        g = rng.standard_normal((n, d_core))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        radius = np.where(y > 0, 1.0, 2.0)[:, None]
        return g * radius
    u = rng.uniform(0.0, 1.0, size=(n, d_core))
    return u * np.where(y > 0, 1.0, -1.0)[:, None]


def make_structured(
    n: int = 1000,
    *,
    d_core: int = 32,
    d_bg: int = 32,
    d: int = 256,
    nonlinear: bool = True,
    bg_shift: Literal["flip", "shift"] = "flip",
    seed: int = 0,
    stream: int = _STREAM_TRAIN,
    V: np.ndarray | None = None,
) -> StructuredFeatures:
    """Draw ``n`` points of the structured feature model (feature-contamination paper, ``toy.py``).

    Labels: half +1, half -1 (shuffled). Core ``x_core`` in R^d_core: with ``nonlinear=True`` a point
    on the unit sphere for y = +1 and on the radius-2 sphere for y = -1 (not linearly separable);
    with ``nonlinear=False`` ``U[0,1]^d_core`` for y = +1 and ``-U[0,1]^d_core`` for y = -1.
    Background ``x_bg ~ U[0,1]^d_bg`` independent of y. OOD: the same ``x_core`` and ``y`` with
    ``x_bg_ood = -U[0,1]^d_bg`` (``bg_shift="flip"``, the paper's) or ``U[1,2]^d_bg``
    (``bg_shift="shift"``). Inputs ``x = [x_core, x_bg] V``.

    Parameters
    ----------
    n : int
        Number of points (even).
    d_core, d_bg, d : int
        Feature and input dimensions.
    nonlinear : bool
        Non-linear (two spheres) or linearly separable core.
    bg_shift : {"flip", "shift"}
        How the OOD background is drawn.
    seed : int
        Seeds ``V`` (unless given) and the draw.
    stream : int
        Which independent sample stream of ``seed`` to draw from (train = 1, test = 2).
    V : ndarray of shape (d_core + d_bg, d), optional
        A mixing matrix to reuse; by default ``structured_basis(d_core, d_bg, d, seed=seed)``.
    """
    n = _check_positive_int("n", n, "make_structured", minimum=2)
    if n % 2:
        raise DataError(f"The 'n' parameter of make_structured must be even (half per class). Got {n}.")
    if bg_shift not in ("flip", "shift"):
        raise DataError(
            f"The 'bg_shift' parameter of make_structured must be one of {{'flip', 'shift'}}. "
            f"Got {bg_shift!r} instead."
        )
    if V is None:
        V = structured_basis(d_core, d_bg, d, seed=seed)
    V = np.asarray(V, dtype=np.float64)
    if V.shape != (d_core + d_bg, d):
        raise DataError(
            f"The 'V' parameter of make_structured must have shape {(d_core + d_bg, d)}. "
            f"Got {V.shape} instead."
        )
    rng = np.random.default_rng([seed, stream])
    y = np.repeat([1, -1], n // 2)
    y = y[rng.permutation(n)]
    x_core = _sample_core(rng, y, d_core, nonlinear)
    x_bg = rng.uniform(0.0, 1.0, size=(n, d_bg))
    u = rng.uniform(0.0, 1.0, size=(n, d_bg))
    x_bg_ood = -u if bg_shift == "flip" else 1.0 + u
    X = np.concatenate([x_core, x_bg], axis=1) @ V
    X_ood = np.concatenate([x_core, x_bg_ood], axis=1) @ V
    return StructuredFeatures(X, X_ood, y.astype(np.int64), x_core, x_bg, x_bg_ood, V)


class StructuredDataset:
    """The structured feature model as a dataset of dict items (built-in ``"structured"``).

    Splits: ``train`` (ID), ``train_ood`` (the training cores and labels with flipped backgrounds:
    the paper's OOD set), ``test_id`` (a fresh ID draw), ``test_ood`` (``test_id``'s cores with
    flipped backgrounds; row i of both shares the core), ``crossed`` (each ``test_id`` core on
    ``n_backgrounds`` backgrounds from ``U[-1,1]^d_bg``, ``group`` = the core's row; the backgrounds
    are drawn per row, so the split is grouped but not fully crossed: the audit reads its background
    sensitivity, not the two-way decomposition). ``stress``, the split's old name, and ``n_stress``
    are still read, with a FutureWarning.

    Items are ``{"x": float32 tensor (d,), "label": 0 | 1, "factors": float32 tensor (d_bg,)}`` (plus
    ``"group"`` on ``crossed``); the factors are the background coordinates ``x_bg``. Attributes
    ``V``, ``core_basis``, ``bg_basis`` give the ground-truth subspaces.
    """

    splits = ("train", "train_ood", "test_id", "test_ood", CROSSED_SPLIT)

    def __init__(
        self,
        split: str = "train",
        *,
        n: int = 1000,
        d_core: int = 32,
        d_bg: int = 32,
        d: int = 256,
        nonlinear: bool = True,
        seed: int = 0,
        n_backgrounds: int = 8,
        n_stress: int | None = None,
    ) -> None:
        split = crossed_split_name(split, "StructuredDataset")
        n_backgrounds = old_n_stress(n_stress, n_backgrounds, "StructuredDataset")
        if split not in self.splits:
            raise DataError(
                f"The structured dataset has no split {split!r}; its splits are {list(self.splits)}."
            )
        self.split = split
        self.V = structured_basis(d_core, d_bg, d, seed=seed)
        self.core_basis = self.V[:d_core]
        self.bg_basis = self.V[d_core:]
        self.factor_names = [f"bg{i}" for i in range(d_bg)]
        self.has_label = True
        self.has_group = split == CROSSED_SPLIT
        stream = _STREAM_TRAIN if split in ("train", "train_ood") else _STREAM_TEST
        data = make_structured(
            n, d_core=d_core, d_bg=d_bg, d=d, nonlinear=nonlinear, seed=seed, stream=stream, V=self.V
        )
        self.group: np.ndarray | None = None
        if split in ("train", "test_id"):
            X, bg, y = data.X, data.x_bg, data.y
        elif split in ("train_ood", "test_ood"):
            X, bg, y = data.X_ood, data.x_bg_ood, data.y
        else:
            k = _check_positive_int("n_backgrounds", n_backgrounds, "StructuredDataset")
            rng = np.random.default_rng([seed, _STREAM_CROSSED])
            core = np.repeat(data.x_core, k, axis=0)
            bg = rng.uniform(-1.0, 1.0, size=(len(core), d_bg))
            X = np.concatenate([core, bg], axis=1) @ self.V
            y = np.repeat(data.y, k)
            self.group = np.repeat(np.arange(n), k)
        self.X = X.astype(np.float32)
        self.factors = bg.astype(np.float32)
        self.labels = ((y + 1) // 2).astype(np.int64)

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        item: dict[str, Any] = {
            "x": torch.from_numpy(self.X[i]),
            "label": int(self.labels[i]),
            "factors": torch.from_numpy(self.factors[i]),
        }
        if self.group is not None:
            item["group"] = int(self.group[i])
        return item


# ---------------------------------------------------------------------------------------------
# XOR-like clusters (simplicity-bias paper, train_xor.py semantics)


def _reflect(x: np.ndarray, dims: slice | int) -> np.ndarray:
    r = x.copy()
    r[:, dims] = -r[:, dims]
    return np.vstack([x, r])


def gen_sym_data(
    n: int = 256,
    d: int = 2,
    mu: float = 1.0,
    delta: float = 0.01,
    sigma: float = 0.005,
    *,
    seed: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric XOR: class 0 at ``±mu e1``, class 1 at ``±mu e2``, exactly symmetric.

    ``n // 16`` Gaussian draws ``z ~ N(0, sigma^2 I_d)`` are kept where ``||z|| < delta``, shifted by
    ``mu e1`` and reflected in ``x1``, then ``x2``, then ``x3..d`` (class 0, 8 copies); class 1 is
    class 0 with coordinates 1 and 2 swapped. About ``n`` points (fewer where draws were truncated).

    Returns
    -------
    X : ndarray of shape (n_points, d), float64
    y : ndarray of shape (n_points,), int64 in {0, 1}
    """
    n = _check_positive_int("n", n, "gen_sym_data", minimum=16)
    d = _check_positive_int("d", d, "gen_sym_data", minimum=2)
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, sigma, size=(n // 16, d))
    z = z[(z**2).sum(1) < delta**2]
    z[:, 0] += mu
    x = _reflect(z, 0)
    x = _reflect(x, 1)
    x = _reflect(x, slice(2, None)) if d > 2 else np.vstack([x, x])
    swapped = x.copy()
    swapped[:, [0, 1]] = x[:, [1, 0]]
    X = np.vstack([x, swapped])
    y = np.repeat(np.array([0, 1], dtype=np.int64), len(x))
    return X, y


def gen_skew_data(
    n: int = 512,
    d: int = 2,
    mu: float = 1.0,
    delta: float = 0.2,
    sigma: float | None = None,
    alpha: float = math.pi / 3,
    *,
    seed: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Skewed XOR: class 0 at ``±mu e1``, class 1 at ``±mu (cos alpha, sin alpha)``.

    ``n // 4`` draws ``z ~ N(0, sigma^2 I_d)`` (``sigma = 0.1 / sqrt(d)`` by default) are kept where
    ``||z_{1:2}|| < delta``, shifted by ``mu e1`` and reflected in ``x1`` (class 0); class 1 is class 0
    times the reflection ``R_alpha = [[cos a, sin a], [sin a, -cos a]]`` in the first two coordinates.
    ``alpha = pi/2`` is XOR, ``pi/3`` the paper's skewed XOR.

    Returns
    -------
    X : ndarray of shape (n_points, d), float64
    y : ndarray of shape (n_points,), int64 in {0, 1}
    """
    n = _check_positive_int("n", n, "gen_skew_data", minimum=4)
    d = _check_positive_int("d", d, "gen_skew_data", minimum=2)
    if sigma is None:
        sigma = 0.1 / math.sqrt(d)
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, sigma, size=(n // 4, d))
    z = z[(z[:, :2] ** 2).sum(1) < delta**2]
    z[:, 0] += mu
    x = _reflect(z, 0)
    rot = np.eye(d)
    c, s = math.cos(alpha), math.sin(alpha)
    rot[:2, :2] = [[c, s], [s, -c]]
    X = np.vstack([x, x @ rot])
    y = np.repeat(np.array([0, 1], dtype=np.int64), len(x))
    return X, y


def xor_axes(alpha: float = math.pi / 2) -> np.ndarray:
    """Unit directions of the four cluster centres: ``±e1`` (class 0), ``±(cos a, sin a)`` (class 1).

    Returns
    -------
    axes : ndarray of shape (4, 2)
    """
    c, s = math.cos(alpha), math.sin(alpha)
    return np.array([[1.0, 0.0], [-1.0, 0.0], [c, s], [-c, -s]])


class XORDataset:
    """XOR-like clusters as a dataset of dict items (built-in ``"xor"``).

    ``kind="sym"`` uses :func:`gen_sym_data`, ``kind="skew"`` :func:`gen_skew_data` with ``alpha``.
    Splits ``train`` and ``test`` are independent draws (data seeds ``seed`` and ``seed + 1``).
    Items are ``{"x": float32 tensor (d,), "label": 0 | 1}``.
    """

    splits = ("train", "test")

    def __init__(
        self,
        split: str = "train",
        *,
        kind: Literal["sym", "skew"] = "sym",
        n: int | None = None,
        d: int = 2,
        alpha: float = math.pi / 3,
        seed: int = 100,
    ) -> None:
        if split not in self.splits:
            raise DataError(f"The xor dataset has no split {split!r}; its splits are {list(self.splits)}.")
        data_seed = seed if split == "train" else seed + 1
        if kind == "sym":
            X, y = gen_sym_data(n or 256, d, seed=data_seed)
            self.axes = xor_axes(math.pi / 2)
        elif kind == "skew":
            X, y = gen_skew_data(n or 512, d, alpha=alpha, seed=data_seed)
            self.axes = xor_axes(alpha)
        else:
            raise DataError(
                f"The 'kind' parameter of the xor dataset must be one of {{'sym', 'skew'}}. Got {kind!r} instead."
            )
        self.split = split
        self.X = X
        self.labels = y
        self.has_label = True
        self.has_group = False

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} items")
        return {"x": torch.tensor(self.X[i], dtype=torch.float32), "label": int(self.labels[i])}
