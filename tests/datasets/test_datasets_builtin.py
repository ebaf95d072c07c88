"""Built-in data: the structured feature model, XOR clusters and background digits.

Oracles: linear algebra on the known mixing matrix, scipy statistical tests for independence,
PIL's bilinear resize and matplotlib's HSV conversion for the digit renderer, and the planted
generation rules (cluster centres, factor ranges, shared foregrounds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from probekit.datasets._bgdigits import FACTOR_NAMES, FAMILIES, BackgroundDigits, _hsv_to_rgb, digit_split
from probekit.datasets._synthetic import (
    StructuredDataset,
    XORDataset,
    gen_skew_data,
    gen_sym_data,
    make_structured,
    structured_basis,
    xor_axes,
)
from probekit.errors import DataError

# ----------------------------------------------------------------------------------------------
# structured feature model


def test_basis_has_orthonormal_rows() -> None:
    V = structured_basis(32, 32, 256, seed=3)
    assert V.shape == (64, 256)
    np.testing.assert_allclose(V @ V.T, np.eye(64), atol=1e-10)


def test_basis_rejects_too_small_input_dimension() -> None:
    with pytest.raises(DataError, match="'d' parameter of structured_basis"):
        structured_basis(32, 32, 40)


@pytest.mark.parametrize("nonlinear", [True, False])
def test_structured_inputs_decompose_into_planted_features(nonlinear: bool) -> None:
    data = make_structured(400, nonlinear=nonlinear, seed=1)
    # V has orthonormal rows, so X V^T recovers the feature coordinates exactly.
    feats = data.X @ data.V.T
    np.testing.assert_allclose(feats[:, :32], data.x_core, atol=1e-10)
    np.testing.assert_allclose(feats[:, 32:], data.x_bg, atol=1e-10)
    np.testing.assert_allclose(data.X @ data.core_basis.T, data.x_core, atol=1e-10)
    np.testing.assert_allclose(data.X @ data.bg_basis.T, data.x_bg, atol=1e-10)
    assert sorted(np.unique(data.y)) == [-1, 1] and (data.y == 1).sum() == 200
    if nonlinear:
        radius = np.linalg.norm(data.x_core, axis=1)
        np.testing.assert_allclose(radius, np.where(data.y > 0, 1.0, 2.0), atol=1e-12)
    else:
        assert np.all(np.sign(data.x_core) == data.y[:, None])


def test_structured_ood_keeps_core_and_label_and_flips_background() -> None:
    data = make_structured(300, seed=2)
    np.testing.assert_allclose(data.X_ood @ data.core_basis.T, data.x_core, atol=1e-10)
    bg_ood = data.X_ood @ data.bg_basis.T
    assert np.all(bg_ood <= 1e-12) and np.all(bg_ood >= -1 - 1e-12)
    assert np.all((data.x_bg >= 0) & (data.x_bg <= 1))
    # the ID - OOD difference lies entirely in the background subspace
    diff = data.X - data.X_ood
    resid = diff - (diff @ data.bg_basis.T) @ data.bg_basis
    assert np.abs(resid).max() < 1e-10


def test_structured_background_is_independent_of_label() -> None:
    data = make_structured(20000, seed=4)
    pos, neg = data.x_bg[data.y > 0], data.x_bg[data.y < 0]
    p_t = stats.ttest_ind(pos, neg, axis=0).pvalue
    p_ks = [stats.ks_2samp(pos[:, j], neg[:, j]).pvalue for j in range(0, 32, 4)]
    # Bonferroni over the coordinates: a real dependence would push some p-value far below this.
    assert p_t.min() > 1e-4 and min(p_ks) > 1e-4
    assert stats.kstest(data.x_bg[:, 0], "uniform").pvalue > 1e-4


def test_structured_dataset_splits_share_cores() -> None:
    tid = StructuredDataset("test_id", n=200, seed=5)
    tood = StructuredDataset("test_ood", n=200, seed=5)
    crossed = StructuredDataset("crossed", n=200, seed=5, n_backgrounds=4)
    train = StructuredDataset("train", n=200, seed=5)
    C = tid.core_basis
    np.testing.assert_allclose(tid.X @ C.T, tood.X @ C.T, atol=1e-5)
    np.testing.assert_array_equal(tid.labels, tood.labels)
    assert not np.allclose(train.X @ C.T, tid.X @ C.T)  # independent draws
    # crossed: 4 rows per test core, same core, same label, different backgrounds
    assert len(crossed) == 800 and crossed.has_group
    core = crossed.X @ C.T
    np.testing.assert_allclose(core[crossed.group == 7], np.repeat(tid.X[7:8] @ C.T, 4, 0), atol=1e-5)
    assert np.all(crossed.labels[crossed.group == 7] == tid.labels[7])
    np.testing.assert_allclose(crossed.X @ crossed.bg_basis.T, crossed.factors, atol=1e-5)
    item = crossed[3]
    assert set(item) == {"x", "label", "factors", "group"} and item["x"].dtype == torch.float32
    assert item["label"] in (0, 1) and tuple(item["factors"].shape) == (32,)


# ----------------------------------------------------------------------------------------------
# XOR


def test_sym_xor_cluster_geometry() -> None:
    X, y = gen_sym_data(256, 2, mu=1.0, delta=0.01, sigma=0.005, seed=100)
    assert X.shape[1] == 2 and len(X) % 16 == 0
    for label, centres in ((0, [(1.0, 0.0), (-1.0, 0.0)]), (1, [(0.0, 1.0), (0.0, -1.0)])):
        pts, centres = X[y == label], np.array(centres)
        dist = np.linalg.norm(pts[:, None] - centres[None], axis=2)
        assert dist.min(1).max() < 0.01  # every point within delta of its class centre
        counts = np.bincount(dist.argmin(1), minlength=2)
        assert counts[0] == counts[1]  # exact reflection symmetry
    # exact symmetries: the set is closed under x -> -x and class 1 is class 0 with x1, x2 swapped
    key = lambda a: np.array(sorted(map(tuple, np.round(a, 12))))  # noqa: E731
    np.testing.assert_array_equal(key(X), key(-X))
    np.testing.assert_array_equal(key(X[y == 1]), key(X[y == 0][:, ::-1]))


@pytest.mark.parametrize("alpha", [math.pi / 2, math.pi / 3])
def test_skew_xor_cluster_geometry(alpha: float) -> None:
    X, y = gen_skew_data(512, 2, alpha=alpha, seed=100)
    axes = xor_axes(alpha)
    for label, centres in ((0, axes[:2]), (1, axes[2:])):
        pts = X[y == label]
        dist = np.linalg.norm(pts[:, None] - centres[None], axis=2)
        assert dist.min(1).max() < 0.2 + 1e-12  # truncation radius delta
        counts = np.bincount(dist.argmin(1), minlength=2)
        assert counts[0] == counts[1]
    # each class is symmetric about the origin along its own axis (the reflection pairs)
    np.testing.assert_allclose(np.sort(X[y == 0] @ axes[0]), np.sort(-(X[y == 0] @ axes[0])), atol=1e-12)
    np.testing.assert_allclose(np.sort(X[y == 1] @ axes[2]), np.sort(-(X[y == 1] @ axes[2])), atol=1e-12)


def test_xor_dataset_items_and_errors() -> None:
    ds = XORDataset("train", kind="skew", alpha=math.pi / 3)
    item = ds[0]
    assert item["x"].shape == (2,) and item["label"] in (0, 1)
    assert not np.allclose(XORDataset("test").X[:4], XORDataset("train").X[:4])
    with pytest.raises(DataError, match="'kind' parameter of the xor dataset"):
        XORDataset("train", kind="ring")
    with pytest.raises(DataError, match="no split 'val'"):
        XORDataset("val")


# ----------------------------------------------------------------------------------------------
# background digits


def test_digit_split_is_stratified_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    labels = load_digits().target
    tr, te = digit_split(0)
    assert len(tr) == 1197 and len(te) == 600
    assert len(np.intersect1d(tr, te)) == 0 and len(np.union1d(tr, te)) == 1797
    expected = np.bincount(labels) * 600 / 1797
    assert np.all(np.abs(np.bincount(labels[te]) - expected) <= 1)
    assert not np.array_equal(digit_split(1)[1], te)


def test_hsv_matches_matplotlib() -> None:
    from matplotlib.colors import hsv_to_rgb

    rng = np.random.default_rng(0)
    hsv = rng.uniform(size=(500, 3))
    np.testing.assert_allclose(_hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2]), hsv_to_rgb(hsv), atol=1e-12)


def test_bgdigits_items_are_deterministic_per_index() -> None:
    a = BackgroundDigits("test_ood", seed=3)
    b = BackgroundDigits("test_ood", seed=3)
    fwd = a.arrays([5, 17, 400])
    rev = b.arrays([400, 17, 5])
    np.testing.assert_array_equal(fwd["x"], rev["x"][::-1])
    np.testing.assert_array_equal(fwd["factors"], rev["factors"][::-1])
    item = b[17]
    np.testing.assert_array_equal(item["x"].numpy(), fwd["x"][1])
    np.testing.assert_array_equal(item["mask"].numpy(), fwd["mask"][1])
    assert item["label"] == fwd["label"][1]
    assert item["x"].shape == (3, 24, 24) and item["x"].dtype == torch.float32
    # a new epoch or seed redraws the background
    assert not np.array_equal(BackgroundDigits("test_ood", seed=3, epoch=1).arrays([17])["x"], fwd["x"][1:2])
    assert not np.array_equal(BackgroundDigits("test_ood", seed=4).arrays([17])["x"], fwd["x"][1:2])


def test_bgdigits_digit_matches_pil_bilinear_upsampling_and_additive_composite() -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0
    ds = BackgroundDigits("train", seed=0)
    a = ds.arrays([0, 1, 2])
    for k in range(3):
        src = images[ds.digit_indices[k]]
        up = np.asarray(Image.fromarray(src, mode="F").resize((16, 16), Image.BILINEAR))
        canvas = a["digit"][k]
        r, c = np.argwhere(canvas > 0).min(0)  # the digit's bounding box starts inside the 16x16 patch
        found = False
        for r0 in range(max(0, r - 15), min(r, 8) + 1):
            for c0 in range(max(0, c - 15), min(c, 8) + 1):
                patch = np.zeros((24, 24), np.float32)
                patch[r0 : r0 + 16, c0 : c0 + 16] = np.clip(up, 0, 1)
                found |= np.allclose(patch, canvas, atol=1e-6)
        assert found
        np.testing.assert_allclose(a["x"][k] - a["background"][k], 0.8 * np.broadcast_to(canvas, (3, 24, 24)), atol=1e-5)
    alpha = BackgroundDigits("train", seed=0, composite="alpha").arrays([0])
    d = alpha["digit"][0]
    np.testing.assert_allclose(alpha["x"][0], (1 - d) * alpha["background"][0] + d, atol=1e-5)


def test_bgdigits_background_is_the_hsv_colour_times_stripes() -> None:
    from matplotlib.colors import hsv_to_rgb

    a = BackgroundDigits("test_union", seed=0).arrays(range(20))
    for k in range(20):
        h, s, v, orient, freq, amp = a["factors"][k]
        rgb = hsv_to_rgb([h, s, v])
        stripes = a["background"][k] / np.maximum(rgb[:, None, None], 1e-6)
        ch = int(np.argmax(rgb))  # brightest channel is well conditioned
        assert stripes[ch].min() >= 1 - amp - 1e-4 and stripes[ch].max() <= 1 + amp + 1e-4
        # the stripe field's spectral peak sits at freq cycles per image along the orientation
        spec = np.abs(np.fft.fft2(stripes[ch] - stripes[ch].mean()))
        ky, kx = np.unravel_index(np.argmax(spec), spec.shape)
        ky, kx = (ky + 12) % 24 - 12, (kx + 12) % 24 - 12  # signed frequencies
        th = np.deg2rad(orient)
        true = np.array([freq * np.cos(th), freq * np.sin(th)])
        k = np.array([kx, ky], dtype=float)
        assert min(np.linalg.norm(true - k), np.linalg.norm(true + k)) < 1.5


def test_bgdigits_id_and_ood_factor_ranges_are_disjoint() -> None:
    idf = BackgroundDigits("test_id", seed=0).arrays()["factors"]
    ood = BackgroundDigits("test_ood", seed=0).arrays()["factors"]
    for name in ("hue", "bright", "orient", "freq"):
        j = FACTOR_NAMES.index(name)
        assert idf[:, j].max() < ood[:, j].min() or ood[:, j].max() < idf[:, j].min(), name
        lo, hi = getattr(FAMILIES["id"], name)
        assert idf[:, j].min() >= lo and idf[:, j].max() <= hi
    for name in ("sat", "amp"):  # shared ranges
        j = FACTOR_NAMES.index(name)
        assert stats.ks_2samp(idf[:, j], ood[:, j]).pvalue > 1e-4
    union = BackgroundDigits("train_union", seed=0).arrays()["factors"]
    for j, name in enumerate(FACTOR_NAMES):
        u = getattr(FAMILIES["union"], name)
        assert union[:, j].min() >= u[0] and union[:, j].max() <= u[1]
        assert union[:, j].min() <= min(idf[:, j].min(), ood[:, j].min()) + 0.1 * (u[1] - u[0])
    # single-factor shifts move only their factor
    hue = BackgroundDigits("test_ood_hue", seed=0).arrays()["factors"]
    assert hue[:, 0].min() >= 0.45 and hue[:, 2].max() <= 0.55


def test_bgdigits_factors_are_independent_of_label() -> None:
    a = BackgroundDigits("train_union", seed=0).arrays()
    for j in range(6):
        groups = [a["factors"][a["label"] == c, j] for c in range(10)]
        assert stats.f_oneway(*groups).pvalue > 1e-4


def test_bgdigits_test_splits_and_crossed_groups_share_the_foreground() -> None:
    tid = BackgroundDigits("test_id", seed=1).arrays(range(30))
    tood = BackgroundDigits("test_ood", seed=1).arrays(range(30))
    np.testing.assert_array_equal(tid["digit"], tood["digit"])
    np.testing.assert_array_equal(tid["label"], tood["label"])
    assert not np.allclose(tid["background"], tood["background"])
    crossed = BackgroundDigits("crossed", seed=1, n_backgrounds=5)
    assert len(crossed) == 3000 and crossed.has_group
    s = crossed.arrays(range(15))
    for g in np.unique(s["group"]):
        rows = np.flatnonzero(s["group"] == g)
        assert len(rows) == 5
        assert np.all(s["digit"][rows] == s["digit"][rows[0]])
        assert len(set(s["label"][rows])) == 1
        assert len({tuple(f) for f in s["factors"][rows]}) == 5
    # group is the load_digits index of the digit, and crossed shows it where test_id render 0 does
    _, te = digit_split(1)
    assert s["group"][0] == te[0]
    np.testing.assert_array_equal(s["digit"][0], tid["digit"][0])


def test_bgdigits_masks_cover_the_digit() -> None:
    a = BackgroundDigits("test_id", seed=0).arrays(range(50))
    for k in range(50):
        d, m = a["digit"][k], a["mask"][k]
        assert m.any() and np.all(d[~m] <= 0.05)
        assert d[m].sum() / d.sum() > 0.97
        assert m.mean() < 0.5  # a foreground, not the canvas


def test_bgdigits_errors() -> None:
    with pytest.raises(DataError, match="no split 'val'"):
        BackgroundDigits("val")
    with pytest.raises(DataError, match="'composite' parameter of bgdigits"):
        BackgroundDigits("train", composite="multiply")
    with pytest.raises(DataError, match="'renders' parameter of bgdigits"):
        BackgroundDigits("train", renders=0)
    with pytest.raises(IndexError):
        BackgroundDigits("test_id")[600]


def test_registered_builtin_datasets() -> None:
    from probekit.datasets import get_dataset

    ds = get_dataset("bgdigits", "crossed", n_backgrounds=2)
    assert len(ds) == 1200 and ds.factor_names == FACTOR_NAMES
    assert "group" in ds[0]
    assert len(get_dataset("structured", "test_ood", n=100)) == 100
    assert len(get_dataset("xor", "train")) > 0


def test_builtin_items_pass_through_as_samples() -> None:
    from probekit.datasets import as_samples, get_dataset

    ds = as_samples(get_dataset("bgdigits", "crossed", n_backgrounds=2))
    assert ds.has_label and ds.has_group and list(ds.factor_names) == FACTOR_NAMES
    item = ds[3]
    assert item["group"] == get_dataset("bgdigits", "crossed", n_backgrounds=2)[2]["group"]  # rows 2, 3: one digit
    s = as_samples(get_dataset("structured", "test_id", n=50))
    assert s.has_label and not s.has_group and len(s[0]["factors"]) == 32
