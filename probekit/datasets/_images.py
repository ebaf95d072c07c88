"""Counterfactual image datasets from a folder with foregrounds: the variants of Xiao et al. 2020 and a
crossed stress split (every foreground on the same backgrounds).

``Counterfactuals(folder_or_root, ...)`` splits the images of a :class:`ForegroundFolder` into
``train`` / ``test`` (per class, deterministic per seed) and builds four map-style datasets with
``split(name)``; every item is a dict ``{"x", "label", "group", "background", "background_label",
"variant"}`` (``label`` and ``background_label`` only when the folder has classes; ``factors`` where
stated), ``variant`` an index into :data:`probekit.store._format.VARIANTS`:

``train``, ``test``
    The original images (variant ``original``); ``group`` = ``background`` = the image's index in the
    folder, ``factors`` = the image's factors.
``variants``
    For each test image ``i`` (``group`` = ``i``) the configured variants, in the order given:
    ``original``; ``only_fg`` (the foreground on black, ``background`` = ``background_label`` = -1);
    ``no_fg`` (the foreground blacked out); ``only_bg`` (the foreground region filled, see *fill*);
    ``mixed_same`` / ``mixed_rand`` / ``mixed_next`` (the foreground on the filled background of another
    image ``j`` of the same class / of any class / of class ``(c + 1) mod K``, drawn per
    ``(seed, i, variant)``). No ``factors`` (``only_fg`` has no background).
``stress``
    The crossed design: every test image's foreground on the same ``n_backgrounds`` backgrounds
    (item ``k``: foreground ``k // B``, background slot ``k % B``). The background images are chosen
    per seed, spread over the classes (classes in a seeded order, one image each round, drawn from
    the train images of the class while there are any, else from its test images). A test image chosen
    as a background is left out as a foreground (so no foreground is ever pasted on its own
    background, and every group sees exactly the same backgrounds). ``variant`` records how the two
    classes relate: ``mixed_same`` where the background image has the foreground's class,
    ``mixed_next`` where it has class ``(c + 1) mod K``, else ``mixed_rand`` (always ``mixed_rand``
    without classes). ``factors`` = the background image's factors.

Compositing happens at the foreground image's own resolution, before the model's ``transform``: the
foreground pixels of image ``i`` (its mask) over image ``j``'s background, i.e. ``j`` with its own
foreground region filled, resized to ``i``'s size (bilinear). The mask is hard (no feathering).
*fill*: ``"inpaint"`` (OpenCV's Telea inpainting, radius 5 px, of the foreground region), ``"mean"``
(the mean colour of the image's background pixels) or ``"auto"`` (inpaint when OpenCV is installed,
else mean; the choice is kept in ``Counterfactuals.fill``). Large regions inpaint as a smooth smear:
the fill is a plausible background, not a reconstruction.

``transform`` maps a PIL RGB image to a tensor (default: a float32 (3, H, W) tensor in [0, 1] at the
image's own size; images of several sizes then need a resizing transform before extraction).

Streaming: only paths, labels, sizes and the split indices are held; images and masks are read per
item, with small least-recently-used caches of decoded images, masks and filled, resized
backgrounds (``cache_size``), so a stress split, read in order, decodes each foreground once and
each of its ``B`` backgrounds once. Items depend only on ``(seed, options, item index)``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..store._format import VARIANTS
from ._foreground import ForegroundFolder, _cache_get, _cache_put, require_cv2

__all__ = ["CounterfactualDataset", "Counterfactuals", "composite", "fill_foreground", "image_counterfactuals"]

SPLITS = ("train", "test", "variants", "stress")
_CODE = {name: k for k, name in enumerate(VARIANTS)}
_INPAINT_RADIUS = 5


def _default_fill() -> str:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return "mean"
    return "inpaint"


def fill_foreground(image: np.ndarray, mask: np.ndarray, method: Literal["inpaint", "mean"] = "mean") -> np.ndarray:
    """The image with its foreground region (``mask``) filled: a background without the object.

    ``"mean"`` paints the region with the mean colour of the background pixels (rounded to uint8);
    ``"inpaint"`` uses OpenCV's Telea inpainting. Returns a new (H, W, 3) uint8 array.
    """
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask, dtype=bool)
    if method == "mean":
        out = image.copy()
        bg = image[~mask]
        colour = np.round(bg.reshape(-1, 3).mean(axis=0)) if bg.size else np.zeros(3)
        out[mask] = colour.astype(np.uint8)
        return out
    if method == "inpaint":
        cv2 = require_cv2("fill='inpaint'")
        return cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8), _INPAINT_RADIUS,
                           cv2.INPAINT_TELEA)
    raise DataError(f"fill={method!r} is not one of 'inpaint', 'mean', 'auto'.")


def composite(foreground: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``foreground`` where ``mask``, else ``background`` (same (H, W, 3) shape); uint8."""
    out = np.where(np.asarray(mask, dtype=bool)[:, :, None], foreground, background)
    return out if out.dtype == np.uint8 else out.astype(np.uint8)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class Counterfactuals:
    """The ``train``, ``test``, ``variants`` and ``stress`` splits of an image folder with foregrounds.

    Parameters
    ----------
    folder : ForegroundFolder, str or PathLike
        A :class:`ForegroundFolder`, or its root (then ``folder_kwargs`` — ``masks``, ``boxes``,
        ``foreground``, ``factors``, ``mask_adjust``, ... — build it).
    test_fraction : float, default 0.5
        Share of each class's images in ``test`` (rounded per class; 1.0 puts every image in ``test``
        and leaves ``train`` empty).
    seed : int, default 0
        Fixes the train/test split, the stress backgrounds and the mixed variants' backgrounds.
    n_backgrounds : int, default 8
        Backgrounds per foreground on ``stress``.
    variants : sequence of str, default all of ``VARIANTS``
        The variants of the ``variants`` split, in item order.
    fill : {"auto", "inpaint", "mean"}, default "auto"
        How a background's own foreground region is filled (``only_bg`` and every mixed composite).
    transform : callable, optional
        PIL RGB image -> tensor (default: float32 (3, H, W) in [0, 1] at the image's size).
    cache_size : int, default 16
        Filled, resized backgrounds kept (least recently used); the folder keeps its own small cache of
        decoded images and masks.
    """

    def __init__(
        self,
        folder: ForegroundFolder | str | os.PathLike,
        *,
        test_fraction: float = 0.5,
        seed: int = 0,
        n_backgrounds: int = 8,
        variants: Sequence[str] = VARIANTS,
        fill: Literal["auto", "inpaint", "mean"] = "auto",
        transform: Callable[[Image.Image], Any] | None = None,
        cache_size: int = 16,
        **folder_kwargs: Any,
    ) -> None:
        if not isinstance(folder, ForegroundFolder):
            folder = ForegroundFolder(folder, **folder_kwargs)
        elif folder_kwargs:
            raise DataError(f"Options {sorted(folder_kwargs)} apply when building the folder; pass them to "
                            "ForegroundFolder, or pass the folder's path instead.")
        self.folder = folder
        self.seed = int(seed)
        if fill == "auto":
            fill = _default_fill()  # type: ignore[assignment]
        if fill not in ("inpaint", "mean"):
            raise DataError(f"fill={fill!r} is not one of 'auto', 'inpaint', 'mean'.")
        if fill == "inpaint":
            require_cv2("fill='inpaint'")
        self.fill: str = fill
        self.transform = transform
        self.cache_size = max(0, int(cache_size))
        self._bg_cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        tf = float(test_fraction)
        if not 0.0 < tf <= 1.0:
            raise DataError(f"test_fraction={test_fraction!r} must lie in (0, 1].")
        self.test_fraction = tf
        names = list(variants)
        bad = [v for v in names if v not in _CODE]
        if bad or not names:
            raise DataError(f"Unknown variants {bad or names!r}; choose from {list(VARIANTS)}.")
        if not folder.has_labels and {"mixed_same", "mixed_next"} & set(names):
            raise DataError(f"The folder {str(folder.root)!r} has no class folders, so 'mixed_same' and "
                            "'mixed_next' are undefined; drop them from variants= or sort the images into "
                            "class folders.")
        self.variants = names
        self.n_backgrounds = int(n_backgrounds)

        n = len(folder)
        labels = folder.labels if folder.labels is not None else np.zeros(n, dtype=np.int64)
        self._labels = labels
        self.num_classes = max(1, folder.num_classes)
        self._by_class = [np.flatnonzero(labels == c) for c in range(self.num_classes)]
        rng = np.random.default_rng([self.seed, 0])
        test_parts, train_parts = [], []
        for idx in self._by_class:
            perm = rng.permutation(idx)
            k = min(len(idx), max(1, round(tf * len(idx))))
            test_parts.append(perm[:k])
            train_parts.append(perm[k:])
        self.test_indices = np.sort(np.concatenate(test_parts)).astype(np.int64)
        self.train_indices = np.sort(np.concatenate(train_parts)).astype(np.int64)
        if "mixed_same" in names:
            small = [folder.classes[c] for c, idx in enumerate(self._by_class) if len(idx) < 2]
            if small:
                raise DataError(f"The class folder {small[0]!r} of {str(folder.root)!r} has one image, so "
                                "'mixed_same' has no other image of its class; add images or drop "
                                "'mixed_same' from variants=.")
        if n < 2:
            raise DataError(f"The folder {str(folder.root)!r} has one image; counterfactuals need two or more.")
        # the stress design; an impossible one is reported when the stress split is asked for
        self._stress_error: DataError | None = None
        self.backgrounds = np.zeros(0, dtype=np.int64)
        self.stress_indices = np.zeros(0, dtype=np.int64)
        try:
            self.backgrounds = self._choose_backgrounds()
        except DataError as e:
            self._stress_error = e
        chosen = set(self.backgrounds.tolist())
        self.stress_indices = np.asarray([i for i in self.test_indices.tolist() if i not in chosen],
                                         dtype=np.int64)
        if self._stress_error is None and len(self.stress_indices) == 0:
            self._stress_error = DataError(
                f"Every test image of {str(folder.root)!r} is a stress background; lower n_backgrounds= "
                "or add images.")

    def _choose_backgrounds(self) -> np.ndarray:
        b = self.n_backgrounds
        n = len(self.folder)
        if not 1 <= b < n:
            raise DataError(f"n_backgrounds={b} must lie in 1..{n - 1} for the {n} images of "
                            f"{str(self.folder.root)!r}; lower n_backgrounds= or add images.")
        rng = np.random.default_rng([self.seed, 1])
        order = rng.permutation(self.num_classes)
        train = set(self.train_indices.tolist())
        pools = []
        for c in order:
            idx = self._by_class[c]
            pools.append([list(rng.permutation([i for i in idx if i in train])),
                          list(rng.permutation([i for i in idx if i not in train]))])
        chosen: list[int] = []
        while len(chosen) < b:
            for first, second in pools:
                if len(chosen) == b:
                    break
                if first:
                    chosen.append(int(first.pop()))
                elif second:
                    chosen.append(int(second.pop()))
        return np.asarray(chosen, dtype=np.int64)

    # ------------------------------------------------------------------------------- pixels
    def background(self, j: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Image ``j`` with its foreground filled, resized (bilinear) to ``size`` = (width, height)."""
        w, h = (int(v) for v in self.folder.sizes[j])
        size = (w, h) if size is None else (int(size[0]), int(size[1]))
        key = (int(j), *size)
        hit = _cache_get(self._bg_cache, key)
        if hit is not None:
            return hit
        own = (int(j), w, h)
        filled = _cache_get(self._bg_cache, own)
        if filled is None:
            filled = fill_foreground(self.folder.image(j), self.folder.mask(j), self.fill)  # type: ignore[arg-type]
            filled.setflags(write=False)
            _cache_put(self._bg_cache, own, filled, self.cache_size)
        if key == own:
            return filled
        out = np.asarray(Image.fromarray(filled).resize(size, Image.BILINEAR))
        _cache_put(self._bg_cache, key, out, self.cache_size)
        return out

    def render(self, i: int, variant: str, j: int | None = None) -> np.ndarray:
        """Image ``i`` in ``variant`` ((H, W, 3) uint8); ``j`` is the background image of a mixed one."""
        img = self.folder.image(i)
        if variant == "original":
            return img
        mask = self.folder.mask(i)
        if variant == "only_fg":
            return composite(img, mask, np.zeros_like(img))
        if variant == "no_fg":
            return composite(np.zeros_like(img), mask, img)
        if variant == "only_bg":
            return self.background(i)
        if j is None:
            raise DataError(f"The variant {variant!r} needs a background image j.")
        return composite(img, mask, self.background(j, (img.shape[1], img.shape[0])))

    def mixed_partner(self, i: int, variant: str) -> int:
        """The image whose background ``variant`` (``mixed_same/rand/next``) of image ``i`` uses."""
        rng = np.random.default_rng([self.seed, 2, int(i), _CODE[variant]])
        c = int(self._labels[i])
        if variant == "mixed_same":
            pool = self._by_class[c]
        elif variant == "mixed_next":
            pool = self._by_class[(c + 1) % self.num_classes]
        else:
            pool = None
        if pool is None:
            n = len(self.folder)
            j = int(rng.integers(n - 1))
            return j + 1 if j >= i else j
        pool = pool[pool != i]
        return int(pool[rng.integers(len(pool))])

    def relation(self, i: int, j: int) -> str:
        """The variant name of foreground ``i`` on background ``j`` in the stress split."""
        if self.folder.has_labels:
            ci, cj = int(self._labels[i]), int(self._labels[j])
            if cj == ci:
                return "mixed_same"
            if cj == (ci + 1) % self.num_classes:
                return "mixed_next"
        return "mixed_rand"

    def split(self, name: str) -> CounterfactualDataset:
        """The dataset of split ``name`` (``train``, ``test``, ``variants`` or ``stress``)."""
        if name not in SPLITS:
            raise DataError(f"Unknown split {name!r} of an image folder's counterfactuals; choose from "
                            f"{list(SPLITS)}.")
        if name == "stress" and self._stress_error is not None:
            raise self._stress_error
        if name == "train" and len(self.train_indices) == 0:
            raise DataError(f"test_fraction={self.test_fraction} leaves no train images in "
                            f"{str(self.folder.root)!r}; lower test_fraction.")
        return CounterfactualDataset(self, name)

    def splits(self) -> dict[str, CounterfactualDataset]:
        """Every split that has items."""
        return {s: self.split(s) for s in SPLITS
                if (s != "train" or len(self.train_indices)) and (s != "stress" or self._stress_error is None)}


class CounterfactualDataset(Dataset):
    """One split of :class:`Counterfactuals` (a map-style dataset of dict items).

    Attributes
    ----------
    split : str
    factor_names : list of str or None
    variant_names : tuple of str
        :data:`probekit.store._format.VARIANTS` (what the ``variant`` codes index).
    """

    variant_names = VARIANTS

    def __init__(self, parent: Counterfactuals, split: str) -> None:
        self.parent = parent
        self.split = split
        folder = parent.folder
        self.factor_names = folder.factor_names if split != "variants" else None
        self.has_label = folder.has_labels
        if split == "train":
            self._images = parent.train_indices
        elif split == "test":
            self._images = parent.test_indices
        elif split == "variants":
            self._images = parent.test_indices
        else:
            self._images = parent.stress_indices
        self._per = {"variants": len(parent.variants), "stress": len(parent.backgrounds)}.get(split, 1)

    def __len__(self) -> int:
        return len(self._images) * self._per

    def locate(self, k: int) -> tuple[int, str, int]:
        """``(image index, variant name, background image index or -1)`` of item ``k``."""
        n = len(self)
        k = int(k)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"index {k} out of range for the {self.split!r} split of {n} items")
        p = self.parent
        i = int(self._images[k // self._per])
        if self.split in ("train", "test"):
            return i, "original", i
        if self.split == "stress":
            j = int(p.backgrounds[k % self._per])
            return i, p.relation(i, j), j
        v = p.variants[k % self._per]
        if v == "only_fg":
            return i, v, -1
        if v in ("original", "no_fg", "only_bg"):
            return i, v, i
        return i, v, p.mixed_partner(i, v)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, v, j = self.locate(k)
        p = self.parent
        arr = p.render(i, v, j if j >= 0 else None)
        img = Image.fromarray(arr)
        x = p.transform(img) if p.transform is not None else _to_tensor(img)
        item: dict[str, Any] = {"x": x, "group": i, "background": j, "variant": _CODE[v]}
        labels = p.folder.labels
        if labels is not None:
            item["label"] = int(labels[i])
            item["background_label"] = int(labels[j]) if j >= 0 else -1
        factors = p.folder.factors
        if factors is not None and self.factor_names is not None:
            item["factors"] = factors[j].copy()
        return item


def image_counterfactuals(root: str | os.PathLike, split: str, **kwargs: Any) -> CounterfactualDataset:
    """One split of ``Counterfactuals(root, **kwargs)`` (``train``, ``test``, ``variants``, ``stress``)."""
    return Counterfactuals(root, **kwargs).split(split)
