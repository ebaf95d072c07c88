"""Recorder: training with it on equals training with it off; resuming appends steps once; stored
activations equal a direct forward of the checkpoint; only rank 0 writes; the state is restored."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import probekit as pk
from probekit.errors import LayerNotFoundError, ProbekitError


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3),
    )


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _train(out=None, steps: int = 12, every: int = 3, seed: int = 0, checkpoints: dict | None = None) -> nn.Module:
    """A plain loop: shuffled DataLoader, BatchNorm, Dropout, SGD with momentum."""
    torch.manual_seed(seed)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(_data(), batch_size=8, shuffle=True)
    rec = None if out is None else pk.Recorder(model, ["1", "5"], _data(20, seed=1), out, every=every,
                                               batch_size=7)
    step = 0
    model.train()
    while step < steps:
        for x, y in loader:
            if checkpoints is not None:
                checkpoints[step] = copy.deepcopy(model)
            if rec is not None:
                rec.step(step)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return model


def test_training_with_recorder_equals_training_without_bit_for_bit(tmp_path):
    off = _train(None)
    on = _train(tmp_path / "run.h5")
    for (k, a), (_, b) in zip(off.state_dict().items(), on.state_dict().items(), strict=True):
        assert torch.equal(a, b), k  # weights, BatchNorm running stats and num_batches_tracked
    with pk.open_store(tmp_path / "run.h5") as s:
        assert s.steps("model") == [0, 3, 6, 9]
    # and the recorder really ran the model: without RNG restoration the runs would differ
    assert not torch.equal(off[5].weight, _net()[5].weight)


def test_record_restores_modes_rng_grad_and_batchnorm_stats(tmp_path):
    torch.manual_seed(1)
    model = _net()
    model.train()
    model[3].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    assert flags.count(False) == 1
    bn = {k: v.clone() for k, v in model[1].state_dict().items()}
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    rec = pk.Recorder(model, ["5"], _data(20), tmp_path / "r.h5")
    with torch.enable_grad():
        assert rec.record(0) is True
        assert torch.is_grad_enabled()
    with torch.no_grad():
        assert rec.record(1) is True
        assert not torch.is_grad_enabled()
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1]) and got[2] == expect[2]
    assert [m.training for m in model.modules()] == flags
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, bn[k]), k


def test_stored_step_activations_equal_a_forward_of_the_checkpoint(tmp_path):
    ckpts: dict[int, nn.Module] = {}
    _train(tmp_path / "run.h5", steps=10, every=4, checkpoints=ckpts)
    x = _data(20, seed=1).tensors[0]
    with pk.open_store(tmp_path / "run.h5") as s:
        assert s.steps("model") == [0, 4, 8]
        assert s.n_rows("probe", "model", step=4) == 20
        np.testing.assert_array_equal(s.sample_field("probe", "index"), np.arange(20))
        for st in (0, 4, 8):
            m = ckpts[st].eval()
            with torch.no_grad():
                bn_out = m[:2](x).mean(dim=(2, 3))  # avg pool of BatchNorm2d output
                fc = m[:6](x)
            np.testing.assert_allclose(s.acts("model", "probe", "1", step=st)[:], bn_out.numpy(), atol=1e-5)
            np.testing.assert_allclose(s.acts("model", "probe", "5", step=st)[:], fc.numpy(), atol=1e-5)
            np.testing.assert_array_equal(s.weights("model", "5", step=st), m[5].weight.detach().numpy())
        assert s.weight_layers("model", step=4) == ["5"]  # BatchNorm has no weight rows


def _linear_run(out, start: int, stop: int, every: int = 10, shift: float = 0.0) -> pk.Recorder:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].bias.add_(shift)
    x = torch.randn(30, 4)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = pk.Recorder(model, ["0"], {"a": TensorDataset(x, y), "b": TensorDataset(x[:11], y[:11])}, out,
                      every=every, batch_size=8)
    for step in range(start, stop + 1):
        with torch.no_grad():  # a resumed run restarts from the model at ``start``: emulate with a shift
            model[0].weight.fill_(0.01 * step + shift)
        rec.step(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rec


def test_resuming_appends_steps_without_duplicating(tmp_path):
    out = tmp_path / "run.h5"
    _linear_run(out, 0, 40)
    with pk.open_store(out) as s:
        assert s.steps("model") == [0, 10, 20, 30, 40]
        w40 = s.weights("model", "0", step=40)
        a40 = s.acts("model", "a", "0", step=40)[:]
    rec = _linear_run(out, 40, 80, shift=1.0)  # step 40 is already in the store: skipped
    assert rec.recorded == [0, 10, 20, 30, 40, 50, 60, 70, 80]
    with pk.open_store(out) as s:
        assert s.steps("model") == [0, 10, 20, 30, 40, 50, 60, 70, 80]
        np.testing.assert_array_equal(s.weights("model", "0", step=40), w40)
        np.testing.assert_array_equal(s.acts("model", "a", "0", step=40)[:], a40)
        np.testing.assert_allclose(s.weights("model", "0", step=60), np.full((5, 4), 0.01 * 60 + 1.0), rtol=1e-6)
        for st in s.steps("model"):
            assert s.n_rows("a", "model", step=st) == 30 and s.n_rows("b", "model", step=st) == 11
        # the sample rows of each split are written once and shared by every step
        assert len(s.sample_field("a", "index")) == 30 and len(s.sample_field("b", "index")) == 11


def test_only_rank_zero_writes_and_ddp_is_unwrapped(tmp_path, monkeypatch):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        ddp = nn.parallel.DistributedDataParallel(inner)
        data = TensorDataset(torch.randn(9, 3))
        rec = pk.Recorder(ddp, ["0"], data, tmp_path / "r0.h5", every=2)
        assert rec.module is inner and rec.step(0) and not rec.step(1)
        with pk.open_store(tmp_path / "r0.h5") as s, torch.no_grad():
            np.testing.assert_allclose(s.acts("model", "probe", "0", step=0)[:], inner[0](data.tensors[0]).numpy(),
                                       atol=1e-6)
        monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 1)
        rec1 = pk.Recorder(ddp, ["0"], data, tmp_path / "r1.h5", every=2)
        assert rec1.rank == 1 and rec1.step(0) is False
        assert not (tmp_path / "r1.h5").exists()
    finally:
        dist.destroy_process_group()


def test_errors_name_the_parameter(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    data = TensorDataset(torch.randn(4, 3))
    with pytest.raises(ProbekitError, match="every"):
        pk.Recorder(model, ["0"], data, tmp_path / "r.h5", every=0)
    with pytest.raises(ProbekitError, match="probe data"):
        pk.Recorder(model, ["0"], None, tmp_path / "r.h5")
    with pytest.raises(LayerNotFoundError):
        pk.Recorder(model, ["nope"], data, tmp_path / "r.h5")
    with pytest.raises(ProbekitError, match="never moves"):
        pk.Recorder(model, ["0"], data, tmp_path / "r.h5", device="meta")
    assert not (tmp_path / "r.h5").exists()


def test_lightning_callback_records_steps(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from probekit.extractors._recorder import RecorderCallback

    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

        def training_step(self, batch, _i):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.randn(32, 3)
    y = (x[:, 0] > 0).long()
    cb = RecorderCallback(["net.0"], TensorDataset(x[:10], y[:10]), tmp_path / "l.h5", every=2)
    trainer = L.Trainer(max_steps=6, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accelerator="cpu")
    trainer.fit(Lit(), DataLoader(TensorDataset(x, y), batch_size=4))
    with pk.open_store(tmp_path / "l.h5") as s:
        assert s.steps("model") == [0, 2, 4, 6]
