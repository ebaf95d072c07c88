"""The capture hooks pool into host buffers reused across batches (CPU): stored rows stay the true layer
outputs even when the model changes them in place later in the forward, and no batch's rows alias
another's, with the synchronous writer and with the writer thread (a slow one that lags behind)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import probekit
from probekit.errors import DataError
from probekit.extraction import extract, extract_pair
from probekit.extractors import ModelSpec, _hooks, extract_models, pool
from probekit.store import StoreWriter

N, BATCH = 11, 4  # batches of 4, 4, 3: the last one is short


class InPlaceAfter(nn.Module):
    """The hooked conv's output is changed in place twice later in the forward."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.add_(1.0)  # changes the conv's output tensor itself
        y = self.act(y)  # in place again: y is still the conv's output tensor
        y.mul_(2.0)  # and again, after the ReLU's hook ran
        return self.head(y.mean((2, 3)))


def oracle(model: InPlaceAfter, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The true outputs of the two layers at the moment each ran, by a manual forward (no hooks)."""
    with torch.no_grad():
        conv = F.conv2d(x, model.conv.weight, model.conv.bias, padding=1)
        act = torch.clamp(conv + 1.0, min=0.0)
    return {"conv": conv.numpy(), "act": act.reshape(len(x), -1).numpy()}


def data(seed: int = 3, n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g))


@pytest.fixture
def slow_writer(monkeypatch):
    """A writer that lags behind the forward passes, so the writer thread has batches queued while
    the next ones are pooled: a buffer handed back too early would show as another batch's rows."""
    real = StoreWriter.write_rows

    def slow(self, *args, **kwargs):
        time.sleep(0.03)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_rows", slow)


@pytest.fixture
def outs_seen(monkeypatch):
    """Records, per call of the hooks' pool, whether it was given a buffer (so the tests know they
    exercise the buffered path and not only the first batch's fresh tensors)."""
    seen: list[bool] = []
    real = _hooks.pool

    def spy(*args, **kwargs):
        seen.append(kwargs.get("out") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(_hooks, "pool", spy)
    return seen


@pytest.mark.parametrize("writer_thread", [False, True])
def test_rows_are_the_outputs_before_later_in_place_ops(tmp_path, writer_thread, slow_writer, outs_seen):
    model, ds = InPlaceAfter(0), data()
    out = extract_models({"model": ModelSpec(model, ["conv", "act"], pool={"conv": "none", "act": "flatten"})},
                         ds, out=tmp_path / "s.h5", batch_size=BATCH, progress=False,
                         writer_thread=writer_thread, queue_size=1)
    want = oracle(model, ds.tensors[0])
    with probekit.open_store(out) as s:
        for layer in ("conv", "act"):
            got = np.asarray(s.acts("model", "data", layer))
            assert got.shape == want[layer].shape
            np.testing.assert_allclose(got, want[layer], rtol=1e-5, atol=1e-6)
    # the two-sample check pass, then 3 batches x 2 layers; every batch after the first was pooled into
    # a reused buffer, except, with the synchronous writer, `act`: its hook ends the (stopped) pass, so
    # it is kept without a copy
    final = not writer_thread
    assert outs_seen == [False, False, False, False, True, not final, True, not final]


@pytest.mark.parametrize("writer_thread", [False, True])
def test_consecutive_batches_are_not_aliased(tmp_path, writer_thread, slow_writer):
    """Every batch stores its own values: equal to the oracle row by row, and different from the rows
    of the batch before. 5 batches, and with queue_size=0 the writer thread has at most 2 buffer sets,
    so each set (the first batch's own tensors included) is reused while the writer lags."""
    n = 19
    model, ds = InPlaceAfter(1), data(7, n)
    out = extract_models({"model": ModelSpec(model, ["conv"])}, ds, pool="none", out=tmp_path / "s.h5",
                         batch_size=BATCH, progress=False, writer_thread=writer_thread, queue_size=0)
    want = oracle(model, ds.tensors[0])["conv"]
    with probekit.open_store(out) as s:
        got = np.asarray(s.acts("model", "data", "conv"))
    assert got.shape == want.shape
    starts = list(range(0, n, BATCH))
    for a, b in itertools.pairwise(starts):
        np.testing.assert_allclose(got[a:a + BATCH], want[a:a + BATCH], rtol=1e-5, atol=1e-6)
        m = min(BATCH, n - b)
        assert not np.allclose(got[a:a + m], got[b:b + m])
    np.testing.assert_allclose(got[starts[-1]:], want[starts[-1]:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("writer_thread", [False, True])
def test_float16_store_casts_in_the_same_copy(tmp_path, writer_thread):
    model, ds = InPlaceAfter(2), data()
    out = extract(model, ds, layers=["conv"], pool="none", out=tmp_path / "s.h5", batch_size=BATCH,
                  progress=False, writer_thread=writer_thread, dtype="float16")
    want = oracle(model, ds.tensors[0])["conv"]
    with probekit.open_store(out) as s:
        got = np.asarray(s.acts("model", "data", "conv"))
    assert got.dtype == np.float16
    # the float16 rounding of the true value (numpy's cast, not the code's)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float16).astype(np.float32),
                               rtol=2e-3, atol=1e-3)


def test_two_models_in_one_pass_keep_their_own_buffers(tmp_path, slow_writer):
    t, s_, ds = InPlaceAfter(4), InPlaceAfter(5), data(9)
    out = extract_pair(t, s_, ds, layers=["conv"], out=tmp_path / "p.h5", pool="none", batch_size=BATCH,
                       progress=False, writer_thread=True, queue_size=1)
    x = ds.tensors[0]
    with probekit.open_store(out) as st:
        for name, m in (("teacher", t), ("student", s_)):
            np.testing.assert_allclose(np.asarray(st.acts(name, "data", "conv")), oracle(m, x)["conv"],
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode, view", [
    ("none", lambda t: t),
    ("flatten", lambda t: t.reshape(len(t), -1)),
    ("cls", lambda t: t[:, 0]),
    ("avg", lambda t: t.mean(dim=1)),
])
def test_pool_into_out_equals_the_plain_result(mode, view):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 6, generator=g)
    want = view(t).clone()
    buf = torch.full(want.shape, float("nan"))
    got = pool(t, mode, out=buf)
    assert got is buf
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    t0 = t.clone()
    t.add_(10.0)  # a later in-place change of the layer output leaves the copy alone
    torch.testing.assert_close(buf, want, rtol=1e-6, atol=1e-7)
    half = torch.empty(want.shape, dtype=torch.float16)
    assert pool(t0, mode, out=half) is half
    np.testing.assert_array_equal(half.numpy(), want.numpy().astype(np.float16))


def test_pool_refuses_an_out_of_another_shape():
    with pytest.raises(DataError, match="shape"):
        pool(torch.zeros(4, 3, 2, 2), "none", out=torch.empty(3, 3, 2, 2))
