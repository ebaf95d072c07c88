"""Behaviour under background swaps: what a model *predicts* when only the background changes.

Reference-free and absolute: these figures read the model's own predictions (its logits, or a linear
probe's predictions for a representation without a head) on a crossed counterfactual split (every
foreground ``group`` on the same backgrounds) and on the image variants of Xiao et al. 2020.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from probekit.errors import DataError
from probekit.vocab import PULL_MARGIN, RELIANCE_EFFECT_MARGIN, RELIANCE_MARGIN

from ._common import ResultMixin, as_vector, check_number, check_option, percentile_ci

__all__ = [
    "BackgroundBehaviourResult",
    "RelianceResult",
    "VariantBehaviourResult",
    "background_behaviour",
    "background_reliance",
    "output_predictions",
    "permutation_variance",
    "shuffle_expectation",
    "variant_behaviour",
]

PULL_THRESHOLD = PULL_MARGIN  # the pull's materiality (probekit.vocab)


@dataclasses.dataclass(repr=False)
class BackgroundBehaviourResult(ResultMixin):
    """Predictions on a crossed split (see :func:`background_behaviour`)."""

    n_rows: int
    n_groups: int
    n_backgrounds: int
    flip_rate: float
    flip_rate_ci: tuple[float, float]
    accuracy: float | None
    accuracy_ci: tuple[float, float] | None
    pull: float
    pull_ci: tuple[float, float]
    pull_raw: float
    pull_null: float
    pull_p_value: float
    follows_background: float | None
    follows_background_ci: tuple[float, float] | None
    follows_background_null: float | None
    n_swapped: int
    threshold: float
    ci_level: float
    flagged: bool
    pull_low: float
    per_background_pull: np.ndarray


def output_predictions(output: Any, class_map: Any = None) -> np.ndarray:
    """The class a model's own output predicts, row by row, read as the audit reads a head.

    Parameters
    ----------
    output : array-like or torch.Tensor of shape (n, ...) : the model's output (flattened per row)
    class_map : mapping output index -> label id, optional : many-to-one allowed; an output index it does
        not name predicts -1 (no class of the folder)

    Returns
    -------
    ndarray of int64, shape (n,) : through ``class_map`` when given; else, for one logit, class 1 where it
    is above 0; else the argmax (the output's index).
    """
    if hasattr(output, "detach"):  # a torch tensor
        output = output.detach().float().cpu().numpy()
    out = np.asarray(output)
    out = out.reshape(len(out), -1)
    if class_map is not None:
        lut = np.full(out.shape[1], -1, dtype=np.int64)
        for k, c in class_map.items():
            if 0 <= int(k) < out.shape[1]:
                lut[int(k)] = int(c)
        return lut[out.argmax(axis=1)]
    if out.shape[1] == 1:
        return (out[:, 0] > 0).astype(np.int64)
    return out.argmax(axis=1).astype(np.int64)


def _codes(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, inv = np.unique(v, return_inverse=True)
    return ids, inv.reshape(-1)


def _pull(bg: np.ndarray, pred: np.ndarray, B: int, K: int, weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Share-weighted total-variation distance of each background's class histogram from the pooled one."""
    C = np.bincount(bg * K + pred, weights=weights, minlength=B * K).reshape(B, K)
    nb = C.sum(axis=1)
    n = nb.sum()
    if n <= 0:
        return float("nan"), np.full(B, np.nan)
    pooled = C.sum(axis=0) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        hb = C / nb[:, None]
    tv = 0.5 * np.abs(hb - pooled).sum(axis=1)
    tv = np.where(nb > 0, tv, 0.0)
    return float((nb * tv).sum() / n), tv


def background_behaviour(pred: Any, group: Any, background: Any, *, label: Any = None,
                         background_label: Any = None, n_boot: int = 500, n_perm: int = 200,
                         ci_level: float = 0.95, threshold: float = PULL_THRESHOLD,
                         random_state: int | None = 0) -> BackgroundBehaviourResult:
    r"""How a model's predictions change when only the background changes.

    Rows are predictions (class ids) on a crossed split: foreground ``group`` g shown on background
    ``background`` b, the same backgrounds for every foreground.

    - **flip rate**: share of foregrounds whose predicted class is not the same on every background.
      It mixes two causes: backgrounds that push predictions (background reliance) and foregrounds
      the model is unsure of, whose answer changes idiosyncratically from one background to the next
      (a robust model that is unsure of a digit). It is reported, not flagged on.
    - **background pull** (the flagged figure): with :math:`h_b` the histogram of predicted classes
      over the foregrounds shown on background b and :math:`\bar h` the pooled histogram,

      .. math:: \mathrm{TV} = \sum_b \frac{n_b}{n}\,\tfrac12 \lVert h_b - \bar h\rVert_1

      the share of predictions a background moves towards the same classes for every foreground.
      Idiosyncratic flips move each foreground its own way and average out over foregrounds; a
      background that favours a class moves them all. Its finite-sample floor is the same statistic
      with the backgrounds shuffled *within* each foreground (``n_perm`` permutations, which keep
      every foreground's own predictions and break only their link to the background):
      ``pull = TV - mean(null TV)``, ``pull_p_value`` the permutation p-value.
    - **follows background** (when ``background_label`` is given): among rows whose background
      came from an image of another class than the foreground's ``label``, the share predicted as
      the background's class; ``follows_background_null`` is its value under the within-foreground
      shuffle.

    Intervals: percentile bootstrap over foregrounds (whole groups resampled). The pull subtracts the
    no-signal floor whatever the signal, so a real pull reads low (by up to that floor); its interval
    is the hull of the bootstrap interval about ``pull`` and the one about the bias-corrected TV
    (``2 TV - mean TV*``), which covers the truth where each alone does not. ``flagged`` when the
    low end of the interval about ``pull`` exceeds ``threshold`` (materiality, default 5 % of
    predictions) *and* the permutation p-value is below ``1 - ci_level``: in effect the threshold is
    0.05 plus the noise floor, so the flag errs towards caution (its measured false-flag rate and
    power: docs/METRICS.md, "The verdict").

    Parameters
    ----------
    pred : array of shape (n,)
        Predicted class of each row.
    group, background : arrays of shape (n,)
        Foreground and background id of each row.
    label, background_label : arrays of shape (n,), optional
        True class of the foreground; class of the image the background came from (-1: unknown).
    """
    check_number("background_behaviour", "n_boot", n_boot, low=1, integer=True)
    check_number("background_behaviour", "n_perm", n_perm, low=1, integer=True)
    check_number("background_behaviour", "ci_level", ci_level, low=0, high=1, low_open=True)
    check_number("background_behaviour", "threshold", threshold, low=0, high=1)
    pred = as_vector(pred, "pred", len(np.asarray(pred)), numeric=False)
    n = pred.size
    g = as_vector(group, "group", n, numeric=False)
    b = as_vector(background, "background", n, numeric=False)
    gids, gi = _codes(g)
    bids, bi = _codes(b)
    G, B = gids.size, bids.size
    if G < 2 or B < 2:
        raise DataError(
            f"background_behaviour needs at least 2 foregrounds and 2 backgrounds; got {G} and {B}. "
            "Show every foreground on the same several backgrounds (a crossed split)."
        )
    y = None if label is None else as_vector(label, "label", n, numeric=False)
    classes = np.unique(pred if y is None else np.concatenate([pred, y]))
    pi = np.searchsorted(classes, pred)
    K = classes.size
    rng = np.random.default_rng(random_state)

    # per-group counts for the bootstrap: flips, correct, follows
    distinct = np.zeros(G)
    order = np.lexsort((pi, gi))
    gs, ps = gi[order], pi[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (gs[1:] != gs[:-1]) | (ps[1:] != ps[:-1])
    np.add.at(distinct, gs, new)
    flips = (distinct > 1).astype(np.float64)
    ng = np.bincount(gi, minlength=G).astype(np.float64)
    correct_g = None
    if y is not None:
        correct_g = np.bincount(gi, weights=(pred == y).astype(np.float64), minlength=G)
    swapped = follow_g = swap_g = None
    if background_label is not None:
        bl = as_vector(background_label, "background_label", n, numeric=False)
        if y is None:
            raise DataError("background_label needs label (the foreground's class) to tell swapped rows.")
        swapped = (bl != y) & (np.asarray(bl).astype(str) != "-1")
        follows = swapped & (pred == bl)
        swap_g = np.bincount(gi, weights=swapped.astype(np.float64), minlength=G)
        follow_g = np.bincount(gi, weights=follows.astype(np.float64), minlength=G)

    pull_raw, per_bg = _pull(bi, pi, B, K)
    # within-group shuffles of the background column (and of the background's class with it)
    sort_g = np.lexsort((np.arange(n), gi))
    null = np.empty(n_perm)
    null_follow = np.empty(n_perm) if swapped is not None else None
    for p in range(n_perm):
        perm = np.empty(n, dtype=np.int64)
        perm[sort_g] = np.lexsort((rng.random(n), gi))
        null[p] = _pull(bi[perm], pi, B, K)[0]
        if null_follow is not None:
            blp, sw = bl[perm], swapped[perm]
            null_follow[p] = float(np.sum(sw & (pred == blp)) / max(1, np.sum(sw)))
    null_mean = float(null.mean())
    p_value = float((1 + np.sum(null >= pull_raw)) / (1 + n_perm))

    # group bootstrap: one multinomial draw of group counts per replicate serves every figure (a row
    # weighs its group's count)
    boot_pull = np.empty(n_boot)
    boot_flip = np.empty(n_boot)
    boot_acc = np.empty(n_boot) if correct_g is not None else None
    boot_follow = np.empty(n_boot) if follow_g is not None else None
    for r in range(n_boot):
        w = np.bincount(rng.integers(0, G, G), minlength=G).astype(np.float64)
        boot_pull[r] = _pull(bi, pi, B, K, weights=w[gi])[0]
        boot_flip[r] = w @ flips / G
        if boot_acc is not None:
            boot_acc[r] = (w @ correct_g) / (w @ ng)
        if boot_follow is not None:
            tot = w @ swap_g
            boot_follow[r] = (w @ follow_g) / tot if tot > 0 else np.nan
    pull = pull_raw - null_mean
    # The replicates' spread about their own mean gives the interval's width. Its centre: the estimate
    # subtracts the no-signal noise floor whatever the signal, although TV's noise bias shrinks as the
    # pull grows, so a real pull reads low. The reported interval is the hull of the interval about the
    # estimate and the one about the bootstrap bias-corrected TV (2 TV - mean TV*), which covers the
    # truth where either alone does not (coverage: docs/METRICS.md, "The verdict", measured by
    # benchmarks/calibrate_verdict.py). The flag reads the low end about the estimate: conservative.
    spread = np.asarray(percentile_ci(boot_pull - boot_pull.mean(), ci_level))
    low_at_estimate = float(pull + spread[0])
    bias_corrected = 2 * pull_raw - float(boot_pull.mean())
    pull_ci = (min(low_at_estimate, float(bias_corrected + spread[0])),
               max(float(pull + spread[1]), float(bias_corrected + spread[1])))
    n_sw = int(swapped.sum()) if swapped is not None else 0
    fb = fb_ci = fb_null = None
    if swapped is not None and n_sw > 0:
        fb = float(follow_g.sum() / n_sw)
        fb_ci = percentile_ci(boot_follow[np.isfinite(boot_follow)], ci_level)
        fb_null = float(null_follow.mean())
    flagged = bool(low_at_estimate > threshold and p_value < 1 - ci_level)
    return BackgroundBehaviourResult(
        n_rows=int(n), n_groups=int(G), n_backgrounds=int(B),
        flip_rate=float(flips.mean()), flip_rate_ci=percentile_ci(boot_flip, ci_level),
        accuracy=None if correct_g is None else float(correct_g.sum() / n),
        accuracy_ci=None if boot_acc is None else percentile_ci(boot_acc, ci_level),
        pull=float(pull), pull_ci=pull_ci, pull_raw=pull_raw, pull_null=null_mean, pull_p_value=p_value,
        follows_background=fb, follows_background_ci=fb_ci, follows_background_null=fb_null,
        n_swapped=n_sw, threshold=float(threshold), ci_level=float(ci_level), flagged=flagged,
        pull_low=low_at_estimate,
        per_background_pull=per_bg,
    )


@dataclasses.dataclass(repr=False)
class VariantBehaviourResult(ResultMixin):
    """Accuracy per image variant (see :func:`variant_behaviour`)."""

    accuracy: dict[str, dict[str, Any]]
    bg_gap: dict[str, Any] | None
    only_bg_accuracy: dict[str, Any] | None
    chance: float
    n_classes: int
    ci_level: float


def variant_behaviour(pred: Any, label: Any, variant: Sequence[str] | np.ndarray, group: Any, *,
                      n_boot: int = 500, ci_level: float = 0.95,
                      random_state: int | None = 0) -> VariantBehaviourResult:
    r"""Accuracy per image variant (Xiao et al. 2020), with the background gap and only-background accuracy.

    - ``accuracy[v]``: accuracy on the rows of variant ``v`` (``original``, ``only_fg``, ``no_fg``,
      ``only_bg``, ``mixed_same``, ``mixed_rand``, ``mixed_next``), each ``{value, ci, n}``.
    - ``bg_gap`` = acc(mixed_same) - acc(mixed_rand): how much a background of the right class helps
      over a random one (when both variants are present).
    - ``only_bg_accuracy``: accuracy with the foreground removed, beside ``chance`` = the accuracy
      of always answering the most common label (``n_classes`` = the labels seen).

    Intervals: percentile bootstrap over foregrounds (``group``), paired across variants.
    """
    check_number("variant_behaviour", "n_boot", n_boot, low=1, integer=True)
    pred = np.asarray(pred).reshape(-1)
    n = pred.size
    y = as_vector(label, "label", n, numeric=False)
    v = np.asarray(variant).astype(str).reshape(-1)
    if v.size != n:
        raise DataError(f"variant has {v.size} rows, pred has {n}; pass one variant per row.")
    gids, gi = _codes(as_vector(group, "group", n, numeric=False))
    G = gids.size
    correct = (pred == y).astype(np.float64)
    names = [name for name in dict.fromkeys(v.tolist())]
    stats = {}
    for name in names:
        sel = v == name
        stats[name] = (np.bincount(gi[sel], weights=correct[sel], minlength=G),
                       np.bincount(gi[sel], minlength=G).astype(np.float64))
    rng = np.random.default_rng(random_state)
    boots = {name: np.empty(n_boot) for name in names}
    for r in range(n_boot):
        w = np.bincount(rng.integers(0, G, G), minlength=G).astype(np.float64)
        for name, (c, m) in stats.items():
            tot = w @ m
            boots[name][r] = (w @ c) / tot if tot > 0 else np.nan
    acc = {}
    for name, (c, m) in stats.items():
        ok = np.isfinite(boots[name])
        acc[name] = {"value": float(c.sum() / m.sum()), "ci": list(percentile_ci(boots[name][ok], ci_level)),
                     "n": int(m.sum())}
    gap = None
    if "mixed_same" in acc and "mixed_rand" in acc:
        d = boots["mixed_same"] - boots["mixed_rand"]
        d = d[np.isfinite(d)]
        gap = {"value": acc["mixed_same"]["value"] - acc["mixed_rand"]["value"],
               "ci": list(percentile_ci(d, ci_level))}
    _, counts = np.unique(y, return_counts=True)
    chance = float(counts.max() / counts.sum())
    return VariantBehaviourResult(
        accuracy=acc, bg_gap=gap, only_bg_accuracy=acc.get("only_bg"), chance=chance,
        n_classes=int(counts.size), ci_level=float(ci_level),
    )


# -- background reliance: directional, graded, backgrounds as a sample ---------------------------

# The default margins (materiality) of reliance and of the background effect are the verdict's, defined
# once in probekit.vocab (RELIANCE_MARGIN: 3 % of the way to a complete shortcut, chosen so that a 10 %
# partial shortcut at 300 objects x 8 backgrounds is flagged with >= 80 % power; RELIANCE_EFFECT_MARGIN:
# 5 accuracy points of SD over backgrounds; benchmarks/calibrate_reliance.py, docs/METRICS.md).
EFFECT_MARGIN = RELIANCE_EFFECT_MARGIN

_BASES = ("background_label", "model_prediction")


@dataclasses.dataclass(repr=False)
class RelianceResult(ResultMixin):
    """Background reliance, background effect and accuracy by background class (see :func:`background_reliance`).

    ``reliance_boot`` (the two-way bootstrap replicates of ``reliance``, for paired comparisons of two
    models on the same split) is left out of :meth:`to_dict`.
    """

    reliance: float | None
    reliance_ci: tuple[float, float] | None
    p_value: float | None
    margin: float
    detectable: float | None
    shortcut: bool | None
    reason: str | None
    basis: str
    n_objects: int
    n_backgrounds: int
    n_background_classes: int
    n_swapped: int
    follows_background: float | None
    follows_background_null: float | None
    accuracy_own: float | None
    accuracy_own_ci: tuple[float, float] | None
    accuracy_other: float | None
    accuracy_other_ci: tuple[float, float] | None
    bg_gap: float | None
    bg_gap_ci: tuple[float, float] | None
    effect: float | None
    effect_ci: tuple[float, float] | None
    effect_p_value: float | None
    effect_margin: float
    sensitive: bool | None
    effect_reason: str | None
    flip_rate: float
    flip_rate_ci: tuple[float, float]
    ci_level: float
    n_boot: int
    reliance_boot: np.ndarray = dataclasses.field(default_factory=lambda: np.empty(0))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("reliance_boot", None)
        return d


def _unknown(v: np.ndarray) -> np.ndarray:
    """Rows whose background class is unknown (-1, as int, float or string)."""
    s = np.asarray(v).astype(str)
    return (s == "-1") | (s == "-1.0")


def _crossed_matrix(values: np.ndarray, gi: np.ndarray, bi: np.ndarray, G: int, B: int) -> np.ndarray:
    out = np.empty((G, B), dtype=values.dtype)
    out[gi, bi] = values
    return out


def _per_level(values: np.ndarray, idx: np.ndarray, n: int, what: str, level: str) -> np.ndarray:
    """The one value each level of ``idx`` takes; DataError when a level has two."""
    first = np.full(n, -1, dtype=np.int64)
    first[idx[::-1]] = np.arange(idx.size)[::-1]
    out = values[first]
    bad = np.flatnonzero(values != out[idx])
    if bad.size:
        raise DataError(
            f"{what} differs between rows of the same {level} (first at row {int(bad[0])}); pass one "
            f"{what} per {level}."
        )
    return out


def shuffle_expectation(pred_row: np.ndarray, bg_class: np.ndarray, swapped: np.ndarray) -> float:
    r"""Expected follows-background count of one object under the within-object shuffle (closed form).

    Shuffling an object's backgrounds among its rows keeps its predictions and pairs each with a
    uniformly random background of its own, so the expected number of rows predicted as the class of
    a swapped background is

    .. math:: E_g = \frac1B \sum_{b'} \mathrm{swapped}_{gb'}\; n_g(c_{b'}),

    :math:`n_g(c)` the number of the object's rows predicted :math:`c`. (A row keeps its own
    background with probability 1/B; :func:`background_reliance` uses the expectation over the *other*
    backgrounds, :math:`(B E_g - F_g)/(B - 1)`, which is the expectation under a random derangement.)

    Parameters
    ----------
    pred_row, bg_class, swapped : arrays of shape (B,)
        The object's prediction, the background's class and whether that background is swapped
        (known class, not the object's own) on each of its B rows.
    """
    pred_row = np.asarray(pred_row)
    bg_class = np.asarray(bg_class)
    swapped = np.asarray(swapped, dtype=bool)
    n_c = np.array([np.sum(pred_row == c) for c in bg_class], dtype=np.float64)
    return float(np.sum(swapped * n_c) / pred_row.size)


def _pair_counts(P: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(B, B) matrix H: H[b, b'] = number of objects g with P[g, b] = c[b'] != y[g]."""
    G, B = P.shape
    H = np.zeros((B, B))
    step = max(1, 4_000_000 // (B * B))
    for g0 in range(0, G, step):
        Pg, yg = P[g0:g0 + step], y[g0:g0 + step]
        H += ((Pg[:, :, None] == c[None, None, :]) & (c[None, None, :] != yg[:, None, None])).sum(axis=0)
    return H


def _impute_diagonal(H: np.ndarray) -> np.ndarray:
    """H with its diagonal replaced by the additive (row + column) fit of the off-diagonal entries."""
    H = np.array(H, dtype=np.float64)
    B = H.shape[0]
    if B > 2:
        diag = np.arange(B)
        for _ in range(100):
            H[diag, diag] = H.mean(axis=1) + H.mean(axis=0) - H.mean()
    return H


def permutation_variance(H: np.ndarray) -> float:
    r"""Variance of :math:`\sum_b H_{b\pi(b)}` over uniformly random permutations :math:`\pi` (closed form).

    Hoeffding's combinatorial central limit theorem: :math:`\frac1{B-1}\sum_{bb'} d_{bb'}^2`, with
    :math:`d` the doubly centred :math:`H`.

    In :func:`background_reliance`, :math:`H_{bb'}` counts the rows on background b predicted as the
    class of background b' (not the object's own): the follows-background count is
    :math:`\sum_b H_{bb}`, and permuting the classes among the backgrounds changes nothing else in
    reliance (swapped rows, the shuffle's pairs and the scale keep their totals). This variance is
    therefore the part of reliance's sampling variance that comes from which background happens to
    carry which class, which the bootstrap cannot see when a class has only one or two backgrounds.
    The diagonal, where a real pull shows, is first replaced by its additive fit from the
    off-diagonal pairs, so that a shortcut does not widen the spread it is tested against.
    """
    H = np.asarray(H, dtype=np.float64)
    B = H.shape[0]
    if B < 2:
        return float("nan")
    d = H - H.mean(axis=1, keepdims=True) - H.mean(axis=0, keepdims=True) + H.mean()
    return float(np.sum(d ** 2) / (B - 1))


def _boot_indices(G: int, B: int, n_boot: int, random_state: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Two-way (pigeonhole) resample: objects and backgrounds, each with replacement, from the seed alone."""
    rng = np.random.default_rng(random_state)
    return rng.integers(0, G, (n_boot, G)), rng.integers(0, B, (n_boot, B))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(n, R) multiplicity of each unit in each of the R resamples ``idx`` of shape (R, m)."""
    R = idx.shape[0]
    flat = (np.arange(R)[:, None] * n + idx).reshape(-1)
    return np.bincount(flat, minlength=R * n).reshape(R, n).T.astype(np.float64)


def _reliance_sums(P: np.ndarray, y: np.ndarray, c: np.ndarray, K: int, Wm: np.ndarray,
                   V: np.ndarray) -> dict[str, np.ndarray]:
    """Weighted sums of the reliance and accuracy figures for R weightings at once.

    ``P`` (G, B) predicted class codes, ``y`` (G,) object class codes, ``c`` (B,) background class
    codes (-1 unknown), ``Wm`` (B, R) background and ``V`` (G, R) object multiplicities. A background
    drawn twice counts as two backgrounds (pairs of its copies included), as the pigeonhole bootstrap
    treats it.
    """
    G, B = P.shape
    known = c >= 0
    swapped = known[None, :] & (c[None, :] != y[:, None])
    own = known[None, :] & (c[None, :] == y[:, None])
    correct = P == y[:, None]
    follows = swapped & (P == c[None, :])
    S = swapped.astype(np.float64) @ Wm
    F = follows.astype(np.float64) @ Wm
    onehot = np.zeros((K, B))
    onehot[c[known], np.flatnonzero(known)] = 1.0
    Wtot = onehot @ Wm  # (K, R): weighted number of backgrounds of each class
    n_w = Wm.sum(axis=0)  # (R,) = B
    # A_g = sum_b w_b * (weighted count of swapped backgrounds whose class is the row's prediction):
    # a quadratic form w' Q_g w with Q_g[b, b'] = [P_gb = c_b' != y_g], in blocks of objects
    A = np.empty((G, Wm.shape[1]))
    step = max(1, 4_000_000 // (B * B))
    for g0 in range(0, G, step):
        Pg, yg = P[g0:g0 + step], y[g0:g0 + step]
        Q = (Pg[:, :, None] == c[None, None, :]) & (Pg != yg[:, None])[:, :, None]
        T = Q.reshape(-1, B).astype(np.float64) @ Wm
        A[g0:g0 + step] = np.einsum("gbr,br->gr", T.reshape(Pg.shape[0], B, -1), Wm)
    # a complete shortcut predicts c_b on every row: A_g = sum_{c != y_g} Wtot(c)^2
    A_short = (Wtot ** 2).sum(axis=0)[None, :] - Wtot[y] ** 2
    E = (A - F) / (n_w - 1)
    E_short = (A_short - S) / (n_w - 1)
    return {
        "excess": (V * (F - E)).sum(axis=0),
        "scale": (V * (S - E_short)).sum(axis=0),
        "follows": (V * F).sum(axis=0),
        "null": (V * E).sum(axis=0),
        "swapped": (V * S).sum(axis=0),
        "own_correct": (V * ((own & correct).astype(np.float64) @ Wm)).sum(axis=0),
        "own": (V * (own.astype(np.float64) @ Wm)).sum(axis=0),
        "other_correct": (V * ((swapped & correct).astype(np.float64) @ Wm)).sum(axis=0),
        "scale_g": (S - E_short)[:, 0] if V.shape[1] == 1 else np.empty(0),
    }


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def background_reliance(pred: Any, group: Any, background: Any, *, label: Any,
                        background_label: Any = None, basis: str = "background_label",
                        n_boot: int = 1000, ci_level: float = 0.95, margin: float = RELIANCE_MARGIN,
                        effect_margin: float = EFFECT_MARGIN,
                        random_state: int | None = 0) -> RelianceResult:
    r"""Background reliance (shortcut) and background effect (sensitivity) on a crossed split.

    Rows are predictions on a crossed split: every object ``group`` g (class ``label``) shown once on
    each of the same backgrounds ``background`` b; ``background_label`` is the class the background
    points to (the class of the image it came from, or, label-free, the model's own prediction on
    that image: say which with ``basis``). A row is *swapped* when its background's class is known
    (not -1) and is not the object's; own-class rows enter only the accuracies.

    **Reliance** (the ``shortcut`` finding). With :math:`F_g` the object's swapped rows predicted as the
    background's class, :math:`S_g` its swapped rows, :math:`E_g` the expected :math:`F_g` when each
    of its predictions is paired with one of its *other* backgrounds at random (the within-object
    shuffle without the identity term, :func:`shuffle_expectation`), and :math:`E^{*}_g` that
    expectation for a complete shortcut (predicting :math:`c_b` on every row),

    .. math:: \mathrm{reliance} = \frac{\sum_g (F_g - E_g)}{\sum_g (S_g - E^{*}_g)},

    the follows-background excess as a share of a complete shortcut's excess on the same design: 1
    for a complete shortcut whatever the number and balance of background classes, 0 in expectation
    for a model whose predictions do not depend on the background's class (a constant predictor:
    exactly 0; unsure or noise-sensitive models whose errors do not go to the background's class:
    0 in expectation), and the share of objects that follow the background's class for a partial
    shortcut. Its population value (backgrounds and objects drawn from their populations) does not
    depend on the number of backgrounds.

    **Intervals: backgrounds are a sample.** Objects and backgrounds are resampled together (two-way
    "pigeonhole" bootstrap, ``n_boot`` replicates; the indices depend only on the numbers of objects and
    backgrounds and ``random_state``, so two models on the same split get the same resamples and
    ``reliance_boot`` differences give a paired comparison). The variance of reliance is modelled as
    :math:`v + R(1-R)h` at true reliance R: :math:`R(1-R)h` is the object variance of a partial
    shortcut of size R (:math:`h = \sum_g D_g^2 / (\sum_g D_g)^2`, :math:`D_g` the objects'
    complete-shortcut scales) and :math:`v` the rest: the bootstrap variance less that term, but at
    least the exact variance over permutations of the background classes among the backgrounds
    (:func:`permutation_variance`; which background happens to carry which class, which the
    bootstrap cannot see when a class has one or two backgrounds). ``reliance_ci``: the R with
    :math:`|\mathrm{reliance} - R| \le z\,\mathrm{sd}(R)` (a Wilson-type score interval: it keeps
    its width when no follower was sampled); ``p_value``: the one-sided score test of H0 reliance
    <= ``margin``; ``shortcut`` is ``p_value < (1 - ci_level) / 2``, exactly when the interval's low
    end is above the margin (the whisker and the threshold never disagree). ``detectable``: the
    smallest R flagged with 80 % power under the same variance model.

    **Accuracy by background class**: ``accuracy_own`` (rows whose background class is the object's),
    ``accuracy_other`` (swapped rows), ``bg_gap = own - other`` (Xiao et al. 2020's BG-gap on the
    crossed split); normal intervals with the variance of the same two-way replicates, at least the
    binomial variance at the Agresti-Coull proportion (which keeps a width when few own-class rows
    are all right).

    **Background effect** (the ``background_sensitive`` finding): the SD over backgrounds of the
    accuracy a background gives, beyond chance: the two-way random-effects (ANOVA) estimate
    :math:`\hat\sigma_B = \sqrt{\max(0, (MS_B - MS_E)/G)}` of the 0/1 correctness, in accuracy points.
    The within-object shuffle's expectation of :math:`MS_B` is :math:`MS_E` (no background effect),
    so an unsure model whose flips are idiosyncratic reads 0. Interval and test: :math:`(B-1) MS_B /
    (G\sigma_B^2 + MS_E) \sim \chi^2_{B-1}` (backgrounds a sample of B); ``effect_p_value`` tests H0
    effect <= ``effect_margin`` and ``sensitive`` is ``effect_p_value < (1 - ci_level) / 2`` (the low end
    of ``effect_ci`` above the margin). It says nothing of direction; reliance does.

    ``flip_rate``: share of objects whose prediction is not the same on every background (it grows
    with the number of backgrounds); its interval resamples objects.

    Parameters
    ----------
    pred : array of shape (n,)
        Predicted class of each row.
    group, background : arrays of shape (n,)
        Object and background id of each row; every object on every background exactly once.
    label : array of shape (n,)
        The object's class (the same on all its rows).
    background_label : array of shape (n,), optional
        The class the row's background points to (the same on all rows of a background; -1 unknown).
        Without it reliance and the accuracies by background class are None (with ``reason``).
    basis : {"background_label", "model_prediction"}
        What ``background_label`` holds: the class of the image the background came from, or the
        model's prediction on that image (label-free; it tells "predictions follow what the model
        sees in the background image", not the background's true class).
    n_boot : int
        Two-way bootstrap replicates.
    ci_level : float
        Two-sided level of every interval; the findings test one-sided at ``(1 - ci_level) / 2``.
    margin, effect_margin : float
        Materiality of reliance (share of a complete shortcut) and of the background effect (SD of
        accuracy over backgrounds, a fraction).
    random_state : int or None
        Seed of the bootstrap indices.

    Returns
    -------
    RelianceResult
        ``shortcut`` / ``sensitive`` are None, with ``reason`` / ``effect_reason``, when the design
        cannot judge them.
    """
    from scipy.stats import chi2

    owner = "background_reliance"
    check_number(owner, "n_boot", n_boot, low=2, integer=True)
    check_number(owner, "ci_level", ci_level, low=0, high=1, low_open=True)
    check_number(owner, "margin", margin, low=0, high=1)
    check_number(owner, "effect_margin", effect_margin, low=0, high=1)
    check_option(owner, "basis", basis, _BASES)
    if ci_level >= 1:
        raise DataError(f"The 'ci_level' parameter of {owner} must be < 1. Got {ci_level!r} instead.")
    pred = as_vector(pred, "pred", len(np.asarray(pred)), numeric=False)
    n = pred.size
    if n == 0:
        raise DataError(f"{owner} got no rows; pass predictions on a crossed split.")
    gids, gi = _codes(as_vector(group, "group", n, numeric=False))
    bids, bi = _codes(as_vector(background, "background", n, numeric=False))
    G, B = gids.size, bids.size
    cell = np.bincount(gi * B + bi, minlength=G * B)
    if cell.max() > 1:
        k = int(np.flatnonzero(cell > 1)[0])
        raise DataError(
            f"{owner}: object {gids[k // B]!r} has {int(cell[k])} rows on background {bids[k % B]!r}; "
            "pass one prediction per object and background."
        )
    if cell.min() == 0:
        k = int(np.flatnonzero(cell == 0)[0])
        raise DataError(
            f"{owner}: object {gids[k // B]!r} has no row on background {bids[k % B]!r}; every object "
            "must be shown on every background (a crossed split). Drop incomplete objects or backgrounds."
        )
    y_row = as_vector(label, "label", n, numeric=False)
    bl_row = None if background_label is None else as_vector(background_label, "background_label", n,
                                                             numeric=False)
    unknown = np.zeros(n, dtype=bool) if bl_row is None else _unknown(bl_row)
    pool = [pred, y_row] + ([] if bl_row is None else [bl_row[~unknown]])
    classes = np.unique(np.concatenate(pool))
    pc = np.searchsorted(classes, pred)
    y = _per_level(np.searchsorted(classes, y_row), gi, G, "label", "object")
    if bl_row is None:
        c = np.full(B, -1, dtype=np.int64)
    else:
        cr = np.where(unknown, -1, np.searchsorted(classes, np.where(unknown, classes[0], bl_row)))
        c = _per_level(cr, bi, B, "background_label", "background")
    K = classes.size
    P = _crossed_matrix(pc, gi, bi, G, B)
    level = float(ci_level)

    # flip rate: objects resampled
    flips = (P != P[:, :1]).any(axis=1).astype(np.float64)
    Gidx, Bidx = _boot_indices(G, B, n_boot, random_state)
    flip_boot = flips[Gidx].mean(axis=1)

    # point estimates and two-way replicates of the reliance and accuracy sums
    point = _reliance_sums(P, y, c, K, np.ones((B, 1)), np.ones((G, 1)))
    keys = ("excess", "scale", "own_correct", "own", "other_correct", "swapped")
    boot = {k: np.empty(n_boot) for k in keys}
    chunk = max(1, 2_000_000 // max(1, G * B))
    for s in range(0, n_boot, chunk):
        sl = slice(s, min(n_boot, s + chunk))
        r = _reliance_sums(P, y, c, K, _counts(Bidx[sl], B), _counts(Gidx[sl], G))
        for k in keys:
            boot[k][sl] = r[k]

    known = c >= 0
    n_swapped = int(point["swapped"][0])
    # classes among swapped rows (a background is swapped for the objects of other classes)
    sw_classes = np.unique(np.concatenate([c[known & (c != yy)] for yy in np.unique(y)]))
    reason = None
    if bl_row is None:
        reason = "no background_label: reliance needs the class each background points to"
    elif G < 2 or B < 2:
        reason = f"{G} object(s) and {B} background(s): reliance needs at least 2 of each"
    elif np.unique(c[known]).size < 2:
        reason = ("every background comes from one class: following the background's class cannot be "
                  "told from errors the backgrounds cause")
    elif n_swapped == 0:
        reason = "no row shows an object on a background of another class"
    elif sw_classes.size < 2 or point["scale"][0] <= 0:
        reason = ("the swapped rows span fewer than 2 background classes: following the background's "
                  "class cannot be told from errors the backgrounds cause")

    rel = rel_ci = p_value = detectable = shortcut = None
    fb = fb_null = None
    rel_boot = np.full(n_boot, np.nan)
    if reason is None:
        rel = float(point["excess"][0] / point["scale"][0])
        rel_boot = _ratio(boot["excess"], boot["scale"])
        ok = np.isfinite(rel_boot)
        var_boot = float(np.var(rel_boot[ok], ddof=1)) if ok.sum() > 1 else 0.0
        # which background carries which class: the bootstrap cannot see it when a class has one or
        # two backgrounds (their noise is then fixed in every replicate); its variance is exact
        var_perm = permutation_variance(_impute_diagonal(_pair_counts(P, y, c)))
        var_perm *= (B / (B - 1) / point["scale"][0]) ** 2
        scale_g = point["scale_g"]
        h = float(np.sum(scale_g ** 2) / np.sum(scale_g) ** 2)
        r_c = min(max(rel, 0.0), 1.0)
        v_other = max(var_boot - r_c * (1 - r_c) * h, var_perm, 0.0)
        fb = float(point["follows"][0] / n_swapped)
        fb_null = float(point["null"][0] / n_swapped)
        rel_ci, p_value, detectable = _score_inference(rel, v_other, h, margin, level)
        shortcut = bool(p_value < (1 - level) / 2)

    # accuracy on own-class and other-class backgrounds: normal intervals from the two-way replicates'
    # variance, at least the binomial variance at the Agresti-Coull proportion (x + 2) / (n + 4) (few
    # own-class rows, all right, would otherwise give a zero-width interval)
    from scipy.stats import norm

    z = float(norm.ppf((1 + level) / 2))
    acc_own = acc_own_ci = acc_other = acc_other_ci = gap = gap_ci = None
    if bl_row is not None:
        sides = {}
        for name, x, m in (("own", point["own_correct"][0], point["own"][0]),
                           ("other", point["other_correct"][0], point["swapped"][0])):
            if m > 0:
                reps = _ratio(boot[f"{name}_correct"], boot[name if name == "own" else "swapped"])
                p_ac = (x + 2) / (m + 4)
                sides[name] = (float(x / m), reps, p_ac * (1 - p_ac) / (m + 4))
        for name, (val, reps, floor) in sides.items():
            ok = np.isfinite(reps)
            v = max(float(np.var(reps[ok], ddof=1)) if ok.sum() > 1 else 0.0, floor)
            ci = (max(0.0, val - z * np.sqrt(v)), min(1.0, val + z * np.sqrt(v)))
            if name == "own":
                acc_own, acc_own_ci = val, ci
            else:
                acc_other, acc_other_ci = val, ci
        if len(sides) == 2:
            d = sides["own"][1] - sides["other"][1]
            ok = np.isfinite(d)
            v = max(float(np.var(d[ok], ddof=1)) if ok.sum() > 1 else 0.0, sides["own"][2] + sides["other"][2])
            gap = sides["own"][0] - sides["other"][0]
            gap_ci = (max(-1.0, gap - z * np.sqrt(v)), min(1.0, gap + z * np.sqrt(v)))

    # background effect: two-way random-effects ANOVA on 0/1 correctness
    eff = eff_ci = eff_p = sensitive = eff_reason = None
    if G < 2 or B < 2:
        eff_reason = f"{G} object(s) and {B} background(s): the background effect needs at least 2 of each"
    else:
        X = (P == y[:, None]).astype(np.float64)
        a_b = X.mean(axis=0)
        a_g = X.mean(axis=1)
        resid = X - a_g[:, None] - a_b[None, :] + X.mean()
        ms_b = G * float(np.sum((a_b - a_b.mean()) ** 2)) / (B - 1)
        ms_e = float(np.sum(resid ** 2)) / ((B - 1) * (G - 1))
        eff = float(np.sqrt(max(0.0, (ms_b - ms_e) / G)))
        dfb = B - 1
        lo_q, hi_q = chi2.ppf((1 - level) / 2, dfb), chi2.ppf((1 + level) / 2, dfb)
        eff_ci = (float(np.sqrt(max(0.0, (dfb * ms_b / hi_q - ms_e) / G))),
                  float(np.sqrt(max(0.0, (dfb * ms_b / lo_q - ms_e) / G))))
        denom = G * effect_margin ** 2 + ms_e
        if denom > 0:
            eff_p = float(chi2.sf(dfb * ms_b / denom, dfb))
        else:  # every prediction right or every one wrong on every background: no effect at all
            eff_p = 1.0
        sensitive = bool(eff_p < (1 - level) / 2)

    return RelianceResult(
        reliance=rel, reliance_ci=rel_ci, p_value=p_value, margin=float(margin), detectable=detectable,
        shortcut=shortcut, reason=reason, basis=basis, n_objects=int(G), n_backgrounds=int(B),
        n_background_classes=int(np.unique(c[known]).size), n_swapped=n_swapped,
        follows_background=fb, follows_background_null=fb_null,
        accuracy_own=acc_own, accuracy_own_ci=acc_own_ci, accuracy_other=acc_other,
        accuracy_other_ci=acc_other_ci, bg_gap=gap, bg_gap_ci=gap_ci,
        effect=eff, effect_ci=eff_ci, effect_p_value=eff_p, effect_margin=float(effect_margin),
        sensitive=sensitive, effect_reason=eff_reason,
        flip_rate=float(flips.mean()), flip_rate_ci=percentile_ci(flip_boot, level),
        ci_level=level, n_boot=int(n_boot), reliance_boot=rel_boot,
    )


def _score_inference(rel: float, v_other: float, h: float, margin: float,
                     level: float) -> tuple[tuple[float, float], float, float | None]:
    """Interval, one-sided p-value at ``margin`` and the 80 %-power reliance, from Var(rel | R) = v + R(1 - R) h.

    A partial shortcut of size R (a share R of objects following the background's class) adds the
    object variance R (1 - R) h, h = sum D_g^2 / (sum D_g)^2 over the objects' complete-shortcut
    scales D_g, to the rest ``v`` (cells, backgrounds). Interval: the R with |rel - R| <= z sd(R)
    (a Wilson-type score interval, which keeps its width when few or no followers were sampled);
    p-value: the score test at R = margin; both read the same variance, so ``p < (1 - level) / 2``
    exactly when the interval's low end is above the margin. ``detectable``: the R at which the flag's
    power is 80 %, R = margin + z sd(margin) + z_0.8 sd(R); None when not even a complete shortcut.
    """
    from scipy.stats import norm

    z = float(norm.ppf((1 + level) / 2))
    zb = float(norm.ppf(0.8))
    a = 1 + z * z * h
    b = 2 * rel + z * z * h
    disc = max(0.0, b * b - 4 * a * (rel * rel - z * z * v_other))
    ci = ((b - np.sqrt(disc)) / (2 * a), (b + np.sqrt(disc)) / (2 * a))
    # the follower variance R (1 - R) h turns negative for R < 0 (or > 1), where an estimate just below 0
    # can fall outside the score interval; the interval then reaches to the estimate (only for rel
    # outside [0, 1], where no flag is at stake: the margin is positive)
    ci = (min(ci[0], rel), max(ci[1], rel))
    # reliance cannot exceed 1 (every swapped prediction takes the background's class); the score
    # interval can, when the variance is wide: its upper end is cut there (the truth is never above it)
    ci = (min(ci[0], 1.0), min(ci[1], 1.0))
    sd_m = np.sqrt(v_other + margin * (1 - margin) * h)
    if sd_m > 0:
        p = float(norm.sf((rel - margin) / sd_m))
    else:  # no sampling variation at all: the estimate is exact
        p = 0.0 if rel > margin else 1.0

    def short(r: float) -> float:
        return margin + z * sd_m + zb * np.sqrt(v_other + r * (1 - r) * h) - r

    detectable = None
    if short(1.0) <= 0:
        lo, hi = margin, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if short(mid) > 0 else (lo, mid)
        detectable = float(hi)
    return (float(ci[0]), float(ci[1])), p, detectable
