"""ForegroundFolder: layout, labels, masks in any format, boxes, factors, mask_adjust, GrabCut."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probekit.datasets import ForegroundFolder, adjust_mask


def _save(path: Path, arr: np.ndarray, fmt: str | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _square(h: int, w: int, x0: int, y0: int, x1: int, y1: int, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def test_class_folders_sorted_to_labels_and_masks_any_extension(tmp_path):
    img, masks = tmp_path / "img", tmp_path / "masks"
    # classes deliberately created out of order; one nested sub-folder; mixed image formats
    planted = {}
    for c, names in (("zebra", ["b.png", "a.jpg"]), ("ant", ["x/1.png", "0.bmp"])):
        for k, name in enumerate(names):
            _save(img / c / name, _rgb(10, 14, k))
            m = _square(10, 14, 2 + k, 1, 9, 7 + k, value=1 + k)  # any non-zero value is foreground
            stem = str(Path(name).with_suffix(""))
            _save(masks / c / (stem + (".png" if k else ".tif")), m)
            planted[f"{c}/{name}"] = m > 0
    (img / "README.txt").write_text("top-level non-images are ignored")
    (img / ".hidden.png").write_bytes(b"skipped")
    f = ForegroundFolder(img, masks=masks)
    assert f.classes == ["ant", "zebra"]
    assert f.paths == ["ant/0.bmp", "ant/x/1.png", "zebra/a.jpg", "zebra/b.png"]
    assert f.labels.tolist() == [0, 0, 1, 1]
    assert f.sizes.tolist() == [[14, 10]] * 4
    for i, rel in enumerate(f.paths):
        np.testing.assert_array_equal(f.mask(i), planted[rel])
        assert f.image(i).shape == (10, 14, 3) and f.image(i).dtype == np.uint8
    # a lossless image reads back exactly
    np.testing.assert_array_equal(f.image(3), _rgb(10, 14, 0))


def test_flat_folder_has_no_labels(tmp_path):
    for k in range(3):
        _save(tmp_path / "img" / f"{k}.png", _rgb(8, 8, k))
        _save(tmp_path / "m" / f"{k}.png", _square(8, 8, 2, 2, 5, 6))
    f = ForegroundFolder(tmp_path / "img", masks=tmp_path / "m")
    assert f.labels is None and f.classes == [] and f.paths == ["0.png", "1.png", "2.png"]


def test_jpeg_mask_threshold(tmp_path):
    planted = _square(32, 32, 5, 7, 21, 25) > 0
    _save(tmp_path / "img" / "a" / "0.png", _rgb(32, 32, 0))
    _save(tmp_path / "img" / "a" / "1.png", _rgb(32, 32, 1))
    for k in range(2):
        _save(tmp_path / "m" / "a" / f"{k}.jpg", planted.astype(np.uint8) * 255, quality=90)
    raw = np.asarray(Image.open(tmp_path / "m" / "a" / "0.jpg"))
    assert ((raw > 0) != planted).any()  # JPEG noise: "non-zero" alone would be wrong here
    f = ForegroundFolder(tmp_path / "img", masks=tmp_path / "m")
    np.testing.assert_array_equal(f.mask(0), planted)


def test_boxes_union_and_header_optional(tmp_path):
    for k in range(2):
        _save(tmp_path / "img" / "c" / f"{k}.png", _rgb(12, 20, k))
    csv = tmp_path / "b.csv"
    csv.write_text("c/0.png,1,2,4,5\n./c/0.png,10,0,12,3\nc/1.png,0,0,20,1\n")  # no header; ./ prefix
    f = ForegroundFolder(tmp_path / "img", boxes=csv)
    want = np.zeros((12, 20), dtype=bool)
    want[2:5, 1:4] = True
    want[0:3, 10:12] = True
    np.testing.assert_array_equal(f.mask(0), want)
    want1 = np.zeros((12, 20), dtype=bool)
    want1[0:1, :] = True  # a box may touch the borders as long as background is left
    np.testing.assert_array_equal(f.mask(1), want1)


def test_factors_csv(tmp_path):
    for k in range(3):
        _save(tmp_path / "img" / "c" / f"{k}.png", _rgb(6, 6, k))
        _save(tmp_path / "m" / "c" / f"{k}.png", _square(6, 6, 1, 1, 4, 4))
    fac = tmp_path / "f.csv"
    fac.write_text("path,light,angle\nc/2.png,0.5,-3\nc/0.png,1e-1,7\nc/1.png,2,0\n")  # any row order
    f = ForegroundFolder(tmp_path / "img", masks=tmp_path / "m", factors=fac)
    assert f.factor_names == ["light", "angle"]
    np.testing.assert_allclose(f.factors, [[0.1, 7], [2, 0], [0.5, -3]], rtol=1e-6)


def _brute_adjust(mask: np.ndarray, k: int) -> np.ndarray:
    """Independent oracle: the distance of every pixel to every pixel of the other kind."""
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    fg, bg = pts[mask.ravel()], pts[~mask.ravel()]
    out = np.zeros(h * w, dtype=bool)
    for n, p in enumerate(pts):
        if k > 0:
            out[n] = np.sqrt(((fg - p) ** 2).sum(1)).min() <= k
        else:
            out[n] = mask.ravel()[n] and np.sqrt(((bg - p) ** 2).sum(1)).min() > -k
    return out.reshape(h, w)


@pytest.mark.parametrize("k", [1, 2, 3, -1, -2])
def test_mask_adjust_matches_brute_force(k):
    m = np.zeros((14, 15), dtype=bool)
    m[3:10, 4:12] = True
    m[10:12, 4:6] = True  # a notch: not a plain rectangle
    m[0:3, 0:2] = True  # touching the border: the border is not background
    got = adjust_mask(m, k)
    np.testing.assert_array_equal(got, _brute_adjust(m, k))
    if k == 2:
        assert got[1, 11] and not got[1, 12]  # (3,11) is 2 px from (1,11), sqrt(5) from (1,12)
    if k == -1:
        assert got[0, 0] and not got[3, 4]  # the border pixel survives, the object's corner goes


def test_mask_adjust_applies_to_items(tmp_path):
    _save(tmp_path / "img" / "c" / "0.png", _rgb(20, 20, 0))
    _save(tmp_path / "img" / "c" / "1.png", _rgb(20, 20, 1))
    for k in range(2):
        _save(tmp_path / "m" / "c" / f"{k}.png", _square(20, 20, 5, 5, 15, 15))
    base = ForegroundFolder(tmp_path / "img", masks=tmp_path / "m")
    grown = ForegroundFolder(tmp_path / "img", masks=tmp_path / "m", mask_adjust=2)
    shrunk = ForegroundFolder(tmp_path / "img", masks=tmp_path / "m", mask_adjust=-2)
    assert base.mask(0).sum() == 100
    assert shrunk.mask(0).sum() == 36  # 10x10 square minus 2 px on each side
    np.testing.assert_array_equal(grown.mask(0), _brute_adjust(base.mask(0), 2))


def _disk_image(h: int, w: int, cy: int, cx: int, r: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal([40, 60, 150], 12, (h, w, 3)), 0, 255).astype(np.uint8)  # noisy blue
    yy, xx = np.mgrid[0:h, 0:w]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[disk] = np.clip(rng.normal([220, 40, 30], 12, (int(disk.sum()), 3)), 0, 255).astype(np.uint8)
    return img, disk


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_finds_planted_objects(tmp_path):
    pytest.importorskip("cv2")
    centred, disk0 = _disk_image(64, 64, 32, 32, 13, 0)
    offset, disk1 = _disk_image(64, 80, 18, 58, 10, 1)
    _save(tmp_path / "img" / "c" / "0.png", centred)
    _save(tmp_path / "img" / "c" / "1.png", offset)
    auto = ForegroundFolder(tmp_path / "img", foreground="auto")  # centred 60 % seed box
    assert _iou(auto.mask(0), disk0) > 0.9
    assert _iou(auto.mask(1), disk1) < 0.5  # the centred box misses an off-centre object...
    csv = tmp_path / "b.csv"
    csv.write_text("path,x0,y0,x1,y1\nc/0.png,14,14,50,50\nc/1.png,44,4,73,32\n")
    seeded = ForegroundFolder(tmp_path / "img", foreground="auto", boxes=csv)
    assert _iou(seeded.mask(1), disk1) > 0.9  # ...which its box finds
    assert _iou(seeded.mask(0), disk0) > 0.9
    # deterministic: a second folder object computes the same masks
    again = ForegroundFolder(tmp_path / "img", foreground="auto", boxes=csv)
    np.testing.assert_array_equal(again.mask(1), seeded.mask(1))


def test_images_read_lazily(tmp_path, monkeypatch):
    for k in range(12):
        _save(tmp_path / "img" / "c" / f"{k}.png", _rgb(8, 8, k))
        _save(tmp_path / "m" / "c" / f"{k}.png", _square(8, 8, 2, 2, 6, 6))
    f = ForegroundFolder(tmp_path / "img", masks=tmp_path / "m", cache_size=3)
    assert len(f._images) == 0 and len(f._masks) == 0  # the constructor keeps no pixels
    for i in range(12):
        f.image(i)
        f.mask(i)
    assert len(f._images) == 3 and len(f._masks) == 3
