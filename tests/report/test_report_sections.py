"""The report's per-layer sections come from one registry, bound to the audit's checks.

Every check of ``probekit.audit.LAYER_CHECKS`` names a section of ``LAYER_SECTIONS`` that reads its
key; every section is named by some check and reads only keys the JSON schema defines for a layer; the
report renders the sections by iterating over the registry (a section added there appears, in its
place, with its glossary rows) and leaves out a section no layer has data for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from probekit.audit import LAYER_CHECKS
from probekit.report import _html, _layers, render_html

ROOT = Path(__file__).resolve().parents[2]


def _est(v):
    return {"value": v, "ci": [v - 0.01, v + 0.01]}


def _doc(**layer):
    return {"store": "s.h5", "splits": {}, "verdict": [], "skipped": [],
            "models": {"m": {"role": "model", "layers": {"l1": {"n_units": 4, **layer}}, "directions": {}}}}


def _section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', html)


def test_every_check_names_a_section_that_reads_its_key():
    sections = {s.id: s for s in _layers.LAYER_SECTIONS}
    assert len(sections) == len(_layers.LAYER_SECTIONS), "two sections share an id"
    for check in LAYER_CHECKS:
        assert check.report in sections, f"check {check.key!r} names no report section ({check.report!r})"
        assert check.key in sections[check.report].reads, (check.key, check.report)


def test_every_section_is_a_checks_and_reads_schema_fields():
    named = {c.report for c in LAYER_CHECKS}
    schema = json.loads((ROOT / "probekit" / "report" / "audit.schema.json").read_text())
    layer_fields = set(schema["$defs"]["layer"]["properties"])
    for s in _layers.LAYER_SECTIONS:
        assert s.id in named, f"section {s.id!r} shows no check"
        assert set(s.reads) <= layer_fields, set(s.reads) - layer_fields


def test_the_report_iterates_over_the_registry(monkeypatch):
    """A section added to the registry is rendered after the existing ones, with its glossary row."""

    def render(s, audit, colors):
        s["tables"].append({"title": "", "header": ["model", "x"], "left": 1,
                            "rows": [[m, str(info["layers"]["l1"]["planted"])] for m, info in audit["models"].items()]})
        return s

    extra = _layers.LayerSection("planted-check", "A planted check", "Its introduction.", reads=("planted",),
                                 glossary=(("planted term", "what it means"),), render=render)
    monkeypatch.setattr(_html, "LAYER_SECTIONS", (*_layers.LAYER_SECTIONS, extra))
    html = render_html(_doc(probe={"id": _est(0.9), "ood": _est(0.7), "gap": _est(0.2)}, planted=41))
    ids = _section_ids(html)
    assert ids.index("probes") < ids.index("planted-check") < ids.index("glossary")
    body = html[html.index('id="planted-check"'):]
    assert "A planted check" in body and "Its introduction." in body and "<td>41</td>" in body
    glossary = html[html.index('id="glossary"'):]
    assert "planted term" in glossary


def test_a_section_without_data_is_left_out_and_order_follows_the_registry():
    html = render_html(_doc(sensitivity={"split": "crossed", "value": _est(0.2)},
                            probe={"id": _est(0.9), "ood": _est(0.7), "gap": _est(0.2)}))
    ids = _section_ids(html)
    assert [i for i in ids if i in {s.id for s in _layers.LAYER_SECTIONS}] == ["probes", "sensitivity"]
    assert "decodability" not in ids and "correlation" not in ids and "decomposition" not in ids


@pytest.mark.parametrize("margin", [1.25, 1.5])
def test_the_decomposition_states_the_audits_own_margin(margin):
    html = render_html({**_doc(crossed={"foreground": _est(1.0), "background": _est(0.5),
                                        "interaction": _est(0.1), "background_share": _est(0.3)}),
                        "config": {"ratio_margin": margin}})
    assert f"by {margin:g}x at the low end" in html


def test_the_glossary_holds_every_term_once_in_section_order():
    rows = _html.glossary()
    terms = [t for t, _ in rows]
    assert len(terms) == len(set(terms))
    expected = [t for s in _layers.LAYER_SECTIONS for t, _ in s.glossary]
    expected += [t for rows_ in _html.MODEL_GLOSSARY.values() for t, _ in rows_]
    assert sorted(terms) == sorted(expected)
    # the behaviour's terms first (its section comes before the layers'), the whole report's last
    assert terms[0] == _html.MODEL_GLOSSARY["behaviour"][0][0]
    assert terms[-1] == _html.MODEL_GLOSSARY[""][-1][0]
    html = render_html(_doc())
    glossary = html[html.index('id="glossary"'):]
    assert [t for t in re.findall(r'<tr><td class="l">(.*?)</td>', glossary)][:len(terms)] == \
        [t.replace("&", "&amp;") for t in terms]
