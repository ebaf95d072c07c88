"""Stored activations equal independent feature extractors, pooled independently in numpy.

Oracles: torchvision's ``create_feature_extractor`` (FX graph) for a random timm ResNet-18, and timm's
``forward_intermediates`` for a small timm ViT. Pooling is recomputed with numpy, not with probekit.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch.utils.data import Dataset
from torchvision.models.feature_extraction import create_feature_extractor

import probekit
from probekit.extractors import capture

N = 6


class Images(Dataset):
    """(x, y) items with integer labels."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(i % 3)


def np_pool(a: np.ndarray, mode: str, prefix: int = 1) -> np.ndarray:
    """Independent pooling in numpy: (N, C, H, W) maps and (N, T, D) token sequences."""
    if mode == "none":
        return a
    if mode == "flatten":
        return a.reshape(len(a), -1)
    if a.ndim == 2:
        return a
    if a.ndim == 4:
        return a.mean(axis=(2, 3)) if mode == "avg" else a.max(axis=(2, 3))
    # tokens (N, T, D)
    return {
        "avg": lambda: a.mean(axis=1),
        "max": lambda: a.max(axis=1),
        "cls": lambda: a[:, 0],
        "tokens_mean": lambda: a[:, prefix:].mean(axis=1),
    }[mode]()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False).eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, 64, 64, generator=g)


RESNET_LAYERS = ["layer1", "layer2.0.conv1", "layer3.1", "layer4", "global_pool", "fc"]


@pytest.fixture(scope="module")
def resnet_reference(resnet, images):
    fe = create_feature_extractor(resnet, return_nodes={n: n for n in RESNET_LAYERS})
    with torch.no_grad():
        return {k: v.numpy().copy() for k, v in fe(images).items()}


@pytest.mark.parametrize("mode", ["avg", "max", "flatten", "none"])
def test_resnet18_store_equals_torchvision_feature_extractor(resnet, images, resnet_reference, mode, tmp_path):
    out = probekit.extract(resnet, Images(images), layers=RESNET_LAYERS, out=tmp_path / "r.h5", pool=mode,
                           batch_size=4, progress=False)
    with probekit.open_store(out) as store:
        assert store.layers("model", "data") == RESNET_LAYERS  # the order the forward pass ran them (depth)
        np.testing.assert_array_equal(store.sample_field("data", "index"), np.arange(N))
        np.testing.assert_array_equal(store.sample_field("data", "label"), np.arange(N) % 3)
        for layer in RESNET_LAYERS:
            got = np.asarray(store.acts("model", "data", layer))
            want = np_pool(resnet_reference[layer], mode)
            assert got.shape == want.shape, layer
            assert got.dtype == np.float32
            assert np.max(np.abs(got - want)) < 1e-5, layer


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, img_size=32).eval()


VIT_BLOCKS = [0, 2, 5]


@pytest.fixture(scope="module")
def vit_reference(vit):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, 3, 32, 32, generator=g)
    with torch.no_grad():
        inter = vit.forward_intermediates(x, indices=VIT_BLOCKS, intermediates_only=True, output_fmt="NLC",
                                          return_prefix_tokens=True, norm=False)
    # re-join the prefix (class) tokens and the patch tokens: the raw (N, T, D) block output
    ref = {f"blocks.{i}": torch.cat([prefix, spatial], dim=1).numpy().copy()
           for i, (spatial, prefix) in zip(VIT_BLOCKS, inter, strict=True)}
    return x, ref


@pytest.mark.parametrize("mode", ["cls", "tokens_mean", "avg", "max", "flatten", "none"])
def test_vit_store_equals_timm_forward_intermediates(vit, vit_reference, mode, tmp_path):
    x, ref = vit_reference
    assert vit.num_prefix_tokens == 1
    layers = [f"blocks.{i}" for i in VIT_BLOCKS]
    out = probekit.extract(vit, Images(x), layers=layers, out=tmp_path / "v.h5", pool=mode, batch_size=4,
                           progress=False)
    with probekit.open_store(out) as store:
        for layer in layers:
            got = np.asarray(store.acts("model", "data", layer))
            want = np_pool(ref[layer], mode, prefix=1)
            assert got.shape == want.shape
            assert np.max(np.abs(got - want)) < 1e-5, layer
            attrs = store.acts("model", "data", layer).attrs
            assert attrs["pool"] == mode
            assert attrs["module_type"] == "Block"
            assert list(attrs["raw_shape"]) == list(ref[layer].shape[1:])


def test_vit_tokens_mean_respects_model_prefix_tokens(vit_reference):
    """A model with 1 class token + 2 register tokens: tokens_mean skips all three (model attribute)."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32, reg_tokens=2).eval()
    assert model.num_prefix_tokens == 3
    x, _ = vit_reference
    with torch.no_grad():
        (spatial,) = model.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC",
                                                 norm=False)
        with capture(model, "blocks.1", pool="tokens_mean") as cap:
            got = cap.run(x)["blocks.1"]
    assert np.max(np.abs(got.numpy() - spatial.numpy().mean(axis=1))) < 1e-5


def test_pool_per_layer_dict(resnet, images, resnet_reference, tmp_path):
    pools = {"layer4": "max", "layer1": "flatten", "fc": "none"}
    out = probekit.extract(resnet, Images(images), layers=list(pools), out=tmp_path / "d.h5", pool=pools,
                           batch_size=5, progress=False)
    with probekit.open_store(out) as store:
        for layer, mode in pools.items():
            got = np.asarray(store.acts("model", "data", layer))
            assert np.max(np.abs(got - np_pool(resnet_reference[layer], mode))) < 1e-5
