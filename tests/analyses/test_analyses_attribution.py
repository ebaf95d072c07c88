"""Background attribution share on hand-built models where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from probekit.analyses import background_attribution_share


class _Masked(nn.Module):
    """Linear 2-class model reading only the pixels where weight_mask is 1 (plus a conv for unit mode)."""

    def __init__(self, weight_mask):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
        self.register_buffer("wm", torch.as_tensor(weight_mask, dtype=torch.float32))

    def forward(self, x):
        h = self.conv(x) * self.wm
        return h.flatten(2).sum(dim=2)  # (n, 2) logits


def _data():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.uniform(0.5, 1.0, (4, 1, 6, 6)), dtype=torch.float32)
    masks = np.zeros((4, 6, 6))
    masks[:, 2:4, 2:4] = 1
    return x, masks


def test_foreground_only_model_has_zero_share():
    x, masks = _data()
    model = _Masked(masks[0]).train()
    res = background_attribution_share(model, x, masks, target=0, n_steps=8, batch_size=3)
    np.testing.assert_allclose(res.per_sample, 0.0, atol=1e-7)
    assert model.training  # state restored


def test_background_only_and_uniform_models():
    x, masks = _data()
    res = background_attribution_share(_Masked(1 - masks[0]), x, masks, target=[0, 1, 0, 1], n_steps=8)
    np.testing.assert_allclose(res.per_sample, 1.0, atol=1e-7)
    # uniform weights on a linear model: IG = x * w, so the share is the background's share of sum |x|
    res = background_attribution_share(_Masked(np.ones((6, 6))), x, masks, target=0, n_steps=8)
    xa = x.numpy()[:, 0]
    expect = (xa * (masks == 0)).sum(axis=(1, 2)) / xa.sum(axis=(1, 2))
    np.testing.assert_allclose(res.per_sample, expect, rtol=1e-5)
    assert res.mean == pytest.approx(expect.mean(), rel=1e-5)


def test_unit_mode_neuron_integrated_gradients():
    x, masks = _data()
    model = _Masked(np.ones((6, 6)))
    # conv unit (channel 0, row 1, col 1) sees only pixel (1, 1): background
    res = background_attribution_share(model, x, masks, layer=model.conv, neuron=(0, 1, 1), n_steps=8)
    np.testing.assert_allclose(res.per_sample, 1.0, atol=1e-7)
    res = background_attribution_share(model, x, masks, layer=model.conv, neuron=(1, 2, 3), n_steps=8)
    np.testing.assert_allclose(res.per_sample, 0.0, atol=1e-7)


def test_returned_maps_are_integrated_gradients_of_a_linear_model():
    """For a linear logit, IG with a zero baseline is exactly x * w: check the maps against it."""
    x, masks = _data()
    wm = np.ones((6, 6))
    wm[:, :3] = 0.5
    model = _Masked(wm)
    res = background_attribution_share(model, x, masks, target=0, n_steps=4, batch_size=2, return_maps=True)
    expected = (x[:, 0].numpy() * wm)  # conv weight +1 for logit 0
    np.testing.assert_allclose(res.maps, np.abs(expected), rtol=1e-5)
    bg = (res.maps * (masks == 0)).sum(axis=(1, 2)) / res.maps.sum(axis=(1, 2))
    np.testing.assert_allclose(res.per_sample, bg, rtol=1e-6)
    assert background_attribution_share(model, x, masks, target=0, n_steps=4).maps is None
