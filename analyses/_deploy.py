"""Where the model will be deployed: its predicted accuracy on the site's own scenes, and the compositing control.

Every test object is composited on the same scenes photographed at the deployment site (a crossed
table: objects x scenes). :func:`predicted_accuracy` reads the model's predictions on that table as a
statement about the *site*: the accuracy expected on new objects of the same kinds on new scenes of
that site, with an interval that counts both the objects and the scenes as samples.
:func:`composite_gap` measures what the compositing itself costs (the object pasted back on its own
image, background filled), so the prediction can be corrected for it. Derivations and validation:
docs/METRICS.md ("Where you deploy it").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.special import expit, logit
from scipy.stats import norm
from scipy.stats import t as t_dist

from probekit.errors import DataError

from ._common import ResultMixin, as_vector, check_number

__all__ = ["CompositeGapResult", "PredictedAccuracyResult", "composite_gap", "predicted_accuracy"]

#: a compositing gap is material, and corrects the predicted accuracy, when it exceeds this (2 points)
#: and its interval excludes 0
GAP_THRESHOLD = 0.02


@dataclasses.dataclass(repr=False)
class CompositeGapResult(ResultMixin):
    """Accuracy on the original images minus accuracy on the objects pasted back (see :func:`composite_gap`)."""

    value: float
    ci: tuple[float, float]
    accuracy_original: float
    accuracy_composite: float
    n_objects: int
    material: bool
    threshold: float
    ci_level: float

    def per_object(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(object ids, accuracy on the original, on the composite)`` per object."""
        return self._ids, self._orig, self._comp  # type: ignore[attr-defined]


@dataclasses.dataclass(repr=False)
class PredictedAccuracyResult(ResultMixin):
    """Accuracy predicted for a deployment site (see :func:`predicted_accuracy`)."""

    value: float
    ci: tuple[float, float]
    n_objects: int
    n_backgrounds: int
    per_class: dict[str, dict[str, Any]]
    corrected: dict[str, Any] | None
    variance_components: dict[str, float]
    ci_level: float


def _codes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, inv = np.unique(v, return_inverse=True)
    return ids, inv.reshape(-1)


def _table(correct: np.ndarray, gi: np.ndarray, bi: np.ndarray, G: int, B: int) -> np.ndarray:
    """Cell means (G, B) of a complete crossed table; a missing cell is a one-line DataError."""
    n = np.bincount(gi * B + bi, minlength=G * B).reshape(G, B)
    if (n == 0).any():
        g, b = np.argwhere(n == 0)[0]
        raise DataError(
            f"The rows are not a crossed table: object {int(g)} (of {G}) has no row on scene {int(b)} (of {B}); "
            "show every object on the same scenes (the deploy:<site> split of Counterfactuals)."
        )
    return np.bincount(gi * B + bi, weights=correct, minlength=G * B).reshape(G, B) / n


def _components(Y: np.ndarray) -> tuple[float, float, float]:
    """Unbiased moment estimates (objects, scenes, residual) of the random-effects two-way model.

    With one value per cell: ``MS_obj = B sum_g (m_g - m)^2 / (G - 1)``, ``MS_sc = G sum_b (m_b - m)^2 /
    (B - 1)``, ``MS_res`` the interaction mean square; ``s2_obj = (MS_obj - MS_res) / B``, ``s2_sc =
    (MS_sc - MS_res) / G`` (clipped at 0), ``s2_res = MS_res``.
    """
    G, B = Y.shape
    m = Y.mean()
    mg, mb = Y.mean(axis=1), Y.mean(axis=0)
    ms_g = B * float(((mg - m) ** 2).sum()) / (G - 1)
    ms_b = G * float(((mb - m) ** 2).sum()) / (B - 1)
    R = Y - mg[:, None] - mb[None, :] + m
    ms_r = float((R ** 2).sum()) / ((G - 1) * (B - 1))
    return max(ms_g - ms_r, 0.0) / B, max(ms_b - ms_r, 0.0) / G, ms_r


def _variance(Y: np.ndarray) -> tuple[float, float, dict[str, float]]:
    """Variance of the table's mean as an estimate of the population mean, its Satterthwaite df, components."""
    G, B = Y.shape
    s_g, s_b, s_r = _components(Y)
    parts = [(s_g / G, G - 1), (s_b / B, B - 1), (s_r / (G * B), (G - 1) * (B - 1))]
    V = sum(p for p, _ in parts)
    den = sum(p * p / d for p, d in parts if p > 0)
    df = V * V / den if den > 0 else np.inf
    return V, df, {"objects": s_g, "scenes": s_b, "residual": s_r}


def _interval(est: float, V: float, df: float, n_cells: int, level: float) -> tuple[float, float]:
    """A t interval on the logit scale (delta method), back-transformed: stays in [0, 1], skews near the edges."""
    q = float(t_dist.ppf((1 + level) / 2, max(df, 1.0)))
    e = float(np.clip(est, 0.5 / n_cells, 1 - 0.5 / n_cells))
    half = q * np.sqrt(V) / (e * (1 - e))
    lo, hi = float(expit(logit(e) - half)), float(expit(logit(e) + half))
    # at 0 or 1 the estimate is clipped off the edge to form the interval; the interval still reaches it
    return min(lo, float(est)), max(hi, float(est))


def _corrected(est: float, V: float, df: float, gap: CompositeGapResult, *, chance: float,
               level: float) -> dict[str, Any] | None:
    """The prediction with the compositing cost taken off the model's margin above chance (see
    :func:`predicted_accuracy`); None where the composites score at or below chance."""
    _, o, m = gap.per_object()
    ao, ac = float(o.mean()), float(m.mean())
    if ac - chance <= 0.05 or ao - chance <= 0:
        return None
    k = (ao - chance) / (ac - chance)
    val = chance + (est - chance) * k
    # delta method: k's variance from the paired per-object accuracies; the prediction's from the table
    grad = np.array([1.0 / (ac - chance), -(ao - chance) / (ac - chance) ** 2])
    var_k = float(grad @ np.cov(np.vstack([o, m])) @ grad) / o.size if o.size > 1 else 0.0
    Vc = k * k * V + (est - chance) ** 2 * var_k
    q = float(t_dist.ppf((1 + level) / 2, max(df, 1.0)))
    half = q * np.sqrt(Vc)
    return {"value": float(val), "ci": (float(max(0.0, val - half)), float(min(1.0, val + half))),
            "gap": gap.value, "factor": float(k)}


def predicted_accuracy(pred: Any, label: Any, group: Any, background: Any, *, scene_unit: Any = None,
                       composite: CompositeGapResult | None = None, ci_level: float = 0.95) -> PredictedAccuracyResult:
    r"""Accuracy predicted for a deployment site from the objects composited on the site's scenes.

    Rows are predictions on a crossed table: every object ``group`` g (true class ``label``) pasted on
    the same scenes ``background`` b of one site. ``value`` is the table's accuracy. The quantity it
    estimates is the site's accuracy: the mean over the *populations* of objects and of scenes, of
    which the table holds a sample of each, so the interval counts both:

    .. math:: \widehat{\mathrm{Var}} = \hat\sigma^2_{obj}/G + \hat\sigma^2_{sc}/B + \hat\sigma^2_{res}/(GB)

    with the unbiased moment (two-way random-effects ANOVA) estimates of the object, scene and residual
    variance components of the 0/1 correctness, a t quantile with Satterthwaite's degrees of freedom,
    on the logit scale (delta method) and transformed back. (The pigeonhole bootstrap, objects and
    scenes resampled independently, counts the residual twice; the coverage of both in simulation:
    docs/METRICS.md, "Where you deploy it", benchmarks/calibrate_deploy.py.) ``per_class``: the same
    on the objects of each class, keyed by ``str(label)``.

    ``scene_unit`` (one id per row, e.g. the photo each scene slot was cropped from): the scene
    component is then estimated over these units (cell = the mean over a unit's slots), so crops of
    one photo are not counted as independent scenes.

    ``composite`` (a :func:`composite_gap` result on the same objects): when its gap is material,
    ``corrected`` = ``{value, ci, gap, factor}``: the compositing is taken to shrink the model's margin
    above chance ``c = 1/K`` (K: the classes among the labels) by the same factor at the site as on
    the objects' own backgrounds, so ``value = c + (raw - c) * factor``, ``factor = (acc(original) -
    c) / (acc(composite_self) - c)``. (Adding the gap instead overshot by 4.7 points where the models
    were near chance at the site, where compositing has nothing left to cost: docs/METRICS.md.)
    Interval: delta method, the table's variance and the factor's (paired over objects), their
    covariance left out. None when the gap is not material or the composites score near chance.
    """
    check_number("predicted_accuracy", "ci_level", ci_level, low=0, high=0.9999, low_open=True)
    pred = np.asarray(pred).reshape(-1)
    n = pred.size
    y = as_vector(label, "label", n, numeric=False)
    gids, gi = _codes(as_vector(group, "group", n, numeric=False))
    unit = background if scene_unit is None else scene_unit
    _, bi = _codes(as_vector(unit, "scene_unit" if scene_unit is not None else "background", n, numeric=False))
    n_scenes = np.unique(as_vector(background, "background", n, numeric=False)).size
    G, B = gids.size, int(bi.max()) + 1 if n else 0
    if G < 2 or B < 2:
        raise DataError(f"predicted_accuracy needs at least 2 objects and 2 scenes (units); got {G} and {B}. "
                        "Composite every test object on several scenes of the site.")
    correct = (pred == y).astype(np.float64)
    Y = _table(correct, gi, bi, G, B)
    obj_label = np.empty(G, dtype=y.dtype)
    obj_label[gi] = y
    if np.any(obj_label[gi] != y):
        raise DataError("An object (group) has rows of two labels; give each object its one true class.")
    est = float(correct.mean())
    V, df, comps = _variance(Y)
    per_class: dict[str, dict[str, Any]] = {}
    for c in np.unique(obj_label):
        sel = obj_label == c
        Yc = Y[sel]
        ec = float(correct[y == c].mean())
        if sel.sum() >= 2:
            Vc, dfc, _ = _variance(Yc)
            ci_c: tuple[float, float] | None = _interval(ec, Vc, dfc, Yc.size, ci_level)
        else:
            ci_c = None
        per_class[str(c)] = {"value": ec, "ci": ci_c, "n_objects": int(sel.sum())}
    corrected = None
    if composite is not None and composite.material:
        corrected = _corrected(est, V, df, composite, chance=1.0 / np.unique(obj_label).size, level=ci_level)
    return PredictedAccuracyResult(
        value=est, ci=_interval(est, V, df, Y.size, ci_level), n_objects=int(G), n_backgrounds=int(n_scenes),
        per_class=per_class, corrected=corrected, variance_components=comps, ci_level=float(ci_level),
    )


def composite_gap(pred_original: Any, pred_composite: Any, label: Any, group: Any, *, ci_level: float = 0.95,
                  threshold: float = GAP_THRESHOLD) -> CompositeGapResult:
    r"""What compositing costs: accuracy on the original images minus on the same objects pasted back.

    Row k pairs the prediction on object ``group[k]``'s original image (``pred_original[k]``) with the
    one on its ``composite_self`` (``pred_composite[k]``): the object cut out with its (feathered) mask
    and pasted on its own image's background, the object's region filled as every counterfactual
    background is. Nothing but the compositing differs, so

    .. math:: \mathrm{gap} = \mathrm{acc(original)} - \mathrm{acc(composite\_self)}

    (a fraction; the report prints points) is the accuracy the compositing itself takes (edges, the
    fill's traces), which every composite also pays. Interval: paired over objects, Agresti & Min's
    (2005) adjusted Wald interval for a difference of paired proportions, on the per-object differences
    ``d_g`` (the mean over an object's pairs): two pseudo-objects of ``d = +-1`` at weight 1/2 and one
    of ``d = 0`` are added, ``est' = sum d / (G + 2)``, ``var' = (sum d^2 + 1 - (G + 2) est'^2) / (G + 2)^2``,
    ``est' +- z sqrt(var')`` (its coverage on planted gaps: docs/METRICS.md, "Where you deploy it").
    ``material`` when ``|gap| > threshold`` (2 points) and the interval excludes 0;
    :func:`predicted_accuracy` then reports a corrected figure.
    """
    check_number("composite_gap", "ci_level", ci_level, low=0, high=0.9999, low_open=True)
    check_number("composite_gap", "threshold", threshold, low=0, high=1)
    po = np.asarray(pred_original).reshape(-1)
    n = po.size
    pc = as_vector(pred_composite, "pred_composite", n, numeric=False)
    y = as_vector(label, "label", n, numeric=False)
    gids, gi = _codes(as_vector(group, "group", n, numeric=False))
    G = gids.size
    if G < 2:
        raise DataError(f"composite_gap needs at least 2 objects; got {G}. Pass the test objects' rows.")
    cnt = np.bincount(gi, minlength=G).astype(np.float64)
    d = np.bincount(gi, weights=(po == y).astype(np.float64) - (pc == y), minlength=G) / cnt
    value = float(d.mean())
    n2 = G + 2.0
    adj = float(d.sum()) / n2
    var = max(float((d ** 2).sum()) + 1.0 - n2 * adj ** 2, 0.0) / n2 ** 2
    z = float(norm.ppf((1 + ci_level) / 2))
    ci = (max(-1.0, adj - z * np.sqrt(var)), min(1.0, adj + z * np.sqrt(var)))
    material = bool(abs(value) > threshold and (ci[0] > 0 or ci[1] < 0))
    res = CompositeGapResult(value=value, ci=ci, accuracy_original=float(np.mean(po == y)),
                             accuracy_composite=float(np.mean(pc == y)), n_objects=int(G), material=material,
                             threshold=float(threshold), ci_level=float(ci_level))
    res._ids = gids  # type: ignore[attr-defined]
    res._orig = np.bincount(gi, weights=(po == y).astype(np.float64), minlength=G) / cnt  # type: ignore[attr-defined]
    res._comp = np.bincount(gi, weights=(pc == y).astype(np.float64), minlength=G) / cnt  # type: ignore[attr-defined]
    return res
