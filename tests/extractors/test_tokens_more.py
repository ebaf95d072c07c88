"""Token data beyond the first extraction: an interrupted run resumed, vision keyword inputs
(``pixel_values``), and the Recorder on keyword-input probe items."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import probekit  # noqa: E402
from probekit.datasets import as_samples  # noqa: E402


def bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32)).eval()


class Texts(torch.utils.data.Dataset):
    def __init__(self, fail_at: int | None = None) -> None:
        rng = np.random.default_rng(4)
        self.ids = [rng.integers(1, 40, size=int(n)) for n in rng.integers(2, 11, size=13)]
        self.fail_at = fail_at

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        if i == self.fail_at:
            raise KeyboardInterrupt  # the run is interrupted while reading this item
        return {"input_ids": torch.as_tensor(self.ids[i]), "group": i % 3}


def _acts(path, layer="encoder.layer.0") -> np.ndarray:
    with probekit.open_store(path) as s:
        return np.asarray(s.acts("model", "data", layer)[:])


def test_interrupted_token_run_resumes_to_the_uninterrupted_result(tmp_path):
    model = bert()
    kw = dict(layers=["encoder.layer.0"], pool="tokens_mean", batch_size=4, progress=False)
    whole = probekit.extract(model, Texts(), out=tmp_path / "whole.h5", **kw)
    with pytest.raises(KeyboardInterrupt):
        probekit.extract(model, Texts(fail_at=9), out=tmp_path / "part.h5", **kw)
    with probekit.open_store(tmp_path / "part.h5") as s:
        assert s.n_rows("data", "model") == 8
    probekit.extract(model, Texts(), out=tmp_path / "part.h5", mode="resume", **kw)
    np.testing.assert_array_equal(_acts(tmp_path / "part.h5"), _acts(whole))
    # a finished store: resuming again checks the layers (one padded item) and writes nothing
    probekit.extract(model, as_samples(Texts(), max_length=12), out=tmp_path / "part.h5", mode="resume", **kw)
    np.testing.assert_array_equal(_acts(tmp_path / "part.h5"), _acts(whole))


def test_pixel_values_items_reach_a_vision_transformer(tmp_path):
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32), add_pooling_layer=False).eval()
    x = torch.randn(6, 3, 8, 8)
    data = [{"pixel_values": x[i], "label": i % 2} for i in range(6)]
    # the first block's name differs between transformers versions (encoder.layer.0, layers.0)
    layer = next(n for n in ("encoder.layer.0", "layers.0") if n in dict(vit.named_modules()))
    with torch.no_grad():
        hs = vit(pixel_values=x, output_hidden_states=True).hidden_states[1]
    for pool, want in [("cls", hs[:, 0]), ("tokens_mean", hs[:, 1:].mean(1))]:  # no mask: skips the class token
        out = probekit.extract(vit, data, layers=[layer], out=tmp_path / f"{pool}.h5", pool=pool,
                               batch_size=4, progress=False)
        np.testing.assert_allclose(_acts(out, layer), want.numpy(), rtol=0, atol=1e-5)


def test_recorder_on_keyword_input_probe_items(tmp_path):
    model = bert()
    rec = probekit.Recorder(model, ["encoder.layer.0"], {"probe": as_samples(Texts(), max_length=10)},
                            out=tmp_path / "run.h5", every=1, pool="none")
    assert rec.step(0)
    with probekit.open_store(tmp_path / "run.h5") as s:
        tokens = np.asarray(s.acts("model", "probe", "encoder.layer.0", step=0)[:])
        mask = np.asarray(s.acts("model", "probe", "@attention_mask", step=0)[:])
    assert tokens.shape == (13, 10, 16) and mask.shape == (13, 10)
    np.testing.assert_array_equal(mask.sum(1), [len(i) for i in Texts().ids])
