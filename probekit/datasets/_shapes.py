"""Generated shapes on coloured backgrounds, with exact masks (built-in ``"shapes"``).

Three classes (``circle``, ``square``, ``triangle``), a light grey shape at a random place and size on
a background of one colour (HSV) with a faint random texture. ``background="class"`` colours each
training background by its class (red, green, blue hues, jittered): a network can then classify by
the background colour alone, the shortcut the audit must catch. ``background="random"`` draws the
hue uniformly, so only the shape tells the class.

Splits: ``train`` and ``test`` (plain images), ``crossed`` (every test shape on the same
``n_backgrounds`` backgrounds, ``n_backgrounds / 3`` drawn from each class's colour range, so
``background_label`` is the class whose training colour the background has; ``variant`` is
``mixed_same`` where that is the shape's own class, else ``mixed_rand``), and ``variants`` (each test
image as ``original``, ``only_fg``, ``no_fg``, ``only_bg``, ``mixed_same``, ``mixed_rand``,
``mixed_next``; mixed backgrounds come from other test images of the same / a random other / the
next class). Item ``i`` depends only on ``(seed, split, i)``. ``stress``, the crossed split's old
name, is still read, with a FutureWarning.

:func:`write_image_folder` writes a split as PNG files in class folders with a mirrored mask folder:
the layout ``probekit audit --data DIR --masks DIR`` reads.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DataError
from ..vocab import CROSSED_SPLIT, crossed_split_name

__all__ = ["CLASSES", "Shapes", "write_image_folder"]

CLASSES = ("circle", "square", "triangle")
CLASS_HUES = (0.0, 1 / 3, 2 / 3)  # red, green, blue: the "class" backgrounds
_SPLITS = {"train": 1, "test": 2, CROSSED_SPLIT: 3, "variants": 4}
_MIXED = ("mixed_same", "mixed_rand", "mixed_next")
VARIANTS_OFFERED = ("original", "only_fg", "no_fg", "only_bg", *_MIXED)


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(0.18, 0.3) * size
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == 0:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == 1:
        s = r * 0.85
        return (np.abs(yy - cy) <= s) & (np.abs(xx - cx) <= s)
    # triangle pointing up: inside three half-planes
    top, left, right = (cy - r, cx), (cy + r * 0.8, cx - r), (cy + r * 0.8, cx + r)

    def side(p: tuple[float, float], q: tuple[float, float]) -> np.ndarray:
        return (q[1] - p[1]) * (yy - p[0]) - (q[0] - p[0]) * (xx - p[1])

    a, b, c = side(top, left), side(left, right), side(right, top)
    return ((a >= 0) & (b >= 0) & (c >= 0)) | ((a <= 0) & (b <= 0) & (c <= 0))


def _background(hue: float, size: int, rng: np.random.Generator) -> np.ndarray:
    sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.45, 0.8)
    rgb = np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val), dtype=np.float32)
    texture = 1.0 + 0.08 * rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(rgb[:, None, None] * texture[None], 0.0, 1.0)


class Shapes:
    """One split of the generated shapes; items are dicts (see the module docstring).

    Parameters
    ----------
    split : {"train", "test", "crossed", "variants"}
    seed : int
    background : {"random", "class"}
        How ``train`` and ``test`` backgrounds are coloured (``crossed`` and ``variants`` are the same
        for both, so two models trained either way are audited on the same images).
    n_train, n_test : int
        Images in ``train`` and ``test`` (classes cycle 0, 1, 2, ...).
    n_backgrounds : int
        Backgrounds of ``crossed`` (a multiple of 3: as many from each class's colour).
    size : int
        Image side in pixels.

    Items: ``{"x": float32 tensor (3, size, size) in [0, 1], "label", "mask": bool tensor}`` plus
    ``group``, ``background``, ``background_label``, ``variant`` on ``crossed`` and ``variants``.
    """

    def __init__(self, split: str = "train", *, seed: int = 0, background: Literal["random", "class"] = "random",
                 n_train: int = 600, n_test: int = 150, n_backgrounds: int = 9, size: int = 32) -> None:
        split = crossed_split_name(split, "Shapes")
        if split not in _SPLITS:
            raise DataError(f"The shapes dataset has no split {split!r}; its splits are {list(_SPLITS)}.")
        if background not in ("random", "class"):
            raise DataError(f"The 'background' parameter of shapes must be 'random' or 'class'. Got {background!r}.")
        if n_backgrounds < 3 or n_backgrounds % 3:
            raise DataError(f"n_backgrounds must be a positive multiple of 3 (one third per class). Got {n_backgrounds}.")
        self.split, self.seed, self.background, self.size = split, int(seed), background, int(size)
        self.n_train, self.n_test, self.n_backgrounds = int(n_train), int(n_test), int(n_backgrounds)
        self._per = {CROSSED_SPLIT: self.n_backgrounds, "variants": len(VARIANTS_OFFERED)}.get(split, 1)

    def __len__(self) -> int:
        if self.split == "train":
            return self.n_train
        return self.n_test * self._per

    # -- the parts of an image ------------------------------------------------------------------
    def _image(self, subset: str, j: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Label, mask and background of image j of ``train`` or ``test`` (as drawn for that split)."""
        rng = np.random.default_rng([self.seed, _SPLITS[subset], j])
        label = j % len(CLASSES)
        mask = _shape_mask(label, self.size, rng)
        hue = CLASS_HUES[label] + rng.uniform(-0.06, 0.06) if self.background == "class" else rng.uniform()
        return label, mask, _background(hue, self.size, rng)

    def _crossed_background(self, b: int) -> tuple[int, np.ndarray]:
        rng = np.random.default_rng([self.seed, 90, b])
        cls = b % len(CLASSES)
        return cls, _background(CLASS_HUES[cls] + rng.uniform(-0.06, 0.06), self.size, rng)

    @staticmethod
    def _compose(mask: np.ndarray, background: np.ndarray) -> np.ndarray:
        fg = np.float32(0.9)
        return np.where(mask[None], fg, background).astype(np.float32)

    def _other(self, j: int, relation: str) -> int:
        """A test image whose class is the same / random / next relative to test image j."""
        rng = np.random.default_rng([self.seed, 91, j, _MIXED.index(relation)])
        c = j % 3
        want = {"mixed_same": c, "mixed_next": (c + 1) % 3, "mixed_rand": int(rng.integers(3))}[relation]
        n_cls = (self.n_test - want + 2) // 3  # test images of class `want`: want, want + 3, ...
        k = want + 3 * int(rng.integers(n_cls))
        if k == j:  # never the image's own background
            k = want + 3 * ((k // 3 + 1) % n_cls)
        return k

    def item(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for the shapes split {self.split!r} of {len(self)} items")
        if self.split in ("train", "test"):
            label, mask, bg = self._image(self.split, i)
            return {"x": self._compose(mask, bg), "label": label, "mask": mask}
        j, k = divmod(i, self._per)
        label, mask, bg = self._image("test", j)
        out: dict[str, Any] = {"label": label, "mask": mask, "group": j}
        if self.split == CROSSED_SPLIT:
            bl, bgb = self._crossed_background(k)
            out.update(x=self._compose(mask, bgb), background=k, background_label=bl,
                       variant="mixed_same" if bl == label else "mixed_rand")
            return out
        v = VARIANTS_OFFERED[k]
        if v in _MIXED:
            o = self._other(j, v)
            bl, _, bgo = self._image("test", o)
            out.update(x=self._compose(mask, bgo), background=o, background_label=bl)
        elif v == "only_fg":
            out.update(x=self._compose(mask, np.zeros_like(bg)), background=-1, background_label=-1)
        elif v == "no_fg":
            out.update(x=np.where(mask[None], 0.0, bg).astype(np.float32), background=j, background_label=label)
        elif v == "only_bg":
            out.update(x=bg, background=j, background_label=label)
        else:
            out.update(x=self._compose(mask, bg), background=j, background_label=label)
        out["variant"] = v
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        it = self.item(int(i))
        it["x"] = torch.from_numpy(it["x"])
        it["mask"] = torch.from_numpy(it["mask"])
        return it

    def __repr__(self) -> str:
        return f"Shapes(split={self.split!r}, background={self.background!r}, seed={self.seed}, n={len(self)})"


def write_image_folder(root: str | os.PathLike, *, split: Literal["train", "test"] = "test", seed: int = 0,
                       background: Literal["random", "class"] = "random", n: int | None = None,
                       size: int = 32) -> tuple[Path, Path]:
    """Write ``n`` images of a plain split as ``root/images/<class>/<k>.png`` with masks in
    ``root/masks/<class>/<k>.png`` (255 = foreground); return the two folders."""
    from PIL import Image

    ds = Shapes(split, seed=seed, background=background, size=size,
                **({"n_train": n} if split == "train" else {"n_test": n}) if n else {})
    root = Path(root)
    images, masks = root / "images", root / "masks"
    for i in range(len(ds)):
        it = ds.item(i)
        name = CLASSES[it["label"]]
        for d in (images, masks):
            (d / name).mkdir(parents=True, exist_ok=True)
        rgb = (np.clip(it["x"], 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(images / name / f"{i:05d}.png")
        Image.fromarray(it["mask"].astype(np.uint8) * 255).save(masks / name / f"{i:05d}.png")
    return images, masks
