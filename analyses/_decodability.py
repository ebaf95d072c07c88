"""Background decodability: how well a linear probe predicts each background factor from a layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from probekit.errors import DataError

from ._common import (
    DEFAULT_MAX_MEMORY,
    FitFirstError,
    ResultMixin,
    as_factors,
    as_source,
    check_number,
    percentile_ci,
)
from ._probes import LinearProbe, ridge_solve, ridge_stats

__all__ = ["BackgroundDecodability", "DecodabilityResult", "background_decodability"]


@dataclasses.dataclass(repr=False)
class DecodabilityResult(ResultMixin):
    """Per-factor probe score minus its shuffled-target control."""

    mode: str
    factor_names: list[str]
    metric: dict[str, str]
    score: dict[str, float]
    score_ci: dict[str, tuple[float, float]]
    control_mean: dict[str, float]
    control_sd: dict[str, float]
    excess: dict[str, float]
    excess_ci: dict[str, tuple[float, float]]
    mean_excess_r2: float | None
    n_fit: int
    n_score: int
    cv: int | None
    n_shuffles: int
    ci_level: float


def _r2(y: np.ndarray, p: np.ndarray, ref_mean: np.ndarray | None = None) -> np.ndarray:
    mu = y.mean(axis=0) if ref_mean is None else ref_mean
    return 1.0 - ((y - p) ** 2).sum(axis=0) / ((y - mu) ** 2).sum(axis=0)


def _balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    classes = np.unique(y)
    return float(np.mean([np.mean(p[y == c] == c) for c in classes]))


def _is_categorical(col: np.ndarray) -> bool:
    u = np.unique(col)
    return bool(np.all(u == np.round(u)) and u.size <= 20)


def background_decodability(
    X: Any, factors: Any, *, factor_names: Sequence[str] | None = None, use: Sequence[str] | None = None,
    categorical: str | Sequence[str] = "auto", X_test: Any = None, factors_test: Any = None, cv: int = 5,
    n_shuffles: int = 5, alpha: float = 1.0, C: float = 1.0, n_boot: int = 200, ci_level: float = 0.95,
    max_memory: int | None = DEFAULT_MAX_MEMORY, chunk_rows: int | None = None, random_state: int | None = 0,
) -> DecodabilityResult:
    r"""Cross-validated (or transfer) decodability of each background factor, minus a shuffled control.

    Continuous factor :math:`f`: a ridge probe (standardised features, penalty ``alpha``) predicts
    it; the score is the pooled out-of-fold :math:`R^2 = 1 - \sum_i (f_i-\hat f_i)^2 / \sum_i (f_i-\bar f)^2`.
    Categorical factor: a logistic probe (``C``), score = balanced accuracy of the out-of-fold
    predictions. The **control** repeats everything with the factor's rows shuffled
    (``n_shuffles`` times; mean and sd reported); ``excess = score - control_mean``. The interval of
    ``score`` bootstraps the scored rows (``excess_ci`` subtracts the control mean from it).

    Modes: without ``X_test``, ``cv``-fold cross-validation within ``X`` (e.g. *within* the OOD or
    stress split: the pilot shows decodability within a wide-background split is what separates
    a contaminated student from its teacher, docs/METRICS.md). With ``X_test``/``factors_test``:
    fit on ``X``, score on ``X_test`` (the control fits on shuffled training factors).

    The ridge path streams ``X`` in one pass (per-fold Gram matrices, O(n_features^2) memory) plus
    one pass for predictions; categorical factors need ``X`` in memory (``max_memory``).

    Parameters
    ----------
    X : array of shape (n_samples, ...) or Activations
    factors : array of shape (n_samples, n_factors)
    factor_names, use : names of the columns; subset to analyse
    categorical : "auto" or list of names
        ``"auto"``: integer-valued factors with at most 20 distinct values are categorical.
    X_test, factors_test : optional, the split to score on
    cv, n_shuffles, alpha, C, n_boot, ci_level, max_memory, chunk_rows, random_state
    """
    own = "background_decodability"
    check_number(own, "cv", cv, low=2, integer=True)
    check_number(own, "n_shuffles", n_shuffles, low=1, integer=True)
    check_number(own, "alpha", alpha, low=0)
    check_number(own, "C", C, low=0, low_open=True)
    check_number(own, "n_boot", n_boot, low=1, integer=True)
    src = as_source(X, "X", chunk_rows=chunk_rows, min_rows=3)
    n = src.n_rows
    F, names = as_factors(factors, n, factor_names, use)
    transfer = X_test is not None
    if transfer != (factors_test is not None):
        raise DataError("Pass X_test and factors_test together (the split to score on), or neither.")
    if transfer:
        tsrc = as_source(X_test, "X_test", chunk_rows=chunk_rows, min_rows=2)
        if tsrc.n_features != src.n_features:
            raise DataError(
                f"X_test has {tsrc.n_features} features but X has {src.n_features}; pass the same layer."
            )
        Ft = np.asarray(factors_test, dtype=np.float64)
        Ft = Ft[:, None] if Ft.ndim == 1 else Ft
        if Ft.shape[0] != tsrc.n_rows:
            raise DataError(f"factors_test has {Ft.shape[0]} rows but X_test has {tsrc.n_rows}.")
        Ft, _ = as_factors(Ft, tsrc.n_rows, factor_names if factor_names is not None else None, use,
                           name="factors_test")
    elif n < 2 * cv:
        raise DataError(
            f"{cv}-fold cross-validation needs at least {2 * cv} rows; X has {n}. Lower cv or pass more rows."
        )
    if categorical == "auto":
        is_cat = [_is_categorical(F[:, j]) for j in range(F.shape[1])]
    else:
        cats = [categorical] if isinstance(categorical, str) else list(categorical)
        unknown = [c for c in cats if c not in names]
        if unknown:
            raise DataError(f"categorical names {unknown} are not factors; the factors are {names}.")
        is_cat = [nm in cats for nm in names]
    rng = np.random.default_rng(random_state)
    fold = None if transfer else rng.permutation(np.arange(n) % cv)
    shuffles = [rng.permutation(n) for _ in range(n_shuffles)]
    out: dict[str, dict[str, Any]] = {k: {} for k in ("metric", "score", "ci", "cm", "cs", "ex", "exci")}

    def record(name: str, metric: str, score: float, boots: np.ndarray, controls: np.ndarray) -> None:
        ci = percentile_ci(boots, ci_level)
        cm = float(np.mean(controls))
        out["metric"][name] = metric
        out["score"][name] = float(score)
        out["ci"][name] = ci
        out["cm"][name] = cm
        out["cs"][name] = float(np.std(controls, ddof=1)) if controls.size > 1 else 0.0
        out["ex"][name] = float(score) - cm
        out["exci"][name] = (ci[0] - cm, ci[1] - cm)

    cont = [j for j in range(F.shape[1]) if not is_cat[j]]
    if cont:
        Fc = F[:, cont]
        Y = np.column_stack([Fc] + [Fc[p] for p in shuffles])  # real targets, then each shuffle
        k = len(cont)
        if transfer:
            st = ridge_stats(src, Y)
            coef, icpt = ridge_solve(st, np.array([True]), alpha, True)
            pred = np.empty((tsrc.n_rows, Y.shape[1]))
            for start, a in tsrc.chunks():
                pred[start:start + a.shape[0]] = a @ coef + icpt
            target = np.tile(Ft[:, cont], (1, 1 + n_shuffles))  # controls are scored on real test factors
        else:
            st = ridge_stats(src, Y, fold, cv)
            models = [ridge_solve(st, np.arange(cv) != f, alpha, True) for f in range(cv)]
            pred = np.empty((n, Y.shape[1]))
            for start, a in src.chunks():
                fc = fold[start:start + a.shape[0]]
                for f in np.unique(fc):
                    m = fc == f
                    pred[start + np.flatnonzero(m)] = a[m] @ models[f][0] + models[f][1]
            target = Y
        r2 = _r2(target, pred)
        nt = target.shape[0]
        boots = np.empty((n_boot, k))
        for b in range(n_boot):
            idx = rng.integers(0, nt, nt)
            boots[b] = _r2(target[idx, :k], pred[idx, :k])
        for i, j in enumerate(cont):
            controls = np.array([r2[k * (s + 1) + i] for s in range(n_shuffles)])
            record(names[j], "r2", r2[i], boots[:, i], controls)

    cat = [j for j in range(F.shape[1]) if is_cat[j]]
    if cat:
        Xa = src.load_within(max_memory, "a categorical factor's logistic probe")
        Xt = tsrc.load_within(max_memory, "a categorical factor's logistic probe") if transfer else None
        for j in cat:
            y = F[:, j].astype(np.int64)
            _, counts = np.unique(y, return_counts=True)
            if not transfer and counts.min() < cv:
                raise DataError(
                    f"Factor {names[j]!r} (categorical) has a level with {counts.min()} row(s), fewer than "
                    f"cv={cv}. Lower cv, merge rare levels, or declare it continuous (categorical=[...])."
                )

            def run(target: np.ndarray, j: int = j) -> tuple[np.ndarray, np.ndarray]:
                probe = LinearProbe(C=C, max_memory=max_memory, random_state=random_state)
                if transfer:
                    probe.fit(Xa, target)
                    return Ft[:, j].astype(np.int64), probe.predict(Xt)
                p = np.empty(n, dtype=np.int64)
                for f in range(cv):
                    tr = fold != f
                    if np.unique(target[tr]).size < 2:
                        raise DataError(f"Factor {names[j]!r}: a training fold holds a single level.")
                    p[~tr] = probe.fit(Xa[tr], target[tr]).predict(Xa[~tr])
                return target, p

            yt, p = run(y)
            score = _balanced_accuracy(yt, p)
            boots = np.empty(n_boot)
            for b in range(n_boot):
                idx = rng.integers(0, yt.size, yt.size)
                boots[b] = _balanced_accuracy(yt[idx], p[idx])
            controls = np.array([_balanced_accuracy(*run(y[s])) for s in shuffles])
            record(names[j], "balanced_accuracy", score, boots, controls)

    r2_ex = [out["ex"][names[j]] for j in cont]
    return DecodabilityResult(
        mode="transfer" if transfer else "cv", factor_names=names, metric=out["metric"],
        score=out["score"], score_ci=out["ci"], control_mean=out["cm"], control_sd=out["cs"],
        excess=out["ex"], excess_ci=out["exci"], mean_excess_r2=float(np.mean(r2_ex)) if r2_ex else None,
        n_fit=n, n_score=tsrc.n_rows if transfer else n, cv=None if transfer else cv,
        n_shuffles=n_shuffles, ci_level=float(ci_level),
    )


class BackgroundDecodability(BaseEstimator):
    r"""Estimator form of :func:`background_decodability` (same parameters and formula).

    Per factor: cross-validated :math:`R^2` (continuous) or balanced accuracy (categorical) of a
    linear probe predicting the factor from the layer, minus the mean score of the same probe on
    shuffled targets; ``fit(X, factors)`` scores within ``X`` by CV, ``fit(X, factors, X_test=...,
    factors_test=...)`` fits on ``X`` and scores on the other split.

    Attributes
    ----------
    result_ : DecodabilityResult
    score_, excess_ : dict of float
    """

    def __init__(self, *, categorical: str | Sequence[str] = "auto", cv: int = 5, n_shuffles: int = 5,
                 alpha: float = 1.0, C: float = 1.0, n_boot: int = 200, ci_level: float = 0.95,
                 max_memory: int | None = DEFAULT_MAX_MEMORY, chunk_rows: int | None = None,
                 random_state: int | None = 0) -> None:
        self.categorical = categorical
        self.cv = cv
        self.n_shuffles = n_shuffles
        self.alpha = alpha
        self.C = C
        self.n_boot = n_boot
        self.ci_level = ci_level
        self.max_memory = max_memory
        self.chunk_rows = chunk_rows
        self.random_state = random_state

    def fit(self, X: Any, factors: Any, *, factor_names: Sequence[str] | None = None,
            use: Sequence[str] | None = None, X_test: Any = None, factors_test: Any = None) -> BackgroundDecodability:
        self.result_ = background_decodability(
            X, factors, factor_names=factor_names, use=use, categorical=self.categorical, X_test=X_test,
            factors_test=factors_test, cv=self.cv, n_shuffles=self.n_shuffles, alpha=self.alpha, C=self.C,
            n_boot=self.n_boot, ci_level=self.ci_level, max_memory=self.max_memory,
            chunk_rows=self.chunk_rows, random_state=self.random_state,
        )
        self.score_ = self.result_.score
        self.excess_ = self.result_.excess
        return self

    def to_dict(self) -> dict[str, Any]:
        if not hasattr(self, "result_"):
            raise FitFirstError("This BackgroundDecodability instance is not fitted yet. Call 'fit' first.")
        return self.result_.to_dict()
