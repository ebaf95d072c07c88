"""The Markdown summary (``probekit analyze --summary``) shows the figure the shortcut finding read.

End to end on planted stores: the same predictions (a model that answers the background's class on half
of the rows, and one that ignores it) once on backgrounds that carry a class (reliance decides) and once
on synthetic backgrounds without one (the background pull stands in). The oracle is audit.json: its
figures printed to one decimal per cent with their interval, as the summary prints them (for the pull, the
interval whose low end its rule reads: ``pull_low`` up to the pull's upper end), and the margin the
verdict's own sentence states.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from probekit.audit import AuditSpec
from probekit.cli import main
from probekit.report import summary_markdown

G, B, K = 60, 6, 3
RELIANCE = "reliance [95 % CI]"
PULL = "background pull (standing in for reliance) [95 % CI]"


def _store(path, with_background_classes: bool) -> None:
    from probekit.store import StoreWriter

    rng = np.random.default_rng(0)
    split = AuditSpec().crossed
    label, bl = np.arange(G) % K, np.arange(B) % K
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    n = g.size
    preds = {"follower": np.where(rng.random(n) < 0.5, bl[b], label[g]), "robust": label[g]}
    fields = ["label", "group", "background"] + (["background_label"] if with_background_classes else [])
    samples = {"index": np.arange(n), "label": label[g], "group": g, "background": b}
    if with_background_classes:
        samples["background_label"] = bl[b]
    with StoreWriter(path, mode="overwrite") as w:
        w.add_split(split, n_rows=n, has_label=True, fields=fields)
        acts = {}
        for m, p in preds.items():
            w.add_model(m, role="model", source="planted")
            w.add_layer(m, split, "@output", feature_shape=(K,), dtype="float32", attrs={"pool": "none"})
            logits = np.zeros((n, K), np.float32)
            logits[np.arange(n), p] = 3.0
            acts[m] = {"@output": logits}
        w.write_rows(split, 0, samples=samples, acts=acts)


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """name -> (audit.json, the summary's Markdown) for backgrounds with ("classes") and without ("synthetic")
    classes."""
    root = tmp_path_factory.mktemp("summary")
    out = {}
    for name, labelled in (("classes", True), ("synthetic", False)):
        _store(root / f"{name}.h5", labelled)
        main(["analyze", str(root / f"{name}.h5"), "-o", str(root / f"{name}.json"), "--summary",
              str(root / f"{name}.md"), "--n-boot", "60", "--n-perm", "30", "--no-progress"])
        out[name] = (json.loads((root / f"{name}.json").read_text()), (root / f"{name}.md").read_text())
    return out


def _table(md: str) -> dict[str, dict[str, str]]:
    """The verdict table: model -> header -> cell."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("| model | verdict"))
    header = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def _printed(e) -> str:
    """An estimate of audit.json as the summary prints it: one decimal per cent, its interval alike."""
    lo, hi = e["ci"]
    return f"{100 * e['value']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]"


def _pull_read(beh) -> str:
    """The pull as its rule reads it: the low end about the estimate (``pull_low``), the hull's upper end."""
    return _printed({"value": beh["pull"]["value"], "ci": [beh["pull_low"], beh["pull"]["ci"][1]]})


def _stated_margin(verdict: str) -> str:
    """The margin a verdict sentence of a model that was not flagged says its figure was judged against."""
    found = re.search(r"not shown to be above (\d+ %)", verdict)
    assert found, verdict
    return found[1]


def test_synthetic_backgrounds_show_the_pull_that_stood_in(audits):
    doc, md = audits["synthetic"]
    table = _table(md)
    assert set(table) == {"follower", "robust"}
    for m, row in table.items():
        beh = doc["models"][m]["behaviour"]
        assert beh["reliance"]["value"] is None and beh["reliance"]["stand_in"] == "pull"
        assert row[PULL] == _pull_read(beh), (m, row)
    assert doc["models"]["follower"]["flagged"] is True and table["follower"]["verdict"] == "**FLAGGED**"
    # the margin the pull was judged against, as the verdict's sentence states it (not reliance's 3 %)
    margin = _stated_margin(doc["models"]["robust"]["verdict"])
    assert margin == "5 %" and {row["flagged above"] for row in table.values()} == {margin}
    # no model has a reliance, a detectable reliance or accuracies by background class: no such column
    header = next(iter(table.values())).keys()
    assert not any(h.startswith(("reliance", "smallest detectable", "accuracy, own-class")) for h in header), header
    assert "the background pull" in md and "stands in for reliance" in md


def test_backgrounds_with_classes_show_reliance_and_no_pull(audits):
    doc, md = audits["classes"]
    table = _table(md)
    for m, row in table.items():
        rel = doc["models"][m]["behaviour"]["reliance"]
        assert row[RELIANCE] == _printed(rel), (m, row)
        assert row["flagged above"] == f"{100 * rel['margin']:.0f} %" == "3 %"
    assert PULL not in next(iter(table.values()))  # the pull decided nothing here
    assert table["follower"]["verdict"] == "**FLAGGED**" and table["robust"]["verdict"] == "not flagged"


def test_a_mixed_document_puts_each_models_figure_in_its_own_column(audits):
    """Models judged on reliance beside models judged on the pull: each row has the figure its finding read,
    under the heading that names it, "–" under the other, and the margin of its own rule."""
    (with_classes, _), (synthetic, _) = audits["classes"], audits["synthetic"]
    models = {**{f"labelled {m}": i for m, i in with_classes["models"].items()},
              **{f"synthetic {m}": i for m, i in synthetic["models"].items()}}
    table = _table(summary_markdown({**with_classes, "models": models}))
    for m, row in table.items():
        beh = models[m]["behaviour"]
        if m.startswith("labelled"):
            assert (row[RELIANCE], row[PULL], row["flagged above"]) == (_printed(beh["reliance"]), "–", "3 %")
        else:
            assert (row[RELIANCE], row[PULL], row["flagged above"]) == ("–", _pull_read(beh), "5 %")


def test_a_pull_that_cannot_stand_in_is_not_shown_as_read(audits):
    """Classes too imbalanced for the pull: the finding is not judged and the summary shows no figure as
    the one it read (the verdict module decides both, from the same behaviour)."""
    from probekit.verdict import judge, shortcut_figure

    doc, _ = audits["synthetic"]
    info = json.loads(json.dumps(doc["models"]["follower"]))
    info["behaviour"]["class_imbalance"] = 3.0  # one class holds 3x its balanced share of the objects
    info.update(judge("skewed", info).to_dict())
    assert info["flagged"] is None and shortcut_figure(info["behaviour"]) is None
    assert shortcut_figure(doc["models"]["follower"]["behaviour"]) == "pull"
    table = _table(summary_markdown({**doc, "models": {**doc["models"], "skewed": info}}))
    assert table["skewed"]["verdict"] == "*not judged*" and table["skewed"][PULL] == "–"
    assert table["follower"][PULL] == _pull_read(doc["models"]["follower"]["behaviour"])
    # the report's findings table reads the same function: the pull is shown as read for follower only
    from probekit.report import render_html

    for name, standing in (("skewed", False), ("follower", True)):
        page = render_html({**doc, "models": {name: info if name == "skewed" else doc["models"][name]}})
        assert ("(background pull, standing in)" in page) is standing, name


def test_the_pull_is_printed_with_the_low_end_its_rule_reads(audits):
    """The pull's interval in audit.json is a hull whose low end may lie below ``pull_low``, the low end the
    rule compares with its margin: the summary prints the latter, so a flagged row never shows a low end
    below its "flagged above"."""
    doc, _ = audits["synthetic"]
    info = json.loads(json.dumps(doc["models"]["follower"]))
    beh = info["behaviour"]
    beh["pull"]["ci"][0], beh["pull_low"] = 0.031, 0.062  # hull below the 5 % margin, the rule's low end above
    table = _table(summary_markdown({**doc, "models": {"follower": info}}))
    hi = 100 * beh["pull"]["ci"][1]
    assert table["follower"][PULL] == f"{100 * beh['pull']['value']:.1f} % [6.2, {hi:.1f}]"
