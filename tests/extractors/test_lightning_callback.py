"""probekit.RecorderCallback in a Lightning Trainer: steps follow optimizer steps under gradient
accumulation, training is unchanged bit for bit, and a LightningModule without forward() is refused
with a message that says what to add."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

import probekit as pk  # noqa: E402
from probekit.errors import ProbekitError  # noqa: E402


class Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _i):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class NoForward(L.LightningModule):
    """No forward(): training_step composes two children, so which takes the inputs is unclear."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def training_step(self, batch, _i):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.trunk(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class OnlyChild(L.LightningModule):
    """No forward(), one child: the probe batches go through the child."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, _i):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data(n: int = 48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _fit(module, callbacks, accumulate: int = 1):
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        accumulate_grad_batches=accumulate)
    trainer.fit(module, DataLoader(_data(), batch_size=4, shuffle=True))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_gradient_accumulation_records_optimizer_steps_bit_identically(tmp_path):
    L.seed_everything(0, verbose=False)
    plain = _fit(Lit(), [], accumulate=2)
    L.seed_everything(0, verbose=False)
    cb = pk.RecorderCallback(["net.2"], _data(20), tmp_path / "l.h5", every=5)
    recorded = _fit(Lit(), [cb], accumulate=2)
    for k in plain:
        assert np.array_equal(plain[k].numpy(), recorded[k].numpy()), k
    # 2 epochs x 12 batches / 2 accumulated = 12 optimizer steps: 0, 5, 10 and the end
    with pk.open_store(tmp_path / "l.h5") as s:
        assert s.steps("model") == [0, 5, 10, 12]
        assert cb.recorder.recorded == [0, 5, 10, 12]


def test_module_without_forward_is_refused_with_what_to_add(tmp_path):
    cb = pk.RecorderCallback(["trunk.1"], _data(20), tmp_path / "l.h5", every=5)
    with pytest.raises(ProbekitError, match=r"NoForward defines no forward\(\) and has 2 child modules"):
        _fit(NoForward(), [cb])
    assert not (tmp_path / "l.h5").exists()


def test_module_without_forward_runs_through_its_only_child(tmp_path):
    cb = pk.RecorderCallback(["net.1"], _data(20), tmp_path / "l.h5", every=6)
    module = OnlyChild()
    final = _fit(module, [cb])
    assert "forward" not in module.__dict__  # the child stood in only while recording
    with pk.open_store(tmp_path / "l.h5") as s:
        assert s.steps("model") == [0, 6, 12, 18, 24]
        stored = s.acts("model", "probe", "net.1", 24)[:]
    # the stored activations at the end are the trained child's ReLU outputs on the probe inputs
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    net.load_state_dict({k.removeprefix("net."): v for k, v in final.items()})
    with torch.no_grad():
        want = net[1](net[0](_data(20).tensors[0])).numpy()
    np.testing.assert_allclose(stored, want, rtol=1e-6, atol=1e-7)
