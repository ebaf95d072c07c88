"""The datasets' caches are bounded in bytes: a small-image folder is decoded, segmented and filled once.

Oracles: files opened (counted by wrapping ``PIL.Image.open``), fill computations (counted by wrapping
the fill), items compared with a cache-less twin (``cache_bytes=0``), and byte sums computed by hand.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from probekit.datasets import Counterfactuals
from probekit.datasets._foreground import _LRU


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _folder(tmp_path: Path, n_per_class=(10, 10, 10), size=16) -> Path:
    rng = np.random.default_rng(3)
    for c, n in enumerate(n_per_class):
        for k in range(n):
            _save(tmp_path / "img" / f"c{c}" / f"{k:02d}.png", rng.integers(0, 256, (size, size, 3)))
            m = np.zeros((size, size))
            y0, x0 = rng.integers(1, 6, 2)
            m[y0:y0 + 6, x0:x0 + 7] = 255
            _save(tmp_path / "masks" / f"c{c}" / f"{k:02d}.png", m)
    return tmp_path


def _cf(root: Path, **kw) -> Counterfactuals:
    return Counterfactuals(root / "img", masks=root / "masks", n_backgrounds=6, fill="borrow", **kw)


def test_lru_keeps_the_most_recent_within_its_bytes():
    c = _LRU(max_bytes=3 * 800)
    arrays = {k: np.full(100, k, np.float64) for k in range(5)}  # 800 bytes each
    for k in range(3):
        c.put(k, arrays[k])
    assert c.get(0) is arrays[0]  # 0 is now the most recent: 1 goes first
    c.put(3, arrays[3])
    assert c.get(1) is None and c.get(0) is arrays[0] and c.get(2) is arrays[2] and c.get(3) is arrays[3]
    assert c.nbytes == 3 * 800 and len(c) == 3
    c.put(9, np.zeros(400))  # 3,200 bytes: larger than the whole bound, not kept, nothing dropped
    assert c.get(9) is None and len(c) == 3
    c.put(3, np.zeros(10))  # replacing a key counts its new size only
    assert c.nbytes == 2 * 800 + 80


def test_lru_entry_bound_and_a_pickled_copy_starts_empty():
    c = _LRU(max_bytes=10**6, max_items=2)
    for k in range(4):
        c.put(k, np.zeros(3))
    assert len(c) == 2 and c.get(0) is None and c.get(3) is not None
    copy = pickle.loads(pickle.dumps(c))  # a DataLoader worker started by spawn
    assert len(copy) == 0 and copy.max_bytes == 10**6 and copy.max_items == 2
    copy.put("a", np.zeros(1))
    assert copy.get("a") is not None
    off = _LRU(max_bytes=0)
    off.put(1, np.zeros(1))
    assert off.get(1) is None


def test_crossed_and_variants_read_and_fill_each_image_once(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    cf = _cf(root)
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *a, **kw):
        opened.append(str(fp))
        return real_open(fp, *a, **kw)

    fills: list[int] = []
    real_filled = Counterfactuals._filled

    def counting_filled(self, j):
        fills.append(int(j))
        return real_filled(self, j)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(Counterfactuals, "_filled", counting_filled)
    for split in ("variants", "crossed"):
        ds = cf.split(split)
        for k in np.random.default_rng(0).permutation(len(ds)):  # rows in random order
            ds[int(k)]
    images = [p for p in opened if "/img/" in p]
    masks = [p for p in opened if "/masks/" in p]
    assert len(images) == len(set(images)) <= 30  # each image decoded at most once
    assert len(masks) == len(set(masks)) <= 30
    assert len(fills) == len(set(fills))  # each image's background filled at most once


def test_items_do_not_depend_on_the_cache(tmp_path):
    root = _folder(tmp_path, n_per_class=(6, 6, 6))
    cached, bare = _cf(root), _cf(root, cache_bytes=0)
    assert bare.folder.cache_bytes == 64 * 2**20  # the folder keeps its own default; only the fills are off
    for split in ("variants", "crossed"):
        a, b = cached.split(split), bare.split(split)
        order = np.random.default_rng(1).permutation(len(a))
        for k in order:
            ia, ib = a[int(k)], b[int(k)]
            assert ia.keys() == ib.keys()
            for key in ia:
                np.testing.assert_array_equal(np.asarray(ia[key]), np.asarray(ib[key]))
    assert len(bare._bg_cache) == 0 and len(bare._region_cache) == 0


def test_caches_stay_within_their_bytes(tmp_path):
    root = _folder(tmp_path)
    one_image = 16 * 16 * 3  # uint8 RGB
    cf = _cf(root, cache_bytes=5 * one_image)
    ds = cf.split("variants")
    for k in range(len(ds)):
        ds[k]
    for cache in (cf._bg_cache, cf._region_cache):  # (16 px images are pasted with hard masks: no alphas)
        assert 0 < cache.nbytes <= 5 * one_image
    assert len(cf._bg_cache) == 5  # 5 filled 16 x 16 backgrounds fill the bound exactly


def test_cache_size_still_bounds_entries(tmp_path):
    """The old ``cache_size`` still bounds entries: a caller's ``cache_size=3`` keeps at most 3."""
    root = _folder(tmp_path, n_per_class=(4, 4, 4))
    cf = _cf(root, cache_size=3)
    ds = cf.split("variants")
    for k in range(len(ds)):
        ds[k]
    assert len(cf._bg_cache) <= 3 and len(cf._alpha_cache) <= 3
