"""The audit's forward passes: in the chosen precision, and split across the ranks of a ``torchrun`` job.

:func:`forward_runner` wraps the extraction function :func:`probekit.model_audit.audit_model` calls (one
call per split, every net of the split fed the same batches). On its own it runs that function under
:func:`probekit.extractors.forward_precision`, after the precision guard (:mod:`probekit._precision`)
on the first batch of each net it has not seen.

Under :func:`run_distributed` (``torchrun --nproc-per-node K -m probekit.cli audit ...``) rank 0 runs
the whole audit and ranks 1..K-1 serve its forward passes. Each extraction call is split as the
``extract`` path splits a dataset (:func:`probekit.extractors.shard_bounds`: contiguous blocks of the
rows still to do, every row once): rank 0 sends the call (the nets, once each, and the dataset, pickled
over the process group), every rank extracts its block into its own shard store
``<store>.part<c>.rank<r>-of-<K>.h5``, the ranks meet (a failure on any rank is raised on rank 0 with
its message), and rank 0 appends the shards' rows in rank order to the audit's store, so that the store
holds the rows a single process writes, in its order. Everything else (GrabCut, the analyses, the mask
check, the report) runs on rank 0. The process group is gloo's (objects only: the activations travel
through the shared file system); each rank runs its nets on ``cuda:<LOCAL_RANK>`` when the audit's
device is CUDA. See docs/SCALING.md.

The ranks of one job trust one another: the nets and datasets travel pickled, as in every
``torch.distributed`` object collective.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._layout import LayoutChoice, check_memory_format
from ._precision import PrecisionChoice, check_precision, choose_precision, guard
from .errors import ProbekitError

__all__ = ["ForwardRunner", "forward_runner", "map_split", "predict_split", "run_distributed", "world"]

_LEADER: _Leader | None = None  # set on rank 0 while run_distributed runs the audit
_AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_COPY_BYTES = 16 << 20  # bytes of rows appended at a time


def world() -> int:
    """Processes of the running :func:`run_distributed` job (1 outside one)."""
    return 1 if _LEADER is None else _LEADER.world


class ForwardRunner:
    """The audit's extraction function, in the chosen precision, split across ranks under torchrun.

    Call it as the wrapped ``extract_models`` (same arguments). Attributes: ``precision`` (a
    :class:`probekit._precision.PrecisionChoice`, final once every net has been seen) and ``layout`` (a
    :class:`probekit._layout.LayoutChoice`: the nets converted to channels-last, which :meth:`restore` gives
    back their own format).
    """

    def __init__(self, extract: Callable[..., Any], *, precision: str, device: str,
                 say: Callable[[str], None] | None = None, memory_format: str = "auto") -> None:
        self._extract = extract
        self._device = device
        self._say = say
        self._seen: set[str] = set()
        self.precision: PrecisionChoice = choose_precision(check_precision(precision), device)
        self.layout = LayoutChoice(check_memory_format(memory_format))
        self._announced = False

    def __call__(self, models: Mapping[str, Any], data: Any, **kwargs: Any) -> Any:
        from .extractors import forward_precision

        new = {k: v for k, v in models.items() if k not in self._seen}
        if new:  # the memory format first: the precision guard then compares the nets as they will run
            self.layout.apply(self._device, new, data)
        if new and self.precision.used != "fp32":
            before = self.precision.used
            guard(self.precision, self._device, new, data, int(kwargs.get("batch_size", 64)))
            if self._say is not None and self.precision.used != before:
                self._say(self.precision.describe())
        self._seen.update(models)
        if self._say is not None and not self._announced:
            self._announced = True
            self._say(self.precision.describe())
            self._say(self.layout.describe())
        with forward_precision(self.precision.dtype):
            if _LEADER is None:
                return self._extract(models, data, **kwargs)
            return _LEADER.extract(self._extract, models, data, self.precision.used, **kwargs)

    def record(self) -> dict[str, Any]:
        """``cost`` fields of ``audit.json``: ``precision``, ``memory_format`` and ``processes``."""
        return {"precision": self.precision.record(), "memory_format": self.layout.record(), "processes": world()}

    def restore(self) -> None:
        """The nets' weights in their own memory format again (call when the audit's forward passes are done)."""
        self.layout.restore()


def forward_runner(extract: Callable[..., Any], *, precision: str = "auto", device: str = "cpu",
                   say: Callable[[str], None] | None = None, memory_format: str = "auto") -> ForwardRunner:
    """Wrap ``extract`` (``extract_models``) for the audit: see :class:`ForwardRunner`."""
    return ForwardRunner(extract, precision=precision, device=device, say=say, memory_format=memory_format)


# -- torchrun ------------------------------------------------------------------------------------------
def _worker_device(device: str) -> str:
    kind = torch.device(device).type
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if kind == "cuda" else device


def _size(n: int, world: int, rank: int) -> int:
    from .extractors import shard_bounds

    lo, hi = shard_bounds(n, world, rank)
    return hi - lo


def _part(out: Path, call: int, rank: int, world: int) -> Path:
    return Path(f"{os.fspath(out)}.part{call}.rank{rank}-of-{world}.h5")


def _on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when its tensors are on the CPU, else a CPU copy (what travels to the ranks)."""
    tensors = [*module.parameters(), *module.buffers()]
    return module if all(t.device.type == "cpu" for t in tensors) else copy.deepcopy(module).cpu()


def _extract_block(extract: Callable[..., Any], models: Mapping[str, Any], samples: Any, lo: int, hi: int,
                   part: Path, split: str, device: str, kwargs: Mapping[str, Any], bar: Any) -> None:
    """Rows ``[lo, hi)`` of ``samples`` (keeping their positions as ``index``) into the shard ``part``."""
    from .extractors import shard_samples

    if hi <= lo:
        return
    extract(models, shard_samples(samples, lo, hi), out=part, split=split, mode="overwrite", device=device,
            progress=False, progress_bar=bar, **kwargs)


class _ScaledBar:
    """Rank 0's progress stands for every rank's: each of its passes counts ``world`` (capped at the call's
    total; the exact remainder is added when every rank is done)."""

    def __init__(self, bar: Any, world: int, total: int) -> None:
        self.bar, self.world, self.total, self.counted = bar, world, total, 0

    def update(self, n: int) -> None:
        add = min(n * self.world, self.total - self.counted)
        self.counted += add
        self.bar.update(add)

    def finish(self) -> None:
        self.bar.update(self.total - self.counted)
        self.counted = self.total


class _Leader:
    """Rank 0: sends each extraction call to the ranks, extracts its own block, appends the shards."""

    def __init__(self, dist: Any, world: int) -> None:
        self.dist, self.world = dist, world
        self._keys: dict[int, str] = {}
        self._keep: list[torch.nn.Module] = []  # the nets sent (their ids stay theirs)
        self._calls = 0

    def _key(self, module: torch.nn.Module, new: dict[str, torch.nn.Module]) -> str:
        """The key the ranks know ``module`` by; a module they have not got yet is added to ``new``."""
        key = self._keys.get(id(module))
        if key is None:
            key = self._keys[id(module)] = f"net{len(self._keys)}"
            self._keep.append(module)
            new[key] = _on_cpu(module)
        return key

    def _meet(self, error: str | None) -> list[tuple[int, str]]:
        """Gather every rank's error (a collective)."""
        errors: list[Any] = [None] * self.world
        self.dist.gather_object(error, errors, dst=0)
        return [(r, e) for r, e in enumerate(errors) if e]

    def extract(self, extract: Callable[..., Any], models: Mapping[str, Any], data: Any, precision: str,
                **kwargs: Any) -> Any:
        from .datasets import as_samples
        from .extractors import shard_bounds

        target = kwargs["out"]  # the store's path, or an open StoreWriter (a session of several calls)
        out = Path(getattr(target, "path", target))
        split = kwargs.get("split", "data")
        samples = as_samples(data)
        n = len(samples)
        start = _committed(target, split, list(models))
        if start is None or start >= n or kwargs.get("step") is not None:
            # nothing to split (a complete split is still checked against the nets), or a state the
            # single-process extraction refuses with its own message
            return extract(models, data, **kwargs)
        local = {k: v for k, v in kwargs.items()
                 if k not in ("out", "split", "mode", "device", "progress", "progress_bar", "open_ended")}
        call = self._calls
        self._calls += 1
        new: dict[str, torch.nn.Module] = {}
        specs = {name: (self._key(spec.module, new), dataclasses.replace(spec, module=None))
                 for name, spec in models.items()}
        job = {"kind": "extract", "call": call, "nets": new, "specs": specs, "data": samples, "split": split,
               "start": start, "out": os.fspath(out), "device": str(kwargs.get("device", "cpu")),
               "precision": precision, "kwargs": local}
        self.dist.broadcast_object_list([job], src=0)
        todo = n - start
        bar = kwargs.get("progress_bar")
        scaled = _ScaledBar(bar, self.world, todo * len(models)) if bar is not None else None
        lo, hi = (start + b for b in shard_bounds(todo, self.world, 0))
        mine: Exception | None = None
        try:
            _extract_block(extract, models, samples, lo, hi, _part(out, call, 0, self.world), split,
                           str(kwargs.get("device", "cpu")), local, scaled)
        except Exception as e:  # raised below, once every rank has met
            mine = e
        failed = self._meet(None if mine is None else f"{type(mine).__name__}: {mine}")
        parts = [_part(out, call, r, self.world) for r in range(self.world) if _size(todo, self.world, r)]
        try:
            if mine is not None:
                raise mine
            if failed:
                r, e = failed[0]
                raise ProbekitError(f"Rank {r} of {self.world} failed extracting split {split!r}: {e}")
            _append(parts, target, split, None if kwargs.get("open_ended") else n, start, samples,
                    kwargs.get("compression"))
        finally:
            for p in parts:
                p.unlink(missing_ok=True)
        if scaled is not None:
            scaled.finish()
        return out

    def predict(self, nets: Mapping[str, torch.nn.Module], data: Any, batch_size: int, device: str, workers: int,
                bar: Any, class_map: Mapping[int, int] | None = None) -> dict[str, np.ndarray]:
        """The mask check's predictions with the rows split across the ranks."""
        from .extractors import shard_bounds

        n = len(data)
        new: dict[str, torch.nn.Module] = {}
        keys = {name: self._key(module, new) for name, module in nets.items()}
        self.dist.broadcast_object_list([{"kind": "predict", "nets": new, "keys": keys, "data": data,
                                          "batch_size": batch_size, "device": device, "workers": workers,
                                          "class_map": class_map}], src=0)
        lo, hi = shard_bounds(n, self.world, 0)
        scaled = _ScaledBar(bar, self.world, n * len(nets))
        mine: Any
        try:
            mine = _predict_block(nets, _Block(data, lo, hi), batch_size, device, workers, scaled,
                                  class_map) if hi > lo else None
        except Exception as e:
            mine = e
        everyone: list[Any] = [None] * self.world
        self.dist.gather_object(None if isinstance(mine, Exception) else mine, everyone, dst=0)
        if isinstance(mine, Exception):
            raise mine
        failed = [(r, v) for r, v in enumerate(everyone) if isinstance(v, str)]
        if failed:
            r, e = failed[0]
            raise ProbekitError(f"Rank {r} of {self.world} failed predicting the mask check's images: {e}")
        scaled.finish()
        parts = [v for v in everyone if v is not None]
        return {m: np.concatenate([p[m] for p in parts]) for m in nets}


    def map(self, fn: Callable[[list[Any]], None], items: list[Any]) -> None:
        """``fn(block)`` on every rank, each on its block of ``items``; raises a rank's failure."""
        from .extractors import shard_bounds

        self.dist.broadcast_object_list([{"kind": "map", "nets": {}, "fn": fn, "items": items}], src=0)
        lo, hi = shard_bounds(len(items), self.world, 0)
        mine: Exception | None = None
        try:
            if hi > lo:
                fn(items[lo:hi])
        except Exception as e:  # raised below, once every rank has met
            mine = e
        failed = self._meet(None if mine is None else f"{type(mine).__name__}: {mine}")
        if mine is not None:
            raise mine
        if failed:
            r, e = failed[0]
            raise ProbekitError(f"Rank {r} of {self.world} failed: {e}")


def map_split(fn: Callable[[list[Any]], None], items: list[Any]) -> None:
    """``fn(block)`` on every rank of the running :func:`run_distributed` job, each on a contiguous block of
    ``items`` (``fn`` pickled: a module-level function or a ``functools.partial`` of one; GrabCut's masks of
    ``--foreground auto``); call it only where :func:`world` > 1."""
    if _LEADER is None:
        raise ProbekitError("map_split runs under run_distributed only (world() > 1).")
    _LEADER.map(fn, items)


class _Block(torch.utils.data.Dataset):
    """Rows ``[lo, hi)`` of a dataset."""

    def __init__(self, data: Any, lo: int, hi: int) -> None:
        self.data, self.lo, self.n = data, lo, hi - lo

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> Any:
        if not 0 <= k < self.n:
            raise IndexError(k)
        return self.data[self.lo + k]


def _predict_block(nets: Mapping[str, torch.nn.Module], data: Any, batch_size: int, device: str, workers: int,
                   bar: Any = None, class_map: Mapping[int, int] | None = None) -> dict[str, np.ndarray]:
    """Each net's predicted classes on ``data`` (a rank's block of the mask check's rows), as
    ``probekit.model_audit._predict`` computes them (the head read as the audit reads it)."""
    from .analyses import output_predictions

    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    out: dict[str, list[np.ndarray]] = {m: [] for m in nets}
    for net in nets.values():
        net.to(device).eval()
    with torch.no_grad():
        for batch in loader:
            x = batch["x"].to(device)
            for m, net in nets.items():
                out[m].append(output_predictions(net(x), class_map))
            if bar is not None:
                bar.update(len(x) * len(nets))
    return {m: np.concatenate(v) for m, v in out.items()}


def predict_split(nets: Mapping[str, torch.nn.Module], data: Any, batch_size: int, device: str, workers: int,
                  bar: Any, class_map: Mapping[int, int] | None = None) -> dict[str, np.ndarray]:
    """Each net's predicted classes on ``data`` (the mask check's rows), the rows split across the ranks of
    the running :func:`run_distributed` job; call it only where :func:`world` > 1."""
    if _LEADER is None:
        raise ProbekitError("predict_split runs under run_distributed only (world() > 1).")
    return _LEADER.predict(nets, data, batch_size, device, workers, bar, class_map)


@contextlib.contextmanager
def _view(target: Any) -> Iterator[Any]:
    """A read-only view of the store: an open writer's own (no second handle), else the file's (None when
    it does not exist yet)."""
    from .store import open_store

    if hasattr(target, "view"):
        yield target.view()
    elif not Path(target).exists():
        yield None
    else:
        with open_store(target) as s:
            yield s


@contextlib.contextmanager
def _writer(target: Any, compression: str | None) -> Iterator[Any]:
    """The open writer itself (its caller closes it), else one opened on the file for this append."""
    from .store import StoreWriter

    if hasattr(target, "write_rows"):
        yield target
    else:
        with StoreWriter(target, mode="resume", compression=compression) as w:
            yield w


def _committed(target: Any, split: str, names: list[str]) -> int | None:
    """Rows of ``split`` every net has committed in the store (0 when new); None when they differ."""
    with _view(target) as s:
        if s is None or split not in s.splits:
            return 0
        rows = {s.n_rows(split, m) if m in s.models else 0 for m in names}
    return rows.pop() if len(rows) == 1 else None


def _append(parts: list[Path], target: Any, split: str, n_rows: int | None, start: int, samples: Any,
            compression: str | None) -> None:
    """Append the shards' rows of ``split`` (in this order) to the store ``target`` (a path or an open
    writer) at row ``start``, declaring the split, nets and layers as the single-process extraction does."""
    from .errors import DataError
    from .store import open_store

    if parts:
        with open_store(parts[0]) as p:
            pools = {(m, la): p.acts(m, split, la).attrs.get("pool") for m in p.models for la in p.layers(m, split)}
        with _view(target) as s:  # before a file is opened for writing (HDF5 opens a file once)
            _check_pools(s, split, pools)
    with _writer(target, compression) as w:
        at = start
        for k, path in enumerate(parts):
            with open_store(path) as p:
                models = p.models
                if k == 0:
                    got = w.add_split(split, n_rows=n_rows, has_label=samples.has_label,
                                      factor_names=samples.factor_names, fields=samples.fields,
                                      factor_periods=samples.factor_periods)
                    if got < start:  # more sample rows than these nets' is fine (checked, not rewritten)
                        raise DataError(f"The split {split!r} of {str(w.path)!r} has {got} rows committed, fewer "
                                        f"than its nets' {start}: another process wrote to it. Rerun the audit.")
                    for m in models:
                        a = p.model_attrs(m)
                        w.add_model(m, role=str(a.get("role", "model")), source=str(a.get("source", "")),
                                    weights_sha256=str(a.get("weights_sha256", "")),
                                    param_count=int(a.get("param_count", -1)),
                                    preprocessing=str(a.get("preprocessing", "")))
                        for layer in p.weight_layers(m):
                            w.write_weights(m, layer, p.weights(m, layer), attrs=_own(p.weight_attrs(m, layer)))
                        for layer in p.layers(m, split):
                            acts = p.acts(m, split, layer)
                            w.add_layer(m, split, layer, feature_shape=acts.shape[1:], dtype=str(acts.dtype),
                                        attrs=_own(acts.attrs))
                fields = ["index", *samples.fields] + (["factors"] if samples.factor_names else [])
                layers = {m: p.layers(m, split) for m in models}
                n = p.n_rows(split)
                row_bytes = sum(p.acts(m, split, la).row_nbytes for m in models for la in layers[m]) or 1
                block = max(1, _COPY_BYTES // row_bytes)
                values = {f: np.asarray(p.sample_field(split, f)) for f in fields}
                for s0 in range(0, n, block):
                    e = min(n, s0 + block)
                    w.write_rows(split, at + s0, {f: v[s0:e] for f, v in values.items()},
                                 {m: {la: np.asarray(p.acts(m, split, la)[s0:e]) for la in layers[m]} for m in models})
                at += n


def _own(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """A dataset's attributes the writer does not set itself."""
    return {k: v for k, v in attrs.items() if k not in ("layer", "encoding-type", "encoding-version")}


def _check_pools(s: Any, split: str, pools: Mapping[tuple[str, str], Any]) -> None:
    """Refuse to append a layer pooled otherwise than the rows the store (view ``s``) already holds."""
    from .errors import DataError

    if s is None:
        return
    for (model, layer), pool in pools.items():
        if model not in s.models or split not in s.acts_splits(model) or layer not in s.layers(model, split):
            continue
        was = s.acts(model, split, layer).attrs.get("pool")
        if was is not None and pool is not None and was != pool:
            raise DataError(
                f"Layer {layer!r} of model {model!r} on split {split!r} in {str(s.path)!r} was stored with pool "
                f"{was!r}, but this run asks for {pool!r}. Resume with the same pool, or write elsewhere.")


def _serve(dist: Any, rank: int, world: int) -> None:
    """Ranks 1..K-1: run each call rank 0 sends on this rank's block, until it says stop."""
    nets: dict[str, torch.nn.Module] = {}
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        job = box[0]
        if job["kind"] == "stop":
            return
        dist.gather_object(_run_job(job, rank, world, nets), None, dst=0)


def _run_job(job: Mapping[str, Any], rank: int, world: int, nets: dict[str, torch.nn.Module]) -> Any:
    """One call of rank 0 on rank ``rank``'s block: what it gathers to rank 0. An extraction: None, or its
    error's text. The mask check's predictions: this block's (None when it is empty), or the error's text."""
    from .extractors import extract_models, forward_precision, shard_bounds

    try:
        nets.update(job["nets"])
        if job["kind"] == "map":
            lo, hi = shard_bounds(len(job["items"]), world, rank)
            if hi > lo:
                job["fn"](job["items"][lo:hi])
            return None
        if job["kind"] == "predict":
            lo, hi = shard_bounds(len(job["data"]), world, rank)
            if hi <= lo:
                return None
            return _predict_block({m: nets[k] for m, k in job["keys"].items()}, _Block(job["data"], lo, hi),
                                  job["batch_size"], _worker_device(job["device"]), job["workers"],
                                  class_map=job.get("class_map"))
        models = {name: dataclasses.replace(spec, module=nets[key]) for name, (key, spec) in job["specs"].items()}
        todo = len(job["data"]) - job["start"]
        lo, hi = (job["start"] + b for b in shard_bounds(todo, world, rank))
        with forward_precision(_AUTOCAST_DTYPES[job["precision"]]):
            _extract_block(extract_models, models, job["data"], lo, hi, _part(Path(job["out"]), job["call"], rank, world),
                           job["split"], _worker_device(job["device"]), job["kwargs"], None)
        return None
    except Exception as e:  # reported to rank 0, which raises it; this rank waits for the next call
        return f"{type(e).__name__}: {e}"


def run_distributed(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` (the audit) on rank 0 with every rank's forward passes.

    Call it on every rank of a ``torchrun`` job (the environment gives ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ...). It starts a gloo process group unless one is running (and then ends it),
    and returns ``fn``'s result on rank 0 and None on the other ranks, which serve rank 0's extraction
    calls until it is done.

    Raises
    ------
    ProbekitError
        On rank 0, when another rank fails (with its message); ``fn``'s own errors on rank 0.
    """
    global _LEADER
    dist = torch.distributed
    own = not dist.is_initialized()
    if own:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # rank 0 may spend hours between two calls (GrabCut, the analyses) while the others wait
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank != 0:
            _serve(dist, rank, world)
            return None
        _LEADER = _Leader(dist, world)
        try:
            result = fn(*args, **kwargs)
        except Exception:  # raised between two calls: the other ranks wait for the next one, and stop
            dist.broadcast_object_list([{"kind": "stop"}], src=0)
            raise
        finally:  # an interrupt (KeyboardInterrupt) leaves the others to torchrun, which ends them
            _LEADER = None
        dist.broadcast_object_list([{"kind": "stop"}], src=0)
        return result
    finally:
        if own:
            dist.destroy_process_group()
