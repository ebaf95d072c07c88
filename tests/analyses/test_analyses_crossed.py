"""Two-way decomposition on a crossed split and the comparison with a reference, on planted layers."""

import numpy as np
import pytest

from probekit.analyses import compare_background, crossed_decomposition
from probekit.errors import DataError

G, B, D = 200, 8, 32


def _layers(seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), B)
    b = np.tile(np.arange(B), G)
    fg = rng.normal(size=(G, D))
    bg = rng.normal(size=(B, D))

    def layer(a, c):
        return a * fg[g] + c * bg[b] + noise * rng.normal(size=(G * B, D))

    return g, b, fg, bg, layer


def test_components_match_the_planted_effects():
    g, b, _, bg, layer = _layers()
    X = layer(1.0, 0.5)
    r = crossed_decomposition(X, g, b, n_boot=100)
    # truth, conditional on the split's backgrounds (fixed effects), per row and summed over units
    bg_truth = 0.25 * ((bg - bg.mean(0)) ** 2).sum() / (B - 1)
    assert r.background == pytest.approx(bg_truth, rel=0.05)
    assert r.foreground == pytest.approx(D * 1.0, rel=0.15)  # fg entries N(0, 1): D per row
    assert r.interaction == pytest.approx(D * 0.01, rel=0.1)
    assert r.background_ci[0] <= r.background <= r.background_ci[1]


def test_weaker_foreground_is_not_more_background():
    """Teacher fg + 0.3 bg, student 0.5 fg + 0.3 bg: the same background response, no flag."""
    g, b, _, _, layer = _layers(1)
    teacher, weak, strong = layer(1, 0.3), layer(0.5, 0.3), layer(1, 0.9)
    r_weak = compare_background(weak, [teacher], g, b, n_boot=200)
    assert not r_weak.flagged and r_weak.ratio == pytest.approx(1.0, abs=0.05)
    # ... while a share of variance reads it as more background
    share = [crossed_decomposition(X, g, b, n_boot=10).background_share for X in (teacher, weak)]
    assert share[1] > 2 * share[0]
    r_strong = compare_background(strong, [teacher], g, b, n_boot=200)
    assert r_strong.flagged and r_strong.ratio == pytest.approx(9.0, rel=0.05)


def test_odds_against_seeded_inits_in_other_units():
    g, b, _, _, layer = _layers(2)
    rng = np.random.default_rng(3)
    base = layer(1, 0.3)
    inits = [base @ rng.normal(size=(D, D)) for _ in range(3)]
    same = compare_background(5 * base, inits, g, b, kind="odds", n_boot=100)
    assert not same.flagged  # scale does not matter to the odds
    more = compare_background(layer(1, 1.0), inits, g, b, kind="odds", n_boot=100)
    assert more.flagged


def test_wide_layers_are_sketched_without_bias():
    g, b, _, _, layer = _layers(4)
    base = layer(1, 0.5)
    X = np.repeat(base, 200, axis=1) / np.sqrt(200)  # 6,400 units with the same sums of squares
    small = crossed_decomposition(base, g, b, n_boot=5)
    wide = crossed_decomposition(X, g, b, n_boot=5, max_dims=512)
    assert wide.sketched
    assert wide.background == pytest.approx(small.background, rel=0.25)


def test_incomplete_groups_are_dropped_and_too_few_refused():
    g, b, _, _, layer = _layers(5)
    X = layer(1, 0.3)
    keep = ~((g == 0) & (b == 3))  # foreground 0 misses one background
    r = crossed_decomposition(X[keep], g[keep], b[keep], n_boot=5)
    assert r.n_dropped_groups == 1 and r.n_groups == G - 1
    with pytest.raises(DataError, match="at least 3 foregrounds"):
        crossed_decomposition(X[:16], g[:16], b[:16])
