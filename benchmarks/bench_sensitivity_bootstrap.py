"""``background_sensitivity``'s bootstrap, before and after computing replicates in blocks (one process each).

    git archive <before> | tar -x -C /tmp/before
    python benchmarks/bench_sensitivity_bootstrap.py old /tmp/before   # writes /tmp/bs_old.npy
    python benchmarks/bench_sensitivity_bootstrap.py new               # writes /tmp/bs_new.npy, compares

Prints each case's value, interval and seconds; the last line is the largest difference between the two.
"""
import sys
import time
from pathlib import Path

import numpy as np

if sys.argv[1] == "old":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _checkout import use_checkout

    use_checkout(sys.argv[2])
from probekit.analyses import background_sensitivity

rng = np.random.default_rng(0)
out = []
for G, per, d, nb in [(499, 8, 1000, 500), (30, 4, 17, 1000), (5, 2, 3, 7), (200, 3, 64, 300)]:
    X = rng.normal(size=(G * per, d))
    X[:, 0] = 1.0  # a dead unit
    g = np.repeat(np.arange(G), per)
    t = time.perf_counter()
    r = background_sensitivity(X, g, n_boot=nb, random_state=3)
    el = time.perf_counter() - t
    out.append([r.layer, *r.layer_ci])
    print(G, per, d, nb, r.layer, r.layer_ci, f"{el:.3f}s")
np.save(f"/tmp/bs_{sys.argv[1]}.npy", np.array(out))
if sys.argv[1] == "new" and Path("/tmp/bs_old.npy").exists():
    old = np.load("/tmp/bs_old.npy")
    print("largest relative difference", float(np.abs((old - np.array(out)) / old).max()))
