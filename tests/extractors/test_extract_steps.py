"""Extraction of a checkpoint series under /models/<m>/steps/<step>/ next to the final model."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import probekit as pk


def test_step_zero_sits_beside_the_trained_model_on_the_same_samples(tmp_path):
    torch.manual_seed(0)
    init = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    trained = copy.deepcopy(init)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    x = torch.randn(23, 5)
    data = TensorDataset(x, torch.arange(23) % 3)
    out = tmp_path / "s.h5"
    pk.extract(trained, data, layers=["0", "2"], out=out, split="test_id", batch_size=4, progress=False)
    pk.extract(init, data, layers=["0", "2"], out=out, split="test_id", batch_size=5, progress=False,
               mode="resume", step=0)
    with pk.open_store(out) as s:
        assert s.steps("model") == [0]
        with torch.no_grad():
            np.testing.assert_allclose(s.acts("model", "test_id", "2")[:], trained(x).numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(s.acts("model", "test_id", "2", step=0)[:], init(x).numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(s.acts("model", "test_id", "0", step=0)[:], init[0](x).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.weights("model", "0", step=0), init[0].weight.detach().numpy())
        np.testing.assert_allclose(s.weights("model", "0"), trained[0].weight.detach().numpy())
        assert s.n_rows("test_id", "model", step=0) == 23
