"""The audit reads a model's output in blocks of rows (a 1,000-unit head on 20,000 crossed rows is 160 MB as
float64): the predictions, and the whole audit.json, must be what reading it whole gives.

Oracles: numpy's argmax and :func:`probekit.analyses.output_predictions` on the whole output (class map and
one logit included), and the audit of the same planted store read in blocks of one to three rows against the
audit read in one block.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from probekit.analyses import background_sensitivity, output_predictions
from probekit.audit import AuditSpec, audit, read_output
from probekit.store import StoreWriter, open_store

audit_mod = importlib.import_module("probekit.audit")  # the module (probekit.audit is also the function)
G, B, K = 40, 5, 4


def _store(path, width: int = K) -> None:
    rng = np.random.default_rng(0)
    split = AuditSpec().crossed
    label, bl = np.arange(G) % K, np.arange(B) % K
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    n = g.size
    with StoreWriter(path, mode="overwrite") as w:
        w.add_split(split, n_rows=n, has_label=True, fields=["label", "group", "background", "background_label"])
        w.add_model("m", role="model", source="planted")
        w.add_layer("m", split, "@output", feature_shape=(width,), dtype="float32", attrs={"pool": "none"})
        w.add_layer("m", split, "h", feature_shape=(6,), dtype="float32", attrs={"pool": "avg"})
        logits = rng.normal(size=(n, width)).astype(np.float32)
        target = np.where(rng.random(n) < 0.4, bl[b], label[g])  # follows the background on 40 % of the rows
        logits[np.arange(n), target % width] += 2.5
        hidden = (rng.normal(size=(n, 6)) + 0.5 * b[:, None]).astype(np.float32)
        w.write_rows(split, 0, samples={"index": np.arange(n), "label": label[g], "group": g, "background": b,
                                        "background_label": bl[b]},
                     acts={"m": {"@output": logits, "h": hidden}})


@pytest.mark.parametrize("width", [1, K, 7])
def test_blocks_give_the_whole_outputs_predictions(tmp_path, monkeypatch, width):
    _store(tmp_path / "s.h5", width)
    with open_store(tmp_path / "s.h5") as s:
        acts = s.acts("m", AuditSpec().crossed, "@output")
        whole = np.asarray(acts[:], dtype=np.float64)
        cmap = {0: 1, 2: 0} if width > 2 else None
        monkeypatch.setattr(audit_mod, "OUTPUT_BLOCK_BYTES", 8 * width * 3)  # three rows a block
        blocks = []
        real = acts.iter_chunks
        monkeypatch.setattr(acts, "iter_chunks", lambda step: [blocks.append(len(x[1])) or x for x in real(step)])
        assert np.array_equal(read_output(acts), whole.argmax(axis=1))
        assert max(blocks) == 3 and sum(blocks) == G * B  # it read three rows at a time, every row once
        assert np.array_equal(read_output(acts, lambda o: output_predictions(o, cmap)), output_predictions(whole, cmap))
        pred, top = read_output(acts, lambda o: (o.argmax(axis=1), o.max(axis=1)))  # two readings, one pass
        assert np.array_equal(pred, whole.argmax(axis=1)) and np.array_equal(top, whole.max(axis=1))


def test_the_audit_is_the_same_read_in_blocks(tmp_path, monkeypatch):
    _store(tmp_path / "s.h5")
    kw = {"n_boot": 40, "n_perm": 20, "random_state": 0, "progress": False}
    with open_store(tmp_path / "s.h5") as s:
        whole = audit(s, **kw).data
        monkeypatch.setattr(audit_mod, "OUTPUT_BLOCK_BYTES", 8 * K)  # one row a block
        rows = audit(s, **kw).data
    whole.pop("created", None), rows.pop("created", None)
    assert whole["models"]["m"]["behaviour"]["flip_rate"]["value"] > 0.2  # the planted background pull is read
    assert rows == whole


def test_background_sensitivity_against_its_formula():
    """The layer figure and per-unit values against the within / total sums of squares written out."""
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(30), 4)
    X = rng.normal(size=(g.size, 5)) + rng.normal(size=(30, 5))[g] * np.array([0.0, 0.5, 1, 2, 4])
    X[:, 0] = 1.0  # a dead unit
    r = background_sensitivity(X, g, n_boot=50)
    means = np.stack([X[g == k].mean(axis=0) for k in range(30)])
    within = ((X - means[g]) ** 2).sum(axis=0)
    total = ((X - X.mean(axis=0)) ** 2).sum(axis=0)
    live = np.arange(5) > 0
    np.testing.assert_allclose(r.per_unit[live], within[live] / total[live], rtol=1e-10)
    assert np.isnan(r.per_unit[0]) and r.n_dead_units == 1
    np.testing.assert_allclose(r.layer, within[live].sum() / total[live].sum(), rtol=1e-10)
    lo, hi = r.layer_ci
    assert lo < r.layer < hi
