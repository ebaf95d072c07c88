"""Cost of one committed batch in the store writer: ``StoreWriter.write_rows`` of pooled rows.

    python benchmarks/bench_write_rows.py [--batches 300 --repeats 5] [--src CHECKOUT]

Each batch is 32 rows: 3 sample fields (index, label, 2 factors) and 4 float32 layers of 64, 128, 256
and 512 units, written and committed (two flushes) as the extraction pipeline does. Prints the median
over repeats of the time per ``write_rows`` call. ``--src DIR`` imports probekit from another checkout
(e.g. a ``git worktree`` of an older commit) for before/after runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _checkout import use_checkout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--src", default=None, help="import probekit from this checkout")
    a = ap.parse_args()
    if a.src:
        use_checkout(a.src)
    import numpy as np

    import probekit
    from probekit.store import StoreWriter

    rng = np.random.default_rng(0)
    b, widths = 32, (64, 128, 256, 512)
    acts = {f"layer{i + 1}": rng.normal(size=(b, d)).astype(np.float32) for i, d in enumerate(widths)}
    tmp = Path(tempfile.mkdtemp(prefix="pk-wr-"))
    per_call = []
    for _ in range(a.repeats):
        path = tmp / "wr.h5"
        with StoreWriter(path, mode="overwrite") as w:
            w.add_split("train", n_rows=a.batches * b, has_label=True, factor_names=["a", "b"])
            w.add_model("m", role="model")
            for name, x in acts.items():
                w.add_layer("m", "train", name, feature_shape=x.shape[1:])
            t = time.perf_counter()
            for k in range(a.batches):
                s = k * b
                w.write_rows("train", s, {"index": np.arange(s, s + b), "label": np.zeros(b, int),
                                          "factors": np.zeros((b, 2))}, {"m": acts})
            per_call.append((time.perf_counter() - t) / a.batches)
        path.unlink()
    tmp.rmdir()
    print(f"probekit from {Path(probekit.__file__).parent.parent}: write_rows median "
          f"{1e3 * statistics.median(per_call):.2f} ms per batch ({a.repeats} x {a.batches} batches)")


if __name__ == "__main__":
    main()
