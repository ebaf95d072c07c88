"""Background correlation, decodability, sensitivity and NMS against numpy/scipy, hand cases and planted truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from probekit.analyses import (
    BackgroundCorrelation,
    background_decodability,
    background_sensitivity,
    normalized_mean_shift,
)
from probekit.errors import DataError
from probekit.testing import ArrayActivations as _FakeActs


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    n, d = 60, 5
    F = rng.normal(size=(n, 3))
    X = rng.normal(size=(n, d)) + 100.0  # large offset: the running sums must stay accurate
    X[:, 0] += 2 * F[:, 0]
    X[:, 1] = np.exp(F[:, 1]) + 0.1 * rng.normal(size=n)
    y = rng.integers(0, 3, n)
    X[:, 2] += y
    return X, F, y


@pytest.mark.parametrize("chunk", [1, 7, 60])
def test_pearson_spearman_equal_scipy_whatever_the_chunk(small, chunk):
    X, F, y = small
    bc = BackgroundCorrelation(n_permutations=20, chunk_rows=chunk, random_state=0).fit(
        _FakeActs(X), F, label=y)
    for u in range(X.shape[1]):
        for f in range(F.shape[1]):
            assert bc.pearson_[u, f] == pytest.approx(stats.pearsonr(X[:, u], F[:, f])[0], abs=1e-10)
            assert bc.spearman_[u, f] == pytest.approx(stats.spearmanr(X[:, u], F[:, f])[0], abs=1e-10)
        for k in range(3):
            assert bc.label_corr_[u, k] == pytest.approx(stats.pearsonr(X[:, u], y == k)[0], abs=1e-10)
        # variance shares against sklearn / a direct ANOVA
        r2 = LinearRegression().fit(F, X[:, u]).score(F, X[:, u])
        assert bc.factor_r2_[u] == pytest.approx(r2, abs=1e-9)
        means = np.array([X[y == k, u].mean() for k in range(3)])
        between = sum((y == k).sum() * (means[k] - X[:, u].mean()) ** 2 for k in range(3))
        assert bc.label_eta2_[u] == pytest.approx(between / ((X[:, u] - X[:, u].mean()) ** 2).sum(), abs=1e-9)


def test_chunk_size_does_not_change_permutation_null(small):
    X, F, _ = small
    a = BackgroundCorrelation(n_permutations=30, chunk_rows=1, random_state=3).fit(X, F)
    b = BackgroundCorrelation(n_permutations=30, chunk_rows=60, random_state=3).fit(X, F)
    np.testing.assert_allclose(a.null_abs_r_, b.null_abs_r_, atol=1e-10)
    np.testing.assert_array_equal(a.significant_, b.significant_)
    # permutation null against a direct recomputation with the same shuffles
    rng = np.random.default_rng(3)
    p0 = rng.permutation(60)
    assert a.null_abs_r_[0, 0, 1] == pytest.approx(abs(stats.pearsonr(X[:, 0], F[p0, 1])[0]), abs=1e-10)


def _planted(p, n=1000, d=100, seed=0, strength=0.6):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 1))
    X = rng.normal(size=(n, d))
    k = round(p * d)
    X[:, :k] = strength * f + np.sqrt(1 - strength**2) * X[:, :k]
    return X, f, k / d, strength**2


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_planted_fraction(seed):
    shares, var_shares = [], []
    for p in (0.0, 0.1, 0.3, 0.6):
        X, f, true_frac, true_r2 = _planted(p, seed=seed)
        # per-unit permutation p-values are >= 1/(1 + P): BH over 100 units rejects 10 of them only
        # if 1/(1 + P) <= 0.05 * 10 / 100, i.e. P >= 199; 400 leaves room for null units at the floor
        res = BackgroundCorrelation(n_permutations=400, random_state=seed).fit(X, f).result_
        shares.append(res.share_significant["factor0"])
        var_shares.append(res.mean_factor_r2)
        # BH lets up to alpha of the discoveries be false; plus sampling noise over 100 units
        assert true_frac - 0.03 <= res.share_significant["factor0"] <= true_frac * (1 + 0.05 / 0.95) + 0.04
        # planted R2 is strength^2 on planted units, ~1/n elsewhere
        assert res.mean_factor_r2 == pytest.approx(true_frac * true_r2 + (1 - true_frac) / 1000, abs=0.02)
        if p == 0:
            # no planted background: uncorrected share within the null, BH finds (almost) nothing
            assert res.share_above_threshold["factor0"] <= 0.05 + 0.05
            assert res.share_significant["factor0"] <= 0.02
            assert res.mean_abs_pearson["factor0"] == pytest.approx(res.noise_floor, rel=0.25)
    assert np.all(np.diff(shares) > 0) and np.all(np.diff(var_shares) > 0)


def test_dead_units_reported_not_dropped(small):
    X, F, _ = small
    X = X.copy()
    X[:, 3] = 5.0
    bc = BackgroundCorrelation(n_permutations=10).fit(X, F)
    assert bc.result_.n_dead_units == 1 and np.isnan(bc.pearson_[3]).all()
    d = bc.to_dict()
    json.dumps(d)
    assert d["pearson"][3] == [None, None, None]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda X, F, y: BackgroundCorrelation().fit(X[:-1], F), "rows"),
        (lambda X, F, y: BackgroundCorrelation().fit(np.where(X > 101, np.nan, X), F), "NaN"),
        (lambda X, F, y: BackgroundCorrelation().fit(X, np.column_stack([F, np.ones(len(F))])), "constant"),
        (lambda X, F, y: BackgroundCorrelation().fit(X, F, factor_names=["a", "b", "c"], use=["hue"]), "Unknown factor"),
        (lambda X, F, y: BackgroundCorrelation().fit(X, F, label=np.zeros(len(F))), "single class"),
        (lambda X, F, y: background_decodability(X[:8], F[:8], cv=5), "at least 10 rows"),
        (lambda X, F, y: background_sensitivity(X, np.arange(len(X))), "only 1 row"),
        (lambda X, F, y: normalized_mean_shift(X, X[:, :2]), "features"),
    ],
)
def test_bad_input(small, call, match):
    X, F, y = small
    with pytest.raises(DataError, match=match):
        call(X, F, y)


# -- decodability ---------------------------------------------------------------------------------
def test_decodability_cv_equals_sklearn_and_control_near_zero():
    rng = np.random.default_rng(0)
    n = 400
    F = rng.normal(size=(n, 2))
    X = rng.normal(size=(n, 20))
    X[:, 0] += F[:, 0]  # factor0 decodable, factor1 not
    res = background_decodability(X, F, factor_names=["hue", "bright"], cv=5, n_shuffles=4, alpha=1.0,
                                  random_state=0)
    # oracle: same folds with sklearn
    fold = np.random.default_rng(0).permutation(np.arange(n) % 5)
    pred = np.empty(n)
    for k in range(5):
        m = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X[fold != k], F[fold != k, 0])
        pred[fold == k] = m.predict(X[fold == k])
    r2 = 1 - ((F[:, 0] - pred) ** 2).sum() / ((F[:, 0] - F[:, 0].mean()) ** 2).sum()
    assert res.score["hue"] == pytest.approx(r2, abs=1e-9)
    assert res.score["hue"] > 0.4 and abs(res.excess["bright"]) < 0.1
    assert abs(res.control_mean["hue"]) < 0.1
    assert res.score_ci["hue"][0] <= res.score["hue"] <= res.score_ci["hue"][1]
    json.dumps(res.to_dict())


def test_decodability_transfer_and_categorical():
    rng = np.random.default_rng(1)
    n = 300
    F = np.column_stack([rng.normal(size=n), rng.integers(0, 3, n)])
    X = rng.normal(size=(n, 10))
    X[:, 0] += F[:, 0]
    X[:, 1] += 2 * F[:, 1]
    res = background_decodability(X[:200], F[:200], factor_names=["c", "k"], X_test=X[200:],
                                  factors_test=F[200:], cv=3, n_shuffles=3, alpha=1.0)
    assert res.mode == "transfer" and res.metric == {"c": "r2", "k": "balanced_accuracy"}
    ref = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(X[:200], F[:200, 0])
    assert res.score["c"] == pytest.approx(ref.score(X[200:], F[200:, 0]), abs=1e-9)
    assert res.score["k"] > 0.7 and abs(res.control_mean["k"] - 1 / 3) < 0.12


def test_decodability_streams_like_memory():
    rng = np.random.default_rng(2)
    F = rng.normal(size=(150, 1))
    X = rng.normal(size=(150, 6)) + F
    a = background_decodability(X, F, cv=3, n_shuffles=2)
    b = background_decodability(_FakeActs(X), F, cv=3, n_shuffles=2, chunk_rows=11)
    assert a.score == pytest.approx(b.score, abs=1e-9)


# -- background sensitivity -----------------------------------------------------------------------
def test_sensitivity_hand_case():
    # 2 groups x 2 rows, 1 unit: values 0,2 | 10,14 -> within = 1+1+4+4 = 10, total = sum (x-6.5)^2
    X = np.array([[0.0], [2.0], [10.0], [14.0]])
    res = background_sensitivity(X, [0, 0, 1, 1], n_boot=10)
    total = ((X - X.mean()) ** 2).sum()
    assert res.layer == pytest.approx(10.0 / total)
    assert res.per_unit[0] == pytest.approx(10.0 / total)


def test_sensitivity_planted_and_layer_weighting():
    rng = np.random.default_rng(0)
    G, R, d = 80, 6, 8
    fg = rng.normal(size=(G, d))
    bg = rng.normal(size=(G * R, d))
    w = np.linspace(0, 1, d)  # unit u: background weight w_u
    X = np.repeat(fg, R, axis=0) * np.sqrt(1 - w**2) + bg * w
    group = np.repeat(np.arange(G), R)
    res = background_sensitivity(_FakeActs(X), group, chunk_rows=13, n_boot=100)
    # oracle: direct numpy
    gm = np.stack([X[group == g].mean(axis=0) for g in range(G)])[group]
    within = ((X - gm) ** 2).sum(axis=0)
    total = ((X - X.mean(axis=0)) ** 2).sum(axis=0)
    np.testing.assert_allclose(res.per_unit, within / total, rtol=1e-9, atol=1e-12)
    assert res.layer == pytest.approx(within.sum() / total.sum(), rel=1e-9)
    # planted: expected within share ~ w^2 (R-1)/R / (w^2 (R-1)/R + (1-w^2) + w^2/R)
    assert np.all(np.diff(res.per_unit) > 0)
    assert res.layer_ci[0] <= res.layer <= res.layer_ci[1]


# -- NMS ------------------------------------------------------------------------------------------
def test_nms_hand_case_and_planted():
    Xa = np.array([[0.0, 1.0], [2.0, 3.0]])  # means (1, 2), variances (1, 1)
    Xb = np.array([[3.0, 2.0], [5.0, 2.0]])  # means (4, 2)
    res = normalized_mean_shift(Xa, Xb, n_boot=20)
    assert res.nms == pytest.approx(9.0 / 2.0)
    assert res.paired
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 20))
    for shift in (0.0, 0.5, 1.0):
        Xb = base + rng.normal(size=(500, 20)) * 0.1 + shift
        r = normalized_mean_shift(_FakeActs(base), Xb, chunk_rows=37, n_boot=200, random_state=1)
        expect = 20 * shift**2 / base.var(axis=0).sum()
        ref = ((Xb.mean(0) - base.mean(0)) ** 2).sum() / base.var(axis=0).sum()
        assert r.nms == pytest.approx(ref, rel=1e-9)
        assert r.nms == pytest.approx(expect, abs=0.02)
        # the noise term of paired rows: the variance of the row differences, not 1/n_a + 1/n_b
        D = Xb - base
        null = D.var(axis=0, ddof=1).sum() / (500 * base.var(axis=0).sum())
        assert r.null_level == pytest.approx(null, rel=1e-9)
        assert r.null_level < 0.05 * (2 / 500)  # well-matched pairs: far below the unpaired level
        assert r.nms_debiased == pytest.approx(ref - null, rel=1e-9, abs=1e-15)
        # the interval is for the true NMS (20 shift^2 over the true sum of variances, 20), at every
        # shift, no shift included
        assert r.ci[0] <= shift**2 <= r.ci[1]


def test_nms_unpaired_noise_term_and_debiased_estimate():
    rng = np.random.default_rng(5)
    Xa = rng.normal(size=(300, 8)) * 2.0
    Xb = rng.normal(size=(200, 8)) + 0.3
    r = normalized_mean_shift(_FakeActs(Xa), Xb, chunk_rows=23, n_boot=50)
    assert not r.paired and (r.n_a, r.n_b) == (300, 200)
    S = Xa.var(axis=0).sum()
    # oracle: Var(mean_b - mean_a) estimated with ddof=1 variances of each family
    null = (Xa.var(axis=0, ddof=1).sum() / 300 + Xb.var(axis=0, ddof=1).sum() / 200) / S
    assert r.nms == pytest.approx(((Xb.mean(0) - Xa.mean(0)) ** 2).sum() / S, rel=1e-9)
    assert r.null_level == pytest.approx(null, rel=1e-9)
    assert r.nms_debiased == pytest.approx(r.nms - null, rel=1e-9)
    assert r.ci[0] <= r.nms_debiased <= r.ci[1]
    json.dumps(r.to_dict())


@pytest.mark.parametrize("paired", [True, False])
def test_nms_streamed_in_lockstep_equals_in_memory(paired):
    rng = np.random.default_rng(6)
    A = rng.normal(size=(120, 7)) + 50.0  # an offset: the shifted sums must stay accurate
    B = 0.8 * A + 0.6 * rng.normal(size=(120, 7)) + 0.2
    mem = normalized_mean_shift(A, B, paired=paired, n_boot=40, random_state=3)
    same = normalized_mean_shift(_FakeActs(A), _FakeActs(B), paired=paired, n_boot=40, random_state=3,
                                 chunk_rows=120)  # one chunk, as the arrays are read
    lazy = normalized_mean_shift(_FakeActs(A), _FakeActs(B), paired=paired, n_boot=40, random_state=3,
                                 chunk_rows=17)
    D = B - A
    S = A.var(axis=0).sum()
    noise = (D.var(axis=0, ddof=1).sum() / 120 if paired
             else A.var(axis=0, ddof=1).sum() / 120 + B.var(axis=0, ddof=1).sum() / 120)
    for r in (mem, same, lazy):
        assert r.paired is paired
        assert r.nms == pytest.approx((D.mean(0) ** 2).sum() / S, rel=1e-9)
        assert r.null_level == pytest.approx(noise / S, rel=1e-9)
    assert same.ci == pytest.approx(mem.ci, rel=1e-9)  # same chunks, same bootstrap weights
    assert lazy.ci[0] <= lazy.nms_debiased <= lazy.ci[1]


def test_nms_needs_two_rows_in_each_family():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(DataError, match="X_b has 1 sample"):
        normalized_mean_shift(X, X[:1], paired=False)


def test_parametric_null_p_values_equal_scipy(small):
    X, F, _ = small
    bc = BackgroundCorrelation(n_permutations=0, random_state=0).fit(X, F)
    for u in range(X.shape[1]):
        for f in range(F.shape[1]):
            # scipy's pearsonr p-value: the exact null of r for Gaussian data (a beta distribution)
            assert bc.p_values_[u, f] == pytest.approx(stats.pearsonr(X[:, u], F[:, f])[1], rel=1e-8)
    assert bc.null_abs_r_.shape == (X.shape[1], 0, F.shape[1])
    # the per-unit threshold is the |r| whose p-value is alpha (n = 60)
    r = bc.threshold_["factor0"]
    x = np.r_[np.zeros(30), np.ones(30)]
    y = r * (x - x.mean()) / x.std() + np.sqrt(1 - r**2) * np.tile([1.0, -1.0], 30)
    assert stats.pearsonr(x, y)[0] == pytest.approx(r, abs=1e-12)
    assert stats.pearsonr(x, y)[1] == pytest.approx(0.05, rel=1e-6)


def test_parametric_null_is_calibrated_on_independent_data():
    # 300 null data sets (20 units, 100 rows, non-Gaussian units): the uncorrected threshold is
    # exceeded by ~alpha of units, the Sidak family-wise one in at most ~alpha of data sets
    rng = np.random.default_rng(1)
    share, any_fwer = [], []
    for _ in range(300):
        X = rng.exponential(size=(100, 20))
        f = rng.normal(size=(100, 1))
        res = BackgroundCorrelation(n_permutations=0, spearman=False).fit(X, f).result_
        share.append(res.share_above_threshold["factor0"])
        any_fwer.append(res.share_above_fwer_threshold["factor0"] > 0)
    # binomial sd of the mean share over 6000 unit tests: 0.003; of the FWER rate over 300 sets: 0.013
    assert np.mean(share) == pytest.approx(0.05, abs=0.012)
    assert np.mean(any_fwer) <= 0.05 + 0.035


@pytest.mark.parametrize("spearman", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("row", [0, 5, 23, 39])
def test_a_nan_or_inf_in_any_chunk_is_refused_with_its_row(bad, row, spearman):
    """The pass checks finiteness through its sums of squares, not a separate pass: the row it names
    must still be the first bad one, whichever chunk of 8 rows it is in."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 6)).astype(np.float32)
    X[row, 3] = bad
    X[min(row + 9, 39), 1] = bad  # a later one, in another chunk: the first is named
    est = BackgroundCorrelation(n_permutations=0, chunk_rows=8, spearman=spearman)
    with pytest.raises(DataError, match=f"first at row {row}\\b"):
        est.fit(X, rng.normal(size=(40, 2)))


def test_finite_values_whose_squares_overflow_float32_are_not_called_nan():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 4)).astype(np.float32)
    X[:, 2] *= np.float32(1e20)  # finite, but its squares overflow float32
    F = rng.normal(size=(30, 1))
    est = BackgroundCorrelation(n_permutations=0, chunk_rows=8, spearman=False).fit(X, F)  # no DataError
    for j in (0, 1, 3):  # the other units are computed as usual (scipy as the oracle)
        assert est.pearson_[j, 0] == pytest.approx(stats.pearsonr(X[:, j], F[:, 0])[0], abs=1e-5)
