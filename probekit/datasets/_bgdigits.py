"""Background digits: real handwritten digits on annotated RGB backgrounds (built-in ``"bgdigits"``).

scikit-learn ships 1797 real 8x8 handwritten digits (``load_digits``; nothing is downloaded). Each
digit is upsampled to 16x16 (bilinear) and placed at a random offset (0-8 px in x and y) on a 24x24
RGB canvas. The background is a colour (HSV hue, saturation, brightness) times stripes
``1 + amp * sin(2 pi freq <r, o> + phase)`` with ``r`` the pixel position in image units and
``o = (cos orient, sin orient)``. Its six factors are drawn independently of the digit and stored per
image as ``[hue, sat, bright, orient, freq, amp]`` (orient in degrees, freq in cycles per image).

Composite: ``additive`` (default) ``x = background + 0.8 * digit`` on every channel, i.e. core plus
background as in the feature-contamination paper's model; ``alpha`` draws opaque white strokes over
the background, ``x = (1 - digit) * background + digit``. Values are not clipped.

Background families (docs/EXPERIMENTS.md): ``id`` and ``ood`` are disjoint in hue, brightness,
orientation and frequency at once (saturation and amplitude shared); ``union`` covers both. Single
factor shifts ``ood_hue``, ``ood_bright``, ``ood_texture`` move one factor group out of the ID range.
Hue (period 1) and stripe orientation (period 180 degrees) are circular (``factor_periods``).

Determinism: item ``i`` of a split depends only on ``(seed, split, epoch, i)`` (and the fixed
digit split of ``seed``), so it is the same every time it is read, in any order, in any process.
The foreground (which digit and where) of item ``i`` is shared by ``test_id``, ``test_ood`` and the
single-factor OOD splits, so those rows differ only in background.

``crossed`` is a crossed counterfactual design: every test digit, at its ``test_id`` render-0
position, on the *same* ``n_backgrounds`` union backgrounds (``group`` = the digit's index in
``load_digits``, ``background`` = the background's id 0..n_backgrounds-1, variant ``mixed_rand``).
Its old name ``stress`` (and ``n_stress`` for ``n_backgrounds``) is still read, with a FutureWarning.
``variants`` shows each test digit in the variants of Xiao et al. 2020 that apply here, exactly,
through the digit's mask: ``original`` (its ``test_id`` render 0), ``only_fg`` (the digit on black),
``no_fg`` (that background with the digit's pixels black), ``only_bg`` (the background alone) and
``mixed_rand`` (the digit on the ``test_id`` background of another test digit). Backgrounds are drawn
independently of the digit, so ``mixed_same`` and ``mixed_rand`` do not differ here and only the
latter is offered; there is no ``background_label``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import DataError
from ..vocab import CROSSED_SPLIT, VARIANTS, crossed_split_name
from ._registry import old_n_stress

__all__ = [
    "FACTOR_NAMES",
    "FAMILIES",
    "BackgroundDigits",
    "BackgroundFamily",
    "digit_split",
    "render",
]

FACTOR_NAMES = ["hue", "sat", "bright", "orient", "freq", "amp"]
FACTOR_PERIODS = [1.0, 0.0, 0.0, 180.0, 0.0, 0.0]  # hue wraps at 1, stripe orientation at 180 degrees
VARIANTS_OFFERED = ("original", "only_fg", "no_fg", "only_bg", "mixed_rand")
CANVAS = 24
DIGIT = 16
MAX_OFFSET = CANVAS - DIGIT  # offsets 0..8 inclusive
DIGIT_GAIN = 0.8
N_TEST_DIGITS = 600


@dataclass(frozen=True)
class BackgroundFamily:
    """Uniform ranges ``(low, high)`` of the six background factors."""

    hue: tuple[float, float]
    sat: tuple[float, float]
    bright: tuple[float, float]
    orient: tuple[float, float]
    freq: tuple[float, float]
    amp: tuple[float, float]

    def ranges(self) -> np.ndarray:
        """The ranges as an array of shape (6, 2) in ``FACTOR_NAMES`` order."""
        return np.array([getattr(self, f) for f in FACTOR_NAMES], dtype=np.float64)


_SAT = (0.5, 1.0)
_AMP = (0.1, 0.4)
_ID = dict(hue=(0.0, 0.30), sat=_SAT, bright=(0.25, 0.55), orient=(0.0, 90.0), freq=(1.0, 3.0), amp=_AMP)
_OOD = dict(hue=(0.45, 0.80), sat=_SAT, bright=(0.60, 0.90), orient=(90.0, 180.0), freq=(3.5, 6.0), amp=_AMP)
FAMILIES: dict[str, BackgroundFamily] = {
    "id": BackgroundFamily(**_ID),
    "ood": BackgroundFamily(**_OOD),
    "union": BackgroundFamily(
        hue=(0.0, 1.0), sat=_SAT, bright=(0.2, 0.95), orient=(0.0, 180.0), freq=(1.0, 6.0), amp=_AMP
    ),
    "ood_hue": BackgroundFamily(**{**_ID, "hue": _OOD["hue"]}),
    "ood_bright": BackgroundFamily(**{**_ID, "bright": _OOD["bright"]}),
    "ood_texture": BackgroundFamily(**{**_ID, "orient": _OOD["orient"], "freq": _OOD["freq"]}),
}

# split -> (digit subset, background family, stable integer code for the seed sequence)
_SPLITS: dict[str, tuple[str, str, int]] = {
    "train": ("train", "id", 1),
    "train_union": ("train", "union", 2),
    "train_ood": ("train", "ood", 3),
    "test_id": ("test", "id", 4),
    "test_ood": ("test", "ood", 5),
    "test_union": ("test", "union", 6),
    CROSSED_SPLIT: ("test", "union", 7),
    "variants": ("test", "id", 4),  # the test_id renders, taken apart by the digit's mask
    "test_ood_hue": ("test", "ood_hue", 8),
    "test_ood_bright": ("test", "ood_bright", 9),
    "test_ood_texture": ("test", "ood_texture", 10),
}
SPLITS = tuple(_SPLITS)
_FG_STREAM = 1000  # seed-sequence tag of foreground placement draws

_DIGITS_CACHE: dict[str, Any] = {}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits upsampled to 16x16 in [0, 1] (float32) and their labels; cached."""
    if "images" not in _DIGITS_CACHE:
        import torch
        import torch.nn.functional as F
        from sklearn.datasets import load_digits

        d = load_digits()
        img = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
        up = F.interpolate(img, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False)[:, 0]
        _DIGITS_CACHE["images"] = up.clamp_(0.0, 1.0).numpy()
        _DIGITS_CACHE["labels"] = d.target.astype(np.int64)
    return _DIGITS_CACHE["images"], _DIGITS_CACHE["labels"]


def digit_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``load_digits`` of the training (1197) and test (600) digits, stratified by class."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=N_TEST_DIGITS, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, inputs of shape (n,), output (n, 3)."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack([v, t, p], 1),
            np.stack([q, v, p], 1),
            np.stack([p, v, t], 1),
            np.stack([p, q, v], 1),
            np.stack([t, p, v], 1),
            np.stack([v, p, q], 1),
        ],
        0,
    )  # (6, n, 3)
    return table[i, np.arange(len(h))]


def render(
    digit_images: np.ndarray,
    offsets: np.ndarray,
    factors: np.ndarray,
    phases: np.ndarray,
    composite: Literal["additive", "alpha"] = "additive",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Composite digits onto striped colour backgrounds.

    Parameters
    ----------
    digit_images : ndarray of shape (n, 16, 16)
        Digit intensities in [0, 1].
    offsets : ndarray of shape (n, 2)
        Integer (row, column) offsets in ``0..8``.
    factors : ndarray of shape (n, 6)
        ``[hue, sat, bright, orient (deg), freq (cycles per image), amp]``.
    phases : ndarray of shape (n,)
        Stripe phases in radians.
    composite : {"additive", "alpha"}

    Returns
    -------
    x : ndarray of shape (n, 3, 24, 24), float32
    background : ndarray of shape (n, 3, 24, 24), float32
    digit : ndarray of shape (n, 24, 24), float32
        The digit intensity on the canvas (the foreground).
    """
    n = len(digit_images)
    hue, sat, bright, orient, freq, amp = (factors[:, k] for k in range(6))
    rgb = _hsv_to_rgb(hue, sat, bright)  # (n, 3)
    coords = (np.arange(CANVAS) + 0.5) / CANVAS
    rr, cc = np.meshgrid(coords, coords, indexing="ij")  # row (y), column (x)
    th = np.deg2rad(orient)
    proj = np.cos(th)[:, None, None] * cc[None] + np.sin(th)[:, None, None] * rr[None]
    stripes = 1.0 + amp[:, None, None] * np.sin(2 * math.pi * freq[:, None, None] * proj + phases[:, None, None])
    background = rgb[:, :, None, None] * stripes[:, None]
    digit = np.zeros((n, CANVAS, CANVAS), dtype=np.float64)
    for k in range(n):
        r0, c0 = int(offsets[k, 0]), int(offsets[k, 1])
        digit[k, r0 : r0 + DIGIT, c0 : c0 + DIGIT] = digit_images[k]
    if composite == "additive":
        x = background + DIGIT_GAIN * digit[:, None]
    elif composite == "alpha":
        x = (1.0 - digit[:, None]) * background + digit[:, None]
    else:
        raise DataError(
            f"The 'composite' parameter of bgdigits must be one of {{'additive', 'alpha'}}. Got {composite!r} instead."
        )
    return x.astype(np.float32), background.astype(np.float32), digit.astype(np.float32)


class BackgroundDigits:
    """One split of the background-digits data; items are dicts.

    Parameters
    ----------
    split : str
        ``train`` (training digits, ID backgrounds), ``train_union`` (training digits, union
        backgrounds: the teacher's family), ``train_ood``, ``test_id``, ``test_ood``,
        ``test_union``, ``crossed`` (every test digit on the same ``n_backgrounds`` union
        backgrounds; ``stress`` is its old name), ``variants`` (each test digit in five image
        variants), ``test_ood_hue``, ``test_ood_bright``, ``test_ood_texture`` (single-factor shifts).
    seed : int
        Seeds the stratified 1197/600 digit split and every draw.
    renders : int
        Renders per digit (plain splits): item ``i`` shows digit ``i % n_digits`` in render
        ``i // n_digits``. Each render has its own placement and background.
    epoch : int
        A training loop passes its epoch to get fresh backgrounds and placements each epoch.
    n_backgrounds : int
        Backgrounds on ``crossed`` (shared by every digit).
    n_stress : int, optional
        Deprecated: the old name of ``n_backgrounds`` (a FutureWarning).
    composite : {"additive", "alpha"}
    family : str, optional
        Override the split's background family (one of ``FAMILIES``).
    mask_threshold : float
        A canvas pixel is foreground where the digit intensity exceeds this.

    Items are ``{"x": float32 tensor (3, 24, 24), "label": int, "mask": bool tensor (24, 24)}``
    plus ``"factors"`` (float32 tensor (6,)) on every split but ``variants``, and ``"group"``,
    ``"background"``, ``"variant"`` on ``crossed`` and ``variants``. :meth:`arrays` renders many
    items at once as numpy arrays.
    """

    factor_names = FACTOR_NAMES
    factor_periods = FACTOR_PERIODS

    def __init__(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        renders: int = 1,
        epoch: int = 0,
        n_backgrounds: int = 8,
        composite: Literal["additive", "alpha"] = "additive",
        family: str | None = None,
        mask_threshold: float = 0.05,
        n_stress: int | None = None,
    ) -> None:
        split = crossed_split_name(split, "BackgroundDigits")
        n_backgrounds = old_n_stress(n_stress, n_backgrounds, "BackgroundDigits")
        if split not in _SPLITS:
            raise DataError(f"The bgdigits dataset has no split {split!r}; its splits are {list(SPLITS)}.")
        if composite not in ("additive", "alpha"):
            raise DataError(
                f"The 'composite' parameter of bgdigits must be one of {{'additive', 'alpha'}}. Got {composite!r} instead."
            )
        for name, value in (("renders", renders), ("n_backgrounds", n_backgrounds)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise DataError(f"The {name!r} parameter of bgdigits must be an int >= 1. Got {value!r} instead.")
        subset, fam, code = _SPLITS[split]
        if family is not None:
            if family not in FAMILIES:
                raise DataError(
                    f"The 'family' parameter of bgdigits must be one of {sorted(FAMILIES)}. Got {family!r} instead."
                )
            fam = family
        self.split = split
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.composite = composite
        self.family = fam
        self.mask_threshold = float(mask_threshold)
        self._code = code
        self._subset = subset
        train_idx, test_idx = digit_split(seed)
        self.digit_indices = train_idx if subset == "train" else test_idx
        self.n_digits = len(self.digit_indices)
        self.renders = 1 if split in (CROSSED_SPLIT, "variants") else int(renders)
        # items per digit on the grouped splits: backgrounds (crossed) or variants
        self._per_digit = {CROSSED_SPLIT: int(n_backgrounds), "variants": len(VARIANTS_OFFERED)}.get(split, 1)
        self.n_backgrounds = int(n_backgrounds) if split == CROSSED_SPLIT else 1
        self.has_label = True
        self.has_group = split in (CROSSED_SPLIT, "variants")
        if split == "variants":
            self.factor_names = None  # type: ignore[assignment]  # only_fg rows have no background
            self.factor_periods = None  # type: ignore[assignment]
        _, labels = _digits()
        self.labels = labels[self.digit_indices][self._digit_pos(np.arange(len(self)))]

    def __len__(self) -> int:
        return self.n_digits * (self._per_digit if self.has_group else self.renders)

    def _digit_pos(self, idx: np.ndarray) -> np.ndarray:
        if self.has_group:
            return idx // self._per_digit
        return idx % self.n_digits

    def _render_no(self, idx: np.ndarray) -> np.ndarray:
        if self.has_group:
            return np.zeros_like(idx)
        return idx // self.n_digits

    def _check_index(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for the bgdigits split {self.split!r} of {n} items")
        return np.where(idx < 0, idx + n, idx)

    def _background_key(self, idx: np.ndarray) -> np.ndarray:
        """The item whose background each item shows (its own, but for the grouped splits)."""
        if self.split == CROSSED_SPLIT:
            return idx % self._per_digit  # background b is the same for every digit
        if self.split == "variants":
            pos = self._digit_pos(idx)
            other = np.array([(p + 1 + np.random.default_rng([self.seed, 11, int(p)]).integers(self.n_digits - 1))
                              % self.n_digits for p in pos], dtype=np.int64)
            mixed = idx % self._per_digit == VARIANTS_OFFERED.index("mixed_rand")
            return np.where(mixed, other, pos)  # test_id item p is digit p's render 0
        return idx

    def _draw(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offsets (n, 2), factors (n, 6) and phases (n,) of items ``idx``, each from its own stream."""
        ranges = FAMILIES[self.family].ranges()
        pos, rend = self._digit_pos(idx), self._render_no(idx)
        bkey = self._background_key(idx)
        offsets = np.empty((len(idx), 2), dtype=np.int64)
        factors = np.empty((len(idx), 6), dtype=np.float64)
        phases = np.empty(len(idx), dtype=np.float64)
        fg_tag = 1 if self._subset == "train" else 2
        for k in range(len(idx)):
            fg = np.random.default_rng([self.seed, _FG_STREAM, fg_tag, self.epoch, int(rend[k]), int(pos[k])])
            offsets[k] = fg.integers(0, MAX_OFFSET + 1, size=2)
            bg = np.random.default_rng([self.seed, self._code, self.epoch, int(bkey[k])])
            u = bg.uniform(size=7)
            factors[k] = ranges[:, 0] + u[:6] * (ranges[:, 1] - ranges[:, 0])
            phases[k] = 2 * math.pi * u[6]
        return offsets, factors, phases

    def arrays(self, idx: Sequence[int] | np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Render items ``idx`` (default: all) at once.

        Returns a dict of numpy arrays: ``x`` (n, 3, 24, 24) float32, ``label`` (n,), ``factors``
        (n, 6) float32 (not on ``variants``), ``mask`` (n, 24, 24) bool, ``background``
        (n, 3, 24, 24), ``digit`` (n, 24, 24), ``index`` (n,), and on ``crossed`` / ``variants``
        ``group`` (n,), ``background_id`` (n,) and ``variant`` (n,) codes of ``VARIANTS``.
        """

        idx = np.arange(len(self)) if idx is None else self._check_index(idx)
        images, _ = _digits()
        offsets, factors, phases = self._draw(idx)
        digit_ids = self.digit_indices[self._digit_pos(idx)]
        x, background, digit = render(images[digit_ids], offsets, factors, phases, self.composite)
        mask = digit > self.mask_threshold
        out = {"x": x, "label": self.labels[idx], "factors": factors.astype(np.float32), "mask": mask,
               "background": background, "digit": digit, "index": idx}
        if self.split == CROSSED_SPLIT:
            out["group"] = digit_ids.astype(np.int64)
            out["background_id"] = self._background_key(idx)
            out["variant"] = np.full(len(idx), VARIANTS.index("mixed_rand"), dtype=np.int64)
        elif self.split == "variants":
            names = np.array(VARIANTS_OFFERED)[idx % self._per_digit]
            only_fg = (DIGIT_GAIN * digit if self.composite == "additive" else digit)[:, None].repeat(3, axis=1)
            no_fg = background * ~mask[:, None]
            pick = {"only_fg": only_fg, "no_fg": no_fg, "only_bg": background}
            for name, img in pick.items():
                sel = names == name
                x[sel] = img[sel]
            background_id = self.digit_indices[self._background_key(idx)].astype(np.int64)
            out["x"] = x
            out["group"] = digit_ids.astype(np.int64)
            out["background_id"] = np.where(names == "only_fg", -1, background_id)
            out["variant"] = np.array([VARIANTS.index(v) for v in names], dtype=np.int64)
            del out["factors"]
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        a = self.arrays([i])
        item: dict[str, Any] = {
            "x": torch.from_numpy(a["x"][0]),
            "label": int(a["label"][0]),
            "mask": torch.from_numpy(a["mask"][0]),
        }
        if "factors" in a:
            item["factors"] = torch.from_numpy(a["factors"][0])
        if "group" in a:
            item["group"] = int(a["group"][0])
            item["background"] = int(a["background_id"][0])
            item["variant"] = int(a["variant"][0])
        return item

    def __repr__(self) -> str:
        return (
            f"BackgroundDigits(split={self.split!r}, seed={self.seed}, n={len(self)}, family={self.family!r}, "
            f"composite={self.composite!r}, epoch={self.epoch})"
        )
