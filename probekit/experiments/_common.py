"""Shared helpers of the experiments: seeds, output folder, JSON, summary statistics."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from probekit.vocab import jsonable


def out_path(out_dir: str | os.PathLike | None, name: str) -> Path:
    """The experiment's output folder (created), default ``./probekit-experiments/<name>``."""
    p = Path(out_dir) if out_dir is not None else Path("probekit-experiments") / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def seeds_list(seeds: int | Iterable[int]) -> list[int]:
    """``3`` -> ``[0, 1, 2]``; an iterable is taken as the seeds themselves."""
    if isinstance(seeds, (int, np.integer)):
        return list(range(int(seeds)))
    return [int(s) for s in seeds]


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of per-seed values."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.write_text(json.dumps(jsonable(result), indent=2, sort_keys=False) + "\n")


def fmt(ms: dict[str, float], digits: int = 3) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['sd']:.{digits}f}"


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` intra-op torch threads (restored after); ``None`` leaves it unchanged.

    Small models train several times faster on one thread when other processes share the CPU.
    """
    import torch

    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt
