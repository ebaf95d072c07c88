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

from ._common import ResultMixin, as_vector, check_number, percentile_ci

__all__ = [
    "BackgroundBehaviourResult",
    "VariantBehaviourResult",
    "background_behaviour",
    "variant_behaviour",
]

#: default materiality of the background pull: a model is flagged only when, beyond sampling noise,
#: backgrounds move at least this share of its predictions towards the same classes
PULL_THRESHOLD = 0.05


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
    per_background_pull: np.ndarray


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
    0.05 plus the noise floor, so the flag errs towards caution (0 false flags in 2,100 null and
    unsure-foreground datasets; power 100 % from a true pull of 0.13 at 100 foregrounds).

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
    # pull grows, so a real pull reads low (a complete shortcut over 8 backgrounds and 100 foregrounds:
    # 0.770 for a true 0.875). The reported interval is the hull of the interval about the estimate and
    # the one about the bootstrap bias-corrected TV (2 TV - mean TV*): 89-100 % coverage over 44
    # simulated settings, where either alone fell to 0-54 % or 2-47 % (benchmarks/calibrate_verdict.py,
    # docs/METRICS.md). The flag reads the low end about the estimate: conservative.
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
