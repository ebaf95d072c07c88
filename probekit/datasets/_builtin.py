"""Registers the built-in datasets (imported lazily by the registry on first use)."""

from __future__ import annotations

from ._bgdigits import SPLITS as _BGD_SPLITS
from ._bgdigits import BackgroundDigits
from ._registry import register_dataset
from ._shapes import Shapes
from ._synthetic import StructuredDataset, XORDataset

register_dataset("bgdigits", BackgroundDigits, splits=_BGD_SPLITS, default_splits=("train", "test_id", "test_ood", "crossed", "variants"), description="sklearn handwritten digits on annotated RGB backgrounds (hue, sat, bright, orient, freq, amp); ID/OOD families disjoint; crossed = every test digit on the same 8 broad backgrounds; variants = each test digit as original, only_fg, no_fg, only_bg, mixed_rand")
register_dataset("structured", StructuredDataset, splits=StructuredDataset.splits, default_splits=("train", "test_id", "test_ood", "crossed"), description="structured feature model x = [x_core, x_bg] V (Zhang et al. 2024); OOD flips the background; crossed = each test core on 8 backgrounds of its own (grouped); factors = x_bg")
register_dataset("xor", XORDataset, splits=XORDataset.splits, description="XOR-like clusters (Tsoy & Konstantinov 2024); kind='sym' or 'skew' (alpha)")
register_dataset("shapes", Shapes, splits=("train", "test", "crossed", "variants"), description="generated circles, squares, triangles on coloured backgrounds with exact masks; background='class' colours training backgrounds by class (a shortcut), 'random' does not; crossed = every test shape on the same 9 backgrounds; variants = Xiao et al. 2020 variants")
