"""Prose cannot drift from the verdict's rules (issue 21, item 4).

Two guards:

- no module of ``probekit/`` but ``probekit/verdict.py`` (and ``probekit/vocab.py``, which holds the
  constants) compares a figure with a margin or with the level's ALPHA: a scan of every comparison in the
  package's syntax trees, shown to find planted comparisons;
- the thresholds the text states follow the constants: ``probekit.vocab`` is loaded with other margins
  and another ALPHA (as if vocab.py had been edited) before the rest of the package, a small planted audit
  runs through ``probekit analyze`` and ``probekit report``, and the CLI's lines and help, the JUnit XML,
  the Markdown summary, the headline's definition and the report's glossary and captions must say the new
  numbers and none of the old ones.
"""

from __future__ import annotations

import ast
import html
import json
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "probekit"
#: the modules allowed to compare with the margins: the rules' owner and the constants' home
OWNERS = {"verdict.py", "vocab.py"}
CONSTANTS = {"ALPHA", "RATIO_MARGIN", "RELIANCE_MARGIN", "RELIANCE_EFFECT_MARGIN", "PULL_MARGIN",
             "PULL_MAX_IMBALANCE"}
#: names (variables, attributes, document keys) that carry a margin the audit used
MARGIN_NAMES = {"margin", "ratio_margin", "reliance_margin", "effect_margin", "pull_margin"}
#: the constants' values written as numbers (a literal 1.25 in a comparison is the ratio margin restated)
VALUES = {0.05, 0.03, 1.25, 1.5}
#: comparisons with a margin that decide no finding: (file, function) -> why
ALLOWED = {
    ("model_audit.py", "near_decision"): "the top-2 softmax margin that picks the objects the mask check reruns",
}


def _mentions(node: ast.AST) -> set[str]:
    found = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            name = n.id
        elif isinstance(n, ast.Attribute):
            name = n.attr
        elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str):
            name = n.slice.value
        elif isinstance(n, ast.Constant) and isinstance(n.value, float) and n.value in VALUES:
            name = repr(n.value)
        else:
            continue
        if name in CONSTANTS or name in MARGIN_NAMES or name[0].isdigit():
            found.add(name)
    return found


def flag_comparisons(path: Path, source: str | None = None) -> list[str]:
    """``file:line: comparison`` for every comparison of a figure with a margin, a threshold constant or
    its value, outside the functions of :data:`ALLOWED`. A check that the margin exists (``is None``) or
    is valid (against a literal such as ``<= 0``) is no rule and is not listed."""
    tree = ast.parse(source if source is not None else path.read_text())
    out = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Compare) and (path.name, name) not in ALLOWED:
                ops_checked = not all(isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn)) for op in child.ops)
                sides = [child.left, *child.comparators]
                literal = any(isinstance(s, ast.Constant) or (isinstance(s, ast.UnaryOp) and isinstance(s.operand, ast.Constant))
                              for s in sides)
                hit = _mentions(child)
                if ops_checked and hit and not (literal and not any(h[0].isdigit() or h in CONSTANTS for h in hit)):
                    out.append(f"{path.name}:{child.lineno}: {ast.unparse(child)}")
            visit(child, name)

    visit(tree, None)
    return out


def test_no_flag_comparison_outside_verdict():
    found = [hit for f in sorted(PACKAGE.rglob("*.py")) if f.name not in OWNERS for hit in flag_comparisons(f)]
    assert not found, ("flag rules outside probekit/verdict.py (add a function there and call it): "
                       + "; ".join(found))
    # the scan reads the rules' owner too: it finds verdict.py's own comparisons, so it is not blind
    assert len(flag_comparisons(PACKAGE / "verdict.py")) >= 4


def test_the_scan_finds_planted_rules():
    planted = textwrap.dedent("""
        def headline(low, ref_value, margin):
            return low > margin * ref_value                 # 1: the headline mark restated
        def rep(ci):
            return ci[0] > RATIO_MARGIN                     # 2: a constant
        def rel(p):
            return p < 0.05 / 2                             # 3: ALPHA's value
        def gap(r, spec):
            return r["value"] >= spec.reliance_margin       # 4: a margin from the spec
        def fine(r, spec):
            return r.get("margin") is None or spec.ratio_margin <= 0   # checks, no rule
        def near_decision(margin, threshold):
            return margin < threshold
    """)
    found = flag_comparisons(PACKAGE / "planted.py", planted)
    # the allowlist is per file: near_decision is reported in any module but model_audit.py
    assert [int(h.split(":")[1]) for h in found] == [3, 5, 7, 9, 13], found
    assert [int(h.split(":")[1]) for h in flag_comparisons(PACKAGE / "model_audit.py", planted)] == [3, 5, 7, 9]


# -- the prose follows the constants --------------------------------------------------------------

NEW = {"RATIO_MARGIN": 1.7, "RELIANCE_MARGIN": 0.07, "PULL_MARGIN": 0.09, "ALPHA": 0.1}

SCRIPT = r'''
import contextlib, io, json, sys
from pathlib import Path

import numpy as np

from probekit.cli import _print_summary, main
from probekit.store import StoreWriter

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
G, B, K, D = 60, 6, 3, 8


def store(path, with_background_classes):
    """A teacher that reads the object and a student whose predictions take the background's class on 40 %
    of the rows; a hidden layer each, the student's with a larger background component."""
    label, bl = rng.choice(K, size=G), np.arange(B) % K
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    n = g.size
    fg, bgv = rng.normal(size=(G, D)), rng.normal(size=(B, D))
    reps = {"teacher": fg[g] + 0.2 * bgv[b] + 0.3 * rng.normal(size=(n, D)),
            "student": fg[g] + 1.5 * bgv[b] + 0.3 * rng.normal(size=(n, D))}
    preds = {"teacher": label[g], "student": np.where(rng.random(n) < 0.4, bl[b], label[g])}
    fields = ["label", "group", "background"] + (["background_label"] if with_background_classes else [])
    with StoreWriter(path, mode="overwrite") as w:
        w.add_split("crossed", n_rows=n, has_label=True, fields=fields)
        acts = {}
        for m, p in preds.items():
            w.add_model(m, role=m, source="planted")
            w.add_layer(m, "crossed", "@output", feature_shape=(K,), dtype="float32", attrs={"pool": "none"})
            w.add_layer(m, "crossed", "rep", feature_shape=(D,), dtype="float32", attrs={"pool": "none"})
            logits = np.zeros((n, K), np.float32)
            logits[np.arange(n), p] = 3.0
            acts[m] = {"@output": logits, "rep": reps[m].astype(np.float32)}
        samples = {"index": np.arange(n), "label": label[g], "group": g, "background": b}
        if with_background_classes:
            samples["background_label"] = bl[b]
        w.write_rows("crossed", 0, samples=samples, acts=acts)


for name, labelled in (("full", True), ("pull", False)):
    path = out / f"{name}.h5"
    store(path, labelled)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["analyze", str(path), "-o", str(out / f"{name}.json"), "--junit", str(out / f"{name}.junit.xml"),
              "--summary", str(out / f"{name}.md"), "--n-boot", "60", "--n-perm", "30", "--no-progress"])
        doc = json.loads((out / f"{name}.json").read_text())
        # the headline table, printed where no model has a verdict (older documents)
        _print_summary({**doc, "models": {m: {**i, "verdict": None} for m, i in doc["models"].items()}})
        with contextlib.suppress(SystemExit):
            main(["analyze", "--help"])
    (out / f"{name}.cli.txt").write_text(buf.getvalue())
main(["report", str(out / "full.h5"), "--audit", str(out / "full.json"), "-o", str(out / "full.html"),
      "--no-progress"])
'''


def _render(tmp_path: Path, constants: dict[str, float], with_constants) -> dict[str, str]:
    r = with_constants(SCRIPT, constants, str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    texts = {f.name: f.read_text() for f in tmp_path.iterdir() if f.suffix in (".txt", ".xml", ".md", ".html")}
    texts["headline"] = json.loads((tmp_path / "full.json").read_text())["headline"]["definition"]
    # argparse wraps its help; the report and JUnit escape quotes
    return {k: re.sub(r"\s+", " ", html.unescape(v)) for k, v in texts.items()}


def test_the_prose_says_the_constants_vocab_holds(tmp_path, with_constants):
    t = _render(tmp_path, NEW, with_constants)
    doc = json.loads((tmp_path / "full.json").read_text())
    assert doc["config"]["ratio_margin"] == 1.7 and doc["models"]["student"]["behaviour"]["reliance"]["margin"] == 0.07
    everything = " ".join(t.values())
    # the new numbers, where each surface states its rule
    expected = {
        "headline": ["Marked when the 90% CI's low end exceeds 1.7 × the reference"],
        "full.cli.txt": ["background sensitivity per layer (90% CI; reference)",
                         "above 7 % at the low end of its 90 % interval"],  # the help of --fail-on-flag
        "pull.cli.txt": ["not shown to be above 9 %"],
        "full.md": ["reliance [90 % CI]", "Intervals: 90 %", "| 7 % |"],
        "full.junit.xml": ["takes the background's class"],
        "full.html": ["holds when its interval's low end lies above 0.09", "exceeds its reference's by 1.7x at the "
                      "low end", "the findings' figures (90 % intervals", "the whisker is its 90 % interval"],
    }
    for where, phrases in expected.items():
        for phrase in phrases:
            assert phrase in t[where], f"{where} does not say {phrase!r}"
    # and none of the old ones, wherever a rule or a verdict is stated
    old = [r"\b1\.25\b", r"low end lies above 0\.05\b", r"(?<![\d.])3 %", r"(?<![\d.])5 %", r"95 ?% CI",
           r"95 ?% interval", r"Intervals: 95"]
    for pattern in old:
        for where, text in t.items():
            if where == "full.html":  # the report's other figures keep their analyses' own 95 % intervals
                text = " ".join(re.findall(r"(?:flagged|holds|Marked|materiality|flag reads)[^<]*", text))
            assert not re.search(pattern, text), f"{where} still says {re.search(pattern, text)[0]!r}"
    assert "1.7" in everything


def test_the_report_states_the_margins_the_audit_used():
    """An audit run with other margins (``AuditSpec``) gets its own numbers in the glossary's rules."""
    from probekit.report import render_html

    doc = {"store": "s.h5", "splits": {}, "verdict": [], "skipped": [], "models": {},
           "config": {"reliance_margin": 0.08, "effect_margin": 0.1, "ratio_margin": 2.0}}
    text = re.sub(r"\s+", " ", html.unescape(render_html(doc)))
    glossary = text[text.index('id="glossary"'):]
    assert "shortcut (finding)" in glossary and "is above 8 % at the low end of its 95 % interval" in glossary
    assert "are above 10 points at the low end" in glossary
    assert "has its interval above 2 (Bonferroni" in glossary
    assert not re.search(r"(?<![\d.])3 % at the low end|above 1\.25|above 5 points", glossary)
