"""A writer process killed with SIGKILL, then resumed, gives the store an uninterrupted run gives.

The child process runs ``probekit.extract``; its dataset kills the process (SIGKILL, no cleanup, no
``finally``) when a chosen item is read, i.e. after a chosen number of committed batches, or a timer
kills it at a random moment (possibly in the middle of an HDF5 write). The parent then resumes with
``mode="resume"`` and compares every dataset and attribute with a run that was never interrupted.
"""

from __future__ import annotations

import importlib.util
import random
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

import probekit

CHILD = textwrap.dedent(
    '''
    import os, signal, sys, threading, time

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    N, BATCH, LAYERS = 40, 4, ["0", "2", "6"]


    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 8, 3, stride=2, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )


    class Data(Dataset):
        factor_names = ["f0"]

        def __init__(self, kill_at=-1, sleep=0.0):
            self.x = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(3))
            self.kill_at, self.sleep = kill_at, sleep

        def __len__(self):
            return N

        def __getitem__(self, i):
            if i == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.sleep:
                time.sleep(self.sleep)
            return self.x[i], i % 3, np.array([i * 0.5], dtype=np.float32)


    def run(out, mode, kill_at=-1, writer_thread=False, sleep=0.0):
        import probekit

        probekit.extract(make_model(), Data(kill_at, sleep), layers=LAYERS, out=out, batch_size=BATCH,
                         pool={"0": "avg", "2": "flatten", "6": "none"}, mode=mode, progress=False,
                         writer_thread=writer_thread)


    if __name__ == "__main__":
        out, kill_at, thread, delay = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
        import probekit  # imports first, so that the timer only spans the extraction

        if delay > 0:  # kill at a random moment, possibly inside an HDF5 write
            threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
        t0 = time.perf_counter()
        run(out, "create", kill_at, thread, sleep=0.025 if delay > 0 else 0.0)
        print(f"finished in {time.perf_counter() - t0:.2f} s", flush=True)
        os._exit(0)  # do not let a pending timer fire after a finished run
    '''
)


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    d = tmp_path_factory.mktemp("child")
    path = d / "resume_child.py"
    path.write_text(CHILD)
    spec = importlib.util.spec_from_file_location("resume_child", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full = d / "full.h5"
    mod.run(full, "create")
    return path, mod, full


def datasets(path) -> dict[str, tuple[np.ndarray, dict]]:
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {k: str(v) for k, v in obj.attrs.items()}
            out[name] = (obj[()] if isinstance(obj, h5py.Dataset) else None, attrs)
        f.visititems(visit)
    return out


def assert_equal_stores(a, b) -> None:
    da, db = datasets(a), datasets(b)
    assert sorted(da) == sorted(db)
    for name, (value, attrs) in da.items():
        if value is not None:
            assert value.dtype == db[name][0].dtype and value.shape == db[name][0].shape, name
            np.testing.assert_array_equal(value, db[name][0], err_msg=name)
        assert attrs == db[name][1], name


def kill_child(path, out, kill_at: int, thread: bool, delay: float = 0.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path), str(out), str(kill_at), "1" if thread else "0", str(delay)],
                          capture_output=True, text=True, timeout=300)


# kill points: item indices read when the kill happens (batch size 4): before the first commit, after
# 1, 3, 5 and 9 committed batches, mid-batch and at a batch boundary
_rng = random.Random(20240611)
KILL_POINTS = sorted({2, 4, *(_rng.randrange(5, 39) for _ in range(3))})


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_sigkill_at_an_item_then_resume_equals_uninterrupted(child, tmp_path, kill_at):
    path, mod, full = child
    out = tmp_path / "killed.h5"
    proc = kill_child(path, out, kill_at, thread=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "finished" not in proc.stdout
    with probekit.open_store(out) as s:
        # the batches read before the killing item are exactly the committed rows
        committed = (kill_at // 4) * 4
        assert s.n_rows("data") == committed
        assert s.n_rows("data", "model") == committed
        with probekit.open_store(full) as ref:
            for layer in ("0", "2", "6") if committed else ():
                np.testing.assert_array_equal(np.asarray(s.acts("model", "data", layer)),
                                              np.asarray(ref.acts("model", "data", layer))[:committed])
    mod.run(out, "resume")
    assert_equal_stores(full, out)


@pytest.mark.parametrize("kill_at", [6, 25])
def test_sigkill_with_writer_thread_then_resume(child, tmp_path, kill_at):
    path, mod, full = child
    out = tmp_path / "killed_thread.h5"
    proc = kill_child(path, out, kill_at, thread=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with probekit.open_store(out) as s:
        assert s.n_rows("data", "model") <= (kill_at // 4) * 4
    mod.run(out, "resume", writer_thread=True)
    assert_equal_stores(full, out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_moment_then_resume(child, tmp_path, seed):
    """The timer may fire anywhere: before the file exists, inside an HDF5 write, or between batches."""
    path, mod, full = child
    delay = random.Random(seed).uniform(0.05, 1.2)  # an uninterrupted child run takes about 1.1 s
    out = tmp_path / f"random{seed}.h5"
    proc = kill_child(path, out, -1, thread=bool(seed % 2), delay=delay)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]
    mod.run(out, "resume" if out.exists() else "create")
    assert_equal_stores(full, out)
