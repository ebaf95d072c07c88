"""Neuron weight directions: clustering on the sphere, projections on known bases, patch bases."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from probekit.errors import DataError

from ._common import FitFirstError, ResultMixin, as_source, check_number, check_option

__all__ = [
    "DirectionClusters",
    "DirectionClustersResult",
    "DirectionSeriesResult",
    "PatchBasesResult",
    "WeightProjectionResult",
    "direction_series",
    "patch_bases",
    "projection_series",
    "weight_projections",
]


def _weights(W: Any, name: str = "W") -> np.ndarray:
    src = as_source(W, name, min_rows=1)
    return src.load()


#: Tolerances (degrees) at which :class:`DirectionClusters` reports the count's stability.
DEFAULT_STABILITY_TOLS = (5.0, 10.0, 15.0, 20.0, 30.0)


@dataclasses.dataclass(repr=False)
class DirectionClustersResult(ResultMixin):
    """Summary of a :class:`DirectionClusters` fit (clusters sorted by mass share, largest first).

    ``stability_n_directions[i]`` is the count at ``stability_tol_degrees[i]``; ``stable`` is False
    when those counts differ by more than a factor of 2 (then ``note`` says so, and the count at
    ``tol_degrees`` alone is not a property of the weights).
    """

    n_directions: int
    n_clusters: int
    n_units: int
    n_zero_units: int
    mass: float
    tol_degrees: float
    shares: np.ndarray
    spread_degrees: np.ndarray
    centers: np.ndarray
    stability_tol_degrees: list[float]
    stability_n_directions: list[int]
    stable: bool
    note: str | None


class DirectionClusters(BaseEstimator):
    r"""Cluster neuron weight rows by direction on the unit sphere.

    Each row :math:`w_j` (a unit's incoming weights) becomes :math:`u_j = w_j/\lVert w_j\rVert` with
    mass :math:`m_j = \lVert w_j\rVert^2`. Directions are grouped greedily in order of decreasing
    mass (a unit joins the first centre within angle ``tol``, else starts a new one), then refined by
    mass-weighted spherical k-means (:math:`c_k \propto \sum_{j\in k} m_j u_j`) and merging of centres
    closer than ``tol``, until stable. The angle is :math:`\arccos(u_j\cdot c_k)`, so antipodal
    directions are distinct. Cluster share :math:`s_k = \sum_{j\in k} m_j / \sum_j m_j`; the number
    of distinct directions is the smallest :math:`K` with :math:`\sum_{k\le K} s_{(k)} \ge` ``mass``
    (shares sorted decreasing). Spread: mean angle (degrees) of a cluster's units to its centre.
    Zero rows carry no direction (label -1, counted in ``n_zero_units``). The count depends on the
    data's directions, not on the number of units.

    **Stability over the tolerance.** The count is only a property of the weights when it does not
    hinge on ``tol``: weights concentrated on :math:`k` directions (angular spread well below the
    tolerances, directions far apart) give :math:`k` at every tolerance, while directions spread
    over the sphere (e.g. isotropic weights in a low-dimensional input space) give a count that
    falls steadily as ``tol`` grows (roughly as the number of caps of radius ``tol`` needed to cover
    them). The fit therefore repeats the clustering at each of ``stability_tols``
    (:math:`K(\tau)`, ``stability_``) and sets ``stable_ = max K(\tau) <= 2 min K(\tau)``; when
    False, ``result_.note`` says that the count swings and by how much. Report ``n_directions_``
    with ``stability_``.

    Parameters
    ----------
    tol : float, default=10.0
        Angle in degrees within which two directions are the same.
    mass : float, default=0.9
        Share of the squared weight norm the counted directions must carry.
    max_iter : int, default=20
        Refinement rounds.
    stability_tols : sequence of float, default=(5, 10, 15, 20, 30)
        Tolerances (degrees) at which the count is repeated; ``()`` skips the check (one fit).

    Attributes
    ----------
    n_directions_ : int
    centers_ : ndarray of shape (n_clusters, fan_in)
        Unit-norm centres, sorted by share.
    shares_ : ndarray of shape (n_clusters,)
    spread_ : ndarray of shape (n_clusters,)
        Mean angle to the centre, degrees.
    labels_ : ndarray of shape (n_units,)
    stability_ : dict of float to int
        ``{tol_degrees: n_directions}`` over ``stability_tols`` (and ``tol``).
    stable_ : bool
        Whether the counts in ``stability_`` agree within a factor of 2.
    result_ : DirectionClustersResult
    """

    def __init__(self, *, tol: float = 10.0, mass: float = 0.9, max_iter: int = 20,
                 stability_tols: Any = DEFAULT_STABILITY_TOLS) -> None:
        self.tol = tol
        self.mass = mass
        self.max_iter = max_iter
        self.stability_tols = stability_tols

    def fit(self, W: Any, y: Any = None) -> DirectionClusters:
        """Cluster the rows of ``W`` of shape (n_units, fan_in) (array or store weights)."""
        own = type(self).__name__
        check_number(own, "tol", self.tol, low=0, high=180, low_open=True)
        check_number(own, "mass", self.mass, low=0, high=1, low_open=True)
        check_number(own, "max_iter", self.max_iter, low=0, integer=True)
        try:
            tols = [float(t) for t in self.stability_tols]
        except (TypeError, ValueError) as e:
            raise DataError(
                f"stability_tols must be a sequence of angles in degrees, e.g. (5, 10, 20); got {self.stability_tols!r}."
            ) from e
        for t in tols:
            check_number(own, "stability_tols entry", t, low=0, high=180, low_open=True)
        W = _weights(W)
        m = (W * W).sum(axis=1)
        zero = m <= 1e-24 * max(m.max(), 1e-300)
        if zero.all():
            raise DataError(f"All {W.shape[0]} weight rows are zero; there is no direction to cluster.")
        idx = np.flatnonzero(~zero)
        U = W[idx] / np.sqrt(m[idx])[:, None]
        mass = m[idx]
        lab, C, shares, n_dir = self._cluster(U, mass, float(self.tol))
        ang = np.degrees(np.arccos(np.clip((U * C[lab]).sum(axis=1), -1.0, 1.0)))
        spread = np.array([ang[lab == k].mean() for k in range(C.shape[0])])
        labels = np.full(W.shape[0], -1)
        labels[idx] = lab
        self.centers_, self.shares_, self.spread_, self.labels_ = C, shares, spread, labels
        self.n_directions_ = n_dir
        self.n_clusters_ = C.shape[0]
        stab = {float(self.tol): n_dir}
        for t in sorted(set(tols) - {float(self.tol)}):
            stab[t] = self._cluster(U, mass, t)[3]
        self.stability_ = dict(sorted(stab.items()))
        lo, hi = min(self.stability_.values()), max(self.stability_.values())
        self.stable_ = bool(hi <= 2 * lo)
        note = None
        if not self.stable_:
            ts = list(self.stability_)
            note = (f"n_directions ranges {lo}..{hi} over tol {ts[0]:g}..{ts[-1]:g} degrees (more than a factor "
                    "of 2): the directions are spread rather than clustered, so the count reflects the "
                    "tolerance; report it with its tolerance or as a spread.")
        self.result_ = DirectionClustersResult(
            n_directions=self.n_directions_, n_clusters=self.n_clusters_, n_units=int(W.shape[0]),
            n_zero_units=int(zero.sum()), mass=float(self.mass), tol_degrees=float(self.tol),
            shares=shares, spread_degrees=spread, centers=C,
            stability_tol_degrees=list(self.stability_), stability_n_directions=list(self.stability_.values()),
            stable=self.stable_, note=note,
        )
        return self

    def _cluster(self, U: np.ndarray, mass: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Labels, centres and shares (sorted by share) and the count at angle ``tol`` (degrees)."""
        cos_tol = math.cos(math.radians(tol))
        # greedy leader pass in order of decreasing mass: a unit joins its most similar centre if that
        # is within tol, else becomes a centre. Blocks of units are compared with the centres found
        # before the block in one product, and with the block's own new centres one by one.
        order = np.argsort(-mass, kind="stable")
        lab = np.empty(U.shape[0], dtype=int)
        C = np.empty((U.shape[0], U.shape[1]))
        nc = 0
        for b0 in range(0, order.size, 256):
            blk = order[b0:b0 + 256]
            n0 = nc
            if n0:
                S = U[blk] @ C[:n0].T
                best_k = np.argmax(S, axis=1)
                best_v = S[np.arange(blk.size), best_k]
            Gb = U[blk] @ U[blk].T
            new_pos: list[int] = []  # block positions that became centres n0, n0 + 1, ...
            for i, j in enumerate(blk):
                k, v = (int(best_k[i]), best_v[i]) if n0 else (-1, -np.inf)
                if new_pos:
                    g = Gb[i, new_pos]
                    q = int(np.argmax(g))
                    if g[q] > v:
                        k, v = n0 + q, g[q]
                if v >= cos_tol:
                    lab[j] = k
                    continue
                C[nc] = U[j]
                lab[j] = nc
                new_pos.append(i)
                nc += 1
        for _ in range(self.max_iter):
            lab = self._compact(self._merge(self._centres(U, mass, lab), mass, lab, cos_tol))
            C = self._centres(U, mass, lab)
            sims = U @ C.T
            new = np.argmax(sims, axis=1)
            far = sims.max(axis=1) < cos_tol  # a unit farther than tol from every centre: its own cluster
            new[far] = C.shape[0] + np.arange(far.sum())
            new = self._compact(new)
            if np.array_equal(new, lab):
                break
            lab = new
        lab = self._compact(lab)
        C = self._centres(U, mass, lab)
        shares = np.bincount(lab, weights=mass, minlength=C.shape[0]) / mass.sum()
        ordr = np.argsort(-shares, kind="stable")
        rank = np.empty_like(ordr)
        rank[ordr] = np.arange(ordr.size)
        lab = rank[lab]
        C, shares = C[ordr], shares[ordr]
        n_dir = int(np.searchsorted(np.cumsum(shares), self.mass - 1e-12) + 1)
        return lab, C, shares, min(n_dir, C.shape[0])

    @staticmethod
    def _compact(lab: np.ndarray) -> np.ndarray:
        return np.unique(lab, return_inverse=True)[1].ravel()

    @staticmethod
    def _centres(U: np.ndarray, mass: np.ndarray, lab: np.ndarray) -> np.ndarray:
        C = np.zeros((int(lab.max()) + 1, U.shape[1]))
        np.add.at(C, lab, U * mass[:, None])
        norm = np.linalg.norm(C, axis=1)
        norm[norm == 0] = 1.0
        return C / norm[:, None]

    @staticmethod
    def _merge(C: np.ndarray, mass: np.ndarray, lab: np.ndarray, cos_tol: float) -> np.ndarray:
        """Map each centre to the first heavier kept centre within ``tol`` (heaviest first)."""
        w = np.bincount(lab, weights=mass, minlength=C.shape[0])
        order = np.argsort(-w, kind="stable")
        target = np.arange(C.shape[0])
        G = C @ C.T
        kept = np.empty(C.shape[0], dtype=np.int64)
        nk = 0
        for k in order:
            if w[k] == 0:
                continue
            hit = np.flatnonzero(G[k, kept[:nk]] >= cos_tol)
            if hit.size:
                target[k] = kept[hit[0]]
            else:
                kept[nk] = k
                nk += 1
        return target[lab]

    def alignment(self, references: Any) -> np.ndarray:
        """Cosine of each centre with each reference direction: array (n_clusters, n_references)."""
        if not hasattr(self, "centers_"):
            raise FitFirstError("This DirectionClusters instance is not fitted yet. Call 'fit' first.")
        R = np.atleast_2d(np.asarray(references, dtype=np.float64))
        if R.shape[1] != self.centers_.shape[1]:
            raise DataError(
                f"references have {R.shape[1]} entries per row but the weight rows have "
                f"{self.centers_.shape[1]} (fan_in); pass directions in the layer's input space."
            )
        norm = np.linalg.norm(R, axis=1)
        if (norm == 0).any():
            raise DataError("A reference direction is the zero vector; pass non-zero directions.")
        return self.centers_ @ (R / norm[:, None]).T

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "result_"):
            raise FitFirstError("This DirectionClusters instance is not fitted yet. Call 'fit' first.")
        return self.result_.to_dict()


# =================================================================================================
@dataclasses.dataclass(repr=False)
class WeightProjectionResult(ResultMixin):
    """Mean projection norms of neuron rows on a core and a background basis."""

    core: float
    background: float
    core_init: float | None
    background_init: float | None
    core_change: float | None
    background_change: float | None
    core_ratio: float | None
    background_ratio: float | None
    n_units: int
    k_core: int
    k_background: int


def _basis(B: Any, name: str, fan_in: int) -> np.ndarray:
    B = np.atleast_2d(np.asarray(B, dtype=np.float64))
    if B.shape[1] != fan_in:
        raise DataError(f"{name} has {B.shape[1]} columns but the weight rows have fan_in {fan_in}.")
    if not np.isfinite(B).all():
        raise DataError(f"{name} contains NaN or inf.")
    G = B @ B.T
    if not np.allclose(G, np.eye(B.shape[0]), atol=1e-6):
        raise DataError(
            f"{name} rows are not orthonormal (max |B B^T - I| = {np.abs(G - np.eye(len(G))).max():.2g}). "
            "Orthonormalise them first, e.g. np.linalg.qr(B.T)[0].T."
        )
    return B


def weight_projections(W: Any, core_basis: Any, bg_basis: Any, W_init: Any = None) -> WeightProjectionResult:
    r"""Mean norm of each neuron row's projection on a core and a background subspace.

    With orthonormal bases :math:`C` (rows = core directions) and :math:`B` (background),
    ``core`` = :math:`\frac1m\sum_j \lVert C w_j\rVert`, ``background`` =
    :math:`\frac1m\sum_j \lVert B w_j\rVert` (the feature-contamination paper's "average feature
    correlation", :math:`P = W V^\top`, corr = mean_j :math:`\lVert P_{j,\text{core}}\rVert`). With
    ``W_init``: the same at initialisation, the change (trained - init) and the ratio.
    """
    W = _weights(W)
    C = _basis(core_basis, "core_basis", W.shape[1])
    B = _basis(bg_basis, "bg_basis", W.shape[1])
    core = float(np.linalg.norm(W @ C.T, axis=1).mean())
    bg = float(np.linalg.norm(W @ B.T, axis=1).mean())
    ci = bi = None
    if W_init is not None:
        W0 = _weights(W_init, "W_init")
        if W0.shape != W.shape:
            raise DataError(f"W_init has shape {W0.shape} but W has {W.shape}; pass the same layer's init.")
        ci = float(np.linalg.norm(W0 @ C.T, axis=1).mean())
        bi = float(np.linalg.norm(W0 @ B.T, axis=1).mean())
    return WeightProjectionResult(
        core=core, background=bg, core_init=ci, background_init=bi,
        core_change=None if ci is None else core - ci, background_change=None if bi is None else bg - bi,
        core_ratio=None if not ci else core / ci, background_ratio=None if not bi else bg / bi,
        n_units=int(W.shape[0]), k_core=int(C.shape[0]), k_background=int(B.shape[0]),
    )


# =================================================================================================
@dataclasses.dataclass(repr=False)
class PatchBasesResult(ResultMixin):
    """Core (foreground) and background subspaces estimated from image patches."""

    core: np.ndarray
    background: np.ndarray
    core_explained: np.ndarray
    background_explained: np.ndarray
    principal_cosines: np.ndarray
    n_core_patches: int
    n_background_patches: int
    patch: int
    centered: bool


def patch_bases(images: Any, masks: Any, *, patch: int = 3, n_components: int = 3, center: bool = False,
                max_patches: int = 20000, random_state: int | None = 0) -> PatchBasesResult:
    r"""Estimate core vs background subspaces for first-layer conv filters from image patches.

    Every ``patch x patch`` window is flattened in the order of a conv filter
    (``weight.reshape(out, -1)``: channel, row, column). Windows entirely on background
    (``mask == 0``) and entirely on foreground (``mask == 1``) are collected (at most
    ``max_patches`` each, seeded subsample) and their top ``n_components`` principal directions
    (scikit-learn; uncentred second-moment directions by default, since the mean colour *is* the
    background signal a filter responds to; ``center=True`` for ordinary PCA) form the
    ``background`` and ``core`` bases (rows orthonormal). ``principal_cosines`` are the cosines of
    the principal angles between the two subspaces: near 1 means they share a direction (e.g. grey
    DC brightness), which weight projections cannot attribute. A research instrument: see
    docs/METRICS.md.

    Parameters
    ----------
    images : array of shape (n, channels, H, W)
    masks : array of shape (n, H, W) or (n, 1, H, W), 1 = foreground
    """
    from sklearn.decomposition import PCA, TruncatedSVD

    X = np.asarray(images, dtype=np.float64)
    M = np.asarray(masks)
    if X.ndim != 4:
        raise DataError(f"images must have shape (n, channels, H, W); got {X.shape}.")
    if M.ndim == 4 and M.shape[1] == 1:
        M = M[:, 0]
    if M.shape != (X.shape[0], X.shape[2], X.shape[3]):
        raise DataError(f"masks must have shape (n, H, W) = {(X.shape[0], X.shape[2], X.shape[3])}; got {M.shape}.")
    check_number("patch_bases", "patch", patch, low=1, high=min(X.shape[2:]), integer=True)
    D = X.shape[1] * patch * patch
    check_number("patch_bases", "n_components", n_components, low=1, high=D - 1, integer=True)
    if not np.isfinite(X).all():
        raise DataError("images contain NaN or inf.")
    win = np.lib.stride_tricks.sliding_window_view(X, (patch, patch), axis=(2, 3))  # n,C,H',W',p,p
    win = win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, D)
    mw = np.lib.stride_tricks.sliding_window_view(M.astype(bool), (patch, patch), axis=(1, 2))
    mw = mw.reshape(-1, patch * patch)
    fg, bg = mw.all(axis=1), ~mw.any(axis=1)
    rng = np.random.default_rng(random_state)
    out = {}
    for name, sel in (("core", fg), ("background", bg)):
        rows = np.flatnonzero(sel)
        if rows.size < n_components + 1:
            raise DataError(
                f"Only {rows.size} {name} patches of {patch}x{patch} lie entirely on "
                f"{'foreground' if name == 'core' else 'background'}; need more than {n_components}. "
                "Use a smaller patch or more images."
            )
        if rows.size > max_patches:
            rows = np.sort(rng.choice(rows, max_patches, replace=False))
        P = win[rows]
        est = (PCA(n_components=n_components, random_state=random_state) if center else
               TruncatedSVD(n_components=n_components, algorithm="arpack", random_state=random_state))
        est.fit(P)
        comp = np.linalg.qr(est.components_.T)[0].T  # exact orthonormal rows, same span
        comp *= np.sign((comp * est.components_).sum(axis=1))[:, None]
        expl = est.explained_variance_ratio_ if center else (
            ((P @ est.components_.T) ** 2).sum(axis=0) / (P * P).sum())
        out[name] = (comp, expl, rows.size)
    cosines = np.linalg.svd(out["core"][0] @ out["background"][0].T, compute_uv=False)
    return PatchBasesResult(
        core=out["core"][0], background=out["background"][0], core_explained=out["core"][1],
        background_explained=out["background"][1], principal_cosines=cosines,
        n_core_patches=int(out["core"][2]), n_background_patches=int(out["background"][2]),
        patch=int(patch), centered=bool(center),
    )


# =================================================================================================
@dataclasses.dataclass(repr=False)
class DirectionSeriesResult(ResultMixin):
    """One result per checkpoint step."""

    steps: list[int]
    results: list[Any]

    def series(self, field: str) -> list[Any]:
        """One field of every step's result, e.g. ``series("n_directions")``."""
        return [getattr(r, field) for r in self.results]


def _by_step(weights: Any, model: str | None, layer: str | None) -> dict[int, np.ndarray]:
    if isinstance(weights, Mapping):
        return {int(k): v for k, v in sorted(weights.items())}
    if hasattr(weights, "steps") and hasattr(weights, "weights"):
        if model is None or layer is None:
            raise DataError("Pass model= and layer= to read a weight series from a store.")
        steps = weights.steps(model)
        if not steps:
            raise DataError(f"The model {model!r} has no recorded steps in the store; record a series first.")
        return {s: weights.weights(model, layer, step=s) for s in steps}
    raise DataError("weights must be a mapping {step: array (units, fan_in)} or a store (with model=, layer=).")


def direction_series(weights: Any, *, model: str | None = None, layer: str | None = None,
                     **params: Any) -> DirectionSeriesResult:
    """Fit :class:`DirectionClusters` (``**params``) at every checkpoint step.

    ``weights``: ``{step: W}`` or a store (``model=``, ``layer=``; its ``steps/<step>/weights``).
    """
    ws = _by_step(weights, model, layer)
    return DirectionSeriesResult(steps=list(ws), results=[DirectionClusters(**params).fit(w).result_ for w in ws.values()])


def projection_series(weights: Any, core_basis: Any, bg_basis: Any, *, model: str | None = None,
                      layer: str | None = None, init_step: int | None = "first") -> DirectionSeriesResult:  # type: ignore[assignment]
    """:func:`weight_projections` at every step, relative to ``init_step`` (default: the first step)."""
    ws = _by_step(weights, model, layer)
    steps = list(ws)
    check_option("projection_series", "init_step", init_step, ["first", None, *steps])
    W0 = None if init_step is None else ws[steps[0] if init_step == "first" else int(init_step)]
    return DirectionSeriesResult(steps=steps, results=[weight_projections(w, core_basis, bg_basis, W0) for w in ws.values()])
