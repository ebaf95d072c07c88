"""One name for the crossed split: probekit writes ``crossed``; what an earlier release wrote as ``stress``
is still read, with exactly one FutureWarning, and gives the same figures.

Oracle: the same data under both names. A store written by ``probekit audit`` is copied and its split
renamed ``crossed`` -> ``stress`` inside the HDF5 file (what the previous release wrote); every figure the
audit, the gallery's reader and a resumed ``probekit audit`` compute from the copy must equal the ones
from the original, the split's name aside.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import jsonschema
import numpy as np
import pytest
import torch

import probekit as pk
from probekit.cli import main
from probekit.datasets._shapes import write_image_folder
from probekit.model_audit import audit_model
from probekit.report import predictions_from_store

MODEL = "probekit.experiments.shortcut:ShapesCNN"
FAST = {"n_boot": 40, "n_perm": 20, "progress": False, "workers": 0, "n_inits": 1, "n_backgrounds": 3}
ROOT = Path(__file__).resolve().parents[2]


def _rename_split(store: Path, old: str, new: str) -> None:
    """Rename a split everywhere the store format names it (docs/FORMAT.md): samples and every model's acts."""
    with h5py.File(store, "r+") as f:
        f.move(f"samples/{old}", f"samples/{new}")
        for m in f["models"]:
            bases = [f"models/{m}"] + [f"models/{m}/steps/{s}" for s in f[f"models/{m}"].get("steps", {})]
            for base in bases:
                if f"{base}/acts/{old}" in f:
                    f.move(f"{base}/acts/{old}", f"{base}/acts/{new}")


def _names(store: Path) -> list[str]:
    with h5py.File(store, "r") as f:
        out: list[str] = []
        f.visit(out.append)
        return out


def _future(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning)]


def _figures(doc: dict) -> dict:
    """What the audit found, with the crossed split's name written one way."""
    text = json.dumps({k: doc[k] for k in ("splits", "models", "pairs", "headline", "verdict", "skipped")})
    return json.loads(re.sub(r"\bstress\b", "crossed", text))  # the word is only ever the split's name here


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fresh")
    images, masks = write_image_folder(tmp / "f", split="test", background="class", n=12)
    torch.manual_seed(5)
    from probekit.experiments.shortcut import ShapesCNN

    torch.save(ShapesCNN().state_dict(), tmp / "m.pt")
    out = tmp / "new"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        doc = audit_model(MODEL, images, masks=masks, weights=tmp / "m.pt", out=out, **FAST).data
    assert _future(rec) == []  # nothing old was read
    return {"tmp": tmp, "images": images, "masks": masks, "weights": tmp / "m.pt", "out": out, "doc": doc}


def test_a_fresh_audit_names_the_split_crossed_and_never_stress(fresh):
    out, doc = fresh["out"], fresh["doc"]
    names = _names(out / "acts.h5")
    assert "samples/crossed" in names and "models/model/acts/crossed" in names
    assert not [n for n in names if "stress" in n]
    assert doc["config"]["crossed"] == "crossed" and "crossed" in doc["splits"]
    for key in ("forward_passes", "images", "images_composited"):
        assert "crossed" in doc["cost"][key] and "stress" not in doc["cost"][key]
    assert doc["models"]["model"]["behaviour"]["split"] == "crossed"
    text = (out / "audit.json").read_text()
    assert "stress" not in text.replace(str(fresh["tmp"]), "")  # paths aside
    assert "crossed" in (out / "report.html").read_text()


def test_an_old_store_is_analysed_with_one_warning_and_the_same_figures(fresh, tmp_path):
    old = tmp_path / "old.h5"
    shutil.copy(fresh["out"] / "acts.h5", old)
    _rename_split(old, "crossed", "stress")
    assert "samples/stress" in _names(old) and not [n for n in _names(old) if "crossed" in n]
    kw = {"train": "train", "test_id": "test", "test_ood": "", "n_boot": 40, "n_perm": 20, "progress": False}
    new_doc = pk.audit(fresh["out"] / "acts.h5", **kw).data
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        old_doc = pk.audit(old, **kw).data
    msgs = _future(rec)
    assert len(msgs) == 1 and "'stress'" in msgs[0] and "crossed='stress'" in msgs[0], msgs
    assert old_doc["config"]["crossed"] == "stress"  # the split it read, as the store names it
    assert old_doc["models"]["model"]["behaviour"]["split"] == "stress"
    assert _figures(old_doc) == _figures(new_doc)
    assert old_doc["models"]["model"]["behaviour"]["reliance"]["value"] is not None  # figures, not skips
    # naming the split silences the fallback: the user's own split name stays valid
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        named = pk.audit(old, crossed="stress", **kw).data
    assert _future(rec) == [] and _figures(named) == _figures(new_doc)
    # the gallery's reader: the old split under the new key, one warning, the same predictions
    want = predictions_from_store(fresh["out"] / "acts.h5", "model")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = predictions_from_store(old, "model")
    assert len(_future(rec)) == 1 and set(got) == set(want) == {"variants", "crossed"}
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_the_cli_reads_an_old_store_and_warns_once(fresh, tmp_path, capsys):
    old = tmp_path / "old.h5"
    shutil.copy(fresh["out"] / "acts.h5", old)
    _rename_split(old, "crossed", "stress")
    args = ["analyze", str(old), "--json", "--train", "train", "--test-id", "test", "--test-ood", "",
            "--n-boot", "40", "--n-perm", "20", "--no-progress"]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert len(_future(rec)) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["crossed"] == "stress" and doc["models"]["model"]["behaviour"]["split"] == "stress"
    # --stress SPLIT, the old flag: one line on stderr, and the split it names is read without the fallback
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert main([*args, "--stress", "stress"]) == 0
    err = capsys.readouterr().err
    assert _future(rec) == [] and err.count("FutureWarning") == 1 and "`--crossed SPLIT`" in err


def test_the_cli_prints_the_library_warning_on_one_line(fresh, tmp_path):
    """In a terminal (a child process, Python's default warning filters): ``probekit: FutureWarning: ...``,
    one line, without the file, line number and source line Python's own form adds."""
    old = tmp_path / "old.h5"
    shutil.copy(fresh["out"] / "acts.h5", old)
    _rename_split(old, "crossed", "stress")
    args = ["analyze", str(old), "--train", "train", "--test-id", "test", "--test-ood", "", "--n-boot", "40",
            "--n-perm", "20", "--no-progress"]
    run = subprocess.run([sys.executable, "-m", "probekit.cli", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if "Warning" in ln]
    assert len(lines) == 1 and lines[0].startswith("probekit: FutureWarning: ") and "--crossed" in lines[0]
    assert "warnings.warn" not in run.stderr and ".py:" not in run.stderr
    debug = subprocess.run([sys.executable, "-m", "probekit.cli", "--debug", *args], capture_output=True, text=True,
                           timeout=300)
    assert debug.returncode == 0 and ".py:" in debug.stderr  # --debug keeps Python's own form


def test_an_old_audit_folder_is_continued_under_its_own_name(fresh, tmp_path):
    """An interrupted or finished folder of the previous release: its rows are reused (no forward pass),
    the split keeps its name in the store and the document, the figures are the fresh audit's."""
    out = tmp_path / "old-folder"
    shutil.copytree(fresh["out"], out)
    _rename_split(out / "acts.h5", "crossed", "stress")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        doc = audit_model(MODEL, fresh["images"], masks=fresh["masks"], weights=fresh["weights"], out=out,
                          **FAST).data
    msgs = _future(rec)
    assert len(msgs) == 1 and "--overwrite" in msgs[0] and "'stress'" in msgs[0], msgs
    assert doc["cost"]["forward_passes_done"] == 0  # continued, not recomputed
    names = _names(out / "acts.h5")
    assert "samples/stress" in names and not [n for n in names if "crossed" in n]
    assert set(doc["cost"]["forward_passes"]) == {"train", "test", "variants", "stress"}
    assert doc["cost"]["forward_passes"]["stress"] == fresh["doc"]["cost"]["forward_passes"]["crossed"]
    assert _figures(doc) == _figures(fresh["doc"])
    # the old document renders and is valid: a split-keyed map takes any split name
    schema = json.loads((ROOT / "probekit" / "report" / "audit.schema.json").read_text())
    jsonschema.validate(doc, schema)
    assert main(["report", str(out / "acts.h5"), "--audit", str(out / "audit.json"), "-o", str(tmp_path / "old.html")]) == 0
    assert "stress" in (tmp_path / "old.html").read_text()  # its split, named as the document names it
    # --overwrite rewrites it under the new name
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        again = audit_model(MODEL, fresh["images"], masks=fresh["masks"], weights=fresh["weights"], out=out,
                            overwrite=True, **FAST).data
    assert _future(rec) == [] and "crossed" in again["splits"] and "stress" not in again["splits"]
    assert _figures(again) == _figures(fresh["doc"])


def test_extract_writes_the_old_split_name_as_crossed(tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert main(["extract", "torch.nn:Flatten", "--data", "structured", "--split", "stress", "--layers", "@output",
                 "-o", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("FutureWarning") == 1 and "`--split crossed`" in err
    with pk.open_store(out) as s:
        assert s.splits == ["crossed"] and s.has_field("crossed", "group")
