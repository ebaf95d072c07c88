"""Counterfactuals of an image folder: hand-computed composites on tiny images, the crossed design,
determinism, streaming, and the rows a store receives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import probekit as pk
from probekit.datasets import Counterfactuals, ForegroundFolder, fill_foreground
from probekit.datasets._images import DEFAULT_FILL
from probekit.vocab import VARIANTS

CODE = {v: k for k, v in enumerate(VARIANTS)}
H, W = 4, 6


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _tiny(tmp_path: Path) -> Path:
    """Two classes of 4x6 PNGs with known colours; foreground boxes in boxes.csv (x1, y1 exclusive).

    a/0: background left cols 0-2 (10,20,30), right cols 3-5 (30,41,50); box x 2:5, y 1:3 red.
    a/1: uniform (0,100,0); box x 0:2, y 0:2 yellow.      a/2: 8x12, left (5,5,5) | right (90,90,90).
    b/k: uniform (40k+50, 7, 9); box x 1:3, y 1:4 (k, 200, 200).
    """
    img = tmp_path / "img"
    a0 = np.zeros((H, W, 3))
    a0[:, :3] = (10, 20, 30)
    a0[:, 3:] = (30, 41, 50)
    a0[1:3, 2:5] = (200, 0, 0)
    _save(img / "a" / "0.png", a0)
    a1 = np.zeros((H, W, 3))
    a1[:] = (0, 100, 0)
    a1[0:2, 0:2] = (250, 250, 0)
    _save(img / "a" / "1.png", a1)
    a2 = np.zeros((8, 12, 3))
    a2[:, :6] = 5
    a2[:, 6:] = 90
    a2[3:5, 4:8] = 255
    _save(img / "a" / "2.png", a2)
    rows = ["path,x0,y0,x1,y1", "a/0.png,2,1,5,3", "a/1.png,0,0,2,2", "a/2.png,4,3,8,5"]
    for k in range(3):
        b = np.zeros((H, W, 3))
        b[:] = (40 * k + 50, 7, 9)
        b[1:4, 1:3] = (k, 200, 200)
        _save(img / "b" / f"{k}.png", b)
        rows.append(f"b/{k}.png,1,1,3,4")
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    return img


def test_fill_and_composites_match_hand_computation(tmp_path):
    img = _tiny(tmp_path)
    cf = Counterfactuals(img, boxes=tmp_path / "boxes.csv", fill="mean", feather=0, clear=0,
                         n_backgrounds=2)  # hard masks filled exactly: as hand-computed
    a0, a1, a2, b0 = 0, 1, 2, 3  # item order: class a then b, by path
    assert cf.folder.paths[:4] == ["a/0.png", "a/1.png", "a/2.png", "b/0.png"]
    m0 = np.zeros((H, W), dtype=bool)
    m0[1:3, 2:5] = True
    red = np.array([200, 0, 0])

    only_fg = np.zeros((H, W, 3))
    only_fg[m0] = red
    np.testing.assert_array_equal(cf.render(a0, "only_fg"), only_fg)

    no_fg = np.asarray(Image.open(img / "a" / "0.png")).copy()
    no_fg[m0] = 0
    np.testing.assert_array_equal(cf.render(a0, "no_fg"), no_fg)

    # mean of a/0's background: 10 px of (10,20,30) (cols 0-2 less 2 box px) and 8 px of (30,41,50)
    # (cols 3-5 less 4 box px): (340, 528, 700) / 18 = (18.9, 29.3, 38.9) -> (19, 29, 39)
    only_bg = np.asarray(Image.open(img / "a" / "0.png")).copy()
    only_bg[m0] = (19, 29, 39)
    np.testing.assert_array_equal(cf.render(a0, "only_bg"), only_bg)

    # a/0's foreground on a/1's background: a/1's own yellow object is filled with its mean (0,100,0)
    mixed = np.zeros((H, W, 3))
    mixed[:] = (0, 100, 0)
    mixed[m0] = red
    np.testing.assert_array_equal(cf.render(a0, "mixed_same", a1), mixed)

    # b/0's foreground on a/2 (8x12, composited at b/0's 4x6): far from a/2's colour edge the resized
    # background keeps its colours; its filled object (mean grey of the two halves) never shows as 255
    got = cf.render(b0, "mixed_rand", a2)
    assert got.shape == (H, W, 3)
    mb = np.zeros((H, W), dtype=bool)
    mb[1:4, 1:3] = True
    np.testing.assert_array_equal(got[mb], np.tile([0, 200, 200], (6, 1)))
    np.testing.assert_array_equal(got[:, 0], np.full((H, 3), 5))
    np.testing.assert_array_equal(got[:, 5], np.full((H, 3), 90))
    assert got[~mb].max() <= 90  # a/2's white object is filled, not resized into b/0's background

    # the original is the file itself
    np.testing.assert_array_equal(cf.render(a0, "original"), np.asarray(Image.open(img / "a" / "0.png")))


def test_inpaint_fill_of_a_uniform_background(tmp_path):
    pytest.importorskip("cv2")
    arr = np.zeros((10, 12, 3), dtype=np.uint8)
    arr[:] = (30, 60, 90)
    arr[3:7, 4:9] = (255, 0, 0)
    m = np.zeros((10, 12), dtype=bool)
    m[3:7, 4:9] = True
    want = np.zeros_like(arr)
    want[:] = (30, 60, 90)  # nothing but the background colour to propagate (Telea rounds within 2)
    got = fill_foreground(arr, m, "inpaint")
    np.testing.assert_array_equal(got[~m], want[~m])
    np.testing.assert_allclose(got[m].astype(int), want[m].astype(int), atol=3)
    img = _tiny(tmp_path)
    assert Counterfactuals(img, boxes=tmp_path / "boxes.csv", n_backgrounds=2).fill == DEFAULT_FILL


def test_items_carry_fields_and_default_transform(tmp_path):
    img = _tiny(tmp_path)
    cf = Counterfactuals(img, boxes=tmp_path / "boxes.csv", fill="mean", n_backgrounds=2, test_fraction=1.0,
                         variants=["original", "only_fg", "no_fg", "only_bg", "mixed_same", "mixed_rand",
                                   "mixed_next"])
    labels = cf.folder.labels
    ds = cf.split("variants")
    assert len(ds) == 6 * 7
    for k in range(len(ds)):
        item = ds[k]
        i, v = k // 7, VARIANTS[k % 7]
        assert item["group"] == i and item["variant"] == CODE[v] and item["label"] == labels[i]
        j = item["background"]
        if v == "only_fg":
            assert j == -1 and item["background_label"] == -1
        elif v in ("original", "no_fg", "only_bg"):
            assert j == i and item["background_label"] == labels[i]
        else:
            assert j != i and item["background_label"] == labels[j]
            want = {"mixed_same": labels[i], "mixed_next": (labels[i] + 1) % 2}.get(v)
            if want is not None:
                assert labels[j] == want
        arr = cf.render(i, v, j if j >= 0 else None)
        assert item["x"].dtype == torch.float32 and item["x"].shape == (3, *arr.shape[:2])
        torch.testing.assert_close(item["x"], torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1))
    with pytest.raises(Exception, match="train"):
        cf.split("train")  # test_fraction=1.0 leaves none


def test_custom_transform_gets_the_pil_image(tmp_path):
    img = _tiny(tmp_path)
    seen = []

    def tf(im):
        seen.append((im.mode, im.size))
        return torch.zeros(2)

    cf = Counterfactuals(img, boxes=tmp_path / "boxes.csv", fill="mean", n_backgrounds=2, transform=tf)
    for k in range(len(cf.split("crossed"))):
        assert cf.split("crossed")[k]["x"].shape == (2,)
    assert seen and all(mode == "RGB" for mode, _ in seen)
    assert {size for _, size in seen} <= {(W, H), (12, 8)}  # each at its own foreground's size


def _random_folder(tmp_path: Path, n_per_class=(5, 4, 6), size=(16, 16), factors=True) -> Path:
    rng = np.random.default_rng(1)
    img, masks = tmp_path / "img", tmp_path / "masks"
    rows = ["path,light,tilt"]
    for c, n in enumerate(n_per_class):
        for k in range(n):
            h, w = size
            _save(img / f"c{c}" / f"{k:02d}.png", rng.integers(0, 256, (h, w, 3)))
            m = np.zeros((h, w))
            y0, x0 = rng.integers(1, 6, 2)
            m[y0:y0 + 6, x0:x0 + 7] = 1
            _save(masks / f"c{c}" / f"{k:02d}.png", m)
            rows.append(f"c{c}/{k:02d}.png,{c + k / 10},{-k}")
    if factors:
        (tmp_path / "factors.csv").write_text("\n".join(rows) + "\n")
    return img


def _cf(tmp_path, **kw):
    kw.setdefault("fill", "mean")
    kw.setdefault("feather", 0)  # hard masks filled exactly, as the expected composites below are computed
    kw.setdefault("clear", 0)
    return Counterfactuals(tmp_path / "img", masks=tmp_path / "masks", factors=tmp_path / "factors.csv", **kw)


def test_train_test_split_per_class(tmp_path):
    _random_folder(tmp_path)
    cf = _cf(tmp_path, test_fraction=0.4)
    labels = cf.folder.labels
    tr, te = cf.train_indices, cf.test_indices
    assert sorted([*tr.tolist(), *te.tolist()]) == list(range(15)) and not set(tr) & set(te)
    assert [int((labels[te] == c).sum()) for c in range(3)] == [2, 2, 2]  # round(0.4 * [5, 4, 6])
    for name, idx in (("train", tr), ("test", te)):
        ds = cf.split(name)
        assert [ds[k]["group"] for k in range(len(ds))] == idx.tolist()
        assert all(ds[k]["variant"] == 0 and ds[k]["background"] == idx[k] for k in range(len(ds)))
        np.testing.assert_allclose(ds[1]["factors"], [labels[idx[1]] + int(cf.folder.paths[idx[1]][-6:-4]) / 10,
                                                      -int(cf.folder.paths[idx[1]][-6:-4])], rtol=1e-6)


def test_crossed_is_a_crossed_design(tmp_path):
    _random_folder(tmp_path)
    cf = _cf(tmp_path, n_backgrounds=8, test_fraction=0.4)
    labels = cf.folder.labels
    ds = cf.split("crossed")
    bgs = cf.backgrounds.tolist()
    assert len(bgs) == 8 and len(set(bgs)) == 8
    assert set(bgs) <= set(cf.train_indices.tolist())  # 9 train images: all backgrounds come from train
    counts = np.bincount(labels[bgs], minlength=3)
    assert counts.max() - counts.min() <= 1  # spread over the classes
    assert cf.crossed_indices.tolist() == cf.test_indices.tolist()  # nothing skipped
    assert len(ds) == 8 * len(cf.test_indices)
    by_group: dict[int, list[int]] = {}
    for k in range(len(ds)):
        it = ds[k]
        g, j = it["group"], it["background"]
        by_group.setdefault(g, []).append(j)
        assert g != j and it["label"] == labels[g] and it["background_label"] == labels[j]
        rel = ("mixed_same" if labels[j] == labels[g] else
               "mixed_next" if labels[j] == (labels[g] + 1) % 3 else "mixed_rand")
        assert it["variant"] == CODE[rel]
        np.testing.assert_array_equal(it["factors"], cf.folder.factors[j])  # the background's factors
        want = np.where(cf.folder.mask(g)[:, :, None], cf.folder.image(g),
                        fill_foreground(cf.folder.image(j), cf.folder.mask(j), "mean"))
        torch.testing.assert_close(it["x"], torch.from_numpy(want.astype(np.float32) / 255).permute(2, 0, 1))
    assert all(v == bgs for v in by_group.values())  # every foreground on the same backgrounds, in order


def test_crossed_skips_foregrounds_chosen_as_backgrounds(tmp_path):
    _random_folder(tmp_path)
    cf = _cf(tmp_path, n_backgrounds=5, test_fraction=1.0)  # no train images: backgrounds are test images
    assert set(cf.backgrounds.tolist()) <= set(cf.test_indices.tolist())
    assert sorted([*cf.crossed_indices.tolist(), *cf.backgrounds.tolist()]) == list(range(15))
    ds = cf.split("crossed")
    assert len(ds) == 5 * 10
    assert not {ds[k]["group"] for k in range(len(ds))} & set(cf.backgrounds.tolist())


def test_deterministic_per_seed(tmp_path):
    _random_folder(tmp_path)
    a, b, c = _cf(tmp_path, seed=3), _cf(tmp_path, seed=3), _cf(tmp_path, seed=4)
    for split in ("train", "test", "variants", "crossed"):
        da, db = a.split(split), b.split(split)
        assert len(da) == len(db)
        for k in range(0, len(da), 3):
            ia, ib = da[k], db[k]
            assert {key: v for key, v in ia.items() if key not in ("x", "factors")} == \
                   {key: v for key, v in ib.items() if key not in ("x", "factors")}
            assert torch.equal(ia["x"], ib["x"])
    # reading out of order gives the same items (no state carried between items)
    ds = a.split("variants")
    fwd = [ds[k]["background"] for k in range(len(ds))]
    assert [ds[k]["background"] for k in reversed(range(len(ds)))] == fwd[::-1]
    assert (a.test_indices.tolist(), a.backgrounds.tolist()) != (c.test_indices.tolist(), c.backgrounds.tolist())


def test_flat_folder_counterfactuals(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(5):
        _save(tmp_path / "img" / f"{k}.png", rng.integers(0, 256, (8, 8, 3)))
        m = np.zeros((8, 8))
        m[2:6, 2:5] = 1
        _save(tmp_path / "m" / f"{k}.png", m)
    cf = Counterfactuals(tmp_path / "img", masks=tmp_path / "m", fill="mean", n_backgrounds=2,
                         variants=["original", "only_bg", "mixed_rand"])
    item = cf.split("crossed")[0]
    assert "label" not in item and "background_label" not in item and item["variant"] == CODE["mixed_rand"]
    assert set(cf.split("variants")[2]) == {"x", "group", "background", "variant"}


def test_crossed_streams_each_image_once(tmp_path, monkeypatch):
    _random_folder(tmp_path, n_per_class=(12, 12, 12))
    cf = _cf(tmp_path, n_backgrounds=8)
    folder: ForegroundFolder = cf.folder
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *a, **kw):
        opened.append(str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(Image, "open", counting_open)
    ds = cf.split("crossed")
    for k in range(len(ds)):
        ds[k]
    images = [p for p in opened if "/img/" in p]
    masks = [p for p in opened if "/masks/" in p]
    n_fg = len(cf.crossed_indices)
    assert len(images) == n_fg + 8 and len(set(images)) == n_fg + 8  # each foreground and background once
    assert len(masks) == n_fg + 8
    assert folder._images.nbytes <= folder.cache_bytes and cf._bg_cache.nbytes <= cf.cache_bytes


def test_extract_writes_the_crossed_fields(tmp_path):
    _random_folder(tmp_path)
    cf = _cf(tmp_path, n_backgrounds=4)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    out = tmp_path / "acts.h5"
    for i, split in enumerate(("train", "crossed")):
        pk.extract(net, cf.split(split), layers=["3"], out=out, split=split, progress=False,
                   mode="create" if i == 0 else "resume")
    ds = cf.split("crossed")
    with pk.open_store(out) as s:
        assert s.n_rows("crossed") == len(ds) == 4 * len(cf.test_indices)
        for field in ("label", "group", "background", "background_label", "variant"):
            np.testing.assert_array_equal(s.sample_field("crossed", field), [ds[k][field] for k in range(len(ds))])
        acts = np.asarray(s.acts("model", "crossed", "3")[:])
    with torch.no_grad():
        want = net(torch.stack([ds[k]["x"] for k in range(len(ds))])).numpy()
    np.testing.assert_allclose(acts, want, rtol=1e-5, atol=1e-6)
