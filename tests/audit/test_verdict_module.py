"""probekit.verdict: findings, the null verdict, the sentences and the CI exit statuses, on hand-made entries."""

from __future__ import annotations

import pytest

from probekit import verdict
from probekit.errors import ProbekitError
from probekit.vocab import RELIANCE_MARGIN


def _beh(value, ci, p, *, detectable=0.09, effect=None, effect_p=None, reason=None):
    return {
        "n_groups": 300, "n_backgrounds": 8, "from_output": True, "predictions": "output",
        "reliance": {"value": value, "ci": ci, "p_value": p, "margin": RELIANCE_MARGIN,
                     "detectable": detectable, "basis": "background_label", "reason": reason},
        "accuracy_own_background": {"value": 0.95, "ci": [0.93, 0.97]},
        "accuracy_other_background": {"value": 0.80, "ci": [0.76, 0.84]},
        "bg_gap_crossed": {"value": 0.15, "ci": [0.11, 0.19]},
        "background_effect": {"value": effect, "ci": None if effect is None else [effect - 0.02, effect + 0.02],
                              "p_value": effect_p, "margin": 0.05},
    }


def _layers(*flags):
    return {f"l{i}": {"background_flag": f, "background_vs_reference": {
        "reference": "teacher", "ratio": {"value": 3.0 if f else 1.0, "ci": [2.5, 3.5] if f else [0.9, 1.1]}}}
        for i, f in enumerate(flags)}


def test_shortcut_found_is_flagged_and_named():
    v = verdict.judge("m", {"behaviour": _beh(0.4, [0.3, 0.5], 1e-4), "layers": {}})
    assert v.flagged is True and v.findings == ["shortcut"] and v.judged["shortcut"]
    assert "takes the background's class" in v.verdict and "40 % [30, 50]" in v.verdict
    assert not v.judged["representation"]  # no layer was compared


def test_non_detection_reads_as_one_with_the_detectable_size():
    v = verdict.judge("m", {"behaviour": _beh(0.01, [-0.01, 0.03], 0.9, detectable=0.08), "layers": {}})
    assert v.flagged is False and v.findings == []
    assert v.verdict.startswith("No shortcut detected for m") and "8 %" in v.verdict
    assert "below" not in v.verdict


def test_estimate_above_margin_but_not_shown_never_says_below():
    v = verdict.judge("m", {"behaviour": _beh(0.06, [0.0, 0.12], 0.2), "layers": {}})
    assert v.flagged is False
    assert "above the 3 % materiality but not shown to be" in v.verdict and "below" not in v.verdict


def test_not_judged_is_null_with_the_reason():
    v = verdict.judge("m", {"behaviour": _beh(None, None, None, reason="every background comes from one class"),
                            "layers": {}})
    assert v.flagged is None and v.verdict_reason == "every background comes from one class"
    assert "not judged" in v.verdict and v.judged["shortcut"] is False
    v2 = verdict.judge("m", {"layers": {}})  # no behaviour at all
    assert v2.flagged is None and v2.findings == []


def test_background_sensitive_is_its_own_finding_not_a_shortcut():
    v = verdict.judge("m", {"behaviour": _beh(0.0, [-0.01, 0.01], 0.99, effect=0.25, effect_p=1e-3), "layers": {}})
    assert v.findings == ["background_sensitive"] and v.flagged is False
    assert "not a shortcut" in v.verdict


def test_representation_finding_and_its_absence():
    v = verdict.judge("m", {"behaviour": _beh(0.0, [-0.01, 0.01], 0.99), "layers": _layers(False, True)})
    assert v.findings == ["representation"] and v.flagged is False and v.judged["representation"]
    assert "1 of 2 layers (l1)" in v.verdict
    v = verdict.judge("m", {"layers": _layers(False, False)})
    assert v.findings == [] and v.judged["representation"] and v.flagged is None


@pytest.mark.parametrize(("models", "flag", "fail_on", "want"), [
    ({"a": {"findings": ["shortcut"], "judged": {"shortcut": True}, "flagged": True}}, True, [], 1),
    ({"a": {"findings": [], "judged": {"shortcut": True}, "flagged": False}}, True, [], 0),
    ({"a": {"findings": [], "judged": {"shortcut": False}, "flagged": None}}, True, [], 3),
    ({"a": {"findings": [], "judged": {"shortcut": False}, "flagged": None},
      "b": {"findings": ["shortcut"], "judged": {"shortcut": True}, "flagged": True}}, True, [], 1),
    ({"a": {"findings": ["representation"], "judged": {"shortcut": True, "representation": True}}},
     False, ["representation"], 1),
    ({"a": {"findings": [], "judged": {"shortcut": True, "representation": False}}}, False, ["representation"], 3),
    ({"a": {"findings": ["representation"], "judged": {"shortcut": True}}}, True, [], 0),
    ({"a": {"findings": [], "judged": {}}}, False, [], 0),  # no gate asked for
])
def test_exit_status(models, flag, fail_on, want):
    code, lines = verdict.exit_status(models, fail_on_flag=flag, fail_on=fail_on)
    assert code == want and bool(lines) == (want != 0)


def test_parse_findings():
    assert verdict.parse_findings("shortcut, representation") == ["shortcut", "representation"]
    assert verdict.parse_findings("any") == list(verdict.FINDINGS)
    with pytest.raises(ProbekitError, match="--fail-on takes findings"):
        verdict.parse_findings("shortcuts")


def test_rules_describe_the_margins_the_code_uses():
    # the prose every surface prints comes from the same constants the rule reads
    assert f"{100 * RELIANCE_MARGIN:.0f} %" in verdict.RULES["shortcut"].rule
    assert set(verdict.RULES) == set(verdict.FINDINGS)


def _pull_beh(low, p, imbalance=1.0):
    b = _beh(None, None, None, reason="the crossed split records no class for its backgrounds")
    b["reliance"]["stand_in"] = "pull"
    b.update({"pull": {"value": low + 0.02, "ci": [low, low + 0.05]}, "pull_low": low, "pull_p_value": p,
              "class_imbalance": imbalance})
    return b


def test_pull_stands_in_where_backgrounds_carry_no_class():
    v = verdict.judge("m", {"behaviour": _pull_beh(0.2, 0.001), "layers": {}})
    assert v.flagged is True and "stands in" in v.verdict
    v = verdict.judge("m", {"behaviour": _pull_beh(0.01, 0.3), "layers": {}})
    assert v.flagged is False and v.verdict.startswith("No shortcut detected")


def test_pull_does_not_stand_in_with_imbalanced_classes():
    v = verdict.judge("m", {"behaviour": _pull_beh(0.2, 0.001, imbalance=1.8), "layers": {}})
    assert v.flagged is None and "imbalanced" in v.verdict_reason


def test_a_finding_holds_exactly_when_the_interval_drawn_clears_the_margin():
    # p = 0.03 is one-sided significance at 5 % but the 95 % interval drawn still reaches the margin
    assert verdict.judge("m", {"behaviour": _beh(0.06, [0.029, 0.09], 0.03), "layers": {}}).flagged is False
    assert verdict.judge("m", {"behaviour": _beh(0.06, [0.031, 0.09], 0.02), "layers": {}}).flagged is True
