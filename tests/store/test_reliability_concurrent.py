"""Readers of a store that another process is appending to see only committed, fully written rows.

HDF5 locks a file it opens (HDF5 >= 1.10): by default a reader is refused ("unable to lock file") while a
writer holds the file, so ``probekit info`` on a running extraction failed. probekit's readers open
without the lock (``locking=False``) and never read past the ``rows_committed`` counters, which the
writer moves only after a batch is written and flushed (docs/RELIABILITY.md). These tests run a writer
in a second process and read the store from this one, many times, while it grows; every row a reader
sees must equal its planted value (so a row of zeros, a chunk not yet visible, would fail).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

import probekit
from probekit.cli import main

WIDTH = 4096  # 16 KiB rows: 64 rows per HDF5 chunk, so the store grows many chunks while it is read

WRITER = textwrap.dedent(
    '''
    import sys, time

    import numpy as np

    from probekit.store import StoreWriter

    out, n_rows, known, batch = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
    WIDTH = 4096
    with StoreWriter(out, mode="create") as w:
        w.add_split("data", n_rows=n_rows if known else None, has_label=True, factor_names=["bg"])
        w.add_model("m", source="planted")
        w.add_layer("m", "data", "layer", feature_shape=(WIDTH,))
        print("ready", flush=True)
        for start in range(0, n_rows, batch):
            idx = np.arange(start, min(start + batch, n_rows))
            acts = (idx[:, None] * 1000.0 + np.arange(WIDTH)[None, :] + 1).astype(np.float32)
            w.write_rows("data", start, {"index": idx, "label": idx % 3, "factors": idx[:, None] * 0.5},
                         {"m": {"layer": acts}})
            time.sleep(0.002)
    print("done", flush=True)
    '''
)


def expected(n: int) -> np.ndarray:
    idx = np.arange(n)
    return (idx[:, None] * 1000.0 + np.arange(WIDTH)[None, :] + 1).astype(np.float32)


def start_writer(tmp_path, n_rows, known, batch=7):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "live.h5"
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(n_rows), "1" if known else "0", str(batch)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc, out


def check_snapshot(store) -> int:
    n = store.n_rows("data", "m")
    assert n <= store.n_rows("data")
    acts = store.acts("m", "data", "layer")
    assert acts.shape == (n, WIDTH)
    got = acts[:]
    np.testing.assert_array_equal(got, expected(n))
    np.testing.assert_array_equal(store.sample_field("data", "index")[:n], np.arange(n))
    np.testing.assert_array_equal(store.sample_field("data", "label")[:n], np.arange(n) % 3)
    # an analysis-style streamed pass gives the column means of exactly the committed rows
    if n:
        total = np.zeros(WIDTH)
        for _, chunk in acts.iter_chunks(rows=64):
            total += chunk.sum(axis=0)
        np.testing.assert_allclose(total / n, expected(n).mean(axis=0, dtype=np.float64), rtol=1e-6)
    return n


def test_default_hdf5_locking_refuses_a_reader_while_a_writer_holds_the_file(tmp_path):
    """Why probekit's readers open without the lock: HDF5's own default refuses them."""
    proc, out = start_writer(tmp_path, 300, True, batch=3)
    try:
        with pytest.raises(OSError, match="lock"):
            h5py.File(out, "r")  # the library default (HDF5_USE_FILE_LOCKING unset)
        with probekit.open_store(out) as s:  # probekit's reader is not refused
            check_snapshot(s)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("known", [True, False], ids=["n_rows_known", "n_rows_unknown"])
def test_fresh_readers_during_append_see_only_committed_rows(tmp_path, known):
    n_total = 700
    proc, out = start_writer(tmp_path, n_total, known)
    seen = []
    try:
        while proc.poll() is None:
            with probekit.open_store(out) as s:
                seen.append(check_snapshot(s))
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read()
    assert seen == sorted(seen)  # counters never go back
    assert len(set(seen)) >= 3 and 0 < seen[len(seen) // 2] < n_total  # reads really overlapped the writes
    with probekit.open_store(out) as s:
        assert check_snapshot(s) == n_total


def test_long_lived_reader_during_append_sees_consistent_committed_rows(tmp_path):
    """One Store kept open while the writer appends: it keeps showing the rows committed when it was
    opened (its counters are read once, before its reading handle opens), all of them correct."""
    proc, out = start_writer(tmp_path, 500, True)
    seen = []
    try:
        with probekit.open_store(out) as s:
            while proc.poll() is None:
                seen.append(check_snapshot(s))
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    assert len(seen) > 3 and len(set(seen)) == 1


def test_probekit_info_during_append(tmp_path, capsys):
    proc, out = start_writer(tmp_path, 500, True)
    counts = []
    try:
        while proc.poll() is None:
            assert main(["info", "--json", str(out)]) == 0
            import json

            desc = json.loads(capsys.readouterr().out)
            n = desc["models"]["m"]["acts"]["data"]["rows_committed"]
            assert desc["models"]["m"]["acts"]["data"]["layers"]["layer"]["shape"] == [n, WIDTH]
            counts.append(n)
    finally:
        proc.wait(timeout=120)
    assert counts == sorted(counts) and len(counts) >= 2


def test_second_writer_is_refused_with_one_clear_line(tmp_path, capsys):
    proc, out = start_writer(tmp_path, 2000, True, batch=2)
    try:
        before = out.stat().st_mtime_ns
        for mode in ("resume", "overwrite"):
            with pytest.raises(probekit.errors.DataError, match="another process has it open for writing"):
                probekit.StoreWriter(out, mode=mode)
        assert out.exists() and out.stat().st_mtime_ns >= before  # still the writer's file
    finally:
        proc.kill()
        proc.wait()
