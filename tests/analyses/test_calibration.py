"""Calibration of the verdict's flags (issue 14, item 6): a fast subset of benchmarks/calibrate_verdict.py.

The benchmark's simulations (imported by path) are run at the audit's defaults with few data sets;
the tolerances allow for Monte-Carlo error (binomial: with 50 data sets a true 5 % false-flag rate
exceeds 10 % with probability about 4 %; the checks below are far from their limits in practice).
The full tables: ``python benchmarks/calibrate_verdict.py`` (benchmarks/results/calibrate_verdict*.json).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("calibrate_verdict", ROOT / "benchmarks" / "calibrate_verdict.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cv = _load()


def _flags(G: int, K: int, sims: int, *, s: float = 0.0, amb: float = 0.0) -> np.ndarray:
    return np.array([cv.run_behaviour_sim(("t", G, 8, K, s, amb, i, False))["flagged"] for i in range(sims)])


# -- the population truths the coverages are measured against ------------------------------------
@pytest.mark.parametrize("K,s,amb", [(3, 0.0, 0.3), (10, 0.1, 0.0), (3, 0.4, 0.2), (10, 1.0, 0.0)])
def test_truths_match_a_large_simulation(K, s, amb):
    """Analytic pull / flip rate / follows-background against 20,000 simulated foregrounds."""
    G, B = 20000, 8
    d = cv.simulate_behaviour(np.random.default_rng(5), G, B, K, s=s, amb=amb)
    t = cv.truth_behaviour(B, K, s=s, amb=amb)
    P = d["P"]
    tv = float(cv._tv(cv._hist(P, K)))
    # plug-in TV at G = 20,000 is within its noise floor (< 0.01 here) above the truth
    assert t["pull"] - 0.002 <= tv <= t["pull"] + 0.01
    flip = float(np.mean((P != P[:, :1]).any(axis=1)))
    assert abs(flip - t["flip_rate"]) < 4 * np.sqrt(t["flip_rate"] * (1 - t["flip_rate"]) / G) + 1e-9
    bl, y, pred = d["bl"], d["label"], d["pred"]
    sw = bl != y
    fb = float(np.mean(pred[sw] == bl[sw]))
    assert abs(fb - t["follows_background"]) < 0.01
    if s == 0:
        assert t["pull"] == 0.0


def test_pull_truth_formula():
    # 8 backgrounds of 8 distinct classes: pull = s (1 - 1/8); of 3 classes (3, 3, 2 backgrounds): s (1 - 22/64)
    assert cv.truth_behaviour(8, 10, s=0.4)["pull"] == pytest.approx(0.4 * 7 / 8)
    assert cv.truth_behaviour(8, 3, s=1.0)["pull"] == pytest.approx(42 / 64)
    assert cv.truth_behaviour(8, 10)["flip_rate"] == pytest.approx(0.0, abs=1e-12)


# -- behaviour flag -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("amb", [0.0, 0.3])
def test_behaviour_flag_false_flag_rate_on_null_and_ambiguous_models(amb):
    """Models that ignore the background (amb 0) or flip idiosyncratically on 30 % of foregrounds
    (half their backgrounds each a random other class) are flagged in at most 10 % of 50 data sets.

    With 10 classes and 100 foregrounds the unsure model's raw TV is ~0.055 (above the 0.05
    threshold): without the within-foreground null it would be flagged most of the time."""
    flags = _flags(100, 10, 50, amb=amb)
    assert flags.mean() <= 0.10, flags.mean()


@pytest.mark.slow
def test_behaviour_flag_power_at_a_40_percent_shortcut():
    """40 % of predictions replaced by the background's class (true pull 0.35): flagged >= 90 %."""
    flags = _flags(100, 10, 20, s=0.4)
    assert flags.mean() >= 0.9, flags.mean()


def test_ambiguous_model_has_a_large_flip_rate_but_no_pull():
    """The flip rate is not what is flagged: 30 % unsure foregrounds flip often, the pull stays ~0."""
    r = cv.run_behaviour_sim(("t", 300, 8, 10, 0.0, 0.3, 0, False))
    assert r["flip"] > 0.2 and not r["flagged"]
    assert abs(r["pull"]) < 0.02


# -- layer flag -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_layer_flag_weaker_foreground_never_flagged_and_3x_background_always():
    """compare_background(kind="absolute"): a student with half the teacher's foreground and the same
    background response is never flagged in 20 data sets; a 3x background component always is."""
    weak = [cv.run_layer_sim(("weaker_fg", 100, 8, 16, 1.0, 0.5, i, False), kinds=("absolute",), n_boot=200)
            for i in range(20)]
    assert not any(r["absolute"]["flagged"] for r in weak)
    assert all(0.6 < r["absolute"]["ratio"] < 1.6 for r in weak)
    big = [cv.run_layer_sim(("planted", 100, 8, 16, 3.0, 1.0, i, False), kinds=("absolute",), n_boot=200)
           for i in range(20)]
    assert all(r["absolute"]["flagged"] for r in big)


def test_odds_flag_with_three_initialisations():
    """kind="odds" against 3 rotated, rescaled references: equal odds not flagged, 3x flagged."""
    same = cv.run_layer_sim(("same", 100, 8, 16, 1.0, 1.0, 0, False), kinds=("odds",), n_boot=200)
    big = cv.run_layer_sim(("planted", 100, 8, 16, 3.0, 1.0, 0, False), kinds=("odds",), n_boot=200)
    assert not same["odds"]["flagged"] and big["odds"]["flagged"]
    assert 0.6 < same["odds"]["ratio"] < 1.6 and big["odds"]["ratio"] > 2


# -- known miscalibrations (strict: these start passing when the intervals are fixed) -------------
# the pull reads low under a real shortcut (it subtracts the no-signal floor); its reported interval is
# the hull with the bias-corrected one, which covers (benchmarks/calibrate_verdict.py)
def test_pull_interval_covers_the_population_pull_under_a_shortcut():
    truth = cv.truth_behaviour(8, 10, s=0.2)["pull"]
    cover = [lo <= truth <= hi for lo, hi in
             (cv.run_behaviour_sim(("t", 100, 8, 10, 0.2, 0.0, i, False))["pull_ci"] for i in range(10))]
    assert np.mean(cover) >= 0.7


# re-centred replicates: the resampled plug-in sits MS_int/G above the unbiased component
def test_decomposition_background_interval_covers():
    from probekit.analyses import crossed_decomposition

    cover = []
    for i in range(20):
        x = cv.simulate_layers(np.random.default_rng([7, i]), 100, 8, 16)
        r = crossed_decomposition(x["teacher"], x["group"], x["background"], n_boot=100, random_state=i)
        lo, hi = r.background_ci
        cover.append(lo <= x["truth_teacher"]["background"] <= hi)
    assert np.mean(cover) >= 0.85


# -- the script ----------------------------------------------------------------------------------
def test_script_quick_run_writes_json(tmp_path):
    out = tmp_path / "calibrate_verdict.json"
    res = cv.main(["--quick", "--sims", "2", "--parts", "behaviour,nms,probe", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["config"]["sims"] == 2 and doc["config"]["behaviour"]["n_perm"] == 200
    kinds = {r["kind"] for r in doc["behaviour"]}
    assert kinds == {"null", "ambiguous", "shortcut"}
    shortcut = [r for r in doc["behaviour"] if r["kind"] == "shortcut"]
    assert [r["s"] for r in shortcut] == list(cv.S_GRID)
    assert all("pull_alternatives" in r for r in shortcut)
    assert {r["nms"] for r in doc["nms"]} == {0.0025, 0.05}
    assert len(res["probe_id_ood"]) == 3
    assert "| shortcut |" in cv.markdown(res)
