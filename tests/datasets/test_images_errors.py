"""Bad image folders, masks, boxes and factor files: each a one-line DataError naming the file and the fix,
raised by the constructor (before any caller writes a row)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probekit.datasets import Counterfactuals, ForegroundFolder
from probekit.errors import DataError
from probekit.vocab import VARIANTS

H, W = 12, 16


def _image(path: Path, h: int = H, w: int = W, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)


def _mask(path: Path, h: int = H, w: int = W, box=(3, 2, 9, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        m[y0:y1, x0:x1] = 255
    Image.fromarray(m).save(path)


def _folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """img/{cat,dog}/{0,1,2}.png with masks/{cat,dog}/{0,1,2}.png and boxes.csv."""
    img, masks = tmp_path / "img", tmp_path / "masks"
    rows = ["path,x0,y0,x1,y1"]
    for c in ("cat", "dog"):
        for k in range(3):
            _image(img / c / f"{k}.png")
            _mask(masks / c / f"{k}.png")
            rows.append(f"{c}/{k}.png,3,2,9,8")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("\n".join(rows) + "\n")
    return img, masks, boxes


def _check(exc: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


def test_good_folder_builds(tmp_path):
    # the baseline every case below breaks: it must construct without error
    img, masks, boxes = _folder(tmp_path)
    assert len(ForegroundFolder(img, masks=masks)) == 6
    assert len(ForegroundFolder(img, boxes=boxes)) == 6


def _break(tmp_path: Path, case: str):
    """Build a folder broken in one way; return (constructor kwargs, expected substrings)."""
    img, masks, boxes = _folder(tmp_path)
    if case == "image without its mask":
        (masks / "dog" / "1.png").unlink()
        return dict(masks=masks), ["dog/1.png", "add its mask"]
    if case == "mask of another size":
        _mask(masks / "cat" / "2.png", h=H + 1)
        return dict(masks=masks), ["2.png", "16x12", "image's size"]
    if case == "empty mask":
        _mask(masks / "dog" / "0.png", box=None)
        return dict(masks=masks), ["dog/0.png", "empty"]
    if case == "all-foreground mask":
        _mask(masks / "cat" / "1.png", box=(0, 0, W, H))
        return dict(masks=masks), ["cat/1.png", "whole image"]
    if case == "mask eroded to nothing":
        return dict(masks=masks, mask_adjust=-4), ["cat/0.png", "mask_adjust=-4", "smaller"]
    if case == "malformed box":
        boxes.write_text(boxes.read_text().replace("dog/2.png,3,2,9,8", "dog/2.png,3,two,9,8"))
        return dict(boxes=boxes), ["boxes.csv", "Line 7", "non-numeric"]
    if case == "box with too few fields":
        boxes.write_text(boxes.read_text().replace("dog/2.png,3,2,9,8", "dog/2.png,3,2,9"))
        return dict(boxes=boxes), ["boxes.csv", "Line 7", "path,x0,y0,x1,y1"]
    if case == "inverted box":
        boxes.write_text(boxes.read_text().replace("cat/0.png,3,2,9,8", "cat/0.png,9,2,3,8"))
        return dict(boxes=boxes), ["boxes.csv", "Line 2", "x0 < x1"]
    if case == "box out of the image":
        boxes.write_text(boxes.read_text().replace("cat/1.png,3,2,9,8", f"cat/1.png,3,2,{W + 1},8"))
        return dict(boxes=boxes), ["boxes.csv", "Line 3", f"x1 <= {W}"]
    if case == "image without a box":
        boxes.write_text(boxes.read_text().replace("dog/0.png,3,2,9,8\n", ""))
        return dict(boxes=boxes), ["dog/0.png", "boxes.csv", "add a row"]
    if case == "CSV path not in the folder":
        boxes.write_text(boxes.read_text() + "bird/0.png,1,1,3,3\n")
        return dict(boxes=boxes), ["boxes.csv", "bird/0.png", "relative to"]
    if case == "unreadable image":
        (img / "cat" / "1.png").write_bytes(b"this is not a png")
        return dict(masks=masks), ["cat/1.png", "replace or remove"]
    if case == "truncated image":
        _image(img / "dog" / "2.jpg", fmt="JPEG")
        _mask(masks / "dog" / "2.png")
        data = (img / "dog" / "2.jpg").read_bytes()
        (img / "dog" / "2.jpg").write_bytes(data[: len(data) // 2])
        return dict(masks=masks), ["dog/2.jpg", "replace or remove"]
    if case == "non-image file":
        (img / "dog" / "notes.txt").write_text("hello")
        return dict(masks=masks), ["notes.txt", "not an image", "remove it"]
    if case == "empty class folder":
        (img / "emu").mkdir()
        return dict(masks=masks), ["emu", "holds no images"]
    if case == "image beside class folders":
        _image(img / "stray.png")
        return dict(masks=masks), ["stray.png", "move it into its class folder"]
    if case == "non-numeric factor column":
        f = tmp_path / "factors.csv"
        lines = ["path,brightness,weather"] + [f"{c}/{k}.png,0.{k},sunny" for c in ("cat", "dog") for k in range(3)]
        f.write_text("\n".join(lines) + "\n")
        return dict(masks=masks, factors=f), ["factors.csv", "'weather'", "not numeric", "encode it"]
    if case == "factor row missing":
        f = tmp_path / "factors.csv"
        lines = ["path,brightness", *[f"{c}/{k}.png,0.{k}" for c in ("cat", "dog") for k in range(3)][:-1]]
        f.write_text("\n".join(lines) + "\n")
        return dict(masks=masks, factors=f), ["dog/2.png", "factors.csv", "add one"]
    if case == "masks and boxes together":
        return dict(masks=masks, boxes=boxes), ["exactly one of"]
    if case == "no foreground":
        return dict(), ["masks=DIR", "boxes=CSV", "foreground='auto'"]
    raise AssertionError(case)


CASES = [
    "image without its mask", "mask of another size", "empty mask", "all-foreground mask",
    "mask eroded to nothing", "malformed box", "box with too few fields", "inverted box",
    "box out of the image", "image without a box", "CSV path not in the folder", "unreadable image",
    "truncated image", "non-image file", "empty class folder", "image beside class folders",
    "non-numeric factor column", "factor row missing", "masks and boxes together", "no foreground",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_data_error(tmp_path, case):
    kwargs, needles = _break(tmp_path, case)
    with pytest.raises(DataError) as exc:
        ForegroundFolder(tmp_path / "img", **kwargs)
    _check(exc, *needles)
    # the counterfactual builder raises the same error, before building any split
    with pytest.raises(DataError) as exc2:
        Counterfactuals(tmp_path / "img", **kwargs)
    assert str(exc2.value) == str(exc.value)


def test_auto_without_opencv_names_the_package(tmp_path, monkeypatch):
    img, _, _ = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    with pytest.raises(DataError) as exc:
        ForegroundFolder(img, foreground="auto")
    _check(exc, "pip install opencv-python-headless", "foreground='auto'")


def test_inpaint_without_opencv_names_the_package(tmp_path, monkeypatch):
    img, masks, _ = _folder(tmp_path)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(DataError) as exc:
        Counterfactuals(img, masks=masks, fill="inpaint")
    _check(exc, "pip install opencv-python-headless")
    # "auto" is "borrow" (measured best, issue 25): it needs no OpenCV; what no donor covers takes the mean colour
    cf = Counterfactuals(img, masks=masks, fill="auto")
    assert cf.fill == "borrow"
    assert cf.render(int(cf.test_indices[0]), "only_bg").shape == cf.folder.image(int(cf.test_indices[0])).shape


def test_mixed_same_needs_two_images_per_class(tmp_path):
    img, masks, _ = _folder(tmp_path)
    _image(img / "emu" / "0.png")
    _mask(masks / "emu" / "0.png")
    with pytest.raises(DataError) as exc:
        Counterfactuals(img, masks=masks)
    _check(exc, "'emu'", "mixed_same")
    # without mixed_same the same folder is fine
    cf = Counterfactuals(img, masks=masks, variants=["original", "mixed_rand", "mixed_next"])
    assert len(cf.split("variants")) == 3 * len(cf.test_indices)


def test_unknown_variant_and_split(tmp_path):
    img, masks, _ = _folder(tmp_path)
    with pytest.raises(DataError) as exc:
        Counterfactuals(img, masks=masks, variants=["original", "mixed_up"])
    _check(exc, "mixed_up", "only_bg")
    cf = Counterfactuals(img, masks=masks, n_backgrounds=2)
    with pytest.raises(DataError) as exc:
        cf.split("val")
    _check(exc, "'val'", "crossed")
    big = Counterfactuals(img, masks=masks, n_backgrounds=6)  # the other splits stay usable
    assert len(big.split("variants")) == len(VARIANTS) * len(big.test_indices)  # every variant by default
    with pytest.raises(DataError) as exc:
        big.split("crossed")
    _check(exc, "n_backgrounds=6", "1..5", "lower n_backgrounds")


def test_auto_with_a_whole_image_box(tmp_path):
    pytest.importorskip("cv2")
    img, _, boxes = _folder(tmp_path)
    boxes.write_text(boxes.read_text().replace("dog/1.png,3,2,9,8", f"dog/1.png,0,0,{W},{H}"))
    with pytest.raises(DataError) as exc:
        ForegroundFolder(img, foreground="auto", boxes=boxes)
    _check(exc, "dog/1.png", "boxes.csv", "tighter box")
    with pytest.raises(DataError) as exc:  # as a plain box it is an all-foreground mask
        ForegroundFolder(img, boxes=boxes)
    _check(exc, "dog/1.png", "whole image")


def test_unreadable_mask(tmp_path):
    img, masks, _ = _folder(tmp_path)
    (masks / "cat" / "2.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError) as exc:
        ForegroundFolder(img, masks=masks)
    _check(exc, "cat/2.png", "Cannot read the mask", "replace")
