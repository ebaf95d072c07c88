"""Record a model's activations and weight rows while it trains, without touching its training state.

:class:`Recorder` wraps a model inside the user's own loop. Every ``every`` steps it runs a small fixed
probe set through the model (eval mode, no gradient) with the streaming pipeline of
:func:`extract_models` and stores the chosen layers under ``/models/<name>/steps/<step>/`` of one store.
Before it returns it puts back everything it touched: each submodule's train/eval flag, the
grad-enabled flag and the random number generators (torch CPU and CUDA, numpy's and Python's global
ones; building a DataLoader iterator draws from torch's). Eval mode leaves BatchNorm running statistics
and dropout alone, so training with the recorder on gives bit-for-bit the same weights as with it off.

A new recorder on an existing store appends steps; a step already complete there is skipped, never
written twice. Under ``torch.distributed`` only rank 0 records; a ``DistributedDataParallel`` /
``DataParallel`` wrapper is unwrapped to its ``.module``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from probekit.datasets import as_samples
from probekit.errors import ProbekitError
from probekit.store import open_store

from ._layers import LayerSpec, resolve_layers
from ._pipeline import PARALLEL_WRAPPERS, ModelSpec, extract_models
from ._pooling import PoolSpec

__all__ = ["Recorder", "RecorderCallback"]


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, PARALLEL_WRAPPERS):
        model = model.module
    return model


def _rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


class _TrainingState:
    """Everything a recording may touch, saved before and put back after."""

    def __init__(self, model: nn.Module) -> None:
        self.modes = [(m, m.training) for m in model.modules()]
        self.grad = torch.is_grad_enabled()
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = (torch.cuda.get_rng_state_all()
                         if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        self.np_rng = np.random.get_state()
        self.py_rng = random.getstate()

    def restore(self) -> None:
        for m, flag in self.modes:
            m.training = flag
        torch.set_grad_enabled(self.grad)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.np_rng)
        random.setstate(self.py_rng)


class _InMemory:
    """A probe split's normalised items, rendered once and kept in memory (the probe set is small)."""

    def __init__(self, data: Any) -> None:
        samples = as_samples(data)
        self.factor_names = samples.factor_names
        self.padding = samples.padding  # how keyword-input items are padded (kept for extract_models)
        self.items = [samples[i] for i in range(len(samples))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class Recorder:
    """Record activations and weight rows of a model every ``every`` training steps into one store.

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained (a ``DistributedDataParallel`` / ``DataParallel`` wrapper is unwrapped).
    layers : str, sequence of str, or callable
        Layers whose activations are stored (names, globs, ``name@K``, predicate; see
        :func:`resolve_layers`).
    probe_data : Dataset, DataLoader or dict of str to Dataset
        The fixed probe set (item protocol of :func:`probekit.datasets.as_samples`), read in order.
        A DataLoader contributes its ``.dataset``. A dict gives several probe splits
        (e.g. ``{"train": ..., "test_ood": ...}``), each stored under its own split name.
    out : str or PathLike
        The store; created on the first record, appended to when it exists.
    every : int, default 100
        :meth:`step` records when ``step % every == 0``.
    name : str, default "model"
        Model name in the store.
    role : {"model", "teacher", "student"}, default "model"
    pool : str or dict, default "avg"
        Pooling of each layer's output (see :func:`pool`).
    weights_layers : None, False, str, sequence of str, or callable
        Layers whose neuron weight rows are stored each step: None, the selected Linear / Conv layers;
        False, none; otherwise a layer selection.
    batch_size : int, default 256
    split : str or dict of str to Dataset, default "probe"
        The split name of ``probe_data``; or a dict split -> dataset (then ``probe_data`` may be None).
    device : str or torch.device, optional
        Where the probe batches run; must be the model's device (the recorder never moves the model).
        Default: the device of the model's parameters.
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of activations.
    source : str, default ""
        Where the model came from, stored as an attribute.
    cache : bool, default True
        Keep the probe items in memory after the first record (they are read once, not at every
        record); turn off for a probe set too large for memory.

    Attributes
    ----------
    recorded : list of int
        Steps complete in the store (including those of earlier runs on the same file).
    rank : int
        This process's rank; only rank 0 records.

    Examples
    --------
    >>> rec = Recorder(model, ["fc1"], probe_set, "run.h5", every=200)   # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                             # doctest: +SKIP
    ...     rec.step(step)
    ...     loss = lossf(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec,
        probe_data: Any = None,
        out: str | os.PathLike = "run.h5",
        *,
        every: int = 100,
        name: str = "model",
        role: str = "model",
        pool: PoolSpec = "avg",
        weights_layers: Any = None,
        batch_size: int = 256,
        split: str | Mapping[str, Any] = "probe",
        device: str | torch.device | None = None,
        dtype: Literal["float32", "float16"] = "float32",
        source: str = "",
        cache: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ProbekitError(f"The 'every' parameter of Recorder must be an int >= 1. Got {every!r} instead.")
        if isinstance(split, Mapping):
            splits = dict(split)
        elif isinstance(probe_data, Mapping):
            splits = dict(probe_data)
        else:
            if not isinstance(split, str):
                raise ProbekitError(
                    f"The 'split' parameter of Recorder must be a str or a dict split -> dataset. Got {split!r}."
                )
            splits = {split: probe_data}
        if not splits or any(d is None for d in splits.values()):
            raise ProbekitError(
                "Recorder needs probe data: pass probe_data=DATASET (with split='name'), or a dict "
                "split -> dataset as probe_data or split."
            )
        self.splits = {s: getattr(d, "dataset", d) if isinstance(d, torch.utils.data.DataLoader) else d
                       for s, d in splits.items()}
        self.module = _unwrap(model)
        self.layers = layers
        resolve_layers(self.module, layers)  # a typo fails here, not at the first record
        own = _model_device(self.module)
        if device is not None and torch.device(device) != own and not (
            torch.device(device).type == own.type == "cuda" and torch.device(device).index is None
        ):
            raise ProbekitError(
                f"Recorder was given device {str(device)!r} but the model is on {str(own)!r}; the recorder "
                "runs the model where it trains and never moves it. Leave device=None."
            )
        self.device = own
        self.out = Path(out)
        self.every = every
        self.name = name
        self.role = role
        self.pool = pool
        self.weights_layers = weights_layers
        self.batch_size = batch_size
        self.dtype = dtype
        self.source = source
        self.cache = cache
        self._cached: dict[str, _InMemory] = {}
        self.rank = _rank()
        self.recorded: list[int] = self._complete_steps() if self.rank == 0 else []

    # -- store bookkeeping ---------------------------------------------------------------------------
    def _complete_steps(self) -> list[int]:
        """Steps whose every probe split is fully committed in ``out``."""
        if not self.out.exists():
            return []
        with open_store(self.out) as s:
            if self.name not in s.models:
                return []
            done = []
            for st in s.steps(self.name):
                have = s.acts_splits(self.name, st)
                if all(sp in have and s.n_rows(sp, self.name, st) == len(d) for sp, d in self.splits.items()):
                    done.append(st)
            return done

    # -- recording -------------------------------------------------------------------------------------
    def step(self, step: int) -> bool:
        """Record if ``step % every == 0`` (and the step is not in the store yet); return whether it did."""
        if int(step) % self.every:
            return False
        return self.record(step)

    def record(self, step: int) -> bool:
        """Record ``step`` now; return False (and write nothing) on a rank other than 0 or a step already stored.

        The model's train/eval flags, the grad-enabled flag and the RNG states are restored even when
        the recording fails.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ProbekitError(f"Recorder.record needs a step that is an int >= 0. Got {step!r} instead.")
        step = int(step)
        if self.rank != 0 or step in self.recorded:
            return False
        state = _TrainingState(self.module)
        try:
            self.module.eval()
            with torch.no_grad():
                for i, (split, data) in enumerate(self.splits.items()):
                    if self.cache:
                        if split not in self._cached:
                            self._cached[split] = _InMemory(data)
                        data = self._cached[split]
                    spec = ModelSpec(self.module, self.layers, role=self.role, source=self.source,
                                     pool=self.pool, weights_layers=self.weights_layers if i == 0 else False)
                    extract_models({self.name: spec}, data, out=self.out, split=split, pool=self.pool,
                                   batch_size=self.batch_size, device=self.device, dtype=self.dtype,
                                   mode="resume", progress=False, step=step)
        finally:
            state.restore()
        self.recorded = sorted({*self.recorded, step})
        return True

    def __repr__(self) -> str:
        return (f"Recorder(name={self.name!r}, out={str(self.out)!r}, every={self.every}, "
                f"splits={list(self.splits)}, recorded={len(self.recorded)} steps)")


def RecorderCallback(layers: LayerSpec, probe_data: Any = None, out: str | os.PathLike = "run.h5",
                     **kwargs: Any) -> Any:
    """A PyTorch Lightning callback that records the LightningModule with a :class:`Recorder`.

    Records step 0 when training starts, after every ``every``-th optimizer step
    (``trainer.global_step``; with gradient accumulation, once per optimizer step) and the final model
    when training ends. Takes :class:`Recorder`'s arguments (without the model); the callback's
    ``recorder`` attribute is the :class:`Recorder` once training has started. Training is unchanged,
    bit for bit (see :class:`Recorder`). The probe batches go through the LightningModule's
    ``forward``; a module without one is run through its only child module (the common
    ``self.net = ...`` pattern), with layer names as seen from the LightningModule (``net.0``). Needs ``lightning`` (or ``pytorch_lightning``) installed
    (``pip install "probekit-audit[lightning]"``); imported only when this is called.

    Examples
    --------
    >>> trainer = lightning.Trainer(max_epochs=3, callbacks=[          # doctest: +SKIP
    ...     probekit.RecorderCallback(["conv2", "conv3"], probe_set, out="run.h5", every=10)])

    Raises
    ------
    ProbekitError
        When neither lightning package is installed; at the start of training, when the
        LightningModule has no ``forward`` and not exactly one child module.
    """
    try:
        from lightning.pytorch import Callback, LightningModule
    except ImportError:
        try:
            from pytorch_lightning import Callback, LightningModule
        except ImportError as e:
            raise ProbekitError(
                "RecorderCallback needs PyTorch Lightning. Install it (pip install lightning), or call "
                "Recorder.step(step) in a plain PyTorch loop."
            ) from e

    class _RecorderCallback(Callback):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.recorder: Recorder | None = None
            self._via: nn.Module | None = None  # the only child, for a LightningModule without forward()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if type(pl_module).forward in (nn.Module.forward, LightningModule.forward):
                children = list(pl_module.children())
                if len(children) != 1:
                    raise ProbekitError(
                        f"RecorderCallback runs the LightningModule on the probe inputs, but "
                        f"{type(pl_module).__name__} defines no forward() and has {len(children)} child modules, "
                        "so which one takes the inputs is unclear. Define forward() (e.g. "
                        "`def forward(self, x): return self.net(x)`)."
                    )
                self._via = children[0]
            self.recorder = Recorder(pl_module, layers, probe_data, out, **kwargs)
            self._record(pl_module, int(trainer.global_step), every=True)

        def _record(self, pl_module: Any, step: int, every: bool) -> None:
            if self.recorder is None:
                return
            if self._via is not None:  # run the probe batches through the only child, just for this call
                pl_module.__dict__["forward"] = self._via
            try:
                if every:
                    self.recorder.step(step)
                else:
                    self.recorder.record(step)
            finally:
                if self._via is not None:
                    pl_module.__dict__.pop("forward", None)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kw: Any) -> None:
            self._record(pl_module, int(trainer.global_step), every=True)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._record(pl_module, int(trainer.global_step), every=False)

    return _RecorderCallback()
