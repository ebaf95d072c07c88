"""``compare`` judges a checkpoint as ``audit`` judges the same predictions (issue 21, item 4).

One crossed split, planted predictions: an invariant model, a complete shortcut, background noise that
favours no class, and a partial shortcut near the margin (reliance 8.75 %: the low end of its 95 %
interval lies just below the 3 % margin, p = 0.039 against it, so a rule at another level decides it
the other way). ``probekit.audit`` on a store of these predictions and ``compare_rows`` on the same
arrays must give the same figures and the same findings, also with the verdict's constants edited
(``ALPHA`` = 0.1, as if probekit/vocab.py said so: the near model then holds). The comparison's HTML and
printed ranking state the verdict's own rule and level.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from probekit.audit import AuditSpec, audit
from probekit.compare import compare_rows
from probekit.store import StoreWriter

G, B, K = 60, 6, 3
N_BOOT = 60
HERE = Path(__file__).resolve().parent


def planted() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(object's class, background's class, predictions per model), each (G, B)."""
    rng = np.random.default_rng(1)
    y, bl = np.tile(np.arange(G)[:, None] % K, (1, B)), np.tile(np.arange(B)[None, :] % K, (G, 1))
    near = np.where(rng.random((G, B)) < 0.1, bl, y)  # a tenth of the cells answer the background's class
    noisy = np.where((np.arange(B) % 3 == 0)[None, :] & (rng.random((G, B)) < 0.5), rng.integers(0, K, (G, B)), y)
    return y, bl, {"near": near, "robust": y.copy(), "complete": bl.copy(), "noisy": noisy}


def both_ways(root: Path) -> dict:
    """The audit's and the comparison's figures and findings for every planted model, the comparison's HTML
    and its printed ranking."""
    from probekit.cli import _print_ranking
    from probekit.report._compare import render_compare_html

    y, bl, preds = planted()
    split = AuditSpec().crossed
    n = G * B
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    with StoreWriter(root / "s.h5", mode="overwrite") as w:
        w.add_split(split, n_rows=n, has_label=True, fields=["label", "group", "background", "background_label"])
        acts = {}
        for m, p in preds.items():
            w.add_model(m, role="model", source="planted")
            w.add_layer(m, split, "@output", feature_shape=(K,), dtype="float32", attrs={"pool": "none"})
            logits = np.zeros((n, K), np.float32)
            logits[np.arange(n), p.reshape(-1)] = 3.0
            acts[m] = {"@output": logits}
        w.write_rows(split, 0, samples={"index": np.arange(n), "label": y.reshape(-1), "group": g, "background": b,
                                        "background_label": bl.reshape(-1)}, acts=acts)
    doc = audit(root / "s.h5", n_boot=N_BOOT, n_perm=20, random_state=0, progress=False).data
    cmp = compare_rows(preds, y, bl, group=g, background=b, n_boot=N_BOOT, seed=0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _print_ranking(cmp)
    return {"audit": {m: {k: i[k] for k in ("flagged", "findings", "judged")}
                      | {k: i["behaviour"][k] for k in ("reliance", "background_effect")}
                      for m, i in doc["models"].items()},
            "compare": cmp, "html": render_compare_html(cmp), "printed": printed.getvalue()}


def _agree(got: dict) -> None:
    rows = got["compare"]["checkpoints"]
    # the findings first, then the figures they read
    assert {m: rows[m]["shortcut"] for m in got["audit"]} == {m: a["flagged"] for m, a in got["audit"].items()}
    for m, a in got["audit"].items():
        c = rows[m]
        assert a["judged"]["background_sensitive"]
        assert c["background_sensitive"] is ("background_sensitive" in a["findings"]), m
        for key in ("value", "ci", "p_value", "margin", "detectable"):
            assert c["reliance"][key] == pytest.approx(a["reliance"][key]), (m, key)
        assert c["background_effect"]["ci"] == pytest.approx(a["background_effect"]["ci"]), m


def test_compare_and_audit_agree_on_every_model(tmp_path):
    got = both_ways(tmp_path)
    _agree(got)
    a = got["audit"]
    # the planted truth, so that the agreement covers both answers of both findings
    assert (a["robust"]["flagged"], a["complete"]["flagged"], a["noisy"]["flagged"]) == (False, True, False)
    assert "background_sensitive" in a["noisy"]["findings"] and "background_sensitive" not in a["robust"]["findings"]
    near = a["near"]["reliance"]
    assert near["ci"][0] < near["margin"] < near["ci"][0] + 0.01 and 0.025 < near["p_value"] < 0.05
    assert a["near"]["flagged"] is False  # at the 95 % level: not shown above the margin


SCRIPT = r'''
import json, sys
from pathlib import Path

sys.path.insert(0, sys.argv[2])
from test_compare_verdict import both_ways

print(json.dumps(both_ways(Path(sys.argv[1]))))
'''


def test_compare_follows_the_verdicts_constants(tmp_path, with_constants):
    """With ALPHA = 0.1 the verdict reads 90 % intervals: the near model holds in the audit and in compare,
    and the comparison's figures, HTML and printed lines say 90 % and the verdict's rule."""
    r = with_constants(SCRIPT, {"ALPHA": 0.1}, str(tmp_path), str(HERE))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    _agree(got)
    assert got["audit"]["near"]["flagged"] is True  # p = 0.039 < ALPHA / 2 = 0.05
    text = re.sub(r"\s+", " ", html.unescape(got["html"]))
    assert ("It holds when reliance (the share of predictions that take the background's class" in text
            and "is above 3 % at the low end of its 90 % interval" in text)
    assert "low end lies above the materiality margin" not in text
    assert "with its 90 % interval" in text and "(paired 90 % CI)" in text and "95 %" not in text
    assert got["printed"].startswith("reliance on the background, lowest first (90% CI; FLAGGED: takes the "
                                     "background's class):")
    assert re.search(r"near .*FLAGGED", got["printed"])


def test_the_rule_states_the_margin_the_comparison_used(tmp_path):
    from probekit.report._compare import render_compare_html

    y, bl, preds = planted()
    cmp = compare_rows({m: preds[m] for m in ("robust", "complete")}, y, bl, n_boot=20)
    for row in cmp["checkpoints"].values():
        row["reliance"]["margin"] = 0.08
    text = re.sub(r"\s+", " ", html.unescape(render_compare_html(cmp)))
    assert "is above 8 % at the low end of its 95 % interval" in text and "above 3 %" not in text
