"""``probekit extract --pool 'MODE,LAYER=MODE'``: each layer pooled its own way, checked against a hooked forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.cli import main


def test_extract_pools_each_layer_its_own_way(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "p.h5"
    assert main(["extract", "timm:test_vit", "--model-arg", "img_size=32", "--data", "shapes", "--split", "test",
                 "--layers", "blocks.0,blocks.2,@output", "--pool", "tokens_mean,blocks.2=cls", "-o", str(out),
                 "--no-progress"]) == 0
    with pk.open_store(out) as s:
        pools = {la: s.acts("model", "test", la).attrs["pool"] for la in s.layers("model")}
        cls_row = np.asarray(s.acts("model", "test", "blocks.2")[:1])
        mean_row = np.asarray(s.acts("model", "test", "blocks.0")[:1])
    assert pools == {"blocks.0": "tokens_mean", "blocks.2": "cls", "@output": "avg"}
    # oracle: the same (seeded, random) model's hooked token outputs on the first test image
    from probekit.datasets import load_data

    x = load_data("shapes", "test")[0]["x"].unsqueeze(0)
    torch.manual_seed(0)
    model = pk.load_model("timm:test_vit", model_args={"img_size": 32}).module
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.detach()))
             for n in ("blocks.0", "blocks.2")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    n_prefix = getattr(model, "num_prefix_tokens", 1)
    np.testing.assert_allclose(cls_row[0], got["blocks.2"][0, 0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean_row[0], got["blocks.0"][0, n_prefix:].mean(0).numpy(), rtol=1e-4, atol=1e-5)
