"""Reruns of ``probekit audit`` that cannot go stale (issue 23 item 1).

A store records a fingerprint of every input that shaped its rows. Each input is changed in turn (an
image's bytes, a mask's bytes, the foreground mode, the seed, the model's weights) and the rerun into
the same ``-o`` must refuse in one line naming that input and ``--overwrite``, before any work; an
identical rerun continues; ``--overwrite`` recomputes with the new inputs.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from probekit._inputs import FINGERPRINT_ATTR, file_sha256
from probekit.cli import main
from probekit.datasets._shapes import write_image_folder

MODEL = "probekit.experiments.shortcut:ShapesCNN"
FAST = ["--n-boot", "20", "--n-perm", "10", "--no-progress", "--inits", "1", "--workers", "0",
        "--backgrounds", "3", "--test-fraction", "0.5"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder, a checkpoint and a finished audit of them (copied by each test)."""
    d = tmp_path_factory.mktemp("fp")
    images, masks = write_image_folder(d, split="test", background="class", n=12)
    torch.manual_seed(3)
    from probekit.experiments.shortcut import ShapesCNN

    w = d / "m.pt"
    torch.save(ShapesCNN().state_dict(), w)
    assert main(_argv(images, masks, w, d / "out")) == 0
    return d


def _argv(images, masks, w, out, *extra):
    return ["audit", MODEL, "--weights", str(w), "--data", str(images), "--masks", str(masks), "--out-dir", str(out),
            *FAST, *extra]


@pytest.fixture
def case(base, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(base, d)
    return d, d / "images", d / "masks", d / "m.pt", d / "out"


def _refused(argv, capsys, needle):
    store = argv[argv.index("--out-dir") + 1] + "/acts.h5"
    before = file_sha256(store)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "--overwrite" in err, err
    assert file_sha256(store) == before  # refused before anything was written


@pytest.mark.slow
def test_identical_rerun_continues(case, capsys):
    _d, images, masks, w, out = case
    first = json.loads((out / "audit.json").read_text())
    assert main(_argv(images, masks, w, out)) == 0
    second = json.loads((out / "audit.json").read_text())
    # the copied folder moved (paths differ) but its contents did not: the store is continued
    assert first["models"] == second["models"]
    assert first["inputs"]["fingerprint"] == second["inputs"]["fingerprint"]
    assert second["cost"]["forward_passes_done"] == 0  # every row was there: nothing ran again
    inp = second["inputs"]
    assert inp["folder"] == str(images.resolve()) and inp["classes"] == {"circle": 4, "square": 4, "triangle": 4}
    assert inp["model"]["checkpoint"] == str(w.resolve()) and inp["model"]["checkpoint_sha256"] == file_sha256(w)
    assert inp["foreground"]["mode"] == "masks" and inp["foreground"]["masks"] == str(masks.resolve())
    import h5py

    with h5py.File(out / "acts.h5", "r") as f:
        assert json.loads(f.attrs[FINGERPRINT_ATTR]) == inp["fingerprint"]


@pytest.mark.slow
def test_changed_image_is_refused_then_overwritten(case, capsys):
    _d, images, masks, w, out = case
    p = sorted(images.rglob("*.png"))[0]
    arr = np.asarray(Image.open(p)).copy()
    arr[0, 0] = 255 - arr[0, 0]  # one pixel: same name, same size, other bytes
    Image.fromarray(arr).save(p)
    _refused(_argv(images, masks, w, out), capsys, "the images")
    assert main(_argv(images, masks, w, out, "--overwrite")) == 0
    doc = json.loads((out / "audit.json").read_text())
    assert main(_argv(images, masks, w, out)) == 0  # and now the same inputs continue
    assert doc["inputs"]["fingerprint"] == json.loads((out / "audit.json").read_text())["inputs"]["fingerprint"]


def test_changed_mask_is_refused(case, capsys):
    _d, images, masks, w, out = case
    p = sorted(masks.rglob("*.png"))[-1]
    m = np.asarray(Image.open(p)).copy()
    ys, xs = np.nonzero(m)
    m[ys[0], xs[0]] = 0
    Image.fromarray(m).save(p)
    _refused(_argv(images, masks, w, out), capsys, "the foreground")


def test_other_foreground_mode_is_refused(case, capsys):
    d, images, masks, w, out = case
    rows = []
    for p in sorted(images.rglob("*.png")):
        m = np.asarray(Image.open(masks / p.relative_to(images))) > 0
        ys, xs = np.nonzero(m)
        rows.append(f"{p.relative_to(images).as_posix()},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    csv = d / "boxes.csv"
    csv.write_text("path,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    argv = _argv(images, masks, w, out)
    i = argv.index("--masks")
    argv[i:i + 2] = ["--boxes", str(csv)]
    _refused(argv, capsys, "the foreground")


@pytest.mark.parametrize("extra,needle", [(["--seed", "1"], "the splits"),
                                          (["--backgrounds", "2"], "the splits"),
                                          (["--inits", "2"], "the seeded initialisations"),
                                          (["--image-size", "24"], "the preprocessing")])
def test_other_settings_are_refused(case, capsys, extra, needle):
    _d, images, masks, w, out = case
    _refused(_argv(images, masks, w, out, *extra), capsys, needle)


def test_other_weights_are_refused(case, capsys):
    _d, images, masks, w, out = case
    sd = torch.load(w, weights_only=True)
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    torch.save(sd, w)
    _refused(_argv(images, masks, w, out), capsys, "the model")


def test_store_without_fingerprint_is_refused(case, capsys):
    import h5py

    _d, images, masks, w, out = case
    with h5py.File(out / "acts.h5", "r+") as f:
        del f.attrs[FINGERPRINT_ATTR]
    _refused(_argv(images, masks, w, out), capsys, "no record of the inputs")
