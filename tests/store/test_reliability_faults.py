"""Fault injection: an extraction is interrupted, then resumed; the store must equal an uninterrupted run's.

Faults (tests/store/test_resume.py already covers SIGKILL through the API, at items and at random moments):

- SIGINT (Ctrl-C) through the CLI: exit code 130, the committed rows kept, a message saying how to
  resume; ``--resume`` then completes the store.
- SIGKILL through the CLI at several items: ``probekit info`` (text and JSON) reports the committed rows
  and never raises; ``--resume`` completes the store.
- an exception raised from a user's forward hook after k batches;
- a failing writer: ``OSError(ENOSPC)`` raised by ``StoreWriter.write_rows`` after k batches, or from
  inside a batch (after some of its datasets were written, before the counters moved), with and
  without the writer thread; and a full disk through the CLI (one line, exit 2, rows committed).

The oracle is an uninterrupted run of the same extraction: every dataset and every attribute of every
group and dataset equal (the root's creation time aside).
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

import probekit
from probekit.cli import main
from probekit.store import StoreWriter
from probekit.store import _writer as writer_module

N, BATCH = 24, 4
HELPER = textwrap.dedent(
    '''
    """Model and data for the fault-injection tests (imported as rel_faults_helper:NAME)."""
    import os, signal

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    N = 24


    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))


    class Data(Dataset):
        factor_names = ["bg"]

        def __init__(self, fault_at=-1, sig=None):
            self.fault_at, self.sig = fault_at, sig

        def __len__(self):
            return N

        def __getitem__(self, i):
            if i == self.fault_at:
                os.kill(os.getpid(), self.sig)
            x = torch.from_numpy(np.random.default_rng(i).normal(size=(3, 6, 6)).astype(np.float32))
            return x, i % 3, np.array([i * 0.25], dtype=np.float32)


    def data():
        """Sends itself the signal in PK_SIGNAL (INT or KILL) when item PK_FAULT_AT is read."""
        at = int(os.environ.get("PK_FAULT_AT", "-1"))
        sig = getattr(signal, "SIG" + os.environ.get("PK_SIGNAL", "INT"))
        return Data(at, sig)
    '''
)


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    d = tmp_path_factory.mktemp("helper")
    (d / "rel_faults_helper.py").write_text(HELPER)
    sys.path.insert(0, str(d))
    try:
        import rel_faults_helper

        yield d, rel_faults_helper
    finally:
        sys.path.remove(str(d))
        sys.modules.pop("rel_faults_helper", None)


def cli_args(out, *extra):
    return ["extract", "rel_faults_helper:model", "--data", "rel_faults_helper:data", "--layers", "0,1,4",
            "-o", str(out), "--batch-size", str(BATCH), "--no-progress", *extra]


@pytest.fixture(scope="module")
def full(helper, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "full.h5"
    assert main(cli_args(out)) == 0
    return out


def contents(path) -> dict[str, tuple]:
    out = {}
    with h5py.File(path, "r", locking=False) as f:
        def visit(name, obj):
            attrs = {k: str(v) for k, v in obj.attrs.items()}
            out[name] = (obj[()] if isinstance(obj, h5py.Dataset) else None, attrs)
        f.visititems(visit)
    return out


def assert_same_store(a, b) -> None:
    da, db = contents(a), contents(b)
    assert sorted(da) == sorted(db)
    for name, (value, attrs) in da.items():
        if value is not None:
            other = db[name][0]
            assert value.dtype == other.dtype and value.shape == other.shape, name
            np.testing.assert_array_equal(value, other, err_msg=name)
        assert attrs == db[name][1], name


def run_cli_child(helper_dir, out, fault_at, sig, *extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{helper_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PK_FAULT_AT=str(fault_at), PK_SIGNAL=sig)
    # SIGINT back to its default in the child: a test run started as a background job of a
    # non-interactive shell has it ignored, and an ignored signal is inherited through exec
    return subprocess.run([sys.executable, "-m", "probekit.cli", *cli_args(out, *extra)], env=env,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# -- SIGINT through the CLI ----------------------------------------------------------------------------
@pytest.mark.parametrize("fault_at", [3, 13])
def test_ctrl_c_exits_130_keeps_rows_says_how_to_resume(helper, full, tmp_path, fault_at):
    d, _ = helper
    out = tmp_path / "int.h5"
    proc = run_cli_child(d, out, fault_at, "INT")
    committed = (fault_at // BATCH) * BATCH  # batches fully read before the item that interrupts
    assert proc.returncode == 130, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    # the line names the command that continues: the same one, with --resume
    assert lines[-1] == (f"probekit: interrupted; {committed} rows committed; run the same command with "
                         "--resume to continue from the last committed row: probekit "
                         + shlex.join(cli_args(out, "--resume")))
    assert "Traceback" not in proc.stderr
    with probekit.open_store(out) as s:
        assert s.n_rows("data") == committed and s.n_rows("data", "model") == committed
        with probekit.open_store(full) as ref:
            for layer in ("0", "1", "4") if committed else ():
                np.testing.assert_array_equal(np.asarray(s.acts("model", "data", layer)),
                                              np.asarray(ref.acts("model", "data", layer))[:committed])
    assert main(cli_args(out, "--resume")) == 0
    assert_same_store(full, out)


def test_ctrl_c_in_process_returns_130(helper, full, tmp_path, monkeypatch, capsys):
    """The same through ``main()``: the KeyboardInterrupt is turned into exit code 130 and one line."""
    out = tmp_path / "int_inproc.h5"
    monkeypatch.setenv("PK_FAULT_AT", "9")
    monkeypatch.setenv("PK_SIGNAL", "INT")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored when run as a background job
    try:
        assert main(cli_args(out)) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("probekit: interrupted; 8 rows committed; run the same command with --resume")
    monkeypatch.setenv("PK_FAULT_AT", "-1")
    assert main(cli_args(out, "--resume")) == 0
    assert_same_store(full, out)


# -- SIGKILL through the CLI, then `probekit info` -----------------------------------------------------
@pytest.mark.parametrize("fault_at", [0, 5, 17])
def test_sigkilled_cli_store_info_reports_committed_then_resume(helper, full, tmp_path, capsys, fault_at):
    d, _ = helper
    out = tmp_path / "kill.h5"
    proc = run_cli_child(d, out, fault_at, "KILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    committed = (fault_at // BATCH) * BATCH
    if fault_at == 0:  # item 0 is read to learn the fields before the store is created
        assert not out.exists()
        assert main(["info", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "probekit: error:" in err and "does not exist" in err
        assert main(cli_args(out, "--resume")) == 0
        assert_same_store(full, out)
        return
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"data: {committed} rows committed of {N} (incomplete: --resume)" in text
    assert f"data: {committed} rows" in text.split("models:")[1]
    assert main(["info", "--json", str(out)]) == 0
    import json

    desc = json.loads(capsys.readouterr().out)
    assert desc["splits"]["data"]["rows_committed"] == committed
    assert desc["splits"]["data"]["rows_expected"] == N
    assert desc["models"]["model"]["acts"]["data"]["rows_committed"] == committed
    assert {k: v["shape"][0] for k, v in desc["models"]["model"]["acts"]["data"]["layers"].items()} == \
        ({"0": committed, "1": committed, "4": committed} if committed else {})
    assert main(cli_args(out, "--resume")) == 0
    assert_same_store(full, out)


# -- an exception from a user's forward hook ----------------------------------------------------------
@pytest.mark.parametrize("fail_call", [0, 1, 4])
def test_exception_in_forward_hook_then_resume(helper, full, tmp_path, fail_call):
    """The user's hook fails on every forward pass that holds the first sample of batch ``fail_call``
    (recognised by its input values, so however many passes reach the hook)."""
    _, h = helper
    model = h.model()
    target = h.Data()[fail_call * BATCH][0]

    def hook(module, inputs, output):
        if any(torch.equal(row, target) for row in inputs[0]):
            raise RuntimeError("hook failure injected by the test")

    handle = model[0].register_forward_hook(hook)
    out = tmp_path / "hook.h5"
    # on the first batch a failing forward is reported as a data error (one line on the CLI) and the
    # file this run created, holding no row, is removed; later it propagates as it is
    expected = probekit.errors.DataError if fail_call == 0 else RuntimeError
    with pytest.raises(expected, match="injected"):
        probekit.extract(model, h.Data(), layers=["0", "1", "4"], out=out, batch_size=BATCH,
                         source="rel_faults_helper:model", progress=False)
    handle.remove()
    # probekit's own capture hooks are gone: the model is left as it was given
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    if fail_call == 0:
        assert not out.exists()
    else:
        with probekit.open_store(out) as s:
            assert s.n_rows("data", "model") == fail_call * BATCH
    probekit.extract(model, h.Data(), layers=["0", "1", "4"], out=out, batch_size=BATCH,
                     source="rel_faults_helper:model", progress=False, mode="resume")
    assert_same_store(full, out)


# -- a failing writer (disk full) ------------------------------------------------------------------------
def _fail_after(monkeypatch, target, name, k):
    """Make ``target.name`` raise OSError(ENOSPC) on its call number k (0-based) and after."""
    real = getattr(target, name)
    count = {"n": 0}

    def failing(*args, **kwargs):
        count["n"] += 1
        if count["n"] > k:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    return count


@pytest.mark.parametrize("thread", [False, True])
@pytest.mark.parametrize("k", [0, 2, 5])
def test_enospc_from_write_rows_after_k_batches_then_resume(helper, full, tmp_path, monkeypatch, k, thread):
    _, h = helper
    out = tmp_path / "full_disk.h5"
    _fail_after(monkeypatch, StoreWriter, "write_rows", k)
    with pytest.raises(OSError) as info:
        probekit.extract(h.model(), h.Data(), layers=["0", "1", "4"], out=out, batch_size=BATCH,
                         source="rel_faults_helper:model", progress=False, writer_thread=thread)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    with probekit.open_store(out) as s:
        assert s.n_rows("data", "model") == k * BATCH
    probekit.extract(h.model(), h.Data(), layers=["0", "1", "4"], out=out, batch_size=BATCH,
                     source="rel_faults_helper:model", progress=False, writer_thread=thread, mode="resume")
    assert_same_store(full, out)


@pytest.mark.parametrize("k", [1, 6, 14])
def test_enospc_inside_a_batch_leaves_no_half_written_rows(helper, full, tmp_path, monkeypatch, k):
    """The failure hits between two datasets of one batch: some were written, the counters not moved.

    A batch writes 3 sample fields (index, label, factors) and 3 layers = 6 datasets; failing on the
    k-th dataset write hits mid-batch for most k.
    """
    _, h = helper
    out = tmp_path / "half.h5"
    with h5py.File(full, "r") as f:
        n_datasets_per_batch = len(f["samples/data"]) + len(f["models/model/acts/data"])
    calls = _fail_after(monkeypatch, writer_module._Rows, "write", k)
    with pytest.raises(OSError):
        probekit.extract(h.model(), h.Data(), layers=["0", "1", "4"], out=out, batch_size=BATCH,
                         source="rel_faults_helper:model", progress=False)
    monkeypatch.undo()
    assert calls["n"] == k + 1
    committed = (k // n_datasets_per_batch) * BATCH  # batches whose every dataset was written
    if committed == 0:  # the store writer's WriteError: a new store with no committed row is not kept
        assert not out.exists()
    else:
        with probekit.open_store(out) as s:
            assert s.n_rows("data") == committed and s.n_rows("data", "model") == committed
            with probekit.open_store(full) as ref:
                for layer in ("0", "1", "4"):
                    np.testing.assert_array_equal(s.acts("model", "data", layer)[:],
                                                  ref.acts("model", "data", layer)[:committed])
    probekit.extract(h.model(), h.Data(), layers=["0", "1", "4"], out=out, batch_size=BATCH,
                     source="rel_faults_helper:model", progress=False, mode="resume")
    assert_same_store(full, out)


def test_enospc_through_cli_is_one_line_with_rows_committed(helper, full, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli_full_disk.h5"
    _fail_after(monkeypatch, StoreWriter, "write_rows", 3)
    assert main(cli_args(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("probekit: error: writing") and "No space left on device" in err
    assert "12 rows committed" in err and "--resume" in err
    monkeypatch.undo()
    assert main(cli_args(out, "--resume")) == 0
    assert_same_store(full, out)
