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
from probekit.store import StoreWriter
from probekit.store import _format as F

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
    """

    module: nn.Module
    layers: LayerSpec
    role: str = "model"
    source: str = ""
    pool: PoolSpec | None = None
    weights_layers: Any = None
    preprocessing: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


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


def _check_stored_pools(out: str | os.PathLike, split: str, caps: Mapping[str, Capture],
                        step: int | None = None) -> None:
    """Refuse to resume a layer with another pooling than the one it was stored with."""
    from probekit.store import open_store

    with open_store(out) as store:
        for name, cap in caps.items():
            if name not in store.models or (step is not None and step not in store.steps(name)):
                continue
            if split not in store.acts_splits(name, step):
                continue
            stored = set(store.layers(name, split, step))
            for layer in cap.layers:
                if layer not in stored:
                    continue
                was = store.acts(name, split, layer, step).attrs.get("pool")
                if was is not None and was != cap.modes[layer]:
                    raise DataError(
                        f"Layer {layer!r} of model {name!r} on split {split!r} in {str(out)!r} was stored "
                        f"with pool {was!r}, but this run asks for {cap.modes[layer]!r}. Resume with the "
                        "same pool, or write to another store."
                    )


def _check_resume_fits(out: str | os.PathLike, split: str, samples: Any, shas: Mapping[str, str],
                       pres: Mapping[str, str] | None = None) -> None:
    """The checks ``StoreWriter.add_split`` / ``add_model`` make, on a read-only handle, before the file is
    opened for writing (opening it for writing alone changes its bytes)."""
    from probekit.store import open_store

    with open_store(out) as store:
        if split in store.splits:
            stored_n = store.n_expected(split)
            if stored_n is not None and stored_n != len(samples):
                raise DataError(
                    f"The split {split!r} in {str(out)!r} holds {stored_n} samples but this data has "
                    f"{len(samples)}. Use the same data to resume, or another split name."
                )
            stored_names = store.factor_names(split) if store.has_field(split, "factors") else None
            want = list(samples.factor_names) if samples.factor_names is not None else None
            stored_fields = sorted(f for f in F.INT_FIELDS if store.has_field(split, f))
            want_fields = sorted(samples.fields)
            if stored_names != want or stored_fields != want_fields:
                raise DataError(
                    f"The split {split!r} in {str(out)!r} was written from data with other fields (factors "
                    f"{stored_names}, fields {stored_fields}) than this data (factors {want}, fields "
                    f"{want_fields}). Write this data to another split (--split) or another store."
                )
        for name, sha in shas.items():
            if name in store.models:
                stored = str(store.model_attrs(name).get("weights_sha256", ""))
                if stored and sha and stored != sha:
                    raise DataError(
                        f"The model {name!r} in {str(out)!r} was extracted from other weights (sha256 "
                        f"{stored[:12]}..., now {sha[:12]}...). Give this model another name (--name) or "
                        "write to another store."
                    )
        for name, pre in (pres or {}).items():
            if name in store.models and pre:
                before = store.model_attrs(name).get("preprocessing", "")
                before = before.decode() if isinstance(before, bytes) else str(before or "")
                if before and before != pre:
                    raise DataError(
                        f"The model {name!r} in {str(out)!r} was extracted with other preprocessing (stored "
                        f"{before[:200]}; now {pre[:200]}). Use the same --image-size/--mean/--std, give this "
                        "model another name (--name), or write to another store."
                    )


def _samples_np(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key in F.SAMPLE_FIELDS:
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
def extract_models(
    models: Mapping[str, ModelSpec],
    data: Any,
    *,
    out: str | os.PathLike,
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
    out : str or PathLike
        The store file.
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
    n = len(samples)
    store_dtype = _TORCH_DTYPES[dtype]
    use_thread = (dev.type == "cuda") if writer_thread is None else bool(writer_thread)

    # resolve everything that can fail on user input before touching the output file
    caps: dict[str, Capture] = {}
    for name, spec in models.items():
        spec.module.to(dev)
        caps[name] = Capture(
            spec.module, spec.layers, pool=spec.pool if spec.pool is not None else pool,
            num_prefix_tokens=num_prefix_tokens, output_key=output_key,
        )
    weight_sel = {name: _weight_selection(spec, caps[name].layers) for name, spec in models.items()}
    in_dtypes = {name: _input_dtype(spec.module) for name, spec in models.items()}
    keyword = samples.input_keys is not None
    params = {name: forward_params(spec.module) for name, spec in models.items()}
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = _collate
    if keyword:
        padding = samples.padding
        pad_id = padding.pad_id if padding.pad_id is not None else default_pad_id(next(iter(models.values())).module)
        collate = functools.partial(collate_inputs, padding=padding, pad_id=pad_id)
    fixed_len: dict[str, int] = {}  # pool "none" of keyword inputs: every batch must have the first's length
    if keyword:
        for name, spec in models.items():
            unknown = [k for k in samples.input_keys if k not in params[name] and k != MASK_KEY]  # type: ignore[union-attr]
            if params[name] and unknown:
                raise DataError(
                    f"The dataset items give the input(s) {unknown}, which the forward of model {name!r} "
                    f"({type(spec.module).__name__}) does not take (it takes {sorted(params[name])[:12]}). "
                    "Rename them to its keyword arguments, or drop them from the items."
                )

    # a checkpoint (step) has other weights than the model by design: only the model's own extraction
    # records and checks the weights hash
    shas = {name: weights_sha256(spec.module) if step is None else "" for name, spec in models.items()}
    if mode == "resume" and Path(out).exists():
        _check_stored_pools(out, split, caps, step)
        # read-only: a refused resume leaves the file as it was
        _check_resume_fits(out, split, samples, shas, {k: v.preprocessing for k, v in models.items()})
    new_file = not Path(out).exists() or mode == "overwrite"
    writer = StoreWriter(out, mode=mode, compression=compression)
    sink: _SyncSink | _ThreadSink | None = None
    failed = False
    remove_new_file = False  # set on a data error: a file this run created is removed if it holds no row
    try:
        writer.add_split(split, n_rows=None if open_ended else n, has_label=samples.has_label, factor_names=samples.factor_names,
                         fields=samples.fields, factor_periods=samples.factor_periods)
        for name, spec in models.items():
            writer.add_model(name, role=spec.role, source=spec.source,
                             weights_sha256=shas[name],
                             param_count=param_count(spec.module), preprocessing=spec.preprocessing)
        committed = {name: writer.committed(split, name, step) for name in models}
        if len(set(committed.values())) > 1:
            raise DataError(
                f"The models {sorted(committed)} have different rows committed on split {split!r} "
                f"({committed}); resume them one at a time with probekit.extract."
            )
        start = next(iter(committed.values()))
        for name, spec in models.items():
            modules = dict(spec.module.named_modules())
            for layer in weight_sel[name]:
                rows = weight_rows(modules[layer])
                if rows is None:
                    raise DataError(
                        f"Layer {layer!r} of model {name!r} is a {type(modules[layer]).__name__}, which has "
                        "no neuron weight rows (only Linear and Conv1d/2d/3d do). Drop it from weights_layers."
                    )
                writer.write_weights(name, layer, rows, step=step,
                                     attrs={"module_type": type(modules[layer]).__name__})

        with ExitStack() as stack:
            for cap in caps.values():
                stack.enter_context(cap)
            last_model = list(caps)[-1]  # runs last on each batch
            stoppable = {name: stop_early and _can_stop_early(spec.module) for name, spec in models.items()}

            def to_model(v: torch.Tensor, name: str) -> torch.Tensor:
                vd = v.to(dev, non_blocking=True)
                if vd is v and name != last_model:
                    # a model may change its input in place (an in-place normalisation): the next
                    # model must see the batch as loaded
                    vd = v.clone()
                if vd.is_floating_point() and in_dtypes[name] is not None:
                    vd = vd.to(in_dtypes[name])
                return vd

            def keyword_inputs(batch: Mapping[str, Any], name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
                """The model's keyword arguments and the attention mask its token outputs are pooled with."""
                kw = {k: to_model(v, name) for k, v in batch["inputs"].items()}
                mask = kw.get(MASK_KEY)
                given = MASK_KEY in samples.input_keys  # type: ignore[operator]
                if MASK_KEY not in params[name] and (not given or params[name]):
                    kw.pop(MASK_KEY, None)  # for pooling only: this model takes no attention mask
                    if batch.get("padded"):
                        raise DataError(
                            f"The items have several lengths and were padded, but model {name!r} takes no "
                            f"{MASK_KEY!r}, so the padding would change its outputs. Give items of one "
                            "length (pad them yourself), or a model whose forward takes attention_mask."
                        )
                if (mask is not None and samples.padding.side == "left" and "position_ids" in params[name]
                        and "position_ids" not in samples.input_keys):  # type: ignore[operator]
                    kw["position_ids"] = left_position_ids(mask)  # real tokens keep their unpadded positions
                return kw, mask

            def forward(batch: Mapping[str, Any],
                        into: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
                # into: model -> layer -> buffer of this batch's size and the store's dtype; the hooks
                # pool (and cast) straight into it
                feats: dict[str, dict[str, torch.Tensor]] = {}
                for name, cap in caps.items():
                    args: tuple[Any, ...] = ()
                    kw: dict[str, torch.Tensor] = {}
                    if "inputs" in batch:
                        kw, mask = keyword_inputs(batch, name)
                    else:
                        x = to_model(batch["x"], name)
                        args = (x,)
                        # integer inputs of shape (N, T) are token ids: their token outputs have no
                        # prefix token to skip by default (a mask of ones pools them as before)
                        mask = torch.ones_like(x) if (not x.is_floating_point() and x.ndim == 2) else None
                    if mask is not None and name in fixed_len and mask.shape[1] != fixed_len[name]:
                        raise DataError(
                            f"Pool 'none' stores every token position, but this batch pads to {mask.shape[1]} "
                            f"tokens and the first to {fixed_len[name]}; pad every batch to one length with "
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

            declared = False

            def declare(feats: dict[str, dict[str, torch.Tensor]]) -> None:
                for name, f in feats.items():
                    cap = caps[name]
                    if MASK_LAYER in f:
                        fixed_len[name] = int(f[MASK_LAYER].shape[1])
                    # declared in the order the hooks fired (raw_shapes fills as they do): the store
                    # records it as the model's layer_order, so readers list layers by depth
                    ran = {la: i for i, la in enumerate(cap.raw_shapes)}
                    for layer, t in sorted(f.items(), key=lambda kv: ran.get(kv[0], len(ran))):
                        attrs = ({"pool": "mask", "module_type": "attention_mask", "raw_shape": list(t.shape[1:])}
                                 if layer == MASK_LAYER else
                                 {"pool": cap.modes[layer], "module_type": cap.module_types[layer],
                                  "raw_shape": list(cap.raw_shapes[layer])})
                        got = writer.add_layer(
                            name, split, layer, feature_shape=tuple(t.shape[1:]), dtype=dtype, step=step,
                            attrs=attrs,
                        )
                        if got != start:
                            raise DataError(
                                f"Layer {layer!r} of model {name!r} has {got} rows committed on split "
                                f"{split!r} but the other layers have {start}; the store is inconsistent. "
                                "Write to a new store (mode='overwrite')."
                            )

            def arm_early_stop() -> None:
                for name, cap in caps.items():
                    cap.stop_when_done = stoppable[name]
                    # the synchronous CPU writer writes a batch before the next forward pass, so the
                    # output that ends a stopped pass needs no safety copy; only for the model that runs
                    # last on the batch: the others' kept output may be (a view of) the shared input,
                    # which a later model may change in place
                    cap.elide_final_copy = (cap.stop_when_done and dev.type == "cpu" and not use_thread
                                            and name == last_model)

            if start >= n:  # nothing left: still check that this run's layers fit the stored ones
                declare(forward(collate([samples[0]])))
                return Path(out)

            ring: _BufferRing | None = None  # CUDA: pinned copies of the pooled batch
            host_ring: _BufferRing | None = None  # CPU: the hooks' output buffers
            write = functools.partial(writer.write_rows, step=step)
            sink = _ThreadSink(write, queue_size) if use_thread else _SyncSink(write)
            loader = DataLoader(
                Subset(samples, range(start, n)), batch_size=batch_size, shuffle=False,
                num_workers=num_workers, collate_fn=collate, pin_memory=dev.type == "cuda",
            )
            from tqdm.auto import tqdm

            row = start
            with tqdm(total=n, initial=start, disable=not progress or progress_bar is not None, unit="sample",
                      desc=f"extract {', '.join(models)}: {split}"[:60], leave=False) as bar:
                for batch in loader:
                    b = len(batch["index"])
                    host_bufs = host_ring.take() if host_ring is not None else None
                    if host_bufs is not None:  # the last batch may be short: a slice of the buffers
                        feats = forward(batch, {m: {k: v[:b] for k, v in lay.items()}
                                                for m, lay in host_bufs.items()})
                    elif declared:
                        feats = forward(batch)
                    else:  # the first batch: a model that cannot take these inputs is a data error
                        try:
                            checked = False
                            if b > 2 and any(stoppable.values()):
                                # a whole pass over two samples checks the layers (a module selected
                                # without @K must not run twice); its rows are not kept, so every batch
                                # is the same as without stopping (a model whose eval output depends on
                                # the batch, or that needs its batch size, stores the same rows). A model
                                # that cannot take two samples is checked on the whole first batch.
                                try:  # on a copy: a model may change its input in place
                                    forward(_head(batch, 2))
                                    checked = True
                                except Exception:  # the whole batch below raises it again
                                    checked = False
                            if checked:
                                arm_early_stop()
                            feats = forward(batch)
                            if any(stoppable.values()) and not checked:
                                arm_early_stop()
                        except ProbekitError:  # ours (a pool that does not fit a layer): already says what to fix
                            raise
                        except (RuntimeError, ValueError, TypeError) as e:
                            raise DataError(
                                f"The model raised on the first batch of split {split!r} ({_describe(batch)}; "
                                f"{type(e).__name__}: {str(e).splitlines()[0][:200]}). Check that the data "
                                "fits the model: input shape, channels, dtype (a transform), the names of "
                                "keyword inputs; --debug shows the traceback."
                            ) from e
                    if not declared:
                        declare(feats)
                        declared = True
                        shapes = {m: {k: (batch_size, *v.shape[1:]) for k, v in f.items()
                                      if not (caps[m].elide_final_copy and k == caps[m].final_layer)}
                                  for m, f in feats.items()}
                        n_sets = queue_size + 2 if use_thread else 1
                        if dev.type == "cuda":
                            ring = _BufferRing(shapes, store_dtype, n_sets, pin=True)
                        elif dev.type == "cpu":
                            host_ring = _BufferRing(shapes, store_dtype, n_sets, pin=False)
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
                        progress_bar.update(b * len(models))
    except BaseException as e:
        failed = True
        # a data error before any row of a file this run created: leave no empty store behind
        remove_new_file = remove_new_file or (new_file and isinstance(e, ProbekitError))
        raise
    finally:
        try:
            if sink is not None:
                sink.close(failed=failed)
        finally:
            if remove_new_file:
                try:
                    remove_new_file = writer.committed(split) == 0
                except KeyError:  # the split was never declared
                    pass
            writer.close()
            if remove_new_file:  # it holds no row: leave no empty store behind to trip the next run
                Path(out).unlink(missing_ok=True)
    return Path(out)
