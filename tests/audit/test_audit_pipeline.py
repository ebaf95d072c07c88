"""``probekit audit`` at scale: one pass over the images, worker processes, any device, the cost model.

Oracles: the forward passes each net makes are counted by a hook on the net itself and compared with
the split sizes computed by hand from the folder (train + test + each variant of each test image +
objects x backgrounds; the inits on the crossed split only); the figures of an audit with worker processes or
``--device auto`` are compared with a plain single-process CPU audit's, field by field.
"""

import json

import numpy as np
import pytest
import torch

from probekit._layout import CHECK_SAMPLES
from probekit.datasets import Counterfactuals
from probekit.datasets._shapes import write_image_folder
from probekit.model_audit import (
    _init_net,
    accuracy_check,
    accuracy_lines,
    audit_model,
    auto_rounds,
    default_workers,
    resolve_device,
)

MODEL = "probekit.experiments.shortcut:ShapesCNN"
FAST = {"n_boot": 40, "n_perm": 20, "progress": False}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    return write_image_folder(d, split="test", background="class", n=24)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One random ShapesCNN, saved: every audit of a test reads the same model."""
    from probekit.experiments.shortcut import ShapesCNN

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("w") / "m.pt"
    torch.save(ShapesCNN().state_dict(), path)
    return path


def _forward_counter(monkeypatch):
    """Samples each top-level ShapesCNN (by object id) was run on, counted by a global forward hook."""
    from probekit.experiments.shortcut import ShapesCNN

    seen: dict[int, int] = {}

    def hook(module, args, output):
        if isinstance(module, ShapesCNN):
            seen[id(module)] = seen.get(id(module), 0) + int(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    return seen, handle


@pytest.mark.slow
def test_each_net_sees_each_image_once(folder, tmp_path, monkeypatch):
    images, masks = folder
    seen, handle = _forward_counter(monkeypatch)
    try:
        doc = audit_model(MODEL, images, masks=masks, out=tmp_path / "o", n_inits=2, workers=0, **FAST).data
    finally:
        handle.remove()
    cf = Counterfactuals(images, masks=masks)  # the audit's defaults: seed 0, 8 backgrounds, half test
    n_train, n_test, n_obj = len(cf.train_indices), len(cf.test_indices), len(cf.crossed_indices)
    n_var = len(cf.variants)  # original, only_fg, no_fg, only_bg, mixed_same/rand/next, composite_self
    model_rows = n_train + n_test + n_var * n_test + n_obj * 8
    # three nets: the model on every split (and one dry pass each on one image to order its layers by depth
    # and choose their pools, and the memory-format check's first images as it is and channels-last; the inits,
    # copies of its architecture, share that check), two inits on the crossed split only; no duplicate pass
    assert sorted(seen.values()) == sorted([model_rows + 2 + 2 * CHECK_SAMPLES, n_obj * 8, n_obj * 8])
    cost = doc["cost"]
    assert cost["forward_passes_total"] == model_rows + 2 * n_obj * 8 == cost["forward_passes_done"]
    assert cost["forward_passes"]["crossed"] == {"model": n_obj * 8, "model@init0": n_obj * 8,
                                                "model@init1": n_obj * 8}
    assert cost["images_composited"] == {"variants": (n_var - 1) * n_test, "crossed": n_obj * 8}
    assert cost["estimated_seconds"] is None or cost["estimated_seconds"] > 0
    # the inits store the crossed split's layers but not the output (their output is never compared)
    from probekit import open_store

    with open_store(tmp_path / "o" / "acts.h5") as s:
        assert "@output" not in s.layers("model@init0", "crossed") and s.layers("model@init0", "crossed")
        assert s.acts_splits("model@init0") == ["crossed"]


@pytest.mark.slow
def test_workers_and_device_auto_give_the_same_figures(folder, weights, tmp_path):
    images, masks = folder
    docs = []
    for i, kw in enumerate(({"workers": 0, "device": "cpu"}, {"workers": 2, "device": "auto"})):
        docs.append(audit_model(MODEL, images, masks=masks, weights=weights, out=tmp_path / str(i), n_inits=1,
                                **kw, **FAST).data)
    assert docs[1]["cost"]["workers"] == 2 and docs[1]["cost"]["device"] == resolve_device("auto")
    a, b = (json.loads(json.dumps({k: v for k, v in d.items() if k not in ("created", "cost")})) for d in docs)
    assert a["store"] != b["store"]
    a.pop("store"), b.pop("store")
    assert a == b


def test_inits_are_seeded_fresh_copies():
    from probekit.experiments.shortcut import ShapesCNN

    torch.manual_seed(0)
    net = ShapesCNN()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a, a2, b = _init_net(net, 0), _init_net(net, 0), _init_net(net, 1)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the model is untouched
    sd, sd2, sdb = a.state_dict(), a2.state_dict(), b.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)  # the same seed: the same init
    w = [k for k in sd if k.endswith("weight")]
    assert all(not torch.equal(sd[k], sdb[k]) and not torch.equal(sd[k], before[k]) for k in w)


@pytest.mark.slow
def test_objects_auto_stops_when_decided_and_grows_when_not(folder, weights, tmp_path, monkeypatch):
    images, masks = folder
    monkeypatch.setattr("probekit.model_audit.AUTO_MIN_OBJECTS", 10)  # looks on this small folder too
    calls = []

    def decide(pred, group, background, label, background_label):
        calls.append((len(pred), len(np.unique(group)), len(np.unique(background))))
        return len(calls) == 1 and stop

    stop = True
    doc = audit_model(MODEL, images, masks=masks, weights=weights, out=tmp_path / "a", n_inits=1, objects="auto",
                      decide=decide, workers=0, **FAST).data
    cap = doc["cost"]["objects"]["available"]
    looks = auto_rounds(cap)
    assert doc["cost"]["objects"]["looks"] == looks and len(looks) >= 2
    assert calls == [(looks[0] * 8, looks[0], 8)]  # the first look's rows: whole objects on all backgrounds
    assert doc["cost"]["objects"]["used"] == looks[0]
    from probekit import open_store

    with open_store(tmp_path / "a" / "acts.h5") as s:
        assert s.n_rows("crossed", "model") == s.n_rows("crossed", "model@init0") == looks[0] * 8
    calls.clear()
    stop = False
    doc = audit_model(MODEL, images, masks=masks, weights=weights, out=tmp_path / "b", n_inits=1, objects="auto",
                      decide=decide, workers=0, **FAST).data
    assert [c[0] for c in calls] == [n * 8 for n in looks[:-1]] and doc["cost"]["objects"]["used"] == cap
    # the rows grown in looks are the rows of --objects N with N = the cap (same order, same figures)
    full = audit_model(MODEL, images, masks=masks, weights=weights, out=tmp_path / "c", n_inits=1, objects=cap,
                       workers=0, **FAST).data
    assert full["models"]["model"]["behaviour"] == doc["models"]["model"]["behaviour"]


def test_auto_rounds():
    assert auto_rounds(200) == [50, 100, 200]
    assert auto_rounds(100) == [50, 100]  # no look before AUTO_MIN_OBJECTS = 50
    assert auto_rounds(30) == [30]
    assert auto_rounds(30, first=10) == [10, 15, 30]
    assert auto_rounds(12, first=10) == [10, 12]
    assert auto_rounds(5, first=10) == [5]


@pytest.mark.slow
def test_mask_check_uses_the_users_resampling_counts(folder, tmp_path, monkeypatch):
    import probekit.analyses as analyses

    images, masks = folder
    csv = tmp_path / "boxes.csv"
    from PIL import Image

    rows = []
    for p in sorted(images.rglob("*.png")):
        m = np.asarray(Image.open(masks / p.relative_to(images))) > 0
        ys, xs = np.nonzero(m)
        rows.append(f"{p.relative_to(images).as_posix()},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    csv.write_text("path,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    asked = []

    def spy(real):
        def f(*a, **kw):
            asked.append((real.__name__, kw["n_boot"], kw.get("n_perm")))
            return real(*a, **kw)
        return f

    for fn in ("background_behaviour", "background_reliance"):
        monkeypatch.setattr(analyses, fn, spy(getattr(analyses, fn)))
    doc = audit_model(MODEL, images, boxes=csv, out=tmp_path / "o", n_inits=0, mask_check=1, workers=0,
                      n_boot=37, n_perm=11, progress=False).data
    assert set(doc["mask_sensitivity"]["models"]["model"]) == {"eroded", "dilated"}
    # every call (the audit's, and the mask check's two per mask: eroded and dilated) uses the user's counts
    assert set(asked) == {("background_behaviour", 37, 11), ("background_reliance", 37, None)}
    assert min(sum(a[0] == fn for a in asked) for fn in ("background_behaviour", "background_reliance")) >= 3


def test_device_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cuda:1") == "cuda:1"


def test_default_workers(monkeypatch):
    import os

    for cores, want in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: set(range(c)))
        assert default_workers() == want


def test_accuracy_near_chance_warns_with_the_preprocessing():
    pre = {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    doc = {"preprocessing": pre, "models": {
        "good": {"behaviour": {"chance": 1 / 3, "accuracy": {"original": {"value": 0.9, "ci": [0.8, 0.96]}}}},
        "bad": {"behaviour": {"chance": 1 / 3, "accuracy": {"original": {"value": 0.4, "ci": [0.3, 0.5]}}}},
        "none": {"behaviour": {}}}}
    chk = accuracy_check(doc)
    assert set(chk) == {"good", "bad"} and not chk["good"]["near_chance"] and chk["bad"]["near_chance"]
    lines = accuracy_lines(doc)
    assert lines[0] == "accuracy on the original images, good: 90 % [80, 96] (chance 33 %)"
    assert lines[2].startswith("WARNING: bad: accuracy on the original images 40 % is near chance (33 %)")
    assert "[3, 224, 224]" in lines[2] and "--image-size" in lines[2] and len(lines) == 3


@pytest.mark.slow
def test_grabcut_runs_once_per_image_and_its_masks_are_read_back(folder, weights, tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    from PIL import Image

    from probekit.datasets import ForegroundFolder

    images, _ = folder
    real = ForegroundFolder._auto_mask
    calls = []

    def counted(self, i):
        calls.append(i)
        return real(self, i)

    monkeypatch.setattr(ForegroundFolder, "_auto_mask", counted)
    kw = {"foreground": "auto", "weights": weights, "n_inits": 0, "mask_check": 1, "n_backgrounds": 3, "workers": 0}
    doc = audit_model(MODEL, images, out=tmp_path / "o", **kw, **FAST).data
    fresh = ForegroundFolder(images, foreground="auto")
    assert sorted(calls) == list(range(len(fresh)))  # once per image: every split and the mask check read files
    assert doc["cost"]["grabcut"] == len(fresh) and set(doc["mask_sensitivity"]["models"]["model"]) == {
        "eroded", "dilated"}
    calls.clear()
    for i, rel in enumerate(fresh.paths):
        saved = np.asarray(Image.open(tmp_path / "o" / "auto-masks" / rel)) > 0
        assert np.array_equal(saved, fresh.mask(i))  # the saved mask is GrabCut's (after its fallback)
    calls.clear()
    again = audit_model(MODEL, images, out=tmp_path / "o", **kw, **FAST).data  # a rerun reads the saved masks
    assert calls == [] and again["models"] == doc["models"]


def test_grabcut_in_several_processes_saves_the_in_process_masks(folder, tmp_path):
    """GrabCut runs in workers + 1 processes (nothing runs beside it): each saved mask is the one GrabCut
    gives in this process (it is seeded per image), whatever process computed it."""
    from PIL import Image

    from probekit.datasets import ForegroundFolder
    from probekit.model_audit import _grabcut, _mask_path

    images, _ = folder
    fresh = ForegroundFolder(images, foreground="auto")
    todo = list(range(len(fresh)))
    _grabcut(fresh, tmp_path / "m", 1, todo)  # two processes
    for i in todo:
        saved = np.asarray(Image.open(_mask_path(tmp_path / "m", fresh.paths[i]))) > 0
        assert np.array_equal(saved, fresh.mask(i))


def test_cli_objects_argument():
    import argparse

    from probekit.cli import _objects_arg

    assert _objects_arg("auto") == "auto" and _objects_arg("40") == 40
    for bad in ("0", "-3", "many", "2.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            _objects_arg(bad)


def test_accuracy_far_below_the_models_own_warns():
    """A ViT given the wrong mean/std fell from 0.94 to 0.67, not near chance: --expected-accuracy tells."""
    doc = {"preprocessing": {"input_size": [3, 224, 224]}, "models": {
        "vit": {"behaviour": {"chance": 1 / 3, "accuracy": {"original": {"value": 0.67, "ci": [0.60, 0.74]}}}}}}
    assert accuracy_check(doc)["vit"]["warning"] is None  # without the model's own accuracy: nothing to say
    chk = accuracy_check(doc, expected=0.94)["vit"]
    assert chk["far_below"] and not chk["near_chance"] and "far below its own 94 %" in chk["warning"]
    assert not accuracy_check(doc, expected=0.80)["vit"]["far_below"]  # within 10 points of the interval
