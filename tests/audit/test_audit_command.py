"""``probekit audit MODEL --data DIR --masks DIR``: from saved weights and an image folder to the verdict.

A folder of generated shapes whose background colour equals the class, with exact masks. A small CNN
trained on such images classifies by colour and must be flagged; the same CNN trained on random
background colours classifies by shape and must not be. Bad inputs fail in one line, exit 2, and
leave nothing behind.
"""

import json
import sys

import pytest
import torch

from probekit.cli import main
from probekit.datasets._shapes import write_image_folder
from probekit.experiments.shortcut import train_shapes_cnn

MODEL = "probekit.experiments.shortcut:ShapesCNN"
FAST = ["--n-boot", "100", "--n-perm", "50", "--no-progress", "--inits", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    images, masks = write_image_folder(d, split="test", background="class", n=60)
    return d, images, masks


@pytest.mark.slow
def test_shortcut_model_flagged_robust_not(folder, tmp_path, capsys):
    _, images, masks = folder
    rcs, docs = {}, {}
    for name, bg in (("shortcut", "class"), ("robust", "random")):
        w = tmp_path / f"{name}.pt"
        torch.save(train_shapes_cnn(bg, seed=1).state_dict(), w)
        out = tmp_path / name
        rcs[name] = main(["audit", MODEL, "--weights", str(w), "--data", str(images), "--masks", str(masks),
                          "--out-dir", str(out), "--name", name, "--fail-on-flag", *FAST])
        docs[name] = json.loads((out / "audit.json").read_text())
        assert (out / "report.html").stat().st_size > 10_000 and (out / "acts.h5").exists()
    assert rcs == {"shortcut": 1, "robust": 0}
    s, r = docs["shortcut"]["models"]["shortcut"], docs["robust"]["models"]["robust"]
    assert s["flagged"] and s["behaviour"]["flip_rate"]["value"] >= 0.9
    # its backgrounds come from images of other classes, whose colour it reads as their class
    assert s["behaviour"]["follows_background"]["value"] >= 0.9
    assert s["behaviour"]["bg_gap"]["value"] > 0.5
    assert not r["flagged"] and r["behaviour"]["accuracy"]["only_fg"]["value"] > 0.8
    # the store records what preprocessing made the inputs, and the seeded inits are the reference
    assert docs["robust"]["preprocessing"]["kind"] == "callable"
    assert r["inits"] == ["robust@init0", "robust@init1"]
    assert any(la.get("background_vs_reference", {}).get("kind") == "within_odds" for la in r["layers"].values())
    out = capsys.readouterr().out
    assert "[FLAGGED: shortcut" in out and "shortcut takes the background's class" in out
    assert "[not flagged] No shortcut detected for robust" in out


@pytest.mark.slow
def test_a_rerun_continues_and_gives_the_same_verdict(folder, tmp_path):
    _, images, masks = folder
    w = tmp_path / "m.pt"
    torch.save(train_shapes_cnn("class", seed=2, epochs=5).state_dict(), w)
    argv = ["audit", MODEL, "--weights", str(w), "--data", str(images), "--masks", str(masks),
            "--out-dir", str(tmp_path / "out"), *FAST]
    main(argv)
    first = json.loads((tmp_path / "out" / "audit.json").read_text())
    main(argv)  # the store is complete: nothing is re-extracted, the audit is the same
    second = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert second["cost"]["forward_passes_done"] == 0  # nothing ran again
    for doc in (first, second):
        doc.pop("created"), doc.pop("cost")  # the cost record holds this run's seconds
    assert first == second


def _bad(images, masks, tmp_path, case):
    if case == "image without its mask":
        bad = tmp_path / "masks"
        import shutil

        shutil.copytree(masks, bad)
        next(bad.rglob("*.png")).unlink()
        return ["--masks", str(bad)], "add its mask"
    if case == "no foreground given":
        return [], "--masks DIR, --boxes CSV or --foreground auto"
    if case == "unknown --model-arg":
        return ["--masks", str(masks), "--model-arg", "colour=3"], "'colour'"
    if case == "--input-shape":
        return ["--masks", str(masks), "--input-shape", "3,32,32"], "--image-size"
    if case == "auto without OpenCV":
        return ["--foreground", "auto"], "pip install opencv-python-headless"
    if case == "box out of the image":
        csv = tmp_path / "boxes.csv"
        rows = [f"{p.relative_to(images).as_posix()},2,2,40,10" for p in sorted(images.rglob("*.png"))]
        csv.write_text("\n".join(rows) + "\n")
        return ["--boxes", str(csv)], "boxes.csv"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["image without its mask", "no foreground given", "unknown --model-arg",
                                  "--input-shape", "auto without OpenCV", "box out of the image"])
def test_bad_inputs_are_one_line_exit_2_nothing_written(folder, tmp_path, capsys, monkeypatch, case):
    _, images, masks = folder
    extra, needle = _bad(images, masks, tmp_path, case)
    if case == "auto without OpenCV":
        monkeypatch.setitem(sys.modules, "cv2", None)
    out = tmp_path / "out"
    assert main(["audit", MODEL, "--data", str(images), "--out-dir", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("probekit: error:") and needle in err, err
    assert not out.exists()


def test_boxes_give_the_mask_check_and_the_report_shows_it(folder, tmp_path):
    """Approximate foregrounds (boxes): the verdict is recomputed with the masks eroded and dilated."""
    import numpy as np
    from PIL import Image

    _, images, masks = folder
    rows = []
    for p in sorted(images.rglob("*.png")):
        m = np.asarray(Image.open(masks / p.relative_to(images))) > 0
        ys, xs = np.nonzero(m)
        rows.append(f"{p.relative_to(images).as_posix()},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    csv = tmp_path / "boxes.csv"
    csv.write_text("path,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["audit", MODEL, "--data", str(images), "--boxes", str(csv), "--out-dir", str(out),
                 "--mask-check", "2", *FAST]) == 0  # a random CNN: its verdict is not gated here
    doc = json.loads((out / "audit.json").read_text())
    ms = doc["mask_sensitivity"]
    assert ms["pixels"] == 2 and set(ms["models"]["model"]) == {"eroded", "dilated"}
    for r in ms["models"]["model"].values():
        assert 0 <= r["flip_rate"] <= 1 and isinstance(r["flagged"], bool)
    html = (out / "report.html").read_text()
    assert "the verdict with every mask eroded / dilated" in html and "dilated by 2 px" in html
