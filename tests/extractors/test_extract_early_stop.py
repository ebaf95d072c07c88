"""Early stopping: each forward pass ends once the last requested layer has run.

One whole pass over (a copy of) the first two samples checks the layers; its rows are not kept, so every
batch is the same as without stopping; then every pass stops early. The modules
after the last requested layer must run only in that check pass (counted by a module that records its
calls and rows), the stored rows must equal a manual forward pass (the oracle) and a run with
``stop_early=False``, and the check that needs a whole pass (a module selected without ``@K`` that runs
twice) still fires.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import probekit
from probekit.cli import main
from probekit.errors import DataError
from probekit.extraction import extract, extract_pair
from probekit.extractors import capture

N, BATCH = 10, 4  # batches of 4, 4, 2


class Calls(nn.Module):
    """Identity that counts the forward passes (n) and the rows (rows) that reached it."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n += 1
        self.rows += len(x)
        return x


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.after_act = Calls()
        self.fc2 = nn.Linear(8, 5)
        self.after_fc2 = Calls()
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        h = self.after_act(h)
        h.mul_(3.0)  # changes act's output in place after its hook: the stored rows must not see it
        z = self.after_fc2(self.fc2(h))
        return self.head(z)


def data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, 6, generator=g))


def oracle(net: Net, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each layer's output when it ran, by hand (no hooks)."""
    with torch.no_grad():
        fc1 = x @ net.fc1.weight.T + net.fc1.bias
        act = fc1.clamp(min=0)
        fc2 = (3 * act) @ net.fc2.weight.T + net.fc2.bias
    return {"fc1": fc1.numpy(), "act": act.numpy(), "fc2": fc2.numpy()}


def stored(path, layers, name="model") -> dict[str, np.ndarray]:
    with probekit.open_store(path) as st:
        return {k: np.asarray(st.acts(name, "data", k)) for k in layers}


@pytest.mark.parametrize("writer_thread", [False, True])
def test_later_modules_run_only_in_the_two_sample_check_and_rows_equal_the_oracle(tmp_path, writer_thread):
    net, ds = Net(), data()
    extract(net, ds, layers=["fc1", "act"], out=tmp_path / "a.h5", batch_size=BATCH, progress=False,
            writer_thread=writer_thread)
    # the check pass runs whole on 2 samples; the 3 batches all stop after `act`
    assert (net.after_act.n, net.after_act.rows) == (1, 2)
    assert (net.after_fc2.n, net.after_fc2.rows) == (1, 2)
    got, want = stored(tmp_path / "a.h5", ["fc1", "act"]), oracle(net, ds.tensors[0])
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_first_batches_of_one_to_three_samples(tmp_path, batch_size):
    net, ds = Net(), data()
    extract(net, ds, layers=["fc2"], out=tmp_path / "a.h5", batch_size=batch_size, progress=False)
    # a first batch of 1 or 2 samples is the check itself (run whole); of 3, a check pass on 2 comes first
    check = 2 if batch_size > 2 else 0
    assert net.after_act.rows == check + N
    assert net.after_fc2.rows == (check or batch_size)
    np.testing.assert_allclose(stored(tmp_path / "a.h5", ["fc2"])["fc2"], oracle(net, ds.tensors[0])["fc2"],
                               rtol=1e-5, atol=1e-6)


def test_stop_early_false_runs_every_module_and_stores_the_same_rows(tmp_path):
    a, b = Net(), Net()
    extract(a, data(), layers=["fc1", "fc2"], out=tmp_path / "a.h5", batch_size=BATCH, progress=False)
    extract(b, data(), layers=["fc1", "fc2"], out=tmp_path / "b.h5", batch_size=BATCH, progress=False,
            stop_early=False)
    # fc2 is the last layer asked for: after_fc2 runs only in the check pass
    assert (a.after_act.rows, a.after_fc2.rows) == (2 + N, 2)
    assert (b.after_act.rows, b.after_fc2.rows) == (N, N)  # no check pass: the first batch runs whole
    sa, sb = stored(tmp_path / "a.h5", ["fc1", "fc2"]), stored(tmp_path / "b.h5", ["fc1", "fc2"])
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    np.testing.assert_allclose(sa["fc2"], oracle(a, data().tensors[0])["fc2"], rtol=1e-5, atol=1e-6)


def test_requested_order_does_not_matter_the_last_layer_to_run_ends_the_pass(tmp_path):
    net = Net()
    extract(net, data(), layers=["fc2", "fc1"], out=tmp_path / "a.h5", batch_size=BATCH, progress=False)
    assert net.after_act.rows == 2 + N and net.after_fc2.rows == 2


class Twice(nn.Module):
    """One block applied twice; a counter after each call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.block = nn.Linear(6, 6)
        self.mid = Calls()
        self.end = Calls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.block(x))
        return self.end(self.block(h))


def test_call_selectors_stop_after_the_requested_call(tmp_path):
    net, ds = Twice(), data()
    extract(net, ds, layers=["block@0"], out=tmp_path / "a.h5", batch_size=BATCH, progress=False)
    assert (net.mid.rows, net.end.rows) == (2, 2)  # check pass whole, then stopped inside the first call
    x = ds.tensors[0]
    with torch.no_grad():
        first = x @ net.block.weight.T + net.block.bias
        second = first @ net.block.weight.T + net.block.bias
    # batches of another size than the oracle's one pass round differently on some CPUs (3 float32 ulps
    # seen on values of 0.02): the absolute floor of the comparison below is the float32 noise level
    np.testing.assert_allclose(stored(tmp_path / "a.h5", ["block@0"])["block@0"], first.numpy(), rtol=1e-6,
                               atol=1e-6)

    net2 = Twice()
    extract(net2, ds, layers=["block@1"], out=tmp_path / "b.h5", batch_size=BATCH, progress=False)
    assert (net2.mid.rows, net2.end.rows) == (2 + N, 2)
    np.testing.assert_allclose(stored(tmp_path / "b.h5", ["block@1"])["block@1"], second.numpy(), rtol=1e-5,
                               atol=1e-6)


def test_a_module_that_runs_twice_is_still_refused_without_a_call_index(tmp_path):
    with pytest.raises(DataError, match="runs more than once"):
        extract(Twice(), data(), layers=["block"], out=tmp_path / "a.h5", batch_size=BATCH, progress=False)


class Swallows(nn.Module):
    """A forward that catches every Exception around its first stage (early stopping must not break it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.fc1 = nn.Linear(6, 4)
        self.tail = Calls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = self.fc1(x)
        except Exception:  # the point of this model
            h = torch.zeros(len(x), 4)
        return self.tail(h)


def test_a_forward_that_swallows_exceptions_runs_on_and_stores_the_true_rows(tmp_path):
    net, ds = Swallows(), data()
    extract(net, ds, layers=["fc1"], out=tmp_path / "a.h5", batch_size=BATCH, progress=False)
    # check pass (2 rows); the first batch's stop was caught and the model ran to its end (4), that
    # pass ran again without stopping (4), and the model was not stopped again (the other 6)
    assert net.tail.rows == 2 + 2 * BATCH + (N - BATCH)
    with torch.no_grad():
        want = ds.tensors[0] @ net.fc1.weight.T + net.fc1.bias
    np.testing.assert_allclose(stored(tmp_path / "a.h5", ["fc1"])["fc1"], want.numpy(), rtol=1e-6)


def test_pair_each_model_stops_at_its_own_last_layer(tmp_path):
    t, s = Net(0), Net(1)
    extract_pair(t, s, data(), layers={"teacher": ["fc2"], "student": ["fc1"]}, out=tmp_path / "p.h5",
                 batch_size=BATCH, progress=False)
    assert (t.after_act.rows, t.after_fc2.rows) == (2 + N, 2)
    assert (s.after_act.rows, s.after_fc2.rows) == (2, 2)
    x = data().tensors[0]
    np.testing.assert_allclose(stored(tmp_path / "p.h5", ["fc2"], "teacher")["fc2"], oracle(t, x)["fc2"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored(tmp_path / "p.h5", ["fc1"], "student")["fc1"], oracle(s, x)["fc1"],
                               rtol=1e-6, atol=1e-6)  # float32 noise of another batch size, as for the teacher


def test_capture_run_whole_by_default_and_the_hooks_are_removed_after_a_stop():
    net, x = Net(), data().tensors[0][:3]
    with capture(net, ["fc1"]) as cap:
        cap.run(x)
        assert net.after_fc2.n == 1
        cap.stop_when_done = True
        got = cap.run(x)["fc1"]
        assert net.after_fc2.n == 1 and net.after_act.n == 1
    assert not net.fc1._forward_hooks  # removed on exit
    net(x)  # no hook left to stop it
    assert net.after_fc2.n == 2
    np.testing.assert_allclose(got.numpy(), oracle(net, x)["fc1"], rtol=1e-6)


def test_cli_full_forward_runs_every_module(tmp_path, monkeypatch):
    made: list[Net] = []

    def factory() -> Net:
        made.append(Net())
        return made[-1]

    import sys
    import types

    mod = types.ModuleType("pk_early_stop_models")
    mod.net = factory  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pk_early_stop_models", mod)
    np.savez(tmp_path / "d.npz", x=data().tensors[0].numpy())
    for flags in ([], ["--full-forward"]):
        out = tmp_path / f"s{len(flags)}.h5"
        rc = main(["extract", "pk_early_stop_models:net", "--data", str(tmp_path / "d.npz"), "-o", str(out),
                   "--layers", "fc1", "--batch-size", str(BATCH), "--no-progress", *flags])
        assert rc == 0
    assert [m.after_fc2.rows for m in made] == [2, N]


class Captured(nn.Module):
    """Identity that remembers the tensor it returned."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x
        return x


class MapNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.probe = Captured()
        self.tail = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.probe(self.conv(x))
        h.mul_(-1.0)  # in place after the hook: a kept view would see it unless the pass stopped
        return self.tail(h)


@pytest.mark.parametrize("elide", [False, True])
def test_the_output_that_ends_the_pass_is_kept_without_a_copy_only_when_asked(elide):
    net, x = MapNet(), torch.randn(2, 3, 5, 5)
    with capture(net, ["probe"], pool="none") as cap:
        cap.stop_when_done, cap.elide_final_copy = True, elide
        got = cap.run(x)["probe"]
        shares = got.data_ptr() == net.probe.last.data_ptr()
    assert shares == elide
    with torch.no_grad():
        want = net.conv(x)  # the map before the in-place negation, which never ran
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_a_view_is_never_kept_without_stopping_the_pass():
    net, x = MapNet(), torch.randn(2, 3, 5, 5)
    with capture(net, ["probe"], pool="none") as cap:
        cap.elide_final_copy = True  # stop_when_done left False: the negation runs after the hook
        got = cap.run(x)["probe"]
    with torch.no_grad():
        want = net.conv(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


class Reuses(nn.Module):
    """Writes its output into one persistent tensor every pass (``out=``): a kept reference to the
    previous batch's output changes under a writer that has not written it yet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc = nn.Linear(6, 64)
        self.buf: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if self.buf is None or self.buf.shape != y.shape:
            self.buf = torch.empty_like(y)
        return torch.clamp(y, min=0, out=self.buf)


class ReuseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Reuses()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


@pytest.mark.parametrize("writer_thread", [False, True])
def test_outputs_in_a_reused_tensor_are_stored_right_with_either_writer(tmp_path, monkeypatch, writer_thread):
    from probekit.store import StoreWriter

    real = StoreWriter.write_rows

    def slow(self, *a, **k):  # the writer lags: the next passes overwrite the module's tensor meanwhile
        import time

        time.sleep(0.02)
        return real(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "write_rows", slow)
    g = torch.Generator().manual_seed(9)
    ds = TensorDataset(torch.randn(16, 6, generator=g))
    net = ReuseNet()
    extract(net, ds, layers=["block"], out=tmp_path / "a.h5", batch_size=4, progress=False,
            writer_thread=writer_thread)
    with torch.no_grad():
        want = (ds.tensors[0] @ net.block.fc.weight.T + net.block.fc.bias).clamp(min=0)
    np.testing.assert_allclose(stored(tmp_path / "a.h5", ["block"])["block"], want.numpy(), rtol=1e-5, atol=1e-6)


class CatchesAndChanges(nn.Module):
    """Catches the stop raised in its in-place ReLU's hook, then changes that output (its own tensor) in
    place: a view kept without a copy would store the changed values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.fc = nn.Linear(6, 16)
        self.act = nn.ReLU(inplace=True)
        self.tail = Calls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        try:
            self.act(h)  # in place: h is the act's output
        except Exception:  # the point of this model
            pass
        h.mul_(-2.0)
        return self.tail(h)


@pytest.mark.parametrize("writer_thread", [False, True])
def test_a_model_that_catches_the_stop_and_changes_the_kept_output_is_rerun_with_copies(tmp_path, writer_thread):
    net, ds = CatchesAndChanges(), data()
    extract(net, ds, layers=["act"], pool="none", out=tmp_path / "a.h5", batch_size=BATCH, progress=False,
            writer_thread=writer_thread)
    with torch.no_grad():
        want = (ds.tensors[0] @ net.fc.weight.T + net.fc.bias).clamp(min=0)
    np.testing.assert_allclose(stored(tmp_path / "a.h5", ["act"])["act"], want.numpy(), rtol=1e-5, atol=1e-6)
    # check pass (2 rows), batch 1 stopped, caught, and run again (4 + 4), then no more stops
    assert net.tail.rows == 2 + 2 * BATCH + (N - BATCH)


def test_wrapped_and_compiled_models_are_not_stopped(tmp_path):
    from probekit.extractors._pipeline import _can_stop_early

    net = Net()
    assert _can_stop_early(net)
    assert not _can_stop_early(nn.DataParallel(net))
    assert not _can_stop_early(torch.compile(net))  # wrapped lazily: nothing is compiled here
    # DataParallel on CPU runs the module itself: extraction works and runs every module
    extract(nn.DataParallel(net), data(), layers=["module.fc1"], out=tmp_path / "a.h5", batch_size=BATCH,
            progress=False)
    assert net.after_fc2.rows == N


class InplaceNorm(nn.Module):
    """Centres its input in place (like torchvision's Normalize(inplace=True))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(x.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("stop_early", [False, True])
@pytest.mark.parametrize("order", ["changer_first", "changer_last"])
def test_a_model_that_changes_its_input_in_place_does_not_change_the_other_models_rows(tmp_path, stop_early,
                                                                                    order):
    """Two models on the same batches: one centres its input in place, the other's requested layer is (a
    view of) its input. Each must store what it computed from the batch as loaded."""
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(N, 6) + 5.0)
    raw = ds.tensors[0].clone()
    changer = nn.Sequential(InplaceNorm(), nn.Linear(6, 4))
    viewer = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    names = ("teacher", "student") if order == "changer_first" else ("student", "teacher")
    models = dict(zip(names, (changer, viewer), strict=True))
    extract_pair(models["teacher"], models["student"], ds, out=tmp_path / "p.h5", pool="none",
                 layers={names[0]: ["0"], names[1]: ["0"]}, batch_size=BATCH, progress=False,
                 stop_early=stop_early)
    centred = raw - raw.mean(dim=1, keepdim=True)
    np.testing.assert_allclose(stored(tmp_path / "p.h5", ["0"], names[1])["0"], raw.numpy(), rtol=1e-6)
    np.testing.assert_allclose(stored(tmp_path / "p.h5", ["0"], names[0])["0"], centred.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(ds.tensors[0].numpy(), raw.numpy())  # the dataset itself untouched


class Guarded(nn.Module):
    """Re-raises its stage's errors with context (``raise ... from e``), which turns the stop into a
    RuntimeError."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.stage(x)
        except Exception as e:
            raise RuntimeError("stage failed") from e


@pytest.mark.parametrize("batch_size", [2, 4])
def test_a_model_that_turns_the_stop_into_another_error_is_run_whole(tmp_path, batch_size):
    torch.manual_seed(0)
    net = nn.Sequential(Guarded(nn.Linear(6, 4)), nn.ReLU(), nn.Linear(4, 2), Calls())
    ds = data()
    extract(net, ds, layers=["0.stage"], out=tmp_path / "a.h5", batch_size=batch_size, progress=False)
    with torch.no_grad():
        want = ds.tensors[0] @ net[0].stage.weight.T + net[0].stage.bias
    np.testing.assert_allclose(stored(tmp_path / "a.h5", ["0.stage"])["0.stage"], want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("batch_size", [3, 6])
def test_a_model_whose_eval_output_depends_on_the_batch_stores_the_same_rows(tmp_path, batch_size):
    """BatchNorm without running statistics normalises over the batch even in eval mode: the check pass
    must not change which samples share a batch (nor fail on a short one)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 2))
    ds = TensorDataset(torch.randn(12, 6))
    for stop in (False, True):
        extract(net, ds, layers=["1"], out=tmp_path / f"{stop}.h5", batch_size=batch_size, progress=False,
                stop_early=stop)
    np.testing.assert_array_equal(stored(tmp_path / "True.h5", ["1"])["1"], stored(tmp_path / "False.h5", ["1"])["1"])
