"""Image folders with a foreground per image: masks, boxes, or an approximate GrabCut segmentation.

:class:`ForegroundFolder` reads ``DIR/<class>/<image>`` (class folders sorted -> label ids 0..K-1,
sub-folders inside a class folder included) or a flat ``DIR/<image>`` (no labels). The foreground of
each image comes from exactly one of

- ``masks=DIR2``: a mask file at the same relative path as the image, any image format and extension
  (``cat/001.jpg`` -> ``DIR2/cat/001.png``); a pixel is foreground where any colour channel exceeds
  ``mask_threshold`` (default 0, i.e. non-zero; 127 for JPEG masks, whose compression noise would
  otherwise count as foreground); an alpha channel is ignored;
- ``boxes=CSV``: rows ``path,x0,y0,x1,y1`` (an optional header line of these names), ``path``
  relative to DIR, pixel coordinates with ``x0, y0`` inclusive and ``x1, y1`` exclusive
  (``0 <= x0 < x1 <= width``), several rows of one image are united; every image needs a row;
- ``foreground="auto"``: OpenCV's GrabCut (``pip install opencv-python-headless``), seeded by the
  image's box when ``boxes`` is given, else by a centred box covering the middle ``auto_box`` (60 %)
  of each side. It is approximate: computed per image when first read (about 0.2 s for a 256 x 256
  image on one CPU core; images larger than 320 px on a side are segmented at 320 px and the mask
  scaled back), and where GrabCut returns an empty or all-foreground mask the seed box is used.

``mask_adjust=k`` grows every mask by ``k`` pixels (Euclidean: every pixel within distance ``k`` of the
foreground) or, negative, shrinks it by ``|k|`` (every foreground pixel within ``|k|`` of a background
pixel is dropped; the image border does not count as background), so that an audit can show how much
its figures move with the masks. ``factors=CSV`` (header ``path,<factor>,...``, one numeric column
per factor, one row per image) gives per-image factors.

Everything that can be checked is checked in the constructor, before a caller writes anything: each
image is opened and (``verify="decode"``, the default) decoded once; each mask is decoded and compared
in size with its image, and must be neither empty nor all foreground after ``mask_adjust``; boxes lie
inside their image. Errors are :class:`~probekit.errors.DataError` with one line naming the file and
the fix. Nothing is kept in memory but paths, labels, sizes, boxes and factors: images and masks are
read again when an item asks for them.

At the top of DIR, files that are not images (a CSV, a README) are ignored; inside a class folder
such a file is an error, as are images beside class folders. Hidden files (``.name``) are skipped;
files in the masks folder that are not images are ignored. EXIF orientation is not applied: masks and
boxes refer to the stored pixels.
"""

from __future__ import annotations

import csv
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, short_path

__all__ = ["ForegroundFolder", "adjust_mask", "image_extensions", "require_cv2"]


#: bytes each of the datasets' caches (decoded images, masks, fill regions, filled backgrounds, feathered
#: masks) holds at most, by default. A folder of small images is then decoded, segmented and filled once per
#: process however a split orders its rows (1,000 images at 32 px: a few MB per cache); with large images
#: the most recently used are kept. Bounded in bytes, not entries: a count that suits 32 px images (the
#: old 8 / 16 entries missed on every mixed background of a 1,000-image folder: each image was filled twice
#: and its mask read about 11 times over the crossed and variants splits) would hold gigabytes at 1,024 px.
CACHE_BYTES = 64 * 2**20


def _nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", 0)) or 64


class _LRU:
    """Arrays kept least recently used, bounded in bytes and optionally in entries (``max_items``).

    Thread-safe: the extraction pipeline may read one dataset from several threads. A pickled copy (a
    DataLoader worker started by ``spawn``) starts empty with the same bounds.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES, max_items: int | None = None) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.max_items = None if max_items is None else max(0, int(max_items))
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_bytes": self.max_bytes, "max_items": self.max_items}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"], state["max_items"])

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def get(self, key: Any) -> Any:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        """Keep ``value`` under ``key``, dropping the least recently used beyond the bounds (a value larger
        than the whole byte bound is not kept)."""
        n = _nbytes(value)
        if n > self.max_bytes or self.max_items == 0:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= _nbytes(old)
            self._data[key] = value
            self._bytes += n
            while self._bytes > self.max_bytes or (self.max_items is not None and len(self._data) > self.max_items):
                _, dropped = self._data.popitem(last=False)
                self._bytes -= _nbytes(dropped)


_AUTO_MAX_SIDE = 320
_LOSSY_MASK_FORMATS = ("JPEG", "MPO")
_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def image_extensions() -> frozenset[str]:
    """File extensions (lower case, with the dot) that Pillow can open."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def require_cv2(purpose: str) -> Any:
    """Import OpenCV, or raise a one-line :class:`DataError` naming the package to install."""
    try:
        import cv2
    except ImportError as e:
        raise DataError(
            f"{purpose} needs OpenCV, which is not installed; run `pip install 'probekit-audit[images]'` (or "
            "`pip install opencv-python-headless`), or give the foreground as masks= or boxes=."
        ) from e
    return cv2


def adjust_mask(mask: np.ndarray, k: int) -> np.ndarray:
    """Grow a boolean mask by ``k`` pixels (``k > 0``) or shrink it by ``-k`` (``k < 0``).

    Growing keeps every pixel whose Euclidean distance to the nearest foreground pixel is at most
    ``k``; shrinking drops every foreground pixel whose distance to the nearest background pixel is at
    most ``-k`` (pixels outside the image are not background).
    """
    mask = np.asarray(mask, dtype=bool)
    k = int(k)
    if k == 0:
        return mask
    from scipy.ndimage import distance_transform_edt

    if k > 0:
        if not mask.any():
            return mask
        return distance_transform_edt(~mask) <= k
    if mask.all():
        return mask
    return distance_transform_edt(mask) > -k


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk(top: Path, root: Path) -> Any:
    """``os.walk(top, followlinks=True)``, refusing a folder that links to itself or a folder above it
    (a loop, which would otherwise nest until the path is too long)."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        here = os.path.realpath(dirpath)
        for d in dirnames:
            target = os.path.realpath(os.path.join(dirpath, d))
            if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                raise DataError(f"{_rel(Path(dirpath) / d, root)!r} in {short_path(root)!r} is a symbolic link "
                                "to a folder above it (a loop); remove the link or point it elsewhere.")
        yield dirpath, dirnames, filenames


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _stem_key(rel: str) -> str:
    p = PurePosixPath(rel)
    return str(p.with_suffix("")) if p.suffix else str(p)


def _normalise_csv_path(text: str) -> str:
    p = PurePosixPath(text.strip().replace("\\", "/"))
    parts = [s for s in p.parts if s not in (".", "")]
    return "/".join(parts)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array of a PIL image of any mode.

    16-bit and 32-bit grayscale (PIL modes ``I;16*`` and ``I``, e.g. 16-bit PNGs) are scaled by their
    bit depth (65535 -> 255); PIL's own RGB conversion clips them to 255, which turned a 16-bit image
    almost white. Floating-point images (``F``) are taken as [0, 1] when they lie there, else clipped.
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(a.max())
        g = np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        g = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


class ForegroundFolder:
    """An image folder with a foreground mask per image (see the module docstring for the layout).

    Parameters
    ----------
    root : str or PathLike
        ``DIR/<class>/<image>`` or a flat ``DIR/<image>``.
    masks : str or PathLike, optional
        Folder of masks at the images' relative paths (any image extension).
    boxes : str or PathLike, optional
        CSV of ``path,x0,y0,x1,y1`` in pixels (``x1``, ``y1`` exclusive), paths relative to ``root``.
    foreground : {"auto"}, optional
        GrabCut (OpenCV) seeded by ``boxes`` or by the centred ``auto_box`` box.
    factors : str or PathLike, optional
        CSV ``path,<factor1>,...`` with one numeric column per factor.
    mask_adjust : int, default 0
        Grow (> 0) or shrink (< 0) every mask by this many pixels.
    mask_threshold : int, optional
        A mask pixel is foreground where a channel exceeds it (default 0; 127 for JPEG masks).
    auto_box : float, default 0.6
        Side fraction of the centred seed box of ``foreground="auto"`` without boxes.
    verify : {"decode", "header"}, default "decode"
        ``decode`` decodes every image once in the constructor (a truncated file is caught before any
        work); ``header`` only opens it (faster on large folders; a damaged file then fails when read).
    cache_size : int, optional
        Decoded images and masks kept (least recently used), at most; by default bounded by
        ``cache_bytes`` only.
    cache_bytes : int, default :data:`CACHE_BYTES` (64 MiB)
        Bytes of decoded images, and apart of masks, kept at most.

    Attributes
    ----------
    paths : list of str
        Relative paths (POSIX), in item order: by class, then by path.
    labels : numpy.ndarray of int64 or None
        Class ids (None for a flat folder).
    classes : list of str
        Class folder names (empty for a flat folder).
    sizes : numpy.ndarray (N, 2) of int
        ``(width, height)`` of each image.
    factors : numpy.ndarray (N, F) of float32 or None
    factor_names : list of str or None
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        masks: str | os.PathLike | None = None,
        boxes: str | os.PathLike | None = None,
        foreground: Literal["auto"] | None = None,
        factors: str | os.PathLike | None = None,
        mask_adjust: int = 0,
        mask_threshold: int | None = None,
        auto_box: float = 0.6,
        verify: Literal["decode", "header"] = "decode",
        cache_size: int | None = None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.root = Path(root)
        if foreground not in (None, "auto"):
            raise DataError(f"foreground={foreground!r} is not supported; use foreground='auto' or give "
                            "masks= or boxes=.")
        if masks is not None and (boxes is not None or foreground is not None):
            raise DataError("Give the foreground as exactly one of masks=, boxes= or foreground='auto' "
                            "(foreground='auto' may be seeded by boxes=); masks= was given with another.")
        if masks is None and boxes is None and foreground is None:
            raise DataError(f"No foreground for the images of {str(self.root)!r}: give masks=DIR, "
                            "boxes=CSV or foreground='auto'.")
        if verify not in ("decode", "header"):
            raise DataError(f"verify={verify!r} is not one of 'decode', 'header'.")
        if not 0 < float(auto_box) < 1:
            raise DataError(f"auto_box={auto_box!r} must lie strictly between 0 and 1 (a centred box's "
                            "side fraction); the default is 0.6.")
        self.mode = "masks" if masks is not None else ("auto" if foreground == "auto" else "boxes")
        if self.mode == "auto":
            require_cv2("foreground='auto' (GrabCut)")
        self.mask_adjust = int(mask_adjust)
        self.mask_threshold = None if mask_threshold is None else int(mask_threshold)
        self.auto_box = float(auto_box)
        self.cache_size = None if cache_size is None else max(0, int(cache_size))
        self.cache_bytes = max(0, int(cache_bytes))
        self._images = _LRU(self.cache_bytes, self.cache_size)
        self._masks = _LRU(self.cache_bytes, self.cache_size)

        self.classes, self.paths, labels = self._scan()
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self._index = {p: i for i, p in enumerate(self.paths)}
        self.sizes = np.zeros((len(self.paths), 2), dtype=np.int64)
        for i in range(len(self.paths)):
            self.sizes[i] = self._check_image(i, verify)

        self.masks_dir = Path(masks) if masks is not None else None
        self._mask_files: list[str] | None = None
        self.boxes: dict[int, list[tuple[int, int, int, int]]] | None = None
        if boxes is not None:
            self.boxes = self._read_boxes(Path(boxes))
        if self.masks_dir is not None:
            self._mask_files = self._match_masks(self.masks_dir)
            for i in range(len(self.paths)):
                self._check_mask(i, self._read_mask_file(i))
        elif self.mode == "boxes":
            for i in range(len(self.paths)):
                self._check_mask(i, self._box_mask(i))
        elif self.boxes is not None:  # GrabCut seeds: each box must leave background to learn from
            for i in range(len(self.paths)):
                w, h = (int(v) for v in self.sizes[i])
                if any(b == (0, 0, w, h) for b in self.boxes[i]):
                    raise DataError(f"A box of {str(self.root / self.paths[i])!r} in {str(boxes)!r} covers the "
                                    "whole image, so GrabCut has no background to learn from; give a tighter box.")
        self.factor_names: list[str] | None = None
        self.factors: np.ndarray | None = None
        if factors is not None:
            self.factor_names, self.factors = self._read_factors(Path(factors))

    # ----------------------------------------------------------------------------------- scanning
    def _scan(self) -> tuple[list[str], list[str], list[int] | None]:
        root = self.root
        if not root.is_dir():
            raise DataError(f"The image folder {str(root)!r} does not exist or is not a folder; give a folder "
                            "of class sub-folders holding images.")
        exts = image_extensions()
        entries = sorted((e for e in os.scandir(root) if not _is_hidden(e.name)), key=lambda e: e.name)
        dirs = [e for e in entries if e.is_dir()]
        top_images = [e for e in entries if e.is_file() and Path(e.name).suffix.lower() in exts]
        if not dirs:
            if not top_images:
                raise DataError(f"The image folder {str(root)!r} holds no images; put images in it (flat) "
                                "or in one sub-folder per class.")
            return [], [e.name for e in sorted(top_images, key=lambda e: e.name)], None
        if top_images:
            raise DataError(f"The image {str(Path(top_images[0].path))!r} lies beside class folders in "
                            f"{str(root)!r}; move it into its class folder.")
        classes = sorted(e.name for e in dirs)
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found: list[str] = []
            for dirpath, dirnames, filenames in _walk(root / name, root):
                dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
                for fn in sorted(filenames):
                    if _is_hidden(fn):
                        continue
                    full = Path(dirpath) / fn
                    if full.suffix.lower() not in exts:
                        raise DataError(f"The file {str(full)!r} in the class folder {name!r} is not an image "
                                        f"(extension {full.suffix or 'none'!r}); remove it or move it out "
                                        "of the image folder.")
                    found.append(_rel(full, root))
            if not found:
                raise DataError(f"The class folder {str(root / name)!r} holds no images; add images or remove "
                                "the folder.")
            found.sort()
            paths.extend(found)
            labels.extend([label] * len(found))
        return classes, paths, labels

    def _check_image(self, i: int, verify: str) -> tuple[int, int]:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as im:
                size = im.size
                if verify == "decode":
                    if im.format == "JPEG":
                        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                    im.load()
        except _READ_ERRORS as e:
            raise DataError(f"Cannot read the image {str(path)!r} ({type(e).__name__}: {_short(e)}); replace "
                            "or remove the file.") from e
        if size[0] < 2 or size[1] < 2:
            raise DataError(f"The image {str(path)!r} is {size[0]}x{size[1]} pixels; images need at least 2x2.")
        return size

    # ----------------------------------------------------------------------------------- masks
    def _match_masks(self, mdir: Path) -> list[str]:
        if not mdir.is_dir():
            raise DataError(f"The masks folder {str(mdir)!r} does not exist; give the folder holding one mask "
                            "per image at the image's relative path.")
        exts = image_extensions()
        by_stem: dict[str, str] = {}
        for dirpath, dirnames, filenames in _walk(mdir, mdir):
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            for fn in filenames:
                if _is_hidden(fn) or Path(fn).suffix.lower() not in exts:
                    continue
                rel = _rel(Path(dirpath) / fn, mdir)
                key = _stem_key(rel)
                if key in by_stem:
                    raise DataError(f"Two masks in {str(mdir)!r} share the name {key!r} ({by_stem[key]!r} and "
                                    f"{rel!r}); keep one mask per image.")
                by_stem[key] = rel
        stems: dict[str, str] = {}
        out = []
        for rel in self.paths:
            key = _stem_key(rel)
            if key in stems:
                raise DataError(f"The images {stems[key]!r} and {rel!r} in {str(self.root)!r} differ only in "
                                "extension, so their masks cannot be told apart; rename one.")
            stems[key] = rel
            if key not in by_stem:
                raise DataError(f"The image {str(self.root / rel)!r} has no mask in {str(mdir)!r} (looked for "
                                f"{key}.<ext>); add its mask or remove the image.")
            out.append(by_stem[key])
        return out

    def _read_mask_file(self, i: int) -> np.ndarray:
        assert self._mask_files is not None and self.masks_dir is not None
        path = self.masks_dir / self._mask_files[i]
        try:
            with Image.open(path) as im:
                fmt = im.format
                if im.mode in ("RGBA", "LA", "PA"):
                    im = im.convert(im.mode[:-1] if im.mode != "PA" else "P")
                arr = np.asarray(im)
        except _READ_ERRORS as e:
            raise DataError(f"Cannot read the mask {str(path)!r} ({type(e).__name__}: {_short(e)}); replace "
                            "the file.") from e
        thr = self.mask_threshold
        if thr is None:
            thr = 127 if fmt in _LOSSY_MASK_FORMATS else 0
        m = arr > thr
        if m.ndim == 3:
            m = m.any(axis=2)
        w, h = (int(v) for v in self.sizes[i])
        if m.shape != (h, w):
            raise DataError(f"The mask {str(path)!r} is {m.shape[1]}x{m.shape[0]} pixels but its image "
                            f"{self.paths[i]!r} is {w}x{h}; save the mask at the image's size.")
        return m

    def _box_mask(self, i: int) -> np.ndarray:
        assert self.boxes is not None
        w, h = (int(v) for v in self.sizes[i])
        m = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in self.boxes[i]:
            m[y0:y1, x0:x1] = True
        return m

    def _check_mask(self, i: int, m: np.ndarray) -> None:
        what = (f"the mask {str(self.masks_dir / self._mask_files[i])!r}" if self._mask_files is not None  # type: ignore[operator]
                else f"the box(es) of {str(self.root / self.paths[i])!r}")
        if not m.any():
            raise DataError(f"{_cap(what)} is empty (no foreground pixel); draw the object or remove the image.")
        if m.all():
            raise DataError(f"{_cap(what)} covers the whole image, leaving no background; fix the mask or "
                            "remove the image.")
        if self.mask_adjust:
            a = adjust_mask(m, self.mask_adjust)
            if not a.any() or a.all():
                raise DataError(f"With mask_adjust={self.mask_adjust}, {what} becomes "
                                f"{'empty' if not a.any() else 'the whole image'}; use a smaller |mask_adjust|.")

    def _read_boxes(self, path: Path) -> dict[int, list[tuple[int, int, int, int]]]:
        boxes: dict[int, list[tuple[int, int, int, int]]] = {}
        for lineno, row in _csv_rows(path):
            if lineno == 1 and [c.strip().lower() for c in row] == ["path", "x0", "y0", "x1", "y1"]:
                continue
            if len(row) != 5:
                raise DataError(f"Line {lineno} of the boxes file {str(path)!r} has {len(row)} fields; each row "
                                "is path,x0,y0,x1,y1 (pixels).")
            i = self._csv_image(path, lineno, row[0])
            try:
                x0, y0, x1, y1 = (_to_int(v) for v in row[1:])
            except ValueError:
                raise DataError(f"Line {lineno} of the boxes file {str(path)!r} has a non-numeric coordinate "
                                f"({','.join(row[1:])}); give x0,y0,x1,y1 as pixel numbers.") from None
            w, h = (int(v) for v in self.sizes[i])
            if not (x0 < x1 and y0 < y1):
                raise DataError(f"Line {lineno} of the boxes file {str(path)!r} has an empty box "
                                f"({x0},{y0},{x1},{y1}); it needs x0 < x1 and y0 < y1 (x1, y1 exclusive).")
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise DataError(f"Line {lineno} of the boxes file {str(path)!r}: the box ({x0},{y0},{x1},{y1}) "
                                f"leaves the {w}x{h} image {row[0].strip()!r}; keep 0 <= x0 < x1 <= {w} and "
                                f"0 <= y0 < y1 <= {h}.")
            boxes.setdefault(i, []).append((x0, y0, x1, y1))
        for i, rel in enumerate(self.paths):
            if i not in boxes:
                raise DataError(f"The image {str(self.root / rel)!r} has no row in the boxes file {str(path)!r}; "
                                "add a row path,x0,y0,x1,y1 for it or remove the image.")
        return boxes

    def _read_factors(self, path: Path) -> tuple[list[str], np.ndarray]:
        rows = list(_csv_rows(path))
        if not rows:
            raise DataError(f"The factors file {str(path)!r} is empty; its first line is path,<factor>,...")
        header = [c.strip() for c in rows[0][1]]
        if len(header) < 2 or header[0].lower() != "path":
            raise DataError(f"The factors file {str(path)!r} must start with a header line path,<factor>,... "
                            f"(got {','.join(header)!r}).")
        names = header[1:]
        out = np.full((len(self.paths), len(names)), np.nan, dtype=np.float32)
        seen = np.zeros(len(self.paths), dtype=bool)
        for lineno, row in rows[1:]:
            if len(row) != len(header):
                raise DataError(f"Line {lineno} of the factors file {str(path)!r} has {len(row)} fields but the "
                                f"header has {len(header)}; give one value per factor.")
            i = self._csv_image(path, lineno, row[0])
            if seen[i]:
                raise DataError(f"Line {lineno} of the factors file {str(path)!r} repeats the image {row[0]!r}; "
                                "keep one row per image.")
            for j, v in enumerate(row[1:]):
                try:
                    val = float(v)
                except ValueError:
                    raise DataError(f"The factor column {names[j]!r} of {str(path)!r} is not numeric (line "
                                    f"{lineno}: {v.strip()!r}); encode it as numbers (e.g. one-hot or "
                                    "category ids).") from None
                if not math.isfinite(val):
                    raise DataError(f"The factor column {names[j]!r} of {str(path)!r} has {v.strip()!r} on line "
                                    f"{lineno}; give a finite number.")
                out[i, j] = val
            seen[i] = True
        if not seen.all():
            miss = self.paths[int(np.flatnonzero(~seen)[0])]
            raise DataError(f"The image {str(self.root / miss)!r} has no row in the factors file {str(path)!r}; "
                            "add one or remove the image.")
        return names, out

    def _csv_image(self, path: Path, lineno: int, text: str) -> int:
        rel = _normalise_csv_path(text)
        i = self._index.get(rel)
        if i is None:
            raise DataError(f"Line {lineno} of {str(path)!r} names {text.strip()!r}, which is not an image in "
                            f"{str(self.root)!r}; give paths relative to that folder (e.g. {self.paths[0]!r}).")
        return i

    # ----------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as an (H, W, 3) uint8 RGB array (read from disk unless cached)."""
        i = int(i)
        hit = self._images.get(i)
        if hit is not None:
            return hit
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as im:
                arr = to_rgb8(im)
        except _READ_ERRORS as e:
            raise DataError(f"Cannot read the image {str(path)!r} ({type(e).__name__}: {_short(e)}); it may "
                            "have changed since the folder was opened; replace or remove it.") from e
        w, h = (int(v) for v in self.sizes[i])
        if arr.shape[:2] != (h, w):
            raise DataError(f"The image {str(path)!r} changed size since the folder was opened; open it again.")
        self._images.put(i, arr)
        return arr

    def mask(self, i: int) -> np.ndarray:
        """Foreground of image ``i`` as an (H, W) bool array, after ``mask_adjust``."""
        i = int(i)
        hit = self._masks.get(i)
        if hit is not None:
            return hit
        if self.mode == "masks":
            m = self._read_mask_file(i)
        elif self.mode == "boxes":
            m = self._box_mask(i)
        else:
            m = self._auto_mask(i)
        m = adjust_mask(m, self.mask_adjust)
        if self.mode == "auto" and (not m.any() or m.all()):
            m = self._seed_mask(i)
        m.setflags(write=False)
        self._masks.put(i, m)
        return m

    def _seed_box(self, i: int) -> list[tuple[int, int, int, int]]:
        if self.boxes is not None:
            return self.boxes[i]
        w, h = (int(v) for v in self.sizes[i])
        bw, bh = max(1, round(w * self.auto_box)), max(1, round(h * self.auto_box))
        x0, y0 = (w - bw) // 2, (h - bh) // 2
        return [(x0, y0, x0 + bw, y0 + bh)]

    def _seed_mask(self, i: int) -> np.ndarray:
        w, h = (int(v) for v in self.sizes[i])
        m = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in self._seed_box(i):
            m[y0:y1, x0:x1] = True
        return m

    def _auto_mask(self, i: int) -> np.ndarray:
        cv2 = require_cv2("foreground='auto' (GrabCut)")
        img = self.image(i)
        h, w = img.shape[:2]
        scale = min(1.0, _AUTO_MAX_SIDE / max(h, w))
        small = img
        if scale < 1.0:
            small = np.asarray(Image.fromarray(img).resize((max(2, round(w * scale)), max(2, round(h * scale))),
                                                           Image.BILINEAR))
        sh, sw = small.shape[:2]
        out = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in self._seed_box(i):
            rx0, ry0 = int(x0 * sw / w), int(y0 * sh / h)
            rx1, ry1 = max(rx0 + 1, math.ceil(x1 * sw / w)), max(ry0 + 1, math.ceil(y1 * sh / h))
            if rx0 == 0 and ry0 == 0 and rx1 >= sw and ry1 >= sh:
                raise DataError(f"The box of {str(self.root / self.paths[i])!r} covers the whole image, so "
                                "GrabCut has no background to learn from; give a tighter box.")
            gc = np.zeros((sh, sw), dtype=np.uint8)
            bgd = np.zeros((1, 65), dtype=np.float64)
            fgd = np.zeros((1, 65), dtype=np.float64)
            cv2.setRNGSeed(0)
            try:
                cv2.grabCut(np.ascontiguousarray(small[:, :, ::-1]), gc, (rx0, ry0, rx1 - rx0, ry1 - ry0),
                            bgd, fgd, 5, cv2.GC_INIT_WITH_RECT)
                fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
            except cv2.error:
                fg = np.zeros((sh, sw), dtype=bool)
                fg[ry0:ry1, rx0:rx1] = True
            if scale < 1.0:
                fg = np.asarray(Image.fromarray(fg.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
            out |= fg
        if not out.any() or out.all():
            return self._seed_mask(i)
        return out


def _to_int(v: str) -> int:
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(v)
    return round(f)


def _csv_rows(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if not row or all(not c.strip() for c in row):
                    continue
                yield lineno, row
    except FileNotFoundError:
        raise DataError(f"The CSV file {str(path)!r} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"Cannot read the CSV file {str(path)!r} ({type(e).__name__}: {_short(e)}); save it as "
                        "UTF-8 comma-separated text.") from None


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:160]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]
