"""Composites of issue 25: crops and tiles of scene photos at their own scale, feathered edges, the fills,
``composite_self`` and the ``deploy:<site>`` splits, checked pixel by pixel against hand computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.special import ndtr

from probekit.datasets import (
    Counterfactuals,
    DeploymentScenes,
    adjust_mask,
    feather_sigma,
    fill_foreground,
    mirror_crop,
    soft_mask,
)
from probekit.errors import DataError
from probekit.vocab import VARIANTS


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _coords(h: int, w: int) -> np.ndarray:
    """A photo whose pixel (y, x) is (y, x, 7): every pixel says where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full_like(yy, 7)], axis=2).astype(np.uint8)


def test_crop_of_a_larger_photo_is_the_window_by_hand():
    photo = _coords(20, 30)
    got = mirror_crop(photo, (10, 8), u=0.3, v=0.7)
    # x0 = round(0.3 * (30 - 10)) = 6, y0 = round(0.7 * (20 - 8)) = round(8.4) = 8
    np.testing.assert_array_equal(got, photo[8:16, 6:16])
    np.testing.assert_array_equal(mirror_crop(photo, (30, 20)), photo)  # same size: the photo itself


def test_a_smaller_photo_is_tiled_by_mirroring_never_resized():
    photo = _coords(5, 4)
    got = mirror_crop(photo, (9, 12), u=0.0, v=0.5)
    # columns from 0 (u=0): 0 1 2 3 | 3 2 1 0 | 0; rows from floor(0.5 * 5) = 2: 2 3 4 | 4 3 2 1 0 | 0 1 2 3
    cols = [0, 1, 2, 3, 3, 2, 1, 0, 0]
    rows = [2, 3, 4, 4, 3, 2, 1, 0, 0, 1, 2, 3]
    np.testing.assert_array_equal(got[:, :, 1], np.tile(cols, (12, 1)))
    np.testing.assert_array_equal(got[:, :, 0], np.tile(np.asarray(rows)[:, None], (1, 9)))


def _stripes(h: int, w: int, period: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w, 3), dtype=np.uint8)
    out[..., 0] = 255 * ((xx // period) % 2)
    out[..., 1] = 255 * ((yy // period) % 2)
    return out


def _runs(line: np.ndarray) -> list[int]:
    edges = np.flatnonzero(np.diff(line.astype(int)) != 0)
    return np.diff(edges).tolist()


@pytest.mark.parametrize("hw", [(40, 80), (80, 40), (100, 100)])
def test_cover_scales_both_axes_alike(tmp_path, hw):
    h, w = hw
    _save(tmp_path / "site" / "p.png", _stripes(h, w, 10))
    sc = DeploymentScenes(tmp_path / "site", n_scenes=2, fit="cover")
    got = sc.scene(0, 0, (32, 32))
    f = max(32 / w, 32 / h)  # one factor: stripes 10 px wide become 10 f on both axes
    for line in (got[16, :, 0] > 127, got[:, 16, 1] > 127):
        inner = _runs(line)
        assert inner, "the window should cross several stripes"
        assert all(abs(r - 10 * f) <= 1 for r in inner), (inner, 10 * f)


def test_crop_scenes_keep_the_photo_pixels_and_one_slot_is_one_window(tmp_path):
    _save(tmp_path / "big" / "a.png", _coords(40, 50))
    _save(tmp_path / "small" / "b.png", _coords(6, 5))
    sc = DeploymentScenes([tmp_path / "big", tmp_path / "small"], n_scenes=3, seed=3)
    assert sc.sites == ["big", "small"] and sc.n_slots(0) == 3
    for s in range(3):
        _, u, v = sc.slots[0][s]
        x0, y0 = round(u * (50 - 12)), round(v * (40 - 10))
        np.testing.assert_array_equal(sc.scene(0, s, (12, 10)), _coords(40, 50)[y0:y0 + 10, x0:x0 + 12])
        tile = sc.scene(1, s, (12, 10))  # tiled: neighbours differ by one pixel step or repeat at a mirror
        assert set(np.unique(np.diff(tile[:, :, 1].astype(int), axis=1))) <= {-1, 0, 1}
        assert set(np.unique(np.diff(tile[:, :, 0].astype(int), axis=0))) <= {-1, 0, 1}


def test_feather_width_and_monotone_edges():
    assert feather_sigma("auto", 32, 32) == 1.0
    assert feather_sigma("auto", 224, 300) == pytest.approx(2.24)
    assert feather_sigma(0, 10, 10) == 0.0
    with pytest.raises(DataError):
        feather_sigma(-1, 10, 10)
    m = np.zeros((6, 30), dtype=bool)
    m[:, 10:] = True  # a straight edge between columns 9 and 10
    a = soft_mask(m, 2.0)
    row = a[3]
    assert np.all(np.diff(row) >= 0) and np.all((row > 0.5) == m[3])
    assert row[10] == pytest.approx(ndtr(0.5 / 2.0), abs=1e-6)  # first inside pixel: d = +0.5
    assert row[8] == pytest.approx(ndtr(-1.5 / 2.0), abs=1e-6)  # second outside: d = -1.5
    yy, xx = np.mgrid[0:41, 0:41]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 12 ** 2
    a = soft_mask(disc, 1.5)
    assert np.all(np.diff(a[20, :21]) >= 0) and np.all(np.diff(a[20, 20:]) <= 0)
    np.testing.assert_array_equal(soft_mask(disc, 0), disc.astype(np.float32))


def test_shift_fill_continues_a_periodic_texture_where_inpainting_smears():
    img = _stripes(24, 24, 2)
    m = np.zeros((24, 24), dtype=bool)
    m[9:12, 10:13] = True  # 3 x 3: shifts are multiples of 4 px, the texture's period
    img_obj = img.copy()
    img_obj[m] = (10, 200, 30)
    np.testing.assert_array_equal(fill_foreground(img_obj, m, "shift"), img)
    cv2 = pytest.importorskip("cv2")  # noqa: F841
    assert not np.array_equal(fill_foreground(img_obj, m, "telea"), img)


def _folder(tmp_path: Path) -> tuple[Path, Path]:
    """Two classes x 3 images of 8 x 10 (H x W): background (20k, 40, 60), a 3 x 4 object (200, 0, 0)."""
    img, msk = tmp_path / "img", tmp_path / "m"
    for c in ("a", "b"):
        for k in range(3):
            arr = np.zeros((8, 10, 3))
            arr[:] = (20 * k + (100 if c == "b" else 0), 40, 60)
            mask = np.zeros((8, 10), dtype=np.uint8)
            mask[2 + k:5 + k, 3:7] = 255
            arr[mask > 0] = (200, 0, 0)
            _save(img / c / f"{k}.png", arr)
            _save(msk / c / f"{k}.png", mask)
    return img, msk


def test_composite_self_hard_is_the_original_and_soft_fills_the_clear_margin(tmp_path):
    img, msk = _folder(tmp_path)
    exact = Counterfactuals(img, masks=msk, fill="mean", feather=0, clear=0, n_backgrounds=2)
    for i in exact.test_indices:  # hard mask, fill of exactly the mask: the original image
        np.testing.assert_array_equal(exact.render(int(i), "composite_self"), exact.folder.image(int(i)))
    hard = Counterfactuals(img, masks=msk, fill="mean", feather=0, n_backgrounds=2)  # clear "auto": 1 px
    i = int(hard.test_indices[0])
    orig, m = hard.folder.image(i), hard.folder.mask(i)
    got = hard.render(i, "composite_self")
    ring = adjust_mask(m, 1) & ~m
    bg = orig[~m][0]
    np.testing.assert_array_equal(got[~ring], orig[~ring])
    # the ring is filled with the mean of the pixels outside the grown mask: the uniform background
    np.testing.assert_array_equal(got[ring], np.broadcast_to(bg, got[ring].shape))
    soft = Counterfactuals(img, masks=msk, fill="mean", feather=1.0, n_backgrounds=2)
    got = soft.render(i, "composite_self").astype(int)
    # the fill covers the mask grown by max(1, ceil(2 * 1)) = 2 px; the background is uniform, so the
    # mean fill is the background colour and the composite is alpha * object + (1 - alpha) * background
    a = soft_mask(m, 1.0)[:, :, None]
    want = np.round(a * orig + (1 - a) * bg.astype(float))
    np.testing.assert_allclose(got, want, atol=1)


def test_deploy_split_fields_and_the_same_scenes_for_every_object(tmp_path):
    img, msk = _folder(tmp_path)
    _save(tmp_path / "siteA" / "p0.png", _coords(30, 40))
    _save(tmp_path / "siteA" / "p1.png", _coords(12, 16))
    _save(tmp_path / "siteB" / "q.png", _coords(5, 7))
    cf = Counterfactuals(img, masks=msk, fill="mean", feather=0, clear=0, n_backgrounds=2,
                         deploy_backgrounds=[tmp_path / "siteA", tmp_path / "siteB"], n_deploy=4)
    assert cf.deploy_splits == ["deploy:siteA", "deploy:siteB"]
    ds = cf.split("deploy:siteA")
    T = cf.test_indices
    assert len(ds) == 4 * len(T)
    labels = cf.folder.labels
    for k in range(len(ds)):
        it = ds[k]
        i, s = int(T[k // 4]), k % 4
        assert (it["group"], it["background"], it["site"]) == (i, s, 0)
        assert it["label"] == labels[i] and it["background_label"] == -1 and it["variant"] == VARIANTS.index("mixed_rand")
        x = (it["x"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        m = cf.folder.mask(i)
        np.testing.assert_array_equal(x[m], cf.folder.image(i)[m])  # the object, untouched (hard mask)
        assert np.all(x[~m][:, 2] == 7)  # scene pixels come from the photos
        # every object of slot s sees the same window of the same photo (checked by hand above)
        np.testing.assert_array_equal(x[~m], cf.scenes.scene(0, s, (10, 8))[~m])
    assert cf.split("deploy:siteB")[0]["site"] == 1
    st = cf.settings
    assert st["fill"] == "mean" and st["feather"] == 0.0 and st["deploy"]["sites"] == ["siteA", "siteB"]
    assert st["deploy"]["photos"] == [2, 1] and len(cf.fingerprint()) == 64
    assert Counterfactuals(img, masks=msk, fill="mean", feather=1, n_backgrounds=2).fingerprint() != \
        Counterfactuals(img, masks=msk, fill="mean", feather=0, n_backgrounds=2).fingerprint()
    with pytest.raises(DataError, match="deploy:siteC"):
        cf.split("deploy:siteC")


def test_borrow_fills_from_another_image_of_the_class(tmp_path):
    img, msk = _folder(tmp_path)
    cf = Counterfactuals(img, masks=msk, fill="borrow", feather=0, n_backgrounds=2)
    j = 0
    k = cf.donor(j)
    assert k != j and cf.folder.labels[k] == cf.folder.labels[j]
    got = cf.background(j)
    m, mk = cf.fill_region(j), cf.fill_region(k)  # the masks grown by the clear margin (1 px)
    assert m.sum() > cf.folder.mask(j).sum()
    take = m & ~mk
    np.testing.assert_array_equal(got[take], cf.folder.image(k)[take])  # the donor's background
    np.testing.assert_array_equal(got[~m], cf.folder.image(j)[~m])
    assert not np.any(np.all(got[m] == (200, 0, 0), axis=1))  # no object pixel left


def test_bad_scene_folders_say_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        DeploymentScenes(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        DeploymentScenes(tmp_path / "nope")
    _save(tmp_path / "one" / "p.png", _coords(9, 9))
    with pytest.raises(DataError, match="one photo"):
        DeploymentScenes(tmp_path / "one", position="center")


def test_deploy_and_composite_self_rows_reach_a_store(tmp_path):
    import torch

    import probekit as pk

    img, msk = _folder(tmp_path)
    _save(tmp_path / "site" / "p.png", _coords(20, 20))
    cf = Counterfactuals(img, masks=msk, n_backgrounds=2, deploy_backgrounds=[tmp_path / "site"], n_deploy=3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    out = tmp_path / "acts.h5"
    for i, split in enumerate(("variants", "deploy:site")):
        pk.extract(net, cf.split(split), layers=["2"], out=out, split=split, progress=False,
                   mode="create" if i == 0 else "resume")
    dep = cf.split("deploy:site")
    with pk.open_store(out) as s:
        assert s.n_rows("deploy:site") == len(dep) == 3 * len(cf.test_indices)
        for field in ("label", "group", "background", "background_label"):
            np.testing.assert_array_equal(s.sample_field("deploy:site", field), [dep[k][field] for k in range(len(dep))])
        names = s.variants("variants")
        assert "composite_self" in set(names) and list(names[:2]) == ["original", "only_fg"]
