"""predicted_accuracy and composite_gap: a hand-computed table, coverage by simulation, a planted gap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, logit
from scipy.stats import t as t_dist

from probekit.analyses import composite_gap, predicted_accuracy
from probekit.errors import DataError


def _rows(Y: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows of a crossed table: prediction = label where Y is 1, else another class."""
    G, B = Y.shape
    g, b = np.divmod(np.arange(G * B), B)
    y = labels[g]
    pred = np.where(Y.reshape(-1) > 0, y, y + 1)
    return pred, y, g, b


def test_a_three_by_three_table_by_hand():
    Y = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    pred, y, g, b = _rows(Y, np.array([0, 0, 5]))
    r = predicted_accuracy(pred, y, g, b)
    # mean 2/3; object means 2/3, 1/3, 1 and scene means 1, 2/3, 1/3: MS_obj = MS_sc = 3 (2/9) / 2 = 1/3;
    # residuals +-1/3 in six cells: MS_res = (6/9) / 4 = 1/6. s2_obj = s2_sc = (1/3 - 1/6) / 3 = 1/18,
    # s2_res = 1/6; Var = 1/54 + 1/54 + 1/54 = 1/18; Satterthwaite df = (3/54)^2 / ((1/54)^2 (1/2 + 1/2 + 1/4)) = 7.2
    assert r.value == pytest.approx(2 / 3)
    assert r.variance_components == pytest.approx({"objects": 1 / 18, "scenes": 1 / 18, "residual": 1 / 6})
    half = t_dist.ppf(0.975, 7.2) * np.sqrt(1 / 18) / (2 / 3 * 1 / 3)
    assert r.ci == pytest.approx((expit(logit(2 / 3) - half), expit(logit(2 / 3) + half)))
    assert (r.n_objects, r.n_backgrounds) == (3, 3)
    # class 0: objects 0 and 1, a 2 x 3 table [[1,1,0],[1,0,0]]: mean 1/2; class 5 has one object: no interval
    assert r.per_class["0"]["value"] == pytest.approx(0.5) and r.per_class["0"]["n_objects"] == 2
    assert r.per_class["5"] == {"value": 1.0, "ci": None, "n_objects": 1}
    assert r.corrected is None


def test_crops_of_one_photo_are_one_scene_unit():
    rng = np.random.default_rng(0)
    Y = (rng.random((30, 8)) < 0.7).astype(int)
    pred, y, g, b = _rows(Y, np.zeros(30, dtype=int))
    photo = b // 2  # slots 0,1 from photo 0, 2,3 from photo 1, ...
    r_units = predicted_accuracy(pred, y, g, b, scene_unit=photo)
    Y4 = Y.reshape(30, 4, 2).mean(axis=2)  # the table of photo means, by hand
    r4 = predicted_accuracy(*_rows_mean(Y4))
    assert r_units.value == pytest.approx(Y.mean()) and r_units.n_backgrounds == 8
    assert r_units.variance_components == pytest.approx(r4.variance_components)


def _rows_mean(Y: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows whose cell means are Y (cells of halves: two rows per cell)."""
    G, B = Y.shape
    pred, y, g, b = [], [], [], []
    for gg in range(G):
        for bb in range(B):
            k = round(2 * Y[gg, bb])
            pred += [0] * k + [1] * (2 - k)
            y += [0, 0]
            g += [gg, gg]
            b += [bb, bb]
    return np.array(pred), np.array(y), np.array(g), np.array(b)


def test_the_interval_covers_the_site_accuracy():
    # correctness ~ Bernoulli(expit(mu + a_obj + b_scene + e)); the site's accuracy is E over all three
    rng = np.random.default_rng(1)
    settings = [(40, 10, 1.5, 1.0, 0.6, 0.4), (60, 12, 2.5, 0.8, 0.8, 0.5)]
    for G, B, mu, sa, sb, se in settings:
        z = rng.standard_normal(2_000_000)
        truth = float(expit(mu + np.sqrt(sa ** 2 + sb ** 2 + se ** 2) * z).mean())
        hits = 0
        R = 300
        for _ in range(R):
            p = expit(mu + rng.normal(0, sa, (G, 1)) + rng.normal(0, sb, (1, B)) + rng.normal(0, se, (G, B)))
            Y = (rng.random((G, B)) < p).astype(int)
            lo, hi = predicted_accuracy(*_rows(Y, np.zeros(G, dtype=int))).ci
            hits += lo <= truth <= hi
        assert 0.90 <= hits / R <= 0.99, (G, B, hits / R)


def test_a_planted_composite_gap_is_found_and_covered():
    rng = np.random.default_rng(2)
    G, gap_true = 200, 0.9 * 0.1  # originals right 90 %; composites lose 10 % of those
    hits = flagged = 0
    R = 120
    for _ in range(R):
        y = rng.integers(0, 3, G)
        orig_ok = rng.random(G) < 0.9
        comp_ok = orig_ok & (rng.random(G) >= 0.1)
        r = composite_gap(np.where(orig_ok, y, y + 1), np.where(comp_ok, y, y + 1), y, np.arange(G))
        hits += r.ci[0] <= gap_true <= r.ci[1]
        flagged += r.material
        assert r.value == pytest.approx(orig_ok.mean() - comp_ok.mean())
    assert 0.90 <= hits / R <= 0.99
    assert flagged / R >= 0.9  # 9 points on 200 objects: material nearly always
    # no gap: rarely material (the 2-point threshold and the interval both must pass)
    false = 0
    for _ in range(R):
        y = rng.integers(0, 3, G)
        ok = rng.random(G) < 0.9
        redraw = rng.random(G) < 0.2  # idiosyncratic changes both ways, mean zero: redrawn from the same 90 %
        comp_ok = np.where(redraw, rng.random(G) < 0.9, ok)
        false += composite_gap(np.where(ok, y, y + 1), np.where(comp_ok, y, y + 1), y, np.arange(G)).material
    assert false / R <= 0.05


def test_a_material_gap_corrects_the_margin_above_chance():
    rng = np.random.default_rng(3)
    G, B = 60, 8
    Y = (rng.random((G, B)) < 0.6).astype(int)
    labels = np.arange(G) % 3  # three classes: chance 1/3
    pred, y, g, b = _rows(Y, labels)
    comp = np.arange(G) % 5 != 0  # originals all right, composites lose every fifth object: gap 0.2
    gap = composite_gap(labels, np.where(comp, labels, labels + 1), labels, np.arange(G))
    assert gap.material and gap.value == pytest.approx(0.2)
    r = predicted_accuracy(pred, y, g, b, composite=gap)
    # factor = (1 - 1/3) / (0.8 - 1/3) = 10/7; corrected = 1/3 + (raw - 1/3) * 10/7
    assert r.corrected["factor"] == pytest.approx(10 / 7)
    assert r.corrected["value"] == pytest.approx(1 / 3 + (Y.mean() - 1 / 3) * 10 / 7)
    assert r.corrected["ci"][0] < r.corrected["value"] < r.corrected["ci"][1]
    assert r.corrected["ci"][1] - r.corrected["ci"][0] > r.ci[1] - r.ci[0]  # the factor's noise adds
    none = composite_gap(labels, labels, labels, np.arange(G))
    assert not none.material and predicted_accuracy(pred, y, g, b, composite=none).corrected is None


def test_rows_that_are_not_crossed_are_refused():
    pred, y, g, b = _rows(np.ones((3, 3), dtype=int), np.zeros(3, dtype=int))
    with pytest.raises(DataError, match="not a crossed table"):
        predicted_accuracy(pred[1:], y[1:], g[1:], b[1:])
    with pytest.raises(DataError, match="at least 2 objects"):
        predicted_accuracy(pred[:3], y[:3], g[:3], b[:3])


def test_interval_reaches_an_estimate_at_one():
    """Every object right on every scene: the estimate is 1 and its interval reaches it (was [0.99, 0.99])."""
    from probekit.analyses import predicted_accuracy

    G, B = 30, 6
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    label = g % 3
    r = predicted_accuracy(label, label, g, b)
    assert r.value == 1.0 and r.ci[0] <= 1.0 <= r.ci[1]
    for d in r.per_class.values():
        assert d["ci"][0] <= d["value"] <= d["ci"][1]
