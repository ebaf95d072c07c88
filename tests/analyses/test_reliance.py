"""background_reliance: closed forms against brute-force oracles, hand-computed cases, degenerate
inputs, and small seeded versions of the calibration (benchmarks/calibrate_reliance.py)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from probekit.analyses import RelianceResult, background_reliance
from probekit.analyses._behaviour import (
    _boot_indices,
    _impute_diagonal,
    _pair_counts,
    permutation_variance,
    shuffle_expectation,
)
from probekit.errors import DataError


def crossed(P: np.ndarray, y: np.ndarray, c: np.ndarray):
    """Rows (pred, group, background, label, background_label) of a G x B prediction matrix."""
    G, B = P.shape
    g, b = np.meshgrid(np.arange(G), np.arange(B), indexing="ij")
    return P.ravel(), g.ravel(), b.ravel(), np.asarray(y)[g].ravel(), np.asarray(c)[b].ravel()


def simulate(rng, G, B, K, *, rho=0.0, acc=0.9, pi=None, q=0.0, drop=0.0):
    """Small generator for the tests: rho of the objects predict the background's class on every
    background; the others are right with probability acc (times 1 - drop on noise backgrounds,
    drawn with probability q), errors uniform over the other classes."""
    pi = np.full(K, 1 / K) if pi is None else np.asarray(pi)
    y = rng.choice(K, G, p=pi)
    c = rng.choice(K, B, p=pi)
    noisy = rng.random(B) < q
    right = rng.random((G, B)) < acc * (1 - drop * noisy)[None, :]
    wrong = rng.integers(0, K - 1, (G, B))
    wrong = wrong + (wrong >= y[:, None])
    P = np.where(right, y[:, None], wrong)
    follow = rng.random(G) < rho
    P[follow] = c[None, :]
    return P, y, c


# -- closed forms against brute force ------------------------------------------------------------

def _follows(pred, cls, sw):
    return float(np.sum(sw & (pred == cls)))


def test_shuffle_expectation_equals_permutation_oracle():
    rng = np.random.default_rng(0)
    B = 5
    for _ in range(20):
        pred = rng.integers(0, 3, B)
        cls = rng.integers(0, 3, B)
        y = rng.integers(0, 3)
        sw = cls != y
        oracle = np.mean([_follows(pred, cls[list(p)], sw[list(p)]) for p in itertools.permutations(range(B))])
        assert shuffle_expectation(pred, cls, sw) == pytest.approx(oracle, abs=1e-12)


def _derangement_oracle(pred, cls, sw):
    B = pred.size
    vals = [_follows(pred, cls[list(p)], sw[list(p)]) for p in itertools.permutations(range(B))
            if all(p[i] != i for i in range(B))]
    return float(np.mean(vals))


def test_reliance_is_excess_over_derangements_scaled_by_a_complete_shortcut():
    """reliance = sum(F - E_der) / sum(S - E*_der), E_der the follows expected when each row is paired
    with another of the object's backgrounds (a random derangement), E*_der that for predictions
    c_b on every row; all by enumeration over the 44 derangements of 5 backgrounds."""
    rng = np.random.default_rng(1)
    G, B, K = 4, 5, 3
    for _ in range(5):
        P = rng.integers(0, K, (G, B))
        y = rng.integers(0, K, G)
        c = np.array([0, 1, 2, 0, 1])
        num = den = null = 0.0
        for g in range(G):
            sw = c != y[g]
            e = _derangement_oracle(P[g], c, sw)
            num += _follows(P[g], c, sw) - e
            den += sw.sum() - _derangement_oracle(c.copy(), c, sw)
            null += e
        r = background_reliance(*crossed(P, y, c)[:3], label=crossed(P, y, c)[3],
                                background_label=crossed(P, y, c)[4], n_boot=20)
        assert r.reliance == pytest.approx(num / den, abs=1e-12)
        assert r.follows_background_null == pytest.approx(null / r.n_swapped, abs=1e-12)


def test_permutation_variance_equals_enumeration():
    rng = np.random.default_rng(2)
    for B in (3, 4, 5):
        H = rng.random((B, B))
        vals = [sum(H[b, p[b]] for b in range(B)) for p in itertools.permutations(range(B))]
        assert permutation_variance(H) == pytest.approx(np.var(vals), rel=1e-10)


def test_pair_counts_and_imputed_diagonal():
    P = np.array([[1, 1, 0], [2, 0, 0]])
    y = np.array([0, 1])
    c = np.array([1, 2, 0])
    # H[b, b'] = #objects predicting c[b'] (not their own class) on background b
    want = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(_pair_counts(P, y, c), want)
    H = np.random.default_rng(3).random((6, 6))
    J = _impute_diagonal(H)
    off = ~np.eye(6, dtype=bool)
    np.testing.assert_array_equal(J[off], H[off])
    d = J - J.mean(1, keepdims=True) - J.mean(0, keepdims=True) + J.mean()
    assert np.abs(np.diag(d)).max() < 1e-9


# -- hand-computed cases -------------------------------------------------------------------------

def test_hand_half_the_objects_follow():
    # backgrounds of classes 0, 1, 2; object A (class 0) predicts the background's class, object B
    # (class 1) is always right. A: S = 2, F = 2, E = 0; B: S = 2, F = 0, E = 0; the complete
    # shortcut's E* = 0 for both, so reliance = 2 / 4.
    P = np.array([[0, 1, 2], [1, 1, 1]])
    r = background_reliance(*crossed(P, [0, 1], [0, 1, 2])[:3], label=crossed(P, [0, 1], [0, 1, 2])[3],
                            background_label=crossed(P, [0, 1], [0, 1, 2])[4], n_boot=50)
    assert r.reliance == pytest.approx(0.5)
    assert r.n_swapped == 4
    assert r.accuracy_own == pytest.approx(1.0)  # A on background 0, B on background 1
    assert r.accuracy_other == pytest.approx(0.5)  # A 0/2, B 2/2
    assert r.bg_gap == pytest.approx(0.5)


def test_hand_one_follow_in_two_classes():
    # backgrounds 0, 0, 1, 1; A (class 0) predicts 0, 0, 1, 0; B (class 1) always 1.
    # A: S = 2, F = 1; its only prediction 1 (on background 2) pairs with background 3 (class 1) among
    # its 3 other backgrounds: E = 1/3. The complete shortcut (0, 0, 1, 1): rows 2 and 3 each pair
    # with the other: E* = 2/3, so A's scale is 2 - 2/3 = 4/3; B's: the same by symmetry, F = E = 0.
    # reliance = (1 - 1/3) / (8/3) = 0.25.
    P = np.array([[0, 0, 1, 0], [1, 1, 1, 1]])
    rows = crossed(P, [0, 1], [0, 0, 1, 1])
    r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=50)
    assert r.reliance == pytest.approx(0.25)
    assert r.follows_background == pytest.approx(1 / 4)
    assert r.follows_background_null == pytest.approx((1 / 3) / 4)


def test_complete_shortcut_reads_one_whatever_the_classes():
    rng = np.random.default_rng(4)
    for K, B in ((2, 8), (3, 4), (10, 8), (100, 8), (10, 16)):
        P, y, c = simulate(rng, 60, B, K, rho=1.0)
        if np.unique(c).size < 2:
            continue
        rows = crossed(P, y, c)
        r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=50)
        assert r.reliance == pytest.approx(1.0)
        assert r.shortcut is True


def test_constant_predictor_is_not_a_shortcut():
    P = np.full((40, 6), 3)
    y = np.arange(40) % 5
    c = np.array([0, 1, 2, 3, 4, 3])
    rows = crossed(P, y, c)
    r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=100)
    assert r.reliance == pytest.approx(0.0, abs=1e-12)
    assert r.shortcut is False and r.reason is None
    assert r.p_value > 0.5
    assert r.effect == pytest.approx(0.0, abs=1e-12) and r.sensitive is False
    assert r.flip_rate == 0.0


# -- degenerate inputs ---------------------------------------------------------------------------

def test_every_background_one_class_cannot_be_judged():
    rng = np.random.default_rng(5)
    P, y, _ = simulate(rng, 50, 6, 4)
    rows = crossed(P, y, np.zeros(6, dtype=int))
    r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=50)
    assert r.shortcut is None and r.reliance is None and "one class" in r.reason
    assert r.n_background_classes == 1
    assert r.effect is not None and r.sensitive is not None  # the background effect needs no classes


def test_swapped_rows_of_one_class_cannot_be_judged():
    # every object is of class 0; backgrounds 0, 0, 1: the swapped rows all point to class 1
    P = np.zeros((10, 3), dtype=int)
    rows = crossed(P, np.zeros(10, dtype=int), [0, 0, 1])
    r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=50)
    assert r.shortcut is None and "fewer than 2 background classes" in r.reason


def test_too_few_objects_or_backgrounds_and_no_background_label():
    P = np.array([[0, 1, 2]])
    rows = crossed(P, [0], [0, 1, 2])
    r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=20)
    assert r.shortcut is None and "at least 2" in r.reason and r.sensitive is None
    P, y, c = simulate(np.random.default_rng(6), 20, 4, 3)
    rows = crossed(P, y, c)
    r = background_reliance(*rows[:3], label=rows[3], n_boot=20)
    assert r.shortcut is None and "background_label" in r.reason
    assert r.accuracy_own is None and r.bg_gap is None and r.effect is not None


def test_unknown_background_class_rows_are_left_out():
    P = np.array([[0, 1, 2, 1], [1, 1, 1, 2]])
    rows = crossed(P, [0, 1], [0, 1, 2, -1])
    r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=20)
    assert r.n_swapped == 4 and r.n_background_classes == 3


def test_small_designs_two_and_hundred_classes_three_backgrounds():
    rng = np.random.default_rng(7)
    for G, B, K in ((30, 3, 10), (30, 8, 2), (100, 8, 100)):
        P, y, c = simulate(rng, G, B, K)
        rows = crossed(P, y, c)
        r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=200)
        if r.reason is None:
            assert r.shortcut is False
            assert r.reliance_ci[0] <= r.reliance <= r.reliance_ci[1]
            assert r.detectable is None or r.margin < r.detectable <= 1
        assert r.sensitive is False


def test_bad_inputs_raise_clear_errors():
    P, y, c = simulate(np.random.default_rng(8), 5, 3, 3)
    pred, g, b, lab, bl = crossed(P, y, c)
    with pytest.raises(DataError, match="no row on background"):
        background_reliance(pred[1:], g[1:], b[1:], label=lab[1:], background_label=bl[1:])
    with pytest.raises(DataError, match="rows on background"):
        background_reliance(np.r_[pred, pred[:1]], np.r_[g, g[:1]], np.r_[b, b[:1]], label=np.r_[lab, lab[:1]],
                            background_label=np.r_[bl, bl[:1]])
    lab2 = lab.copy()
    lab2[0] = (lab2[0] + 1) % 3
    with pytest.raises(DataError, match="label differs"):
        background_reliance(pred, g, b, label=lab2, background_label=bl)
    bl2 = bl.copy()
    bl2[0] = (bl2[0] + 1) % 3
    with pytest.raises(DataError, match="background_label differs"):
        background_reliance(pred, g, b, label=lab, background_label=bl2)
    with pytest.raises(DataError, match="basis"):
        background_reliance(pred, g, b, label=lab, background_label=bl, basis="labels")


# -- result, reproducibility ---------------------------------------------------------------------

def test_to_dict_is_json_and_leaves_out_the_replicates():
    P, y, c = simulate(np.random.default_rng(9), 30, 5, 4, rho=0.3)
    rows = crossed(P, y, c)
    r = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=100,
                            basis="model_prediction")
    assert isinstance(r, RelianceResult)
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert "reliance_boot" not in d and d["basis"] == "model_prediction"
    assert r.reliance_boot.shape == (100,)


def test_replicates_depend_on_the_design_and_seed_only():
    """Same G, B, seed: the same resamples, whatever the predictions or the row order, so two models'
    replicate differences are paired."""
    a1, b1 = _boot_indices(40, 6, 50, 3)
    a2, b2 = _boot_indices(40, 6, 50, 3)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    rng = np.random.default_rng(10)
    P, y, c = simulate(rng, 40, 6, 5, rho=0.2)
    rows = crossed(P, y, c)
    order = rng.permutation(rows[0].size)
    r1 = background_reliance(*rows[:3], label=rows[3], background_label=rows[4], n_boot=50, random_state=3)
    r2 = background_reliance(*(v[order] for v in rows[:3]), label=rows[3][order],
                             background_label=rows[4][order], n_boot=50, random_state=3)
    np.testing.assert_array_equal(r1.reliance_boot, r2.reliance_boot)


# -- small seeded calibration (the full one: benchmarks/calibrate_reliance.py) -------------------

def _rates(rng, sims, G, B, K, n_boot=200, truth=0.0, **kw):
    rows = []
    for i in range(sims):
        P, y, c = simulate(rng, G, B, K, **kw)
        data = crossed(P, y, c)
        r = background_reliance(*data[:3], label=data[3], background_label=data[4], n_boot=n_boot,
                                random_state=i)
        if r.shortcut is not None:
            rows.append((r.shortcut, r.reliance_ci[0] <= truth <= r.reliance_ci[1], r.sensitive))
    a = np.array(rows, dtype=float)
    return a[:, 0].mean(), a[:, 1].mean(), a[:, 2].mean(), len(rows)


@pytest.mark.slow
def test_false_flags_at_the_boundary_and_under_noise_backgrounds():
    rng = np.random.default_rng(11)
    # the materiality boundary: a share margin = 0.03 of objects follows the background's class
    flag, cov, _, n = _rates(rng, 200, 100, 6, 5, rho=0.03, truth=0.03)
    assert flag <= 0.06 and 0.88 <= cov <= 1.0, (flag, cov, n)
    # noise backgrounds (accuracy 0.94 -> 0.43 on half of them), 90 / 10 two-class: the old pull
    # flagged 82.5 % of such data sets; the directional measure must not
    flag, cov, sens, n = _rates(rng, 200, 100, 8, 2, acc=0.94, pi=[0.9, 0.1], q=0.5, drop=0.54)
    assert n >= 80
    assert flag <= 0.06 and cov >= 0.88, (flag, cov, n)
    assert sens >= 0.8  # but the accuracy drop is found, under its own name


def test_power_and_coverage_for_a_partial_shortcut():
    rng = np.random.default_rng(12)
    flag, cov, sens, _ = _rates(rng, 60, 300, 8, 10, rho=0.1, truth=0.1)
    assert flag >= 0.8, flag
    assert cov >= 0.85, cov
    assert sens <= 0.1  # a shortcut over balanced classes moves no background's accuracy


def test_background_effect_does_not_fire_on_an_unsure_robust_model():
    rng = np.random.default_rng(13)
    flag, _, sens, _ = _rates(rng, 150, 100, 8, 10, acc=0.6)
    assert sens <= 0.06 and flag <= 0.06, (sens, flag)


def test_interval_contains_the_estimate_just_below_zero():
    """A robust model with a few idiosyncratic errors reads a reliance a hair below 0: its interval reaches it."""
    from probekit.analyses import background_reliance

    rng = np.random.default_rng(0)
    G, B, k = 240, 8, 10
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    label, bl = rng.integers(0, k, G), np.arange(B) % k
    pred = np.where(rng.random(g.size) < 0.05, rng.integers(0, k, g.size), label[g])
    r = background_reliance(pred, g, b, label=label[g], background_label=bl[b], n_boot=300)
    assert r.reliance < 0 and r.reliance_ci[0] <= r.reliance <= r.reliance_ci[1]
    assert r.shortcut is False


def test_interval_never_reaches_above_one():
    """A complete shortcut over few backgrounds has a wide interval; it stops at 1, the largest reliance."""
    from probekit.analyses import background_reliance

    G, B, k = 30, 3, 3
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    label, bl = np.arange(G) % k, np.arange(B) % k
    r = background_reliance(bl[b], g, b, label=label[g], background_label=bl[b], n_boot=200)
    assert r.reliance == pytest.approx(1.0) and r.reliance_ci[1] <= 1.0
