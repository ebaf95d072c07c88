"""Failures of the file system through the command line: one line on stderr, exit 2, nothing half-written.

The conditions are real, not mocked, wherever the machine allows it without root tricks:

- a full disk: ``/dev/full`` (every write fails with ENOSPC, errno 28) as the target of the JSON and
  HTML writes, reached directly or through a symbolic link;
- a file size limit: ``RLIMIT_FSIZE`` in a child process (writes past it fail with EFBIG, errno 27),
  which makes HDF5's own flush fail during an extraction exactly as a full disk does;
- permission denied: the tests run as root, whom ``chmod`` does not stop, so the command runs in a
  child process that dropped the two capabilities that let root ignore permissions (CAP_DAC_OVERRIDE,
  CAP_DAC_READ_SEARCH, from its bounding set, as ``setpriv --bounding-set`` does) on folders and files
  it may not write or read.

Only the translation of HDF5's ENOSPC text (errno 28 inside h5py's RuntimeError) is injected: no
file system here fills up on demand.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

import probekit
from probekit._io import write_text
from probekit.cli import main
from probekit.errors import WriteError
from probekit.store import StoreWriter
from probekit.store import _writer as writer_module

REPO = Path(__file__).resolve().parents[2]
N, WIDTH, BATCH = 20000, 64, 1000

HELPER = textwrap.dedent(
    '''
    """A model for the file-system tests (imported as fs_helper:model)."""
    import torch
    from torch import nn


    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64))
    '''
)


@pytest.fixture(scope="module")
def work():
    """A folder every user may enter (pytest's own tmp folders are root's alone), removed at the end."""
    d = Path(tempfile.mkdtemp(prefix="pk-fs-"))
    d.chmod(0o755)
    (d / "fs_helper.py").write_text(HELPER)
    x = np.random.default_rng(0).normal(size=(N, 16)).astype(np.float32)
    np.savez(d / "data.npz", x=x, y=np.arange(N) % 3)
    for p in d.iterdir():
        p.chmod(0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def extract_args(work: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "fs_helper:model", "--data", str(work / "data.npz"), "--layers", "0,2", "-o", str(out),
            "--batch-size", str(BATCH), "--no-progress", *extra]


PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2  # linux/prctl.h, linux/capability.h


def run_cli(argv, cwd, *, fsize_limit=None, as_user=False, timeout=300) -> subprocess.CompletedProcess:
    """``python -m probekit.cli ARGV`` in a child process, optionally with a file size limit (SIGXFSZ
    ignored, so that a write past it fails with EFBIG instead of killing) or bound by file permissions
    as any user is (root's capabilities to override them dropped)."""

    def limit():
        if fsize_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
        if as_user and os.geteuid() == 0:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONDONTWRITEBYTECODE="1", HOME=str(cwd))
    return subprocess.run([sys.executable, "-m", "probekit.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)


def one_line(proc_or_err) -> str:
    err = proc_or_err.stderr if hasattr(proc_or_err, "stderr") else proc_or_err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err
    assert lines[0].startswith("probekit: error: "), lines[0]
    return lines[0]


def contents(path) -> dict[str, tuple]:
    """Every dataset's committed rows and every attribute below the root (whose 'created' differs)."""
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
            np.testing.assert_array_equal(value, db[name][0], err_msg=name)
        assert attrs == db[name][1], name


@pytest.fixture(scope="module")
def full(work):
    out = work / "full.h5"
    proc = run_cli(extract_args(work, out), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# -- a disk that fills up during an extraction ---------------------------------------------------------------
def test_disk_full_during_extraction_is_one_line_then_resume_equals_an_uninterrupted_run(work, full):
    """The disk fills up in the middle (tests/cli/_small_disk.py: HDF5 writes through a file that allocates
    blocks as ext4 does, with half the finished store's blocks free): one line, exit 2 (not h5py's crash
    at exit), the committed rows readable, and --resume gives the uninterrupted store."""
    out = work / "filled.h5"
    free = (full.stat().st_blocks * 512 // 4096) // 2
    env = dict(os.environ, PK_FREE_BLOCKS=str(free), PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join([str(work), str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_small_disk.py")),
                           *extract_args(work, out)], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc)
    assert f"Writing the store {str(out)!r} failed: No space left on device (errno 28). Free disk space" in line
    assert "then rerun: it continues from the last committed row" in line
    assert line.endswith(f"The rerun that continues: probekit {shlex.join(extract_args(work, out, '--resume'))}")
    with probekit.open_store(out) as s:  # the file is whole: its committed rows are the reference's
        committed = s.n_rows("data", "model")
        assert 0 < committed < N and committed % BATCH == 0
        assert f"({committed} rows of split 'data' are committed)" in line
        with probekit.open_store(full) as ref:
            for layer in ("0", "2"):
                np.testing.assert_array_equal(s.acts("model", "data", layer)[:],
                                              ref.acts("model", "data", layer)[:committed])
    again = run_cli(extract_args(work, out, "--resume"), work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_store(full, out)


def test_a_file_size_limit_fails_before_the_first_row_and_leaves_no_store(work, full):
    """A real limit of the operating system (RLIMIT_FSIZE: EFBIG) smaller than the store: the store takes
    its whole size when it is declared, so the limit is hit before any row, and no file is left over."""
    out = work / "limited.h5"
    proc = run_cli(extract_args(work, out), work, fsize_limit=full.stat().st_size // 2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc)
    assert f"Writing the store {str(out)!r} failed: File too large (errno {errno.EFBIG})" in line
    assert "no row was committed yet" in line
    assert not out.exists()
    assert run_cli(extract_args(work, out), work).returncode == 0  # the plain rerun works
    assert_same_store(full, out)


def test_hdf5_no_space_text_becomes_the_write_error(tmp_path, monkeypatch):
    """h5py raises a failed flush as RuntimeError with HDF5's text; errno 28 in it is a full disk."""
    text = ("Unable to synchronously flush file (file write failed: time = Sun Dec  6 05:48:23 2026\n, "
            f"filename = '{tmp_path / 's.h5'}', file descriptor = 3, errno = 28, error message = 'No space "
            "left on device', buf = 0x5559eb51cd88, total write size = 11216, bytes this sub-write = 11216, "
            "offset = 300000)")
    w = StoreWriter(tmp_path / "s.h5", mode="create")
    w.add_split("data", n_rows=8, has_label=False)
    w.add_model("m")
    w.add_layer("m", "data", "x", feature_shape=(2,))
    w.write_rows("data", 0, {"index": np.arange(4)}, {"m": {"x": np.ones((4, 2), np.float32)}})

    def full_disk(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(writer_module._Rows, "write", full_disk)
    with pytest.raises(WriteError) as info:
        w.write_rows("data", 4, {"index": np.arange(4, 8)}, {"m": {"x": np.ones((4, 2), np.float32)}})
    w.close()  # after a failed write: releases the file without raising again
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert str(info.value) == (
        f"Writing the store {str(tmp_path / 's.h5')!r} failed: No space left on device (errno 28). Free disk "
        "space (or write the store elsewhere), then rerun: it continues from the last committed row (4 rows of "
        "split 'data' are committed).")
    monkeypatch.undo()
    with probekit.open_store(tmp_path / "s.h5") as s:
        assert s.n_rows("data", "m") == 4


def test_a_bug_in_h5py_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """A RuntimeError without an errno or a failed write in its text is raised as it is."""
    w = StoreWriter(tmp_path / "s.h5", mode="create")
    w.add_split("data", n_rows=4, has_label=False)
    w.add_model("m")
    w.add_layer("m", "data", "x", feature_shape=(2,))
    monkeypatch.setattr(writer_module._Rows, "write", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match=r"^boom$"):
        w.write_rows("data", 0, {"index": np.arange(4)}, {"m": {"x": np.ones((4, 2), np.float32)}})
    w.close()


# -- a full disk under the JSON and the HTML ---------------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(work):
    """A store with labels, for analyze and report."""
    out = work / "small.h5"
    with StoreWriter(out, mode="create") as w:
        w.add_split("train", n_rows=40, has_label=True)
        w.add_model("m")
        w.add_layer("m", "train", "x", feature_shape=(3,))
        rng = np.random.default_rng(0)
        w.write_rows("train", 0, {"index": np.arange(40), "label": np.arange(40) % 2},
                     {"m": {"x": rng.normal(size=(40, 3)).astype(np.float32)}})
    out.chmod(0o644)
    return out


def _no_space_line(err: str, target: str) -> None:
    line = one_line(err)
    assert f"Cannot write {target!r}: No space left on device. Free disk space (or write it elsewhere), then " \
           "rerun." in line, line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_under_the_json_and_the_report_is_one_line(small_store, tmp_path, capsys):
    quick = ["--n-boot", "20", "--n-perm", "0", "--no-progress"]
    assert main(["analyze", str(small_store), "-o", "/dev/full", *quick]) == 2
    _no_space_line(capsys.readouterr().err, "/dev/full")
    good = tmp_path / "audit.json"
    assert main(["analyze", str(small_store), "-o", str(good), *quick]) == 0
    capsys.readouterr()
    link = tmp_path / "report.html"  # a link to the full device: the report is written through it
    link.symlink_to("/dev/full")
    assert main(["report", str(small_store), "--audit", str(good), "-o", str(link)]) == 2
    _no_space_line(capsys.readouterr().err, str(link))
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # the device is written to, never replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "report.html"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(work):
    """A size limit in the middle of the text: the old file is as it was, and nothing else is there."""
    folder = work / "keep"
    folder.mkdir()
    (folder / "r.json").write_text("old")
    code = ("import sys; from probekit._io import write_text\n"
            "try:\n    write_text(sys.argv[1], 'x' * 200000)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-c", code, str(folder / "r.json")], capture_output=True, text=True,
                          env=env, preexec_fn=limit, timeout=60)
    assert proc.stdout.startswith(f"WriteError Cannot write {str(folder / 'r.json')!r}: File too large."), proc
    assert (folder / "r.json").read_text() == "old"
    assert [p.name for p in folder.iterdir()] == ["r.json"]


def test_write_text_replaces_the_file_a_link_names_and_keeps_the_link(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"
    assert stat.S_IMODE((tmp_path / "real.json").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- permission denied ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locked(work, small_store):
    """A read-only folder, an unreadable store and an unreadable image."""
    probe = subprocess.run([sys.executable, "-c", "open('/proc/self/status').read()"], preexec_fn=lambda: (
        ctypes.CDLL(None).prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) if os.geteuid() == 0 else 0))
    if os.geteuid() == 0 and probe.returncode != 0:
        pytest.skip("cannot drop root's capabilities here")
    ro = work / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    secret = work / "secret.h5"
    shutil.copy(small_store, secret)
    secret.chmod(0o000)
    images = work / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(2):
            from PIL import Image

            Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(images / cls / f"{i}.png")
    for p in images.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    images.chmod(0o755)
    (images / "b" / "1.png").chmod(0o000)
    return ro, secret, images


@pytest.mark.parametrize("case", ["extract into a read-only folder", "audit into a read-only folder",
                                  "analyze -o in a read-only folder", "info of an unreadable store",
                                  "extract of an unreadable image"])
def test_permission_denied_is_one_line_exit_2(work, small_store, locked, case):
    ro, secret, images = locked
    if case == "extract into a read-only folder":
        argv, want = extract_args(work, ro / "x.h5"), [f"Cannot write the store {str(ro / 'x.h5')!r}: "
                                                        "Permission denied", "a folder you may write to"]
    elif case == "audit into a read-only folder":  # refused before the model is even loaded
        argv = ["audit", "fs_helper:model", "--data", str(images), "--masks", str(images),
                "--out-dir", str(ro / "out"), "--no-progress"]
        want = [f"Cannot write the output folder {str(ro / 'out')!r}: permission denied in {str(ro)!r}"]
    elif case == "analyze -o in a read-only folder":
        argv = ["analyze", str(small_store), "-o", str(ro / "r.json"), "--no-progress"]
        want = [f"Cannot write {str(ro / 'r.json')!r}: permission denied in {str(ro)!r}"]
    elif case == "info of an unreadable store":
        argv, want = ["info", str(secret)], [f"Cannot read the store {str(secret)!r}: Permission denied"]
    else:
        argv = ["extract", "fs_helper:model", "--data", str(images), "--layers", "0", "-o", str(work / "img.h5"),
                "--image-size", "4", "--no-progress"]
        want = [f"Permission denied: {str(images / 'b' / '1.png')!r}", "fix its permissions"]
    proc = run_cli(argv, work, as_user=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc)
    for phrase in want:
        assert phrase in line, line
    assert not (ro / "x.h5").exists() and not (ro / "out").exists()


def test_an_abandoned_store_file_lets_the_process_exit_cleanly(work):
    """A real refused write (RLIMIT_FSIZE) in a store of unknown length, which grows batch by batch: the
    writer leaves the file open instead of a close that fails, so the process exits normally, not
    with h5py's segmentation fault at exit."""
    code = textwrap.dedent(
        """
        import numpy as np
        from probekit.errors import WriteError
        from probekit.store import StoreWriter

        w = StoreWriter("grow.h5", mode="overwrite")
        w.add_split("data", n_rows=None, has_label=False)
        w.add_model("m")
        w.add_layer("m", "data", "x", feature_shape=(64,))
        try:
            for s in range(0, 20000, 1000):
                w.write_rows("data", s, {"index": np.arange(s, s + 1000)},
                             {"m": {"x": np.ones((1000, 64), np.float32)}})
        except WriteError as e:
            kept = e  # its traceback holds the store's datasets until the interpreter ends
            print(e)
        w.close()
        """
    )

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    folder = work / "grow"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("Writing the store 'grow.h5' failed: File too large (errno 27)."), proc.stdout
    assert proc.stderr == ""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_while_audit_writes_its_report_then_the_rerun_finishes(tmp_path, capsys):
    """`probekit audit` whose report lands on a full disk (report.html a link to /dev/full): one line,
    exit 2, the store and audit.json kept; once there is room, the same command finishes."""
    import torch

    from probekit.datasets._shapes import write_image_folder
    from probekit.experiments.shortcut import train_shapes_cnn

    images, masks = write_image_folder(tmp_path / "shapes", split="test", background="class", n=24)
    torch.save(train_shapes_cnn("class", seed=0, epochs=2).state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").symlink_to("/dev/full")
    argv = ["audit", "probekit.experiments.shortcut:ShapesCNN", "--weights", str(tmp_path / "w.pt"), "--data",
            str(images), "--masks", str(masks), "--out-dir", str(out), "--inits", "1", "--n-boot", "20",
            "--n-perm", "10", "--mask-check", "0", "--no-progress"]
    assert main(argv) == 2
    _no_space_line(capsys.readouterr().err, str(out / "report.html"))
    assert (out / "audit.json").stat().st_size > 0 and (out / "acts.h5").exists()
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    (out / "report.html").unlink()
    assert main(argv) == 0
    assert (out / "report.html").stat().st_size > 10_000
