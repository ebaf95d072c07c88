"""Image folders get the preprocessing of the model (issue 15): timm's data config, torchvision's
weights transforms or the standard ImageNet ones, the image as it is for a module:callable; overrides
with --image-size/--mean/--std; what ran is stored with the activations.

Oracles: a resize / centre crop / normalise written here with PIL and numpy from the numbers timm
documents (scale = floor(size / crop_pct), bicubic), torchvision's own weights transforms, and the
models' own forward passes on those inputs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import probekit
from probekit.cli import main
from probekit.models import LoadedModel, load_model, preprocessing_for

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

SIZES = [(50, 40), (31, 57), (64, 64), (45, 45)]  # (width, height): none of them is the model's size


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate(SIZES):
        cls = root / ("cat" if k % 2 else "dog")
        cls.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(cls / f"{k}.png")
    return root


def _images(root: Path) -> list[Image.Image]:
    """The images in ImageFolder's order (classes sorted, files sorted), as RGB."""
    paths = sorted(p for p in root.rglob("*.png"))
    return [Image.open(p).convert("RGB") for p in sorted(paths, key=lambda p: (p.parent.name, p.name))]


def _resize_crop_normalise(img: Image.Image, scale: int, crop: int, resample: int, mean, std) -> torch.Tensor:
    w, h = img.size
    nw, nh = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    img = img.resize((nw, nh), resample)
    left, top = round((nw - crop) / 2.0), round((nh - crop) / 2.0)
    a = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(a).permute(2, 0, 1)


@pytest.fixture(scope="module")
def timm10(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("w")
    torch.manual_seed(7)
    model = timm.create_model("resnet18", num_classes=10).eval()
    save_file(model.state_dict(), str(d / "r10.safetensors"))
    return model, d / "r10.safetensors"


def test_timm_folder_gets_the_data_config_transform_at_the_chosen_size(folder, timm10, tmp_path, capsys):
    model, weights = timm10
    out = tmp_path / "t.h5"
    rc = main(["extract", "timm:resnet18", "--weights", str(weights), "--data", str(folder), "--image-size", "32",
               "--layers", "conv1,fc", "--pool", "none", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "preprocessing (timm data config" in err and "center crop 32x32" in err
    with h5py.File(out, "r") as f:
        info = json.loads(f["models/model"].attrs["preprocessing"])
    cfg = model.pretrained_cfg  # what timm documents for resnet18
    assert info["kind"] == "timm" and info["input_size"] == [3, 32, 32]
    assert info["interpolation"] == cfg["interpolation"] == "bicubic" and info["crop_pct"] == cfg["crop_pct"]
    assert info["mean"] == pytest.approx(cfg["mean"]) and info["std"] == pytest.approx(cfg["std"])
    assert info["overrides"] == {"image_size": [32, 32]}
    scale = math.floor(32 / cfg["crop_pct"])
    x = torch.stack([_resize_crop_normalise(im, scale, 32, Image.BICUBIC, cfg["mean"], cfg["std"])
                     for im in _images(folder)])
    with torch.no_grad():
        conv1, logits = model.conv1(x), model(x)
    with probekit.open_store(out) as s:
        stored_conv1 = s.acts("model", "data", "conv1")[:]
        assert stored_conv1.shape == (len(SIZES), 64, 16, 16)  # every image reached the model at 32 px
        np.testing.assert_allclose(stored_conv1, conv1.numpy(), atol=2e-4)
        np.testing.assert_allclose(s.acts("model", "data", "fc")[:], logits.numpy(), rtol=1e-4, atol=1e-4)


def test_timm_folder_default_is_the_models_own_input_size(folder, tmp_path, capsys):
    out = tmp_path / "d.h5"
    rc = main(["extract", "timm:resnet18", "--data", str(folder), "--layers", "layer4", "--pool", "none",
               "-o", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    with h5py.File(out, "r") as f:
        info = json.loads(f["models/model"].attrs["preprocessing"])
    assert info["input_size"] == [3, 224, 224]
    assert info["steps"][:2] == [f"resize {math.floor(224 / 0.95)} bicubic", "center crop 224x224"]
    with probekit.open_store(out) as s:
        assert s.acts("model", "data", "layer4").shape == (len(SIZES), 512, 7, 7)


def test_a_timm_model_built_at_64_px_gets_64_px_images(folder, tmp_path, capsys):
    """timm's data config says 224 for a ViT built with img_size=64; the model's patch_embed says 64."""
    args = ["timm:vit_tiny_patch16_224", "--model-arg", "img_size=64", "--model-arg", "depth=1"]
    out = tmp_path / "v.h5"
    rc = main(["extract", *args, "--data", str(folder), "--layers", "patch_embed", "--pool", "none", "-o", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    with h5py.File(out, "r") as f:
        info = json.loads(f["models/model"].attrs["preprocessing"])
    assert info["input_size"] == [3, 64, 64] and info["mean"] == [0.5, 0.5, 0.5]
    with probekit.open_store(out) as s:
        assert s.acts("model", "data", "patch_embed").shape == (len(SIZES), 16, 192)  # (64 / 16) ** 2 patches
    assert main(["layers", *args, "--json"]) == 0  # the dummy input of `layers` has the same size
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["patch_embed"]["output_shape"] == [16, 192]


def test_overrides_of_mean_and_std_reach_the_inputs(folder, timm10, tmp_path, capsys):
    model, weights = timm10
    out = tmp_path / "m.h5"
    rc = main(["extract", "timm:resnet18", "--weights", str(weights), "--data", str(folder), "--image-size", "40",
               "--mean", "0.5", "--std", "0.25,0.25,0.25", "--layers", "fc", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    x = torch.stack([_resize_crop_normalise(im, math.floor(40 / 0.95), 40, Image.BICUBIC, [0.5] * 3, [0.25] * 3)
                     for im in _images(folder)])
    with torch.no_grad(), probekit.open_store(out) as s:
        np.testing.assert_allclose(s.acts("model", "data", "fc")[:], model(x).numpy(), rtol=1e-4, atol=1e-4)
    with h5py.File(out, "r") as f:
        info = json.loads(f["models/model"].attrs["preprocessing"])
    assert info["overrides"] == {"image_size": [40, 40], "mean": [0.5] * 3, "std": [0.25] * 3}
    # resuming the same model with other preprocessing is refused before anything is written
    before = out.read_bytes()
    rc = main(["extract", "timm:resnet18", "--weights", str(weights), "--data", str(folder), "--image-size", "48",
               "--layers", "fc", "-o", str(out), "--resume", "--split", "other", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "extracted with other preprocessing" in err[0], err
    assert out.read_bytes() == before


def test_torchvision_random_init_uses_standard_imagenet_and_says_so(folder, tmp_path, capsys):
    out = tmp_path / "tv.h5"
    torch.manual_seed(3)
    model = torchvision.models.resnet18(num_classes=7).eval()
    torch.save(model.state_dict(), tmp_path / "tv7.pt")
    rc = main(["extract", "torchvision:resnet18", "--weights", str(tmp_path / "tv7.pt"), "--data", str(folder),
               "--image-size", "32", "--layers", "fc", "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "standard ImageNet" in err
    with h5py.File(out, "r") as f:
        info = json.loads(f["models/model"].attrs["preprocessing"])
    assert info["source"] == "standard ImageNet preprocessing" and "not known" in info["note"]
    scale = round(32 * 256 / 224)  # torchvision's resize 256 / crop 224 ratio at 32 px
    assert info["steps"][:2] == [f"resize {scale} bilinear", "center crop 32x32"]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.stack([_resize_crop_normalise(im, scale, 32, Image.BILINEAR, mean, std) for im in _images(folder)])
    with torch.no_grad(), probekit.open_store(out) as s:
        np.testing.assert_allclose(s.acts("model", "data", "fc")[:], model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_torchvision_pretrained_weights_use_their_own_transforms(folder):
    """No download: a LoadedModel that names the weights enum, as load_model(pretrained=True) returns it."""
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    loaded = LoadedModel(torchvision.models.resnet18(), "torchvision:resnet18", (3, 224, 224), kind="torchvision",
                         pretrained=True, tv_weights=w)
    tf, info = preprocessing_for(loaded)
    assert "IMAGENET1K_V1" in info["source"] and info["input_size"] == [3, 224, 224] and info["note"] == ""
    img = _images(folder)[1]
    assert torch.equal(tf(img), w.transforms()(img))
    tf2, info2 = preprocessing_for(loaded, image_size=(48, 64))
    assert info2["input_size"] == [3, 48, 64] and tuple(tf2(img).shape) == (3, 48, 64)


HELPER = textwrap.dedent(
    """
    import torch
    from torch import nn


    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    """
)


def test_module_callable_gets_images_at_their_own_size_in_0_1(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "pk_pre_helper.py").write_text(HELPER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        # images of several sizes at their own size cannot be batched: one line that names --image-size
        rc = main(["extract", "pk_pre_helper:net", "--data", str(folder), "--layers", "0", "--pool", "none",
                   "-o", "o.h5", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "several sizes" in err[0] and "--image-size" in err[0], err
        assert not os.path.exists("o.h5")
        same = tmp_path / "same" / "a"
        same.mkdir(parents=True)
        rng = np.random.default_rng(1)
        pix = [rng.integers(0, 256, (12, 20, 3), dtype=np.uint8) for _ in range(3)]
        for k, p in enumerate(pix):
            Image.fromarray(p).save(same / f"{k}.png")
        rc = main(["extract", "pk_pre_helper:net", "--data", str(tmp_path / "same"), "--layers", "0",
                   "--pool", "none", "-o", "o.h5", "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        with h5py.File("o.h5", "r") as f:
            info = json.loads(f["models/model"].attrs["preprocessing"])
        assert info["kind"] == "callable" and info["input_size"] is None and info["steps"] == ["to tensor [0, 1]"]
        x = torch.from_numpy(np.stack(pix).astype(np.float32) / 255.0).permute(0, 3, 1, 2)  # unresized, [0, 1]
        with torch.no_grad():
            ref = sys.modules["pk_pre_helper"].net()[0](x)
        with probekit.open_store("o.h5") as s:
            stored = s.acts("model", "data", "0")[:]
        assert stored.shape == (3, 2, 12, 20)
        np.testing.assert_allclose(stored, ref.numpy(), rtol=1e-5, atol=1e-6)
        tf16, info16 = preprocessing_for(load_model("pk_pre_helper:net"), image_size=16)
        assert info16["input_size"] == [3, 16, 16] and tuple(tf16(Image.fromarray(pix[0])).shape) == (3, 16, 16)
    finally:
        sys.modules.pop("pk_pre_helper", None)


def test_load_data_without_a_model_keeps_images_unresized_and_with_one_uses_its_transform(folder):
    from probekit.datasets import load_data
    from probekit.errors import DataError

    with pytest.raises(DataError, match="several sizes"):
        load_data(str(folder))
    loaded = load_model("timm:resnet18", model_args={"num_classes": 2})
    data = load_data(str(folder), model=loaded)
    assert tuple(data[0]["x"].shape) == (3, 224, 224)
