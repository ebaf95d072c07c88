"""Profile ``probekit.audit()`` (the analyses) on a store that ``probekit audit`` wrote.

    python benchmarks/profile_audit_analyses.py OUT/acts.h5 [CROSSED_SPLIT]

e.g. the store a ``bench_audit_scale.py --images 1000`` child leaves in ``/tmp/bench-audit-*/audit/``.
Prints the wall time of ``audit()`` (n_boot 500, n_perm 200, as the benchmark's audits) and its 45 calls
with the most cumulative time.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

import probekit
from probekit.store import Store

torch.set_num_threads(1)
path, crossed = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "crossed")
pr = cProfile.Profile()
t = time.perf_counter()
pr.enable()
with Store(path) as s:
    probekit.audit(s, train="train", test_id="test", test_ood="", crossed=crossed, variants="variants", n_boot=500,
                   n_perm=200, progress=False)
pr.disable()
print(f"audit() {time.perf_counter() - t:.1f} s")
pstats.Stats(pr).sort_stats("cumulative").print_stats(45)
