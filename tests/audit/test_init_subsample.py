"""The init reference on a subsample of objects (issue 22): ``compare_background`` with references on
other rows than the model, and ``probekit audit --init-objects``.

Oracles: the paired two-way jackknife (the references on the model's own rows must give the same
interval through the new path), the delete-one jackknife recomputed from scratch with
``crossed_decomposition`` on every leave-one-out table (disjoint objects: the variances add),
coverage of the population ratio by simulation (benchmarks/calibrate_layers.py's generator, exact
truths), and planted shortcut / robust CNNs audited end to end.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from probekit._layout import CHECK_SAMPLES
from probekit.analyses import compare_background, crossed_decomposition
from probekit.analyses._crossed import _subsample_estimate, _unpaired_parts
from probekit.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cl = _load("calibrate_layers")


def _data(G=40, B=6, seed=0, act="linear", n_inits=3):
    rng = np.random.default_rng(seed)
    z, wb, e = rng.normal(size=(G, 8)), rng.normal(size=(B, 8)), rng.normal(size=(G, B, 8))
    g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
    X = cl.rows(cl.weights(rng, a=3.0), act, z, wb, e)
    inits = [cl.rows(cl.weights(rng), act, z, wb, e) for _ in range(n_inits)]
    return X, inits, g, b


def test_references_on_the_models_rows_through_the_new_arguments_change_nothing():
    X, inits, g, b = _data()
    a = compare_background(X, inits, g, b, kind="within_odds")
    # the same rows, labelled and shuffled: the same tables, so the same figures and interval
    perm = np.random.default_rng(1).permutation(len(g))
    r = compare_background(X, [z[perm] for z in inits], g, b, kind="within_odds", reference_group=g[perm],
                           reference_background=b[perm])
    assert r.ratio == pytest.approx(a.ratio) and r.ratio_ci == pytest.approx(a.ratio_ci) and r.df == pytest.approx(a.df)
    assert (r.n_groups, r.n_reference_groups, r.n_shared_groups) == (40, 40, 40)


def _log_figure_loo(Z, g, b, keep):
    """log(bg / int) with each object of ``keep`` left out, recomputed from scratch."""
    out = []
    for o in keep:
        sel = np.isin(g, keep) & (g != o)
        r = crossed_decomposition(Z[sel], g[sel], b[sel])
        out.append(np.log(r.background / r.interaction))
    return np.array(out)


def _jack_var(loo):
    n = loo.size
    return (n - 1) / n * ((loo - loo.mean()) ** 2).sum()


def test_unpaired_parts_equal_the_jackknife_recomputed_from_scratch():
    X, inits, g, b = _data(G=24, B=5, seed=3, n_inits=1)
    Z = inits[0]
    S_g, T_g = (np.exp(_log_figure_loo(M, g, b, np.arange(24))) for M in (X, Z))
    S, T = (crossed_decomposition(M, g, b) for M in (X, Z))
    S, T = S.background / S.interaction, T.background / T.interaction
    S_b = np.array([(lambda r: r.background / r.interaction)(crossed_decomposition(X[b != k], g[b != k], b[b != k]))
                    for k in range(5)])
    T_b = np.array([(lambda r: r.background / r.interaction)(crossed_decomposition(Z[b != k], g[b != k], b[b != k]))
                    for k in range(5)])
    # every object shared: the paired two-way jackknife of log(S / T)
    parts = _unpaired_parts(True, S, T, S_g, T_g, S_b, T_b, (np.arange(24), np.arange(24)))
    want_g = _jack_var(np.log(S_g) - np.log(T_g))
    want_b = _jack_var(np.log(S_b) - np.log(T_b))
    assert [p for p, _ in parts] == pytest.approx([want_g, want_b])
    assert [d for _, d in parts] == [23, 4]
    # no object shared: the two tables' own object jackknife variances add (independent samples)
    parts = _unpaired_parts(True, S, T, S_g, T_g, S_b, T_b, (np.zeros(0, int), np.zeros(0, int)))
    assert [p for p, _ in parts[:2]] == pytest.approx([_jack_var(np.log(S_g)), _jack_var(np.log(T_g))])


def test_subsample_estimate_on_every_object_is_the_paired_jackknife():
    X, inits, g, b = _data(G=24, B=5, seed=4, n_inits=1)
    Z = inits[0]
    S_g, T_g = (np.exp(_log_figure_loo(M, g, b, np.arange(24))) for M in (X, Z))
    fig = [crossed_decomposition(M, g, b) for M in (X, Z)]
    S, T = (r.background / r.interaction for r in fig)
    S_b, T_b = (np.array([(lambda r: r.background / r.interaction)(crossed_decomposition(M[b != k], g[b != k],
                                                                                         b[b != k])) for k in range(5)])
                for M in (X, Z))
    # the "subsample" is every object: D = 0 and its terms vanish, whatever the weight
    est, _, parts = _subsample_estimate(True, S, T, S, S_g, T_g, S_g, S_b, T_b, S_b, np.arange(24))
    assert est == pytest.approx(np.log(S / T))
    assert [p for p, _ in parts] == pytest.approx([_jack_var(np.log(S_g) - np.log(T_g)),
                                                   _jack_var(np.log(S_b) - np.log(T_b))])


def test_inits_that_vary_with_the_model_lean_on_the_shared_objects_and_cover():
    """Inits = the model's rows + noise (a first conv layer and its inits see the same pixels): the weight
    on the model's other objects is small (the ratio is read mostly where the inits were measured), and the
    interval covers the exact truth."""
    ci = _load("calibrate_init_subsample")
    cover = [ci.run_correlated(100, 8, 15, s)["15"]["covered"] for s in range(30)]
    assert np.mean(cover) >= 0.9
    X, _, g, b = _data(G=100, B=8, seed=2)
    sel = g < 15
    noisy = [X + 0.7 * np.random.default_rng(k).normal(size=X.shape) for k in range(3)]
    r = compare_background(X, [z[sel] for z in noisy], g, b, kind="within_odds", reference_group=g[sel],
                           reference_background=b[sel])
    assert r.subsample_weight < 0.5


def test_a_subsample_adds_the_references_sampling_variance():
    X, inits, g, b = _data(G=60, B=6, seed=5)
    full = compare_background(X, inits, g, b, kind="within_odds")
    sel = g < 12
    sub = compare_background(X, [z[sel] for z in inits], g, b, kind="within_odds", reference_group=g[sel],
                             reference_background=b[sel])
    assert (sub.n_groups, sub.n_reference_groups, sub.n_shared_groups) == (60, 12, 12)
    # the model's figure is the same; the reference is estimated from fewer objects
    assert sub.value == pytest.approx(full.value)
    assert sub.reference != pytest.approx(full.reference, rel=1e-9)
    assert sub.ratio_ci is not None and sub.ratio_ci[0] < sub.ratio < sub.ratio_ci[1]


def test_bad_reference_rows_fail_in_one_line():
    X, inits, g, b = _data(G=20, B=5)
    sel = g < 8
    with pytest.raises(DataError, match="together"):
        compare_background(X, [z[sel] for z in inits], g, b, kind="within_odds", reference_group=g[sel])
    other = b < 4  # the references on 4 of the 5 backgrounds
    with pytest.raises(DataError, match="same backgrounds"):
        compare_background(X, [z[other] for z in inits], g, b, kind="within_odds", reference_group=g[other],
                           reference_background=b[other])
    with pytest.raises(DataError, match="rows"):
        compare_background(X, [z[sel] for z in inits], g, b, kind="within_odds")


@pytest.mark.parametrize("act", ["linear", "relu"])
def test_subsample_interval_covers_and_flags_as_calibrated(act):
    """A small seeded version of benchmarks/calibrate_init_subsample.py: G = 100 objects, inits on 15."""
    ci = _load("calibrate_init_subsample")
    ref = cl.init_reference(act, n=1_000)
    hits = {"at_1": [], "at_margin": [], "bg_3x": []}
    for s in range(25):
        for name, by_k in ci.run(100, 8, act, s, ref, [15]).items():
            if name in hits:
                hits[name].append(by_k["15"])
    for name in ("at_1", "at_margin"):  # false flags at ratio 1 and at the margin 1.25
        assert sum(r["flag"] for r in hits[name]) <= 1
    cover = [r["covered"] for rs in hits.values() for r in rs]
    assert np.mean(cover) >= 0.9
    if act == "linear":  # power at a 3x background is still there (72 % with all objects at G = 100)
        assert sum(r["flag"] for r in hits["bg_3x"]) >= 8


@pytest.mark.slow
def test_audit_with_inits_on_a_subsample_gives_the_same_verdict(tmp_path, capsys):
    """Planted shortcut and robust CNNs through the CLI: the same findings with the inits on 5 of the 30
    objects as on all; the inits hold 5 objects' rows; a rerun with another --init-objects is refused."""
    import torch

    from probekit.cli import main
    from probekit.datasets._shapes import write_image_folder
    from probekit.experiments.shortcut import train_shapes_cnn

    images, masks = write_image_folder(tmp_path / "data", split="test", background="class", n=60)
    fast = ["--n-boot", "100", "--n-perm", "50", "--no-progress", "--inits", "2", "--mask-check", "0"]
    docs = {}
    for name, bg in (("shortcut", "class"), ("robust", "random")):
        w = tmp_path / f"{name}.pt"
        torch.save(train_shapes_cnn(bg, seed=1, epochs=8, n_train=600).state_dict(), w)
        for io in ("all", "5"):
            out = tmp_path / f"{name}-{io}"
            main(["audit", "probekit.experiments.shortcut:ShapesCNN", "--weights", str(w), "--data", str(images),
                  "--masks", str(masks), "--out-dir", str(out), "--name", name, "--init-objects", io, *fast])
            docs[name, io] = json.loads((out / "audit.json").read_text())
    for name in ("shortcut", "robust"):
        a, s = docs[name, "all"]["models"][name], docs[name, "5"]["models"][name]
        assert a["flagged"] == s["flagged"] == (name == "shortcut")
        assert sorted(a["findings"]) == sorted(s["findings"])
        refs = [la["background_vs_reference"] for la in s["layers"].values() if "background_vs_reference" in la]
        assert refs and all(r["n_reference_objects"] == 5 and r["n_objects"] == 30 for r in refs)
        cost = docs[name, "5"]["cost"]
        assert cost["init_objects"] == {"requested": 5, "used": 5}
        assert cost["forward_passes"]["crossed"][f"{name}@init0"] == 5 * 8
        assert docs[name, "all"]["cost"]["forward_passes"]["crossed"][f"{name}@init0"] == 30 * 8
    capsys.readouterr()
    rc = main(["audit", "probekit.experiments.shortcut:ShapesCNN", "--weights", str(tmp_path / "robust.pt"), "--data",
               str(images), "--masks", str(masks), "--out-dir", str(tmp_path / "robust-5"), "--name", "robust",
               "--init-objects", "7", *fast])
    assert rc == 2 and "--init-objects" in capsys.readouterr().err


@pytest.mark.slow
def test_inits_see_the_first_objects_of_the_seeded_order_and_the_behaviour_is_unchanged(tmp_path, monkeypatch):
    """Forward passes counted by a hook on the nets (oracle: the split sizes by hand); the inits' rows are
    the first k objects of the seeded order; the behaviour figures do not depend on the order of the rows."""
    import torch

    from probekit import open_store
    from probekit.datasets import Counterfactuals
    from probekit.datasets._shapes import write_image_folder
    from probekit.experiments.shortcut import ShapesCNN
    from probekit.model_audit import _object_order, audit_model

    images, masks = write_image_folder(tmp_path / "d", split="test", background="class", n=24)
    torch.manual_seed(5)
    w = tmp_path / "m.pt"
    torch.save(ShapesCNN().state_dict(), w)
    seen: dict[int, int] = {}

    def hook(module, args, output):
        if isinstance(module, ShapesCNN):
            seen[id(module)] = seen.get(id(module), 0) + int(args[0].shape[0])

    fast = {"n_boot": 40, "n_perm": 20, "progress": False, "workers": 0, "n_inits": 2}
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        sub = audit_model("probekit.experiments.shortcut:ShapesCNN", images, masks=masks, weights=w,
                          out=tmp_path / "sub", init_objects=4, **fast).data
    finally:
        handle.remove()
    full = audit_model("probekit.experiments.shortcut:ShapesCNN", images, masks=masks, weights=w,
                       out=tmp_path / "full", init_objects="all", **fast).data
    cf = Counterfactuals(images, masks=masks)
    n_obj = len(cf.crossed_indices)
    model_rows = len(cf.train_indices) + len(cf.test_indices) * (1 + len(cf.variants)) + n_obj * 8
    # + the dry pass that orders the layers and the memory-format check's first images, twice (probekit._layout)
    assert sorted(seen.values()) == sorted([model_rows + 2 + 2 * CHECK_SAMPLES, 4 * 8, 4 * 8])
    assert sub["cost"]["forward_passes_done"] == model_rows + 2 * 4 * 8
    crossed = cf.split("crossed")
    first = {crossed.locate(int(o) * 8)[0] for o in _object_order(n_obj, 0)[:4]}
    with open_store(tmp_path / "sub" / "acts.h5") as s:
        assert s.n_rows("crossed", "model@init0") == 32 and s.n_rows("crossed", "model") == n_obj * 8
        assert set(np.asarray(s.sample_field("crossed", "group"))[:32].tolist()) == first
    assert sub["models"]["model"]["behaviour"] == full["models"]["model"]["behaviour"]
    # the report's gallery puts the seeded order's rows back in the split's order (as audit_model does)
    from probekit.model_audit import _crossed_rows
    from probekit.report import predictions_from_store

    # --objects auto grows the split in looks; the inits stop at their 4 objects, the model goes on
    monkeypatch.setattr("probekit.model_audit.AUTO_MIN_OBJECTS", 4)  # looks on this 12-object folder too
    auto = audit_model("probekit.experiments.shortcut:ShapesCNN", images, masks=masks, weights=w,
                       out=tmp_path / "auto", init_objects=4, objects="auto", decide=lambda *a: False, **fast).data
    assert auto["cost"]["init_objects"] == {"requested": 4, "used": 4}
    assert auto["cost"]["objects"]["used"] == n_obj and len(auto["cost"]["objects"]["looks"]) >= 2
    with open_store(tmp_path / "auto" / "acts.h5") as s:
        assert s.n_rows("crossed", "model@init1") == 32 and s.n_rows("crossed", "model") == n_obj * 8
    assert auto["models"]["model"]["behaviour"] == full["models"]["model"]["behaviour"]
    rows = _crossed_rows(_object_order(n_obj, 0), n_obj, 8)
    for d, shown in (("sub", lambda v: _back(v, rows)), ("full", lambda v: v)):
        with open_store(tmp_path / d / "acts.h5") as s:
            cells = np.stack([shown(np.asarray(s.sample_field("crossed", f))) for f in ("group", "background")], 1)
        assert np.array_equal(cells, [crossed.locate(i)[::2] for i in range(len(crossed))])  # the split's own order
        p = predictions_from_store(tmp_path / d / "acts.h5", "model")["crossed"]
        assert np.array_equal(shown(p), predictions_from_store(tmp_path / "full" / "acts.h5", "model")["crossed"])


def _back(values, rows):
    out = np.empty_like(values)
    out[rows] = values
    return out
