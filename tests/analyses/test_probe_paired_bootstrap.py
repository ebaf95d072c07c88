"""probe_id_ood's paired bootstrap: planted correctness vectors with a known population gap.

The oracle is the planted model: each test row i has a pair (c_id, c_ood) of 0/1 correctness drawn
from a fixed joint distribution, so the population gap P(c_id = 1) - P(c_ood = 1) and the variance
of the per-row difference are known in closed form.
"""

from __future__ import annotations

import numpy as np
import pytest

from probekit.analyses import LinearProbe, probe_id_ood
from probekit.analyses._common import percentile_ci
from probekit.analyses._probes import _bootstrap_accuracies
from probekit.errors import DataError

# joint distribution of (c_id, c_ood): P(1,1), P(1,0), P(0,1), P(0,0)
P11, P10, P01, P00 = 0.69, 0.21, 0.01, 0.09
TRUE_GAP = (P11 + P10) - (P11 + P01)  # 0.90 - 0.70 = 0.20
VAR_DIFF = P10 + P01 - TRUE_GAP**2  # variance of c_id - c_ood: 0.18
VAR_UNPAIRED = 0.9 * 0.1 + 0.7 * 0.3  # var(c_id) + var(c_ood): 0.30, as if the rows were independent


def _planted(rng, n):
    cell = rng.choice(4, size=n, p=[P11, P10, P01, P00])
    return np.isin(cell, (0, 1)).astype(float), np.isin(cell, (0, 2)).astype(float)


def test_paired_gap_interval_covers_the_planted_gap():
    rng = np.random.default_rng(20261202)
    n, n_sets, n_boot = 300, 200, 500
    hits, widths, widths_unpaired = 0, [], []
    for _ in range(n_sets):
        cid, cood = _planted(rng, n)
        bid, bood = _bootstrap_accuracies(cid, cood, n_boot, rng, paired=True)
        lo, hi = percentile_ci(bid - bood, 0.95)
        hits += lo <= TRUE_GAP <= hi
        widths.append(hi - lo)
        bid, bood = _bootstrap_accuracies(cid, cood, n_boot, rng, paired=False)
        lo_u, hi_u = percentile_ci(bid - bood, 0.95)
        widths_unpaired.append(hi_u - lo_u)
    coverage = hits / n_sets
    assert 0.90 <= coverage <= 0.99, coverage
    # widths: 2 * 1.96 * sqrt(var / n) for the per-row difference (paired) and for independent rows
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(VAR_DIFF / n), rel=0.1)
    assert np.mean(widths_unpaired) == pytest.approx(2 * 1.96 * np.sqrt(VAR_UNPAIRED / n), rel=0.1)


def test_paired_replicates_resample_the_same_rows():
    """Paired replicate b of each split averages the same rows: the replicate gap is the mean of the
    per-row differences over those rows, so identical vectors give exactly 0 in every replicate."""
    rng = np.random.default_rng(0)
    cid, cood = _planted(rng, 200)
    bid, bood = _bootstrap_accuracies(cid, cid.copy(), 300, np.random.default_rng(1), paired=True)
    assert np.array_equal(bid, bood)
    bid, bood = _bootstrap_accuracies(cid, cood, 300, np.random.default_rng(1), paired=True)
    r = np.random.default_rng(1)
    for b in range(300):
        idx = r.integers(0, 200, 200)
        assert bid[b] == cid[idx].mean() and bood[b] == cood[idx].mean()


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)
    n, d = 300, 8
    y = rng.integers(0, 3, 3 * n)
    X = rng.normal(size=(3 * n, d))
    X[np.arange(3 * n), y] += 1.5
    Xood = X[2 * n:] + rng.normal(size=(n, d)) * 1.5  # the same rows under a noisier "background"
    return X[:n], y[:n], X[n:2 * n], y[n:2 * n], X[2 * n:], Xood, y[2 * n:]


def test_identical_id_and_ood_rows_give_a_zero_interval(split):
    Xtr, ytr, _, _, Xte, _, yte = split
    res = probe_id_ood(Xtr, ytr, Xte, yte, Xte.copy(), yte, probe=LinearProbe(C=1.0), n_boot=200)
    assert res.paired is True  # auto: equal row counts
    assert res.gap == 0.0 and res.gap_ci == (0.0, 0.0)
    assert res.id_ci == res.ood_ci
    unpaired = probe_id_ood(Xtr, ytr, Xte, yte, Xte.copy(), yte, probe=LinearProbe(C=1.0), n_boot=200,
                            paired=False)
    assert unpaired.paired is False
    assert unpaired.gap_ci[1] - unpaired.gap_ci[0] > 0.05  # independent resamples of equal rows


def test_paired_interval_is_narrower_on_paired_rows(split):
    Xtr, ytr, _, _, Xte, Xood, yte = split
    kw = dict(probe=LinearProbe(C=1.0), n_boot=400, random_state=0)
    p = probe_id_ood(Xtr, ytr, Xte, yte, Xood, yte, **kw)
    u = probe_id_ood(Xtr, ytr, Xte, yte, Xood, yte, paired=False, **kw)
    assert p.paired and not u.paired
    assert p.gap == u.gap and p.gap > 0.1
    assert p.gap_ci[0] <= p.gap <= p.gap_ci[1]
    # the two correctness vectors correlate (same rows): the paired interval is the narrower one
    assert p.gap_ci[1] - p.gap_ci[0] < 0.9 * (u.gap_ci[1] - u.gap_ci[0])
    assert p.to_dict()["paired"] is True


def test_paired_needs_equal_row_counts(split):
    Xtr, ytr, Xid, yid, _, Xood, yood = split
    res = probe_id_ood(Xtr, ytr, Xid, yid, Xood[:250], yood[:250], probe=LinearProbe(C=1.0), n_boot=50)
    assert res.paired is False  # auto with different counts
    with pytest.raises(DataError, match="paired=True needs as many OOD rows as ID rows"):
        probe_id_ood(Xtr, ytr, Xid, yid, Xood[:250], yood[:250], probe=LinearProbe(C=1.0), paired=True)
    with pytest.raises(DataError, match="'paired' parameter"):
        probe_id_ood(Xtr, ytr, Xid, yid, Xood, yood, probe=LinearProbe(C=1.0), paired="yes")
