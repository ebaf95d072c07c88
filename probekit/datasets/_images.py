"""Counterfactual image datasets from a folder with foregrounds: the variants of Xiao et al. 2020 and a
crossed split (every foreground on the same backgrounds).

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
    ``(seed, i, variant)``); ``composite_self`` (the foreground pasted back on its own image's filled
    background, exactly as a mixed composite is made: the compositing control of
    :func:`probekit.analyses.composite_gap`). No ``factors`` (``only_fg`` has no background).
``crossed``
    The crossed design (its old name ``stress`` is still read, with a FutureWarning): every test
    image's foreground on the same ``n_backgrounds`` backgrounds (item ``k``: foreground ``k // B``,
    background slot ``k % B``). The background images are chosen
    per seed, spread over the classes (classes in a seeded order, one image each round, drawn from
    the train images of the class while there are any, else from its test images). A test image chosen
    as a background is left out as a foreground (so no foreground is ever pasted on its own
    background, and every group sees exactly the same backgrounds). ``variant`` records how the two
    classes relate: ``mixed_same`` where the background image has the foreground's class,
    ``mixed_next`` where it has class ``(c + 1) mod K``, else ``mixed_rand`` (always ``mixed_rand``
    without classes). ``factors`` = the background image's factors.

``deploy:<site>`` (with ``deploy_backgrounds=``, one per site)
    Every test image's foreground on the same ``n_deploy`` scenes of the site's photos of empty
    scenes (:class:`DeploymentScenes`; item ``k``: foreground ``k // B``, scene slot ``k % B``):
    ``group`` = the image, ``background`` = the scene slot, ``site`` = the site's index,
    ``background_label`` = -1, ``variant`` = ``mixed_rand`` (a background unrelated to the class). What
    :func:`probekit.analyses.predicted_accuracy` reads.

Compositing happens at the foreground image's own resolution, before the model's ``transform``: the
foreground of image ``i`` over image ``j``'s background, i.e. ``j`` with its own foreground region
(grown by the clear margin, ``max(1, ceil(2 sigma))`` px) filled, resized to ``i``'s size
(bilinear); or over a scene, cropped or tiled at ``i``'s size, never resized unevenly. The
foreground is pasted with its mask, hard by default (*feather*: a Gaussian-profile edge of
``sigma`` px; ``"auto"``: ``max(1, 0.01 * min(H, W))``). *fill*: ``"telea"`` / ``"ns"`` (OpenCV's
inpainting, Telea or Navier-Stokes, radius 5 px), ``"mean"`` (the mean colour of the image's
background pixels), ``"shift"`` (the region copied from a shifted place of the same image),
``"borrow"`` (copied from another image of the class where that image's own object is not) or
``"auto"`` (:data:`DEFAULT_FILL`, ``"borrow"``; the choice is kept in ``Counterfactuals.fill``).
The defaults were measured on the project's generator (benchmarks/bench_deploy.py,
docs/BENCHMARKS.md), not assumed. :attr:`Counterfactuals.settings` records them (and the
deployment scenes) for the store.

``transform`` maps a PIL RGB image to a tensor (default: a float32 (3, H, W) tensor in [0, 1] at the
image's own size; images of several sizes then need a resizing transform before extraction).

Streaming: only paths, labels, sizes and the split indices are held; images and masks are read per
item, with least-recently-used caches of decoded images, masks, fill regions, feathered masks and
filled, resized backgrounds, each bounded in bytes (``cache_bytes``, 64 MiB by default), so a folder
of small images is decoded and filled once per process however a split orders its rows, and a large
one keeps its most recent images. Items depend only on ``(seed, options, item index)``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..vocab import CROSSED_SPLIT, VARIANTS, crossed_split_name
from ._foreground import (
    _LRU,
    _READ_ERRORS,
    CACHE_BYTES,
    ForegroundFolder,
    adjust_mask,
    image_extensions,
    require_cv2,
    to_rgb8,
)

__all__ = ["CounterfactualDataset", "Counterfactuals", "DeploymentScenes", "composite", "feather_sigma",
           "fill_foreground", "mirror_crop", "soft_mask"]

SPLITS = ("train", "test", "variants", CROSSED_SPLIT)
#: the fill methods of a background's own object region (see :func:`fill_foreground`, ``"borrow"``:
#: :meth:`Counterfactuals.background`)
FILLS = ("telea", "ns", "mean", "shift", "borrow")
#: ``fill="auto"``: the crossed split erred least against the truth with it on the project's generator
#: (mean absolute error over 5 models 2.7 points, against 4.2 NS, 4.4 shift, 5.5 Telea, 6.2 mean colour;
#: benchmarks/bench_deploy.py, docs/BENCHMARKS.md). Needs no OpenCV (what no donor covers: Telea if
#: installed, else the mean colour)
DEFAULT_FILL = "borrow"
DEFAULT_FEATHER: float | str = 0.0
#: default ``feather``: hard edges predicted deployment accuracy best there (error 1.5 points against
#: 1.6 with sigma 0.5 px and 2.5 with ``"auto"``, 1 px at 32 px images), and a hard edge pays no
#: compositing gap; ``"auto"`` (see :func:`feather_sigma`) remains available for larger images
_CODE = {name: k for k, name in enumerate(VARIANTS)}
_INPAINT_RADIUS = 5
_DEPLOY_PREFIX = "deploy:"


def feather_sigma(feather: float | str, height: int, width: int) -> float:
    """The feathering width (Gaussian sigma, pixels) of a composite at an image of ``height x width``.

    ``"auto"``: ``max(1, 0.01 * min(height, width))`` (1 px up to 100 px images, 2.24 px at 224 px);
    a number: that many pixels; 0: a hard mask.
    """
    if feather == "auto":
        return max(1.0, 0.01 * min(int(height), int(width)))
    f = float(feather)
    if not np.isfinite(f) or f < 0:
        raise DataError(f"feather={feather!r} must be 'auto' or a number of pixels >= 0 (0: hard mask edges).")
    return f


def clear_margin(sigma: float, clear: int | str = "auto") -> int:
    """Pixels beyond the mask that a background's fill also covers.

    ``"auto"``: ``max(1, ceil(2 sigma))``. A feathered object reaches about 2 sigma beyond its mask
    (alpha 2 % there), and even a hard mask leaves the object's edge pixels below the mask's threshold
    (anti-aliasing, a halo the mask missed) as a faint outline: a background's own object is removed
    that far, so neither its outline shows in a composite nor the pasted object's own fringe in
    ``composite_self``. An int: that many pixels (0: exactly the mask).
    """
    if clear == "auto":
        return max(1, int(np.ceil(2.0 * sigma)))
    c = int(clear)
    if c < 0 or c != clear:
        raise DataError(f"clear={clear!r} must be 'auto' or a whole number of pixels >= 0.")
    return c


def soft_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Alpha (H, W) float32 in [0, 1] of a mask feathered by ``sigma`` pixels (``sigma=0``: the mask itself).

    ``alpha = Phi(d / sigma)``, ``d`` the signed distance of the pixel centre to the mask's edge (positive
    inside: a foreground pixel next to the edge is at +0.5, a background pixel next to it at -0.5) and
    ``Phi`` the normal CDF: above 0.5 exactly on the mask, rising monotonically with the distance into
    the object, so thin parts stay as opaque as their width allows (a blurred mask would dim them).
    """
    mask = np.asarray(mask, dtype=bool)
    if sigma <= 0 or mask.all() or not mask.any():
        return mask.astype(np.float32)
    from scipy.ndimage import distance_transform_edt
    from scipy.special import ndtr

    d = np.where(mask, distance_transform_edt(mask) - 0.5, -(distance_transform_edt(~mask) - 0.5))
    return ndtr(d / sigma).astype(np.float32)


def _inpaint(image: np.ndarray, region: np.ndarray, flag: str) -> np.ndarray:
    cv2 = require_cv2(f"fill={flag!r}")
    code = cv2.INPAINT_TELEA if flag == "telea" else cv2.INPAINT_NS
    return cv2.inpaint(np.ascontiguousarray(image), region.astype(np.uint8), _INPAINT_RADIUS, code)


def _mean_fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    out = image.copy()
    bg = image[~region]
    colour = np.round(bg.reshape(-1, 3).mean(axis=0)) if bg.size else np.zeros(3)
    out[region] = colour.astype(np.uint8)
    return out


def _rest_fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Telea inpainting where OpenCV is installed, else the mean colour (what is left after a copy fill)."""
    if not region.any():
        return image
    try:
        import cv2  # noqa: F401
    except ImportError:
        return _mean_fill(image, region)
    return _inpaint(image, region, "telea")


def _shift_fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Copy the region from a shifted place of the same image's background (no smear for textures).

    Candidate shifts are multiples (-2..2) of the region's bounding box plus one pixel on each axis;
    among those whose source lies wholly in the image and outside the region (else: the most such
    pixels) the one whose copied ring matches the pixels around the region best is used. Pixels with
    no source are inpainted (:func:`_rest_fill`).
    """
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        return image.copy()
    h, w = region.shape
    bh, bw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
    from scipy.ndimage import binary_dilation

    ring = binary_dilation(region, iterations=1) & ~region
    ry, rx = np.nonzero(ring)
    img = image.astype(np.float32)
    best: tuple[float, float, int, int] | None = None
    for my in range(-2, 3):
        for mx in range(-2, 3):
            if my == 0 and mx == 0:
                continue
            dy, dx = my * (bh + 1), mx * (bw + 1)
            sy, sx = ys + dy, xs + dx
            inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
            ok = inside.copy()
            ok[inside] = ~region[sy[inside], sx[inside]]
            if not ok.any():
                continue
            ty, tx = ry + dy, rx + dx
            rin = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
            cost = float(np.abs(img[ty[rin], tx[rin]] - img[ry[rin], rx[rin]]).mean()) if rin.any() else 0.0
            key = (-float(ok.mean()), cost, dy, dx)
            if best is None or key[:2] < best[:2]:
                best = key
    out = image.copy()
    if best is None:
        return _rest_fill(out, region)
    _, _, dy, dx = best
    sy, sx = ys + dy, xs + dx
    inside = (sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)
    ok = inside.copy()
    ok[inside] = ~region[sy[inside], sx[inside]]
    out[ys[ok], xs[ok]] = image[sy[ok], sx[ok]]
    left = np.zeros_like(region)
    left[ys[~ok], xs[~ok]] = True
    return _rest_fill(out, left)


def fill_foreground(image: np.ndarray, mask: np.ndarray, method: str = "mean") -> np.ndarray:
    """The image with its foreground region (``mask``) filled: a background without the object.

    ``"mean"`` paints the region with the mean colour of the background pixels (rounded to uint8);
    ``"telea"`` (alias ``"inpaint"``) and ``"ns"`` use OpenCV's inpainting (Telea; Navier-Stokes),
    radius 5 px; ``"shift"`` copies the region from a shifted place of the same image's background
    (:func:`_shift_fill`; textures keep their grain where inpainting smears). Filling from *another*
    image's background (``"borrow"``) needs the folder: :meth:`Counterfactuals.background`. Returns a
    new (H, W, 3) uint8 array.
    """
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask, dtype=bool)
    if method == "mean":
        return _mean_fill(image, mask)
    if method in ("inpaint", "telea", "ns"):
        return _inpaint(image, mask, "ns" if method == "ns" else "telea")
    if method == "shift":
        return _shift_fill(image, mask)
    raise DataError(f"fill={method!r} is not one of {list(FILLS)} or 'auto'.")


def composite(foreground: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``foreground`` over ``background`` (same (H, W, 3) shape) through ``mask``; uint8.

    A boolean mask pastes hard; a float mask is an alpha in [0, 1] (see :func:`soft_mask`), blended
    per pixel and rounded.
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        out = np.where(mask[:, :, None], foreground, background)
        return out if out.dtype == np.uint8 else out.astype(np.uint8)
    a = mask.astype(np.float32)[:, :, None]
    out = a * np.asarray(foreground, dtype=np.float32) + (1.0 - a) * np.asarray(background, dtype=np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def mirror_crop(photo: np.ndarray, size: tuple[int, int], u: float = 0.5, v: float = 0.5) -> np.ndarray:
    """A ``size = (width, height)`` window of ``photo`` at its own pixel scale: cropped, or tiled, never resized.

    Along an axis where the photo is at least as long as the window, the window starts at
    ``round(u * (W - w))`` (``v`` for rows): ``u = 0.5`` centres it. Where the photo is shorter, it is
    tiled by mirroring (``.. 2 1 0 | 0 1 2 .. n-1 | n-1 n-2 ..``, so no seam shows), starting at
    ``floor(u * W)`` of the mirrored tiling. Every output pixel is a pixel of the photo.
    """
    photo = np.asarray(photo)
    H, W = photo.shape[:2]
    w, h = int(size[0]), int(size[1])

    def index(n_src: int, n_out: int, t: float) -> np.ndarray:
        if n_src >= n_out:
            start = round(float(t) * (n_src - n_out))
            return np.arange(start, start + n_out)
        k = (int(np.floor(t * n_src)) + np.arange(n_out)) % (2 * n_src)
        return np.where(k < n_src, k, 2 * n_src - 1 - k)

    return photo[np.ix_(index(H, h, v), index(W, w, u))]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class DeploymentScenes:
    """Photos of empty scenes where a model will be deployed, one folder per site: the deployment backgrounds.

    Each site offers ``n_scenes`` scene slots, fixed per ``seed``: slot ``s`` is photo ``perm[s % P]``
    (``P`` photos in a seeded order, so slots spread over the photos) at a relative position ``(u, v)``
    drawn uniformly per slot (``position="random"``) or ``(0.5, 0.5)`` (``"center"``; then at most one
    slot per photo). :meth:`scene` gives slot ``s`` at an object image's size, so every object is
    shown on the same scenes whatever its size:

    - ``fit="crop"`` (default): a window of the photo at its own pixel scale (:func:`mirror_crop`):
      cropped where the photo is larger, tiled by mirroring where it is smaller. For photos taken at
      about the object images' scale (a floor photographed from the camera's usual distance).
    - ``fit="cover"``: the photo scaled by one factor for both axes (the smallest that covers the
      object image; Lanczos), then cropped: for photos that frame a whole scene the way the object
      images do.

    Never stretched: both axes always keep one scale. Nothing but paths and sizes is held; photos are
    decoded when a scene is first asked for (a small least-recently-used cache keeps the last few).

    Parameters
    ----------
    dirs : str, PathLike, or a sequence of them
        One folder of photos per site (images anywhere below it; hidden files and non-images skipped).
    n_scenes : int, default 16
        Scene slots per site.
    fit : {"crop", "cover"}, default "crop"
    position : {"random", "center"}, default "random"
    seed : int, default 0
    names : sequence of str, optional
        Site names (default: the folders' names, made unique with ``-2``, ``-3``, ...).
    cache_size : int, default 8
        Decoded photos kept (the scenes cut from them are kept apart, see :meth:`scene`).
    cache_bytes : int, default 64 MiB
        Bytes of decoded photos, and apart of scenes, kept at most.

    Attributes
    ----------
    sites : list of str
    photos : list of list of str
        Each site's photo paths.
    slots : list of numpy.ndarray (n_scenes, 3)
        Per site: ``(photo index, u, v)`` of each slot.
    """

    def __init__(self, dirs: str | os.PathLike | Sequence[str | os.PathLike], *, n_scenes: int = 16,
                 fit: Literal["crop", "cover"] = "crop", position: Literal["random", "center"] = "random",
                 seed: int = 0, names: Sequence[str] | None = None, cache_size: int = 8,
                 cache_bytes: int = CACHE_BYTES) -> None:
        if isinstance(dirs, (str, os.PathLike)):
            dirs = [dirs]
        self.dirs = [Path(d) for d in dirs]
        if not self.dirs:
            raise DataError("No deployment folders given; name one folder of scene photos per site.")
        if fit not in ("crop", "cover"):
            raise DataError(f"fit={fit!r} is not one of 'crop', 'cover'.")
        if position not in ("random", "center"):
            raise DataError(f"position={position!r} is not one of 'random', 'center'.")
        if int(n_scenes) < 2:
            raise DataError(f"n_scenes={n_scenes!r} must be at least 2 (scenes are resampled for the interval).")
        self.fit, self.position, self.seed = fit, position, int(seed)
        self.cache_size = max(0, int(cache_size))
        self._cache = _LRU(cache_bytes, self.cache_size)
        self._scenes = _LRU(cache_bytes)
        if names is None:
            names, seen = [], {}
            for d in self.dirs:
                base = d.resolve().name or "site"
                seen[base] = seen.get(base, 0) + 1
                names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
        names = [str(n) for n in names]
        if len(names) != len(self.dirs) or len(set(names)) != len(names):
            raise DataError(f"names={names!r} must give one distinct name per deployment folder ({len(self.dirs)}).")
        bad = [n for n in names if not n or "/" in n or n != n.strip()]
        if bad:
            raise DataError(f"The site name {bad[0]!r} cannot name a split; use a non-empty name without '/' or "
                            "edge spaces (names=).")
        self.sites = names
        self.photos: list[list[str]] = []
        self.sizes: list[np.ndarray] = []
        self.slots: list[np.ndarray] = []
        exts = image_extensions()
        for k, d in enumerate(self.dirs):
            if not d.is_dir():
                raise DataError(f"The deployment folder {str(d)!r} does not exist or is not a folder; give a "
                                "folder of photos of the empty scenes.")
            found = []
            for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
                dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
                found += [str(Path(dirpath) / f) for f in sorted(filenames)
                          if not f.startswith(".") and Path(f).suffix.lower() in exts]
            if not found:
                raise DataError(f"The deployment folder {str(d)!r} holds no images; put photos of the empty "
                                "scenes in it.")
            sizes = np.zeros((len(found), 2), dtype=np.int64)
            for i, f in enumerate(found):
                try:
                    with Image.open(f) as im:
                        sizes[i] = im.size
                except _READ_ERRORS as e:
                    raise DataError(f"Cannot read the scene photo {f!r} ({type(e).__name__}); replace or remove "
                                    "it.") from e
            self.photos.append(found)
            self.sizes.append(sizes)
            rng = np.random.default_rng([self.seed, 7, k])
            P = len(found)
            B = int(n_scenes) if position == "random" else min(int(n_scenes), P)
            if B < 2:
                raise DataError(f"The deployment folder {str(d)!r} has one photo, and position='center' gives "
                                "one scene per photo; add photos or use position='random'.")
            perm = rng.permutation(P)
            uv = rng.random((B, 2)) if position == "random" else np.full((B, 2), 0.5)
            self.slots.append(np.column_stack([perm[np.arange(B) % P], uv]))
        self.n_scenes = int(n_scenes)

    def __len__(self) -> int:
        return len(self.sites)

    def n_slots(self, site: int) -> int:
        """Scene slots of site ``site``."""
        return len(self.slots[site])

    def photo_of(self, site: int) -> np.ndarray:
        """The photo index of each scene slot of ``site`` (to resample photos rather than crops)."""
        return self.slots[site][:, 0].astype(np.int64)

    def _photo(self, site: int, p: int) -> np.ndarray:
        key = (site, p)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        path = self.photos[site][p]
        try:
            with Image.open(path) as im:
                arr = to_rgb8(im)
        except _READ_ERRORS as e:
            raise DataError(f"Cannot read the scene photo {path!r} ({type(e).__name__}); it may have changed "
                            "since the folder was opened.") from e
        self._cache.put(key, arr)
        return arr

    def scene(self, site: int, s: int, size: tuple[int, int]) -> np.ndarray:
        """Scene slot ``s`` of ``site`` at ``size = (width, height)``: (H, W, 3) uint8, never stretched.

        The scenes made are kept (least recently used, up to ``cache_bytes``), so a
        deployment split read object by object decodes each photo about once.
        """
        w, h = int(size[0]), int(size[1])
        key = (int(site), int(s), w, h)
        hit = self._scenes.get(key)
        if hit is not None:
            return hit
        p, u, v = self.slots[site][int(s)]
        photo = self._photo(site, int(p))
        if self.fit == "cover":
            H, W = photo.shape[:2]
            f = max(w / W, h / H)
            nw, nh = max(w, int(np.ceil(W * f - 1e-9))), max(h, int(np.ceil(H * f - 1e-9)))
            if (nw, nh) != (W, H):
                photo = np.asarray(Image.fromarray(photo).resize((nw, nh), Image.LANCZOS))
        out = mirror_crop(photo, (w, h), float(u), float(v))
        out.setflags(write=False)
        self._scenes.put(key, out)
        return out

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-safe description: sites, folders, photos per site, scene slots (and the photo of each:
        ``slot_photos``, what :func:`probekit.analyses.predicted_accuracy` takes as ``scene_unit``), fit,
        position, seed."""
        return {"sites": list(self.sites), "folders": [str(d) for d in self.dirs],
                "photos": [len(p) for p in self.photos], "n_scenes": [self.n_slots(k) for k in range(len(self))],
                "slot_photos": [self.photo_of(k).tolist() for k in range(len(self))],
                "fit": self.fit, "position": self.position, "seed": self.seed}


class Counterfactuals:
    """The ``train``, ``test``, ``variants`` and ``crossed`` splits of an image folder with foregrounds.

    Parameters
    ----------
    folder : ForegroundFolder, str or PathLike
        A :class:`ForegroundFolder`, or its root (then ``folder_kwargs`` — ``masks``, ``boxes``,
        ``foreground``, ``factors``, ``mask_adjust``, ... — build it).
    test_fraction : float, default 0.5
        Share of each class's images in ``test`` (rounded per class; 1.0 puts every image in ``test``
        and leaves ``train`` empty).
    seed : int, default 0
        Fixes the train/test split, the crossed split's backgrounds and the mixed variants' backgrounds.
    n_backgrounds : int, default 8
        Backgrounds per foreground on ``crossed``.
    variants : sequence of str, default all of ``VARIANTS``
        The variants of the ``variants`` split, in item order.
    fill : {"auto", "telea", "ns", "mean", "shift", "borrow"}, default "auto"
        How a background's own foreground region (grown by :func:`clear_margin`) is filled
        (``only_bg``, ``composite_self`` and every mixed composite): see :func:`fill_foreground`;
        ``"borrow"`` copies the region from another image of the same class where that image's own
        object is not (what no donor covers: Telea, or the mean colour without OpenCV). ``"auto"`` is
        :data:`DEFAULT_FILL` (``"borrow"``, measured best); ``"inpaint"`` is ``"telea"``.
    feather : "auto" or float, default 0
        Soft mask edges of every composite of two images (mixed, ``composite_self``, deployment):
        Gaussian-profile alpha of ``sigma`` pixels (:func:`soft_mask`, :func:`feather_sigma`;
        ``"auto"``: ``max(1, 0.01 min(H, W))``); 0 pastes with the hard mask (measured best on 32-px
        images, :data:`DEFAULT_FEATHER`).
    clear : "auto" or int, default "auto"
        Pixels beyond a background image's mask that its fill also covers (:func:`clear_margin`).
    deploy_backgrounds : folder(s) or DeploymentScenes, optional
        Photos of empty scenes of the deployment site(s), one folder per site: a split
        ``deploy:<site>`` per site shows every test object on the same ``n_deploy`` scenes.
    n_deploy : int, default 16
        Scene slots per site (with folders; a :class:`DeploymentScenes` brings its own).
    deploy_fit : {"crop", "cover"}, default "crop"
        How a scene photo meets an object image's size (see :class:`DeploymentScenes`).
    transform : callable, optional
        PIL RGB image -> tensor (default: float32 (3, H, W) in [0, 1] at the image's size).
    cache_size : int, optional
        Filled, resized backgrounds (and apart feathered masks and fill regions) kept at most, least
        recently used; by default bounded by ``cache_bytes`` only.
    cache_bytes : int, default 64 MiB
        Bytes each of those caches holds at most; the folder keeps its own caches of decoded images and
        masks (``ForegroundFolder(cache_bytes=...)``).
    """

    def __init__(
        self,
        folder: ForegroundFolder | str | os.PathLike,
        *,
        test_fraction: float = 0.5,
        seed: int = 0,
        n_backgrounds: int = 8,
        variants: Sequence[str] = VARIANTS,
        fill: str = "auto",
        feather: float | str = DEFAULT_FEATHER,
        clear: int | str = "auto",
        deploy_backgrounds: str | os.PathLike | Sequence[str | os.PathLike] | DeploymentScenes | None = None,
        n_deploy: int = 16,
        deploy_fit: Literal["crop", "cover"] = "crop",
        transform: Callable[[Image.Image], Any] | None = None,
        cache_size: int | None = None,
        cache_bytes: int = CACHE_BYTES,
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
            fill = DEFAULT_FILL
        elif fill == "inpaint":
            fill = "telea"
        if fill not in FILLS:
            raise DataError(f"fill={fill!r} is not one of {['auto', *FILLS]}.")
        if fill in ("telea", "ns"):
            require_cv2(f"fill={fill!r}")
        self.fill: str = fill
        feather_sigma(feather, 100, 100)  # checks the value
        self.feather = feather if feather == "auto" else float(feather)
        clear_margin(0.0, clear)  # checks the value
        self.clear = clear
        if deploy_backgrounds is None or isinstance(deploy_backgrounds, DeploymentScenes):
            self.scenes = deploy_backgrounds
        else:
            self.scenes = DeploymentScenes(deploy_backgrounds, n_scenes=n_deploy, fit=deploy_fit, seed=seed)
        self.transform = transform
        self.cache_size = None if cache_size is None else max(0, int(cache_size))
        self.cache_bytes = max(0, int(cache_bytes))
        self._bg_cache = _LRU(self.cache_bytes, self.cache_size)
        self._alpha_cache = _LRU(self.cache_bytes, self.cache_size)
        self._region_cache = _LRU(self.cache_bytes, self.cache_size)
        # each image's donor, once: choosing one reads 9 fill regions (a distance transform each), and the
        # filled backgrounds' small LRU cache misses often when a split reads backgrounds in random order
        self._donors: dict[int, int] = {}
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
        # the crossed design; an impossible one is reported when the crossed split is asked for
        self._crossed_error: DataError | None = None
        self.backgrounds = np.zeros(0, dtype=np.int64)
        self.crossed_indices = np.zeros(0, dtype=np.int64)
        try:
            self.backgrounds = self._choose_backgrounds()
        except DataError as e:
            self._crossed_error = e
        chosen = set(self.backgrounds.tolist())
        self.crossed_indices = np.asarray([i for i in self.test_indices.tolist() if i not in chosen],
                                          dtype=np.int64)
        if self._crossed_error is None and len(self.crossed_indices) == 0:
            self._crossed_error = DataError(
                f"Every test image of {str(folder.root)!r} is a background of the crossed split; lower "
                "n_backgrounds= or add images.")

    @property
    def stress_indices(self) -> np.ndarray:
        """Deprecated: :attr:`crossed_indices` (the crossed split's objects; ``stress`` was its old name)."""
        warnings.warn("Counterfactuals.stress_indices is now Counterfactuals.crossed_indices (the split 'stress' "
                      "is 'crossed'); the old name goes in the next release.", FutureWarning, stacklevel=2)
        return self.crossed_indices

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
    def sigma(self, i: int) -> float:
        """The feathering sigma (pixels) of composites at image ``i``'s size."""
        w, h = (int(v) for v in self.folder.sizes[i])
        return feather_sigma(self.feather, h, w)

    def fill_region(self, j: int) -> np.ndarray:
        """The region of image ``j`` that its filled background replaces: the mask grown by the clear margin."""
        j = int(j)
        hit = self._region_cache.get(j)
        if hit is None:  # a distance transform: read 9 times per image when choosing donors
            hit = adjust_mask(self.folder.mask(j), clear_margin(self.sigma(j), self.clear))
            hit.setflags(write=False)
            self._region_cache.put(j, hit)
        return hit

    def alpha(self, i: int) -> np.ndarray:
        """Image ``i``'s foreground as pasted: its mask feathered by :meth:`sigma` (bool when hard)."""
        s = self.sigma(i)
        m = self.folder.mask(i)
        if s <= 0:
            return m
        hit = self._alpha_cache.get(int(i))
        if hit is None:
            hit = soft_mask(m, s)
            hit.setflags(write=False)
            self._alpha_cache.put(int(i), hit)
        return hit

    def donor(self, j: int) -> int:
        """The image whose background fills image ``j``'s object region under ``fill="borrow"``.

        Of up to 8 other images of ``j``'s class (any class without labels; drawn per ``(seed, j)``),
        the one whose own fill region, cropped at ``j``'s size, overlaps ``j``'s region least.
        """
        j = int(j)
        if j in self._donors:
            return self._donors[j]
        pool = self._by_class[int(self._labels[j])]
        pool = pool[pool != j]
        if pool.size == 0:
            pool = np.asarray([k for k in range(len(self.folder)) if k != j])
        rng = np.random.default_rng([self.seed, 3, int(j)])
        cand = rng.permutation(pool)[:8]
        region = self.fill_region(j)
        h, w = region.shape
        overlap = [int((mirror_crop(self.fill_region(int(k)), (w, h)) & region).sum()) for k in cand]
        self._donors[j] = int(cand[int(np.argmin(overlap))])
        return self._donors[j]

    def _filled(self, j: int) -> np.ndarray:
        img, region = self.folder.image(j), self.fill_region(j)
        if self.fill != "borrow":
            return fill_foreground(img, region, self.fill)
        k = self.donor(j)
        h, w = region.shape
        src = mirror_crop(self.folder.image(k), (w, h))
        hole = mirror_crop(self.fill_region(k), (w, h))
        out = img.copy()
        take = region & ~hole
        out[take] = src[take]
        return _rest_fill(out, region & hole)

    def background(self, j: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Image ``j`` with its foreground (grown by the clear margin) filled, resized (bilinear) to
        ``size`` = (width, height)."""
        w, h = (int(v) for v in self.folder.sizes[j])
        size = (w, h) if size is None else (int(size[0]), int(size[1]))
        key = (int(j), *size)
        hit = self._bg_cache.get(key)
        if hit is not None:
            return hit
        own = (int(j), w, h)
        filled = self._bg_cache.get(own)
        if filled is None:
            filled = self._filled(j)
            filled.setflags(write=False)
            self._bg_cache.put(own, filled)
        if key == own:
            return filled
        out = np.asarray(Image.fromarray(filled).resize(size, Image.BILINEAR))
        self._bg_cache.put(key, out)
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
        if variant == "composite_self":
            return composite(img, self.alpha(i), self.background(i))
        if j is None:
            raise DataError(f"The variant {variant!r} needs a background image j.")
        return composite(img, self.alpha(i), self.background(j, (img.shape[1], img.shape[0])))

    def render_deploy(self, i: int, site: int, s: int) -> np.ndarray:
        """Image ``i``'s object on scene slot ``s`` of deployment site ``site`` ((H, W, 3) uint8)."""
        if self.scenes is None:
            raise DataError("No deployment scenes: give deploy_backgrounds= (one folder of photos per site).")
        img = self.folder.image(i)
        return composite(img, self.alpha(i), self.scenes.scene(site, s, (img.shape[1], img.shape[0])))

    @property
    def deploy_splits(self) -> list[str]:
        """The names of the deployment splits, ``deploy:<site>`` in site order (empty without scenes)."""
        return [] if self.scenes is None else [_DEPLOY_PREFIX + n for n in self.scenes.sites]

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-safe record of how the counterfactuals were made (store it beside the rows; see
        :meth:`fingerprint`): fill, feather, clear margin rule, seed, split design, deployment scenes."""
        return {"fill": self.fill, "feather": self.feather,
                "feather_rule": "sigma = max(1, 0.01 * min(H, W)) px" if self.feather == "auto" else "fixed px",
                "clear": self.clear, "clear_rule": "max(1, ceil(2 sigma)) px" if self.clear == "auto" else "fixed px",
                "seed": self.seed, "test_fraction": self.test_fraction,
                "n_backgrounds": self.n_backgrounds, "variants": list(self.variants),
                "deploy": None if self.scenes is None else self.scenes.settings}

    def fingerprint(self) -> str:
        """SHA-256 (hex) of :attr:`settings` as sorted JSON: equal when the composites are made alike."""
        return sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()

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
        """The variant name of foreground ``i`` on background ``j`` in the crossed split."""
        if self.folder.has_labels:
            ci, cj = int(self._labels[i]), int(self._labels[j])
            if cj == ci:
                return "mixed_same"
            if cj == (ci + 1) % self.num_classes:
                return "mixed_next"
        return "mixed_rand"

    def split(self, name: str) -> CounterfactualDataset:
        """The dataset of split ``name`` (``train``, ``test``, ``variants``, ``crossed`` or ``deploy:<site>``;
        ``stress``, the crossed split's old name, is read as ``crossed`` with a FutureWarning)."""
        name = crossed_split_name(name, "Counterfactuals.split")
        if name not in SPLITS and name not in self.deploy_splits:
            raise DataError(f"Unknown split {name!r} of an image folder's counterfactuals; choose from "
                            f"{list(SPLITS) + self.deploy_splits}.")
        if name == CROSSED_SPLIT and self._crossed_error is not None:
            raise self._crossed_error
        if name == "train" and len(self.train_indices) == 0:
            raise DataError(f"test_fraction={self.test_fraction} leaves no train images in "
                            f"{str(self.folder.root)!r}; lower test_fraction.")
        return CounterfactualDataset(self, name)


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
        elif split == CROSSED_SPLIT:
            self._images = parent.crossed_indices
        else:
            self._images = parent.test_indices
        self.site = parent.deploy_splits.index(split) if split.startswith(_DEPLOY_PREFIX) else -1
        self._per = {"variants": len(parent.variants), CROSSED_SPLIT: len(parent.backgrounds)}.get(split, 1)
        if self.site >= 0:
            assert parent.scenes is not None
            self._per = parent.scenes.n_slots(self.site)
            self.factor_names = None

    def __len__(self) -> int:
        return len(self._images) * self._per

    def locate(self, k: int) -> tuple[int, str, int]:
        """``(image index, variant name, background image index or -1)`` of item ``k``; on a deployment
        split ``(image index, "mixed_rand", scene slot)``."""
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
        if self.site >= 0:
            return i, "mixed_rand", k % self._per
        if self.split == CROSSED_SPLIT:
            j = int(p.backgrounds[k % self._per])
            return i, p.relation(i, j), j
        v = p.variants[k % self._per]
        if v == "only_fg":
            return i, v, -1
        if v in ("original", "no_fg", "only_bg", "composite_self"):
            return i, v, i
        return i, v, p.mixed_partner(i, v)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, v, j = self.locate(k)
        p = self.parent
        arr = p.render_deploy(i, self.site, j) if self.site >= 0 else p.render(i, v, j if j >= 0 else None)
        img = Image.fromarray(arr)
        x = p.transform(img) if p.transform is not None else _to_tensor(img)
        item: dict[str, Any] = {"x": x, "group": i, "background": j, "variant": _CODE[v]}
        labels = p.folder.labels
        if self.site >= 0:
            item["site"] = self.site
        if labels is not None:
            item["label"] = int(labels[i])
            item["background_label"] = int(labels[j]) if j >= 0 and self.site < 0 else -1
        factors = p.folder.factors
        if factors is not None and self.factor_names is not None:
            item["factors"] = factors[j].copy()
        return item
