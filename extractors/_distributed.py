"""Extraction on several processes (``torchrun``, SLURM, any torch.distributed job): one shard per rank.

Each rank extracts a contiguous block of the dataset's rows into its own shard store
``<out>.rank<r>-of-<K>.h5`` (every row exactly once: no padding, no duplicates, unlike
``DistributedSampler``'s default), the ranks meet, and rank 0 merges the shards into ``out`` in the
standard format with rows in dataset order (:func:`probekit.store.merge_shards`). A shard is an ordinary
store: an interrupted rank resumes its own shard with ``mode="resume"``. See docs/SCALING.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from probekit.datasets import SampleDataset, as_samples
from probekit.errors import DataError, ProbekitError, StoreExistsError
from probekit.store import merge_shards

from ._pipeline import ModelSpec, extract_models
from ._weights import weights_sha256

__all__ = ["extract_distributed", "shard_bounds", "shard_path", "shard_samples"]


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """The block ``[start, stop)`` of ``n`` rows that ``rank`` of ``world_size`` extracts.

    Blocks are contiguous, in rank order, cover ``range(n)`` exactly once, and differ in size by at
    most one row (a rank gets none only when ``n < world_size``).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ProbekitError(f"rank must be in [0, world_size); got rank {rank} of world_size {world_size}.")
    return rank * n // world_size, (rank + 1) * n // world_size


def shard_path(out: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The shard file of ``rank``: ``<out>.rank<r>-of-<K>.h5``."""
    return Path(f"{os.fspath(out)}.rank{rank}-of-{world_size}.h5")


class _ShardSamples(SampleDataset):
    """Rows ``[start, stop)`` of a :class:`SampleDataset`, each keeping its index in the full dataset.

    A SampleDataset subclass, so :func:`probekit.datasets.as_samples` passes it through unchanged (a
    plain ``Subset`` would be renumbered from 0).
    """

    def __init__(self, base: SampleDataset, start: int, stop: int) -> None:  # no super().__init__: no re-read
        self.source = base
        self._base = base
        self._start = start
        self._n = stop - start
        self.fields = base.fields
        self.factor_names = base.factor_names
        self.factor_periods = base.factor_periods
        self.x_shape = base.x_shape
        self.input_keys = base.input_keys
        self.padding = base.padding

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= int(i) < self._n:
            raise IndexError(f"row {i} out of range for a shard of {self._n} rows")
        return self._base[self._start + int(i)]


def shard_samples(data: Any, start: int, stop: int) -> SampleDataset:
    """Rows ``[start, stop)`` of a dataset, each keeping its position in the whole dataset as its ``index``.

    What one rank extracts (``start, stop = shard_bounds(len(data), K, rank)``): a shard written from it
    holds the dataset indices that :func:`probekit.store.merge_shards` orders the shards by.
    """
    samples = as_samples(data)
    if not 0 <= start <= stop <= len(samples):
        raise ProbekitError(f"A shard must be rows [start, stop) within [0, {len(samples)}]; got [{start}, {stop}).")
    return _ShardSamples(samples, start, stop)


def _dist() -> tuple[Any, int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _all_failed(dist: Any, failed: bool) -> list[int]:
    """Ranks that report a failure (a collective: every rank must call it)."""
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flags = flags.cuda()
    flags[dist.get_rank()] = int(failed)
    dist.all_reduce(flags)
    return [r for r, v in enumerate(flags.tolist()) if v]


def _check_same_weights(dist: Any, models: Mapping[str, ModelSpec]) -> None:
    """Refuse, on every rank alike, models whose weights differ between ranks (a collective)."""
    mine = {name: weights_sha256(spec.module) for name, spec in models.items()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for r, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            bad = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
            raise DataError(
                f"The models {bad} have other weights on rank {r} than on rank 0 (weights_sha256 differ): "
                "every rank must extract the same models. Load the same checkpoint on every rank (or seed "
                "the initialisation identically) before calling extract_distributed."
            )


def extract_distributed(
    models: Mapping[str, ModelSpec],
    data: Any,
    *,
    out: str | os.PathLike,
    split: str = "data",
    mode: Literal["create", "resume", "overwrite"] = "create",
    device: str | torch.device | None = None,
    merge: bool = True,
    keep_shards: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Path:
    """Extract with every process of a torch.distributed job, one shard per rank, then merge.

    Call it on every rank (e.g. under ``torchrun --nproc-per-node K``) after
    ``torch.distributed.init_process_group``. Without an initialised process group it runs as a single
    rank and writes ``out`` directly, as :func:`extract_models` does.

    Parameters
    ----------
    models : dict of str to ModelSpec
        As in :func:`extract_models` (the same on every rank).
    data : Dataset
        The full dataset (the same, in the same order, on every rank); each rank reads only its block
        of rows (:func:`shard_bounds`).
    out : str or PathLike
        The merged store. Rank r writes its rows to ``shard_path(out, r, K)``.
    split : str, default "data"
    mode : {"create", "resume", "overwrite"}, default "create"
        Applied to each shard. ``create`` also refuses an existing ``out``; ``resume`` continues each
        shard at its committed rows (or adds a split or model to the shards) and rebuilds ``out`` from
        the shards; ``overwrite`` replaces shards and ``out``.
    device : str or torch.device, optional
        Default: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
    merge : bool, default True
        Merge the shards into ``out`` on rank 0 once every rank is done. With False (and always with
        an explicit ``rank``), run :func:`probekit.store.merge_shards` later (e.g. after independent
        SLURM array jobs).
    keep_shards : bool, default True
        Keep the shard files after the merge (they let a later run add a split or model with
        ``mode="resume"``). With False they are deleted after a successful merge.
    rank, world_size : int, optional
        Run as this rank of this many without torch.distributed (independent jobs writing shards to a
        shared file system; merge afterwards). Default: from the process group.
    progress : bool, default True
        Progress bar (rank 0 only).
    **kwargs
        Every other keyword of :func:`extract_models` (pool, batch_size, dtype, num_workers, ...).

    Returns
    -------
    pathlib.Path
        ``out`` when merged, else this rank's shard.

    Raises
    ------
    ProbekitError
        On every rank when any rank failed (the failing rank raises its own error).
    DataError
        From the merge when a shard is incomplete.
    """
    if "step" in kwargs and kwargs["step"] is not None:
        raise ProbekitError("extract_distributed does not take step=; extract checkpoints with probekit.extract.")
    dist, d_rank, d_world = _dist()
    if (rank is None) != (world_size is None):
        raise ProbekitError("Give both rank and world_size, or neither (they then come from torch.distributed).")
    if rank is not None:
        if dist is not None:
            raise ProbekitError(
                "rank and world_size are for runs without torch.distributed; under an initialised process "
                "group they come from it. Drop them."
            )
        shard_bounds(0, int(world_size), int(rank))  # validates
        d_rank, d_world = int(rank), int(world_size)
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    out = Path(out)
    show = progress and d_rank == 0
    if d_world == 1 and rank is None:
        return extract_models(models, data, out=out, split=split, mode=mode, device=device,
                              progress=show, **kwargs)

    my_shard = shard_path(out, d_rank, d_world)
    will_merge = merge and rank is None
    try:
        if will_merge and mode == "create" and out.exists():
            raise StoreExistsError(
                f"The output {str(out)!r} already exists. Pass mode='resume' to add to it (the shards are "
                "resumed and the store rebuilt from them) or mode='overwrite' to replace it."
            )
        if dist is not None:
            _check_same_weights(dist, models)
        samples = as_samples(data)
        n = len(samples)
        lo, hi = shard_bounds(n, d_world, d_rank)
        if hi > lo:
            extract_models(models, _ShardSamples(samples, lo, hi), out=my_shard, split=split, mode=mode,
                           device=device, progress=show, **kwargs)
    except BaseException:
        if dist is not None:
            _all_failed(dist, True)  # unblocks the other ranks, which then raise too
        raise
    if dist is not None:
        bad = _all_failed(dist, False)
        if bad:
            raise ProbekitError(
                f"Rank(s) {bad} of {d_world} failed during extraction; this rank's shard {str(my_shard)!r} "
                "is kept. Fix the cause and rerun every rank with mode='resume'."
            )
    if not will_merge:
        return my_shard

    shards = [shard_path(out, r, d_world) for r in range(d_world) if shard_bounds(n, d_world, r)[1] >
              shard_bounds(n, d_world, r)[0]]
    merge_error: BaseException | None = None
    if d_rank == 0:
        try:
            missing = [str(p) for p in shards if not p.exists()]
            if missing:
                raise DataError(f"Cannot merge into {str(out)!r}: the shard files {missing} are missing.")
            merge_shards(shards, out, overwrite=mode != "create")
            if not keep_shards:
                for p in shards:
                    p.unlink()
        except BaseException as e:
            merge_error = e
    if dist is not None:
        bad = _all_failed(dist, merge_error is not None)
        if bad and merge_error is None:
            raise ProbekitError(f"Rank 0 failed to merge the shards into {str(out)!r}; see its error.")
    if merge_error is not None:
        raise merge_error
    return out
