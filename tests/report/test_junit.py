"""JUnit XML and the Markdown summary of an audit (``--junit``, ``--summary`` on ``audit`` and ``analyze``):
the attributes CI tools read, counts that match the test cases, the verdict in every failure, a shortcut the
audit could not judge reported as an error (never a silent pass)."""

from __future__ import annotations

import inspect
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from probekit.cli import main
from probekit.report import junit_xml, summary_markdown, write_summary

HOSTILE = 'a<b>&"c\'|x\ny\x01'


def _model(name, flagged, judged=True, findings=(), rel=0.4):
    b = {"reliance": {"value": rel, "ci": [rel - 0.05, rel + 0.05], "margin": 0.05, "detectable": 0.1,
                      "p_value": 0.01, "basis": "background_label", "reason": None},
         "accuracy_own_background": {"value": 0.9, "ci": [0.85, 0.95]},
         "accuracy_other_background": {"value": 0.5, "ci": [0.4, 0.6]},
         "bg_gap_crossed": {"value": 0.4, "ci": [0.3, 0.5]},
         "background_effect": {"value": 0.08, "ci": [0.06, 0.1], "p_value": 0.01, "margin": 0.05}}
    return {"role": "model", "flagged": flagged, "findings": list(findings), "verdict": f"{name}: the verdict.",
            "verdict_reason": None if flagged is not None else "too few objects to judge",
            "judged": {"shortcut": judged, "background_sensitive": judged, "representation": False},
            "behaviour": b if judged else {}, "layers": {}}


def doc():
    return {"schema": "probekit.audit", "schema_version": 3, "probekit_version": "0.x", "store": "s.h5",
            "created": "2026-01-01T00:00:00+00:00",
            "models": {"bad": _model("bad", True, findings=("shortcut", "background_sensitive")),
                       "good": _model("good", False, rel=0.01),
                       HOSTILE: _model(HOSTILE, None, judged=False)}}


def _cases(root):
    return {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}


def test_junit_structure_counts_and_messages():
    root = ET.fromstring(junit_xml(doc()))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    ts = suites[0]
    cases = list(ts.iter("testcase"))
    for el in (root, ts):  # the counts CI tools show equal the elements they count
        assert int(el.get("tests")) == len(cases) == 9
        assert int(el.get("failures")) == len(ts.findall("testcase/failure")) == 2
        assert int(el.get("errors")) == len(ts.findall("testcase/error")) == 1
        # representation is judged for no model (3), background_sensitive not for the unjudged one (1)
        assert int(el.get("skipped")) == len(ts.findall("testcase/skipped")) == 4
    for c in cases:
        assert c.get("classname").startswith("probekit.") and c.get("name") and c.get("time") == "0"
    by = _cases(ts)
    fail = by[("probekit.bad", "shortcut")].find("failure")
    assert fail.get("message") == "bad: the verdict." and "bad: the verdict." in fail.text
    assert "background effect 8.0 %" in by[("probekit.bad", "background_sensitive")].find("failure").get("message")
    assert by[("probekit.good", "shortcut")].find("failure") is None  # passes
    hostile = HOSTILE.replace("\x01", "?")  # a control character XML cannot hold
    err = by[(f"probekit.{hostile}", "shortcut")].find("error")  # not judged: an error, with its reason
    assert err.get("message") == "not judged: too few objects to judge"
    assert by[(f"probekit.{hostile}", "background_sensitive")].find("skipped") is not None
    assert by[("probekit.good", "representation")].find("skipped") is not None  # not judged: skipped


def test_junit_of_a_schema2_document():
    d = {"models": {"m": {"flagged": True, "flag_basis": "behaviour", "verdict": "m relies on it.",
                          "layers": {"a": {"background_flag": False}}},
                    "n": {"flagged": False, "flag_basis": None, "verdict": "n: no verdict.", "layers": {}}}}
    by = _cases(ET.fromstring(junit_xml(d)))
    assert by[("probekit.m", "shortcut")].find("failure").get("message") == "m relies on it."
    assert by[("probekit.m", "representation")].find("failure") is None
    assert by[("probekit.n", "shortcut")].find("error").get("message") == "not judged: n: no verdict."


def test_summary_markdown_table():
    md = summary_markdown(doc())
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model | verdict"))
    ncol = lines[header].count("|")
    rows = lines[header + 2: header + 5]
    assert all(r.count("|") - r.count("\\|") == ncol for r in rows)  # a pipe in a name does not add a column
    assert "| bad | **FLAGGED** | 40.0 % [35.0, 45.0] | 5 % | – | 90 % [85, 95] / 50 % [40, 60] | " \
           "+40.0 pts [+30.0, +50.0] |" in md
    assert "| good | not flagged | 1.0 % [-4.0, 6.0] | 5 % | 10 % |" in md  # the power of a non-detection
    assert "*not judged*" in md and "not judged because: too few objects to judge" in md
    assert "<b>" not in md and "a&lt;b&gt;" in md
    assert "1 flagged, 1 not flagged, 1 not judged" in md


def test_summary_appends_to_the_github_step_summary(tmp_path, monkeypatch):
    f = tmp_path / "step.md"
    f.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(f))
    write_summary(doc(), f)
    assert f.read_text().startswith("earlier step\n## probekit audit")
    other = tmp_path / "card.md"
    other.write_text("old")
    write_summary(doc(), other)
    assert other.read_text().startswith("## probekit audit")


# -- the CLI flags, end to end on a tiny folder --------------------------------------------------------------


class CornerNet(nn.Module):
    """Class scores = the colour of the top-left corner: the background alone."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.mix.weight.copy_(10 * torch.eye(3).reshape(3, 3, 1, 1))
            self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x)[..., :3, :3].mean(dim=(2, 3))


def _folder(root, n=10, size=20):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("0_r", "1_g", "2_b")):
        for d in ("images", "masks"):
            (root / d / name).mkdir(parents=True)
        for k in range(n):
            img = 40 + 150 * np.eye(3)[c] + rng.uniform(0, 40, (size, size, 3))
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[6:14, 6:14] = 255
            img[mask > 0] = 255 * np.eye(3)[c]
            Image.fromarray(img.astype(np.uint8)).save(root / "images" / name / f"{k}.png")
            Image.fromarray(mask).save(root / "masks" / name / f"{k}.png")
    return root / "images", root / "masks"


@pytest.mark.slow
def test_audit_and_analyze_write_junit_and_summary(tmp_path, monkeypatch):
    images, masks = _folder(tmp_path / "data")
    (tmp_path / "cornermod.py").write_text("import torch\nfrom torch import nn\n\n\n" + inspect.getsource(CornerNet))
    monkeypatch.chdir(tmp_path)
    code = main(["audit", "cornermod:CornerNet", "--data", str(images), "--masks", str(masks), "--out-dir", "out",
                 "--inits", "0", "--n-boot", "100", "--n-perm", "50", "--no-progress", "--junit", "out/junit.xml",
                 "--summary", "out/summary.md", "--fail-on-flag"])
    assert code == 1  # flagged
    case = _cases(ET.parse(tmp_path / "out" / "junit.xml").getroot())[("probekit.model", "shortcut")]
    verdict = json.loads((tmp_path / "out" / "audit.json").read_text())["models"]["model"]["verdict"]
    assert case.find("failure").get("message") == verdict
    assert "**FLAGGED**" in (tmp_path / "out" / "summary.md").read_text()
    code = main(["analyze", "out/acts.h5", "--n-boot", "100", "--n-perm", "50", "--no-progress", "--junit", "a.xml",
                 "--summary", "a.md"])
    assert code == 0
    assert ET.parse(tmp_path / "a.xml").getroot().get("failures") != "0"
    assert main(["analyze", "out/acts.h5", "--junit", "nowhere/a.xml"]) == 2  # refused before the work
