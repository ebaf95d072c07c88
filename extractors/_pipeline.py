"""The streaming extraction pipeline: data -> models with hooks -> pooled features -> a store.

One pass over the data feeds every model the same batches, so a teacher and a student share the sample
rows of one store. Memory stays bounded: a batch is pooled on the device, copied to the host and written
(then dropped); nothing accumulates with the number of samples.

On CUDA the host copies are non-blocking into pinned buffers taken from a small ring, and a writer
thread commits batches to HDF5 behind a bounded queue, so the GPU never waits for the disk. The same
thread path runs on CPU when ``writer_thread=True`` (tests exercise it; CI has no GPU).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data._utils.collate import default_collate

from probekit.datasets import as_samples
from probekit.errors import DataError, ProbekitError
from probekit.store import StoreWriter, check_resume, open_store
from probekit.vocab import SAMPLE_FIELDS

from ._hooks import Capture, OutputKey
from ._layers import OUTPUT_LAYER, LayerSpec, forward_params, parse_selector, resolve_layers
from ._pooling import MASK_LAYER, POOLS, PoolSpec
from ._tokens import MASK_KEY, Padding, collate_inputs, default_pad_id, describe_inputs, left_position_ids
from ._weights import param_count, weight_rows, weights_sha256

__all__ = ["ModelSpec", "extract_models"]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class ModelSpec:
    """One model of an extraction run, with how its layers are chosen and stored.

    Attributes
    ----------
    module : torch.nn.Module
        The model (moved to the run's device).
    layers : str, sequence of str, or callable
        Layer selection, see :func:`resolve_layers`.
    role : {"teacher", "student", "model"}
    source : str
        Where the model came from (e.g. ``"timm:resnet18"``), stored as an attribute.
    pool : str or dict, optional
        Pooling for this model's layers; None uses the run's ``pool``.
    weights_layers : None, False, str, sequence of str, or callable
        Layers whose neuron weight rows are stored: None, the selected Linear / Conv layers; False,
        none; otherwise a layer selection resolved like ``layers``.
    preprocessing : str
        What turned the data into inputs (a JSON string, the ``info`` of
        :func:`probekit.models.preprocessing_for`), stored as the model's ``preprocessing`` attribute
        when it is declared; resuming a model stored with other preprocessing is refused before the
        file is opened for writing. Empty: not recorded.
    weights_sha256 : str
        :func:`weights_sha256` of ``module`` as it is now, when the caller has it already (the audit hashes
        its model once for every split); empty: computed by each extraction.
    """

    module: nn.Module
    layers: LayerSpec
    role: str = "model"
    source: str = ""
    pool: PoolSpec | None = None
    weights_layers: Any = None
    preprocessing: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""


# -- sinks: where host batches go ----------------------------------------------------------------------
class _SyncSink:
    def __init__(self, write: Callable[..., None]) -> None:
        self._write = write

    def put(self, item: tuple[Any, ...], ready: Any = None, release: Callable[[], None] | None = None) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            self._write(*item)
        finally:
            if release is not None:
                release()

    def close(self, *, failed: bool = False) -> None:
        return None


class _ThreadSink:
    """A writer thread behind a bounded queue; errors in the thread surface on the next ``put``."""

    def __init__(self, write: Callable[..., None], maxsize: int) -> None:
        self._write = write
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, maxsize))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="probekit-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            item, ready, release = job
            try:
                if self._error is None:
                    if ready is not None:
                        ready.synchronize()  # the non-blocking device->host copies of this batch are done
                    self._write(*item)
            except BaseException as e:  # kept and re-raised in the main thread
                self._error = e
            finally:
                if release is not None:
                    release()

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def put(self, item: tuple[Any, ...], ready: Any = None, release: Callable[[], None] | None = None) -> None:
        self._check()
        while True:
            try:
                self._q.put((item, ready, release), timeout=0.2)
                return
            except queue.Full:
                self._check()

    def close(self, *, failed: bool = False) -> None:
        """Write what is queued, stop the thread, and re-raise its error (unless already failing)."""
        self._q.put(None)
        self._thread.join()
        if not failed:
            self._check()


class _BufferRing:
    """Host buffer sets (model -> layer -> tensor of one full batch) reused across batches.

    A set is taken for a batch and given back (``give``, by the sink) only after the writer has written
    that batch, so no batch's rows are overwritten before they are on their way to disk. ``n`` bounds
    the sets: 1 for the synchronous writer, ``queue_size + 2`` for the writer thread (queued batches,
    the one being written, the one being filled). On CUDA the sets are pinned (for non-blocking
    copies) and made up front; on CPU the capture hooks pool straight into them, and they are made on
    demand, so a writer that keeps up needs fewer. Reuse is the point on CPU: a fresh 100 MB tensor
    per batch (what a copying pool allocates otherwise) is mapped anew by the allocator and
    page-faulted every time.
    """

    def __init__(self, shapes: dict[str, dict[str, tuple[int, ...]]], dtype: torch.dtype, n: int, *,
                 pin: bool) -> None:
        self._shapes, self._dtype, self._n, self._pin = shapes, dtype, max(1, n), pin
        self._made = 0  # touched by the main thread only (take); the writer thread only gives
        self._free: queue.Queue[dict[str, dict[str, torch.Tensor]]] = queue.Queue()
        if pin:
            for _ in range(self._n):
                self._free.put(self._make())

    def _make(self) -> dict[str, dict[str, torch.Tensor]]:
        self._made += 1
        return {m: {k: torch.empty(s, dtype=self._dtype, pin_memory=self._pin) for k, s in lay.items()}
                for m, lay in self._shapes.items()}

    def adopt(self, feats: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Count the first batch's pooled tensors (new, owned by the pipeline alone) as a set, where they
        fit; the caller gives it back once that batch is written. Saves allocating and faulting one
        more set per run."""
        self._made += 1
        return {m: {k: (v if tuple(v.shape) == s and v.dtype == self._dtype and v.is_contiguous()
                        and not self._pin else torch.empty(s, dtype=self._dtype, pin_memory=self._pin))
                    for k, s in lay.items() for v in (feats[m][k],)}
                for m, lay in self._shapes.items()}

    def take(self) -> dict[str, dict[str, torch.Tensor]]:
        if self._made < self._n:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                return self._make()
        return self._free.get()

    def give(self, bufs: dict[str, dict[str, torch.Tensor]]) -> None:
        self._free.put(bufs)


# -- helpers ---------------------------------------------------------------------------------------------
def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ProbekitError(
            f"The {name!r} parameter of extract must be one of {{{', '.join(repr(c) for c in choices)}}}. "
            f"Got {value!r} instead."
        )


PARALLEL_WRAPPERS: tuple[type[nn.Module], ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
"""Wrappers whose ``.module`` is the model (the Recorder unwraps them; extraction does not stop them)."""


def _can_stop_early(model: nn.Module) -> bool:
    """Whether an exception raised in a hook may end ``model``'s forward pass: not for DataParallel
    (replicas run in threads), DistributedDataParallel (its forward has bookkeeping after the wrapped
    module's) or a ``torch.compile``d wrapper (the hook is traced)."""
    return not isinstance(model, PARALLEL_WRAPPERS) and type(model).__name__ != "OptimizedModule"


def _input_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _weight_selection(spec: ModelSpec, selected: list[str]) -> list[str]:
    wl = spec.weights_layers
    if wl is False:
        return []
    names = [parse_selector(s)[0] for s in (selected if wl is None else resolve_layers(spec.module, wl))]
    modules = dict(spec.module.named_modules())
    out: list[str] = []
    for n in names:
        if n == OUTPUT_LAYER:  # the model's output is no module with weight rows
            continue
        if n not in out and (wl is not None or weight_rows(modules[n]) is not None):
            out.append(n)
    return out


def _samples_np(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key in SAMPLE_FIELDS:
        if key in batch:
            v = batch[key]
            out[key] = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return out


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return default_collate(items)


def _head(batch: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The first ``k`` samples of a batch's inputs (copies: a model may change its input in place)."""
    if "inputs" in batch:
        return {"inputs": {key: v[:k].clone() for key, v in batch["inputs"].items()},
                "padded": batch.get("padded", False)}
    return {"x": batch["x"][:k].clone()}


def _describe(batch: Mapping[str, Any]) -> str:
    if "inputs" in batch:
        return f"keyword inputs {describe_inputs(batch['inputs'])}"
    return f"inputs of shape {tuple(batch['x'].shape[1:])} per sample"


# -- the pipeline -------------------------------------------------------------------------------------------
# extract_models reads as its three steps: _plan resolves and validates everything that can fail on user
# input before the output is touched; _declare_rows declares the split, the models and their weight rows
# in the store (returning the row to start at); _Forward runs one batch through every model's hooks and
# _stream_batches feeds the batches to it and the pooled rows to the store.


@dataclass
class _Plan:
    """What one extraction run does, resolved from the arguments before the output is touched."""

    models: Mapping[str, ModelSpec]
    samples: Any
    split: str
    step: int | None
    dev: torch.device
    dtype: str
    store_dtype: torch.dtype
    batch_size: int
    num_workers: int
    use_thread: bool
    queue_size: int
    open_ended: bool
    stop_early: bool
    caps: dict[str, Capture]
    weight_sel: dict[str, list[str]]
    in_dtypes: dict[str, torch.dtype | None]
    params: dict[str, Any]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    shas: dict[str, str]

    @property
    def n(self) -> int:
        return len(self.samples)


def _plan(models: Mapping[str, ModelSpec], data: Any, *, split: str, pool: PoolSpec, batch_size: int,
          device: str | torch.device, dtype: str, mode: str, num_workers: int, writer_thread: bool | None,
          queue_size: int, num_prefix_tokens: int | None, output_key: OutputKey, step: int | None,
          stop_early: bool, open_ended: bool) -> _Plan:
    """Check the arguments, move the models to the device and hook their layers."""
    _check_choice("dtype", dtype, tuple(_TORCH_DTYPES))
    _check_choice("mode", mode, ("create", "resume", "overwrite"))
    if isinstance(pool, str):
        _check_choice("pool", pool, POOLS)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ProbekitError(f"The 'batch_size' parameter of extract must be an int >= 1. Got {batch_size!r} instead.")
    if not models:
        raise ProbekitError("extract needs at least one model.")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbekitError(f"The device {str(device)!r} was asked for but CUDA is not available. Use device='cpu'.")
    samples = as_samples(data)
    if not isinstance(data, type(samples)) and isinstance(getattr(data, "padding", None), Padding):
        samples.padding = data.padding  # e.g. the Recorder's in-memory probe items

    caps: dict[str, Capture] = {}
    for name, spec in models.items():
        spec.module.to(dev)
        caps[name] = Capture(
            spec.module, spec.layers, pool=spec.pool if spec.pool is not None else pool,
            num_prefix_tokens=num_prefix_tokens, output_key=output_key,
        )
    params = {name: forward_params(spec.module) for name, spec in models.items()}
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = _collate
    if samples.input_keys is not None:
        padding = samples.padding
        pad_id = padding.pad_id if padding.pad_id is not None else default_pad_id(next(iter(models.values())).module)
        collate = functools.partial(collate_inputs, padding=padding, pad_id=pad_id)
        for name, spec in models.items():
            unknown = [k for k in samples.input_keys if k not in params[name] and k != MASK_KEY]
            if params[name] and unknown:
                raise DataError(
                    f"The dataset items give the input(s) {unknown}, which the forward of model {name!r} "
                    f"({type(spec.module).__name__}) does not take (it takes {sorted(params[name])[:12]}). "
                    "Rename them to its keyword arguments, or drop them from the items."
                )
    return _Plan(
        models=models, samples=samples, split=split, step=step, dev=dev, dtype=dtype,
        store_dtype=_TORCH_DTYPES[dtype], batch_size=batch_size, num_workers=num_workers,
        use_thread=(dev.type == "cuda") if writer_thread is None else bool(writer_thread),
        queue_size=queue_size, open_ended=open_ended, stop_early=stop_early, caps=caps,
        weight_sel={name: _weight_selection(spec, caps[name].layers) for name, spec in models.items()},
        in_dtypes={name: _input_dtype(spec.module) for name, spec in models.items()},
        params=params, collate=collate,
        # a checkpoint (step) has other weights than the model by design: only the model's own extraction
        # records and checks the weights hash
        shas={name: (spec.weights_sha256 or weights_sha256(spec.module)) if step is None else ""
              for name, spec in models.items()},
    )


def _check_resume(store: Any, plan: _Plan) -> None:
    """The checks ``StoreWriter.add_split`` / ``add_model`` / ``add_layer`` make, on a read-only view."""
    check_resume(store, plan.split, n_rows=plan.n, fields=plan.samples.fields,
                 factor_names=plan.samples.factor_names, weights_sha256=plan.shas,
                 preprocessing={k: v.preprocessing for k, v in plan.models.items()},
                 pools={name: dict(cap.modes) for name, cap in plan.caps.items()}, step=plan.step)


def _declare_rows(writer: StoreWriter, plan: _Plan) -> int:
    """Declare the split and the models, store the weight rows; return the row the batches start at."""
    samples, split, step = plan.samples, plan.split, plan.step
    writer.add_split(split, n_rows=None if plan.open_ended else plan.n, has_label=samples.has_label,
                     factor_names=samples.factor_names, fields=samples.fields, factor_periods=samples.factor_periods)
    for name, spec in plan.models.items():
        writer.add_model(name, role=spec.role, source=spec.source, weights_sha256=plan.shas[name],
                         param_count=param_count(spec.module), preprocessing=spec.preprocessing)
    committed = {name: writer.committed(split, name, step) for name in plan.models}
    if len(set(committed.values())) > 1:
        raise DataError(
            f"The models {sorted(committed)} have different rows committed on split {split!r} "
            f"({committed}); resume them one at a time with probekit.extract."
        )
    for name, spec in plan.models.items():
        modules = dict(spec.module.named_modules())
        for layer in plan.weight_sel[name]:
            rows = weight_rows(modules[layer])
            if rows is None:
                raise DataError(
                    f"Layer {layer!r} of model {name!r} is a {type(modules[layer]).__name__}, which has "
                    "no neuron weight rows (only Linear and Conv1d/2d/3d do). Drop it from weights_layers."
                )
            writer.write_weights(name, layer, rows, step=step, attrs={"module_type": type(modules[layer]).__name__})
    return next(iter(committed.values()))


class _Forward:
    """One batch through every model's capture hooks, pooled to the store's dtype; the first batch's
    layers declared in the store. Use inside the captures' context (their hooks attached)."""

    def __init__(self, plan: _Plan, writer: StoreWriter, start: int) -> None:
        self.plan, self.writer, self.start = plan, writer, start
        self.last_model = list(plan.caps)[-1]  # runs last on each batch
        self.stoppable = {name: plan.stop_early and _can_stop_early(spec.module) for name, spec in plan.models.items()}
        # pool "none" of keyword inputs: every batch must have the first's length
        self.fixed_len: dict[str, int] = {}

    def to_model(self, v: torch.Tensor, name: str) -> torch.Tensor:
        vd = v.to(self.plan.dev, non_blocking=True)
        if vd is v and name != self.last_model:
            # a model may change its input in place (an in-place normalisation): the next
            # model must see the batch as loaded
            vd = v.clone()
        if vd.is_floating_point() and self.plan.in_dtypes[name] is not None:
            vd = vd.to(self.plan.in_dtypes[name])
        return vd

    def keyword_inputs(self, batch: Mapping[str, Any], name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The model's keyword arguments and the attention mask its token outputs are pooled with."""
        samples, params = self.plan.samples, self.plan.params
        kw = {k: self.to_model(v, name) for k, v in batch["inputs"].items()}
        mask = kw.get(MASK_KEY)
        given = MASK_KEY in samples.input_keys
        if MASK_KEY not in params[name] and (not given or params[name]):
            kw.pop(MASK_KEY, None)  # for pooling only: this model takes no attention mask
            if batch.get("padded"):
                raise DataError(
                    f"The items have several lengths and were padded, but model {name!r} takes no "
                    f"{MASK_KEY!r}, so the padding would change its outputs. Give items of one "
                    "length (pad them yourself), or a model whose forward takes attention_mask."
                )
        if (mask is not None and samples.padding.side == "left" and "position_ids" in params[name]
                and "position_ids" not in samples.input_keys):
            kw["position_ids"] = left_position_ids(mask)  # real tokens keep their unpadded positions
        return kw, mask

    def __call__(self, batch: Mapping[str, Any],
                 into: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Every model's pooled layers on ``batch``. ``into``: model -> layer -> buffer of this batch's
        size and the store's dtype; the hooks pool (and cast) straight into it."""
        store_dtype = self.plan.store_dtype
        feats: dict[str, dict[str, torch.Tensor]] = {}
        for name, cap in self.plan.caps.items():
            args: tuple[Any, ...] = ()
            kw: dict[str, torch.Tensor] = {}
            if "inputs" in batch:
                kw, mask = self.keyword_inputs(batch, name)
            else:
                x = self.to_model(batch["x"], name)
                args = (x,)
                # integer inputs of shape (N, T) are token ids: their token outputs have no
                # prefix token to skip by default (a mask of ones pools them as before)
                mask = torch.ones_like(x) if (not x.is_floating_point() and x.ndim == 2) else None
            if mask is not None and name in self.fixed_len and mask.shape[1] != self.fixed_len[name]:
                raise DataError(
                    f"Pool 'none' stores every token position, but this batch pads to {mask.shape[1]} "
                    f"tokens and the first to {self.fixed_len[name]}; pad every batch to one length with "
                    "max_length=T (as_samples(data, max_length=T); CLI --max-length T)."
                )
            cap.token_mask = mask
            try:
                got = cap.run(*args, **kw) if into is None else cap.run_into(into[name], *args, **kw)
            finally:
                cap.token_mask = None
            feats[name] = {k: v.to(store_dtype) for k, v in got.items()}
            if cap.masked_none and "inputs" in batch and mask is not None:  # the mask beside the tokens
                if into is not None and MASK_LAYER in into[name]:
                    feats[name][MASK_LAYER] = into[name][MASK_LAYER].copy_(mask)
                else:
                    feats[name][MASK_LAYER] = mask.to(store_dtype)
        return feats

    def declare(self, feats: dict[str, dict[str, torch.Tensor]]) -> None:
        """Declare each model's layers in the store, with their shapes, from a batch's features."""
        plan = self.plan
        for name, f in feats.items():
            cap = plan.caps[name]
            if MASK_LAYER in f:
                self.fixed_len[name] = int(f[MASK_LAYER].shape[1])
            # declared in the order the hooks fired (raw_shapes fills as they do): the store
            # records it as the model's layer_order, so readers list layers by depth
            ran = {la: i for i, la in enumerate(cap.raw_shapes)}
            for layer, t in sorted(f.items(), key=lambda kv: ran.get(kv[0], len(ran))):
                attrs = ({"pool": "mask", "module_type": "attention_mask", "raw_shape": list(t.shape[1:])}
                         if layer == MASK_LAYER else
                         {"pool": cap.modes[layer], "module_type": cap.module_types[layer],
                          "raw_shape": list(cap.raw_shapes[layer])})
                got = self.writer.add_layer(name, plan.split, layer, feature_shape=tuple(t.shape[1:]),
                                            dtype=plan.dtype, step=plan.step, attrs=attrs)
                if got != self.start:
                    raise DataError(
                        f"Layer {layer!r} of model {name!r} has {got} rows committed on split "
                        f"{plan.split!r} but the other layers have {self.start}; the store is inconsistent. "
                        "Write to a new store (mode='overwrite')."
                    )

    def arm_early_stop(self) -> None:
        plan = self.plan
        for name, cap in plan.caps.items():
            cap.stop_when_done = self.stoppable[name]
            # the synchronous CPU writer writes a batch before the next forward pass, so the
            # output that ends a stopped pass needs no safety copy; only for the model that runs
            # last on the batch: the others' kept output may be (a view of) the shared input,
            # which a later model may change in place
            cap.elide_final_copy = (cap.stop_when_done and plan.dev.type == "cpu" and not plan.use_thread
                                    and name == self.last_model)

    def first(self, batch: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """The first batch: a model that cannot take these inputs is a data error; arms the early stop."""
        b = len(batch["index"])
        try:
            checked = False
            if b > 2 and any(self.stoppable.values()):
                # a whole pass over two samples checks the layers (a module selected
                # without @K must not run twice); its rows are not kept, so every batch
                # is the same as without stopping (a model whose eval output depends on
                # the batch, or that needs its batch size, stores the same rows). A model
                # that cannot take two samples is checked on the whole first batch.
                try:  # on a copy: a model may change its input in place
                    self(_head(batch, 2))
                    checked = True
                except Exception:  # the whole batch below raises it again
                    checked = False
            if checked:
                self.arm_early_stop()
            feats = self(batch)
            if any(self.stoppable.values()) and not checked:
                self.arm_early_stop()
            return feats
        except ProbekitError:  # ours (a pool that does not fit a layer): already says what to fix
            raise
        except (RuntimeError, ValueError, TypeError) as e:
            raise DataError(
                f"The model raised on the first batch of split {self.plan.split!r} ({_describe(batch)}; "
                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}). Check that the data "
                "fits the model: input shape, channels, dtype (a transform), the names of "
                "keyword inputs; --debug shows the traceback."
            ) from e


def _stream_batches(plan: _Plan, writer: StoreWriter, forward: _Forward, *, progress: bool,
                    progress_bar: Any) -> None:
    """Feed the rows from ``forward.start`` on, batch by batch, to the models and their pooled rows to
    the store (through a writer thread on CUDA, into reused host buffers on the CPU)."""
    from tqdm.auto import tqdm

    split, n, start, batch_size = plan.split, plan.n, forward.start, plan.batch_size
    ring: _BufferRing | None = None  # CUDA: pinned copies of the pooled batch
    host_ring: _BufferRing | None = None  # CPU: the hooks' output buffers
    write = functools.partial(writer.write_rows, step=plan.step)
    sink: _SyncSink | _ThreadSink = _ThreadSink(write, plan.queue_size) if plan.use_thread else _SyncSink(write)
    failed = False
    try:
        loader = DataLoader(
            Subset(plan.samples, range(start, n)), batch_size=batch_size, shuffle=False,
            num_workers=plan.num_workers, collate_fn=plan.collate, pin_memory=plan.dev.type == "cuda",
        )
        row = start
        declared = False
        with tqdm(total=n, initial=start, disable=not progress or progress_bar is not None, unit="sample",
                  desc=f"extract {', '.join(plan.models)}: {split}"[:60], leave=False) as bar:
            for batch in loader:
                b = len(batch["index"])
                host_bufs = host_ring.take() if host_ring is not None else None
                if host_bufs is not None:  # the last batch may be short: a slice of the buffers
                    feats = forward(batch, {m: {k: v[:b] for k, v in lay.items()} for m, lay in host_bufs.items()})
                elif declared:
                    feats = forward(batch)
                else:
                    feats = forward.first(batch)
                if not declared:
                    forward.declare(feats)
                    declared = True
                    shapes = {m: {k: (batch_size, *v.shape[1:]) for k, v in f.items()
                                  if not (plan.caps[m].elide_final_copy and k == plan.caps[m].final_layer)}
                              for m, f in feats.items()}
                    n_sets = plan.queue_size + 2 if plan.use_thread else 1
                    if plan.dev.type == "cuda":
                        ring = _BufferRing(shapes, plan.store_dtype, n_sets, pin=True)
                    elif plan.dev.type == "cpu":
                        host_ring = _BufferRing(shapes, plan.store_dtype, n_sets, pin=False)
                        # this batch's own pooled tensors become a set once it is written
                        host_bufs = host_ring.adopt(feats)
                smp = _samples_np(batch)
                if ring is not None:
                    bufs = ring.take()
                    acts: dict[str, dict[str, Any]] = {}
                    for m, f in feats.items():
                        acts[m] = {}
                        for k, v in f.items():
                            dst = bufs[m][k][:b]
                            dst.copy_(v, non_blocking=True)
                            acts[m][k] = dst.numpy()
                    ready = torch.cuda.Event()
                    ready.record()
                    sink.put((split, row, smp, acts), ready, lambda bufs=bufs, ring=ring: ring.give(bufs))
                else:
                    acts = {m: {k: v.cpu().numpy() for k, v in f.items()} for m, f in feats.items()}
                    release = None
                    if host_bufs is not None:  # back to the ring once this batch is written
                        release = functools.partial(host_ring.give, host_bufs)  # type: ignore[union-attr]
                    sink.put((split, row, smp, acts), None, release)
                row += b
                bar.update(b)
                if progress_bar is not None:
                    progress_bar.update(b * len(plan.models))
    except BaseException:
        failed = True
        raise
    finally:
        sink.close(failed=failed)


def extract_models(
    models: Mapping[str, ModelSpec],
    data: Any,
    *,
    out: str | os.PathLike | StoreWriter,
    split: str = "data",
    pool: PoolSpec = "avg",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: Literal["float32", "float16"] = "float32",
    mode: Literal["create", "resume", "overwrite"] = "create",
    num_workers: int = 0,
    progress: bool = True,
    writer_thread: bool | None = None,
    queue_size: int = 4,
    num_prefix_tokens: int | None = None,
    output_key: OutputKey = None,
    compression: str | None = None,
    step: int | None = None,
    stop_early: bool = True,
    progress_bar: Any = None,
    open_ended: bool = False,
) -> Path:
    """Extract pooled activations of one or more models on the same batches into one store.

    Parameters
    ----------
    models : dict of str to ModelSpec
        Store name -> model with its layer selection, role and source. Every model sees the same
        batches, so they share the split's sample rows.
    data : Dataset
        A map-style dataset following the item protocol (see :func:`probekit.datasets.as_samples`).
        Read in order, never shuffled, so an interrupted run resumes at the right row. Items that are
        dicts of keyword inputs (``input_ids``, ``attention_mask``, ...) reach each model as
        ``model(**inputs)``; their token sequences are padded per batch as ``data.padding`` says
        (:class:`Padding`; the pad id defaults to the first model's ``config.pad_token_id``, else 0),
        and the attention mask is passed to every model whose forward takes ``attention_mask``.
    out : str, PathLike or StoreWriter
        The store file, or an open :class:`~probekit.store.StoreWriter`: a session several calls write
        through (the audit writes all its splits through one), left open; ``mode`` and ``compression``
        are then the writer's own, and the resume checks read through its :meth:`~StoreWriter.view`.
    split : str, default "data"
        The split name the rows are stored under.
    pool : str or dict, default "avg"
        Pooling mode for every layer, or a dict layer -> mode; see :func:`pool`. A model's own
        ``ModelSpec.pool`` wins. Token outputs of keyword-input batches are pooled over their real
        tokens (the attention mask); ``none`` stores the mask beside them as the layer ``@attention_mask``.
    batch_size : int, default 64
    device : str or torch.device, default "cpu"
        Where the models run (each model is moved there).
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of the activations.
    mode : {"create", "resume", "overwrite"}, default "create"
        ``resume`` continues at the last committed row of an interrupted run (or adds a model or split
        to an existing store); the result equals an uninterrupted run's.
    num_workers : int, default 0
        DataLoader workers.
    progress : bool, default True
        Show a tqdm progress bar.
    writer_thread : bool, optional
        Write batches on a background thread behind a bounded queue. Default: on for CUDA, off on CPU.
    queue_size : int, default 4
        Batches the writer thread may lag behind (bounds memory).
    num_prefix_tokens : int, optional
        Prefix tokens for ``tokens_mean``; default ``model.num_prefix_tokens``, else 0 for token inputs
        (keyword inputs with a sequence, or an integer ``(N, T)`` tensor), else 1.
    output_key : int, str or dict, optional
        Element of tuple / dict outputs to keep; default the first tensor.
    compression : {None, "gzip", "lzf"}
        Compression of activation datasets (see :class:`probekit.store.StoreWriter`).
    step : int, optional
        Write under ``/models/<name>/steps/<step>/``.
    stop_early : bool, default True
        End each model's forward pass once its last requested layer has run (after one whole pass
        over the first two samples, which checks the layers; the rows stored are the same as
        without stopping). Pass False for a model whose later modules have side effects that must happen
        (hooks of its own, statistics it updates). Not applied to ``DataParallel``,
        ``DistributedDataParallel`` and ``torch.compile``d models.
    progress_bar : object with ``update(n)``, optional
        A bar shared by several calls (the audit's one bar over all its forward passes): advanced by
        each batch's forward passes (its samples x the models) instead of a bar of this call's own.
    open_ended : bool, default False
        Declare the split without a length, so that a later call may append rows: ``data`` then
        starts with the rows already committed (the audit's ``objects="auto"`` grows the crossed split
        in rounds this way). A split declared with a length stays that length.

    Returns
    -------
    pathlib.Path
        The store's path.

    Raises
    ------
    LayerNotFoundError
        Before the first batch, when a layer matches no module.
    DataError, StoreExistsError
        On data that does not fit the store, or an existing output without resume / overwrite.
    """
    plan = _plan(models, data, split=split, pool=pool, batch_size=batch_size, device=device, dtype=dtype, mode=mode,
                 num_workers=num_workers, writer_thread=writer_thread, queue_size=queue_size,
                 num_prefix_tokens=num_prefix_tokens, output_key=output_key, step=step, stop_early=stop_early,
                 open_ended=open_ended)
    if isinstance(out, StoreWriter):  # a session: its caller opened the writer and closes it
        _check_resume(out.view(), plan)
        _extract_into(out, plan, progress=progress, progress_bar=progress_bar)
        return out.path
    path = Path(out)
    if mode == "resume" and path.exists():
        with open_store(path) as store:  # read-only: a refused resume leaves the file as it was
            _check_resume(store, plan)
    new_file = not path.exists() or mode == "overwrite"
    writer = StoreWriter(path, mode=mode, compression=compression)
    remove_new_file = False  # set on a data error: a file this run created is removed if it holds no row
    try:
        _extract_into(writer, plan, progress=progress, progress_bar=progress_bar)
    except BaseException as e:
        # a data error before any row of a file this run created: leave no empty store behind
        remove_new_file = new_file and isinstance(e, ProbekitError)
        raise
    finally:
        if remove_new_file:
            try:
                remove_new_file = writer.committed(split) == 0
            except KeyError:  # the split was never declared
                pass
        writer.close()
        if remove_new_file:  # it holds no row: leave no empty store behind to trip the next run
            path.unlink(missing_ok=True)
    return path


def _extract_into(writer: StoreWriter, plan: _Plan, *, progress: bool, progress_bar: Any) -> None:
    """Declare the run in the store and stream its batches (the hooks attached meanwhile)."""
    start = _declare_rows(writer, plan)
    with ExitStack() as stack:
        for cap in plan.caps.values():
            stack.enter_context(cap)
        forward = _Forward(plan, writer, start)
        if start >= plan.n:  # nothing left: still check that this run's layers fit the stored ones
            forward.declare(forward(plan.collate([plan.samples[0]])))
            return
        _stream_batches(plan, writer, forward, progress=progress, progress_bar=progress_bar)
