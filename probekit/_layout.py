"""Channels-last weights for the audit's convolutional nets, only where the first batch shows nothing moves.

oneDNN (CPU) and cuDNN run 2-D convolutions faster on NHWC tensors. Measured here, a timm net on 2 CPU
cores in float32 runs 1.1-1.6x faster with its weights in ``torch.channels_last`` (ResNet-18/50,
EfficientNet-B0, MobileNetV3; ConvNeXt-T 0.98x, ViT-Tiny 0.98x; benchmarks/bench_channels_last.py). The
values are the same up to float32 rounding: only the order of the additions changes.

A user's own net may not take it: ``x.view(n, -1)`` on a channels-last map raises, and a module that reads
raw strides (``as_strided``) gets other values without raising. So ``memory_format="auto"`` (the default)
converts a net with two or more ``nn.Conv2d`` on the CPU or CUDA only after a check on the first
:data:`CHECK_SAMPLES` images: the net runs them as it is and channels-last, and keeps channels-last only
if nothing raised, no top-1 prediction moved and every stored layer's pooled activations agree within
:data:`TOLERANCE` (relative error); else it stays as it was, and ``cost.memory_format`` says why. Copies of
one architecture (the seeded inits) are checked once. ``"contiguous"`` never converts.

The conversion changes the strides of the net's 4-D weights in place (the same modules, so hooks stay);
:meth:`LayoutChoice.restore` gives every converted tensor back its own format when the audit ends, so a
module the caller passed in leaves the audit as it came (values untouched: a change of strides copies
them exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import DataError

__all__ = ["CHECK_SAMPLES", "MEMORY_FORMATS", "TOLERANCE", "LayoutChoice", "check_memory_format"]

MEMORY_FORMATS = ("auto", "contiguous")
"""The values of ``memory_format`` (``--memory-format``)."""

TOLERANCE = 1e-3
"""Largest relative error ``||a_cl - a|| / ||a||`` of a stored layer's pooled activations on the check's
batch that keeps channels-last. float32 reordering moves a deep net's activations by ~1e-6; a net that reads
its maps' raw strides moves them by order 1."""

CHECK_SAMPLES = 4
"""Images in the check's batch: enough to run every module once; the check is for errors and for values
read through the wrong strides, which one image shows."""


def check_memory_format(memory_format: str) -> str:
    """Validate ``memory_format`` (one of :data:`MEMORY_FORMATS`) before any work."""
    if memory_format not in MEMORY_FORMATS:
        raise DataError(f"--memory-format must be one of {', '.join(MEMORY_FORMATS)}; got {memory_format!r}.")
    return memory_format


def _n_conv2d(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def _signature(module: nn.Module) -> tuple[Any, ...]:
    """The architecture: module classes and parameter shapes (the seeded inits share the model's)."""
    return (type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters()))


def _to_format(module: nn.Module, fmt: torch.memory_format,
               only: set[tuple[int, str]] | None = None) -> set[tuple[int, str]]:
    """Every 4-D parameter and buffer of ``module`` (or those named in ``only``) in ``fmt``; returns the ones
    whose format changed, as (id of the owning module, name)."""
    changed: set[tuple[int, str]] = set()
    with torch.no_grad():
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for name, t in store.items():
                    key = (id(owner), name)
                    if t is None or t.dim() != 4 or (only is not None and key not in only):
                        continue
                    if t.is_contiguous(memory_format=fmt):
                        continue
                    new = t.data.contiguous(memory_format=fmt)
                    if isinstance(t, nn.Parameter):
                        t.data = new
                    else:
                        store[name] = new
                    changed.add(key)
    return changed


@dataclass
class LayoutChoice:
    """Which of the audit's nets run channels-last, and why the others do not.

    Attributes
    ----------
    requested : str
        One of :data:`MEMORY_FORMATS`.
    nets : dict of str to str
        Per net seen: ``"channels_last"`` or ``"contiguous"``.
    reasons : dict of str to str
        Per net left contiguous: why (requested, device, no convolutions, the check's finding).
    checked : dict
        The check's figures per net checked: ``samples``, ``max_rel_error``, ``top1_differ``; ``as`` for a copy
        of an architecture checked before (the net whose check it shares).
    """

    requested: str
    nets: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    checked: dict[str, dict[str, Any]] = field(default_factory=dict)
    _arch: dict[tuple[Any, ...], tuple[str, bool]] = field(default_factory=dict, repr=False)
    _converted: list[tuple[nn.Module, set[tuple[int, str]]]] = field(default_factory=list, repr=False)

    def apply(self, device: str, models: Mapping[str, Any], data: Any) -> None:
        """Check each net of ``models`` not seen yet (``ModelSpec``: ``module``, ``layers``, ``pool``) on the first
        images of ``data`` and convert those that pass; call before their first forward pass."""
        kind = torch.device(device).type
        for name, spec in models.items():
            if name in self.nets:
                continue
            self.nets[name] = "contiguous"
            module = spec.module
            if self.requested == "contiguous":
                self.reasons[name] = "requested"
            elif kind not in ("cpu", "cuda"):
                self.reasons[name] = f"channels-last is used on the CPU and CUDA only, not {kind}"
            elif _n_conv2d(module) < 2:
                self.reasons[name] = "fewer than two 2-D convolutions: nothing to gain"
            else:
                sig = _signature(module)
                if sig in self._arch:  # a copy of a checked architecture (the seeded inits): its finding
                    first, ok = self._arch[sig]
                    self.checked[name] = {"as": first}
                    if ok:
                        self._convert(name, module)
                    else:
                        self.reasons[name] = self.reasons[first]
                    continue
                ok = self._check(name, spec, device, data)
                self._arch[sig] = (name, ok)

    def _convert(self, name: str, module: nn.Module) -> None:
        self._converted.append((module, _to_format(module, torch.channels_last)))
        self.nets[name] = "channels_last"

    def _check(self, name: str, spec: Any, device: str, data: Any) -> bool:
        from ._precision import _first_batch, compare_runs
        from .extractors import capture

        x = _first_batch(data, CHECK_SAMPLES)
        if x is None:
            self.reasons[name] = "the check needs tensor inputs (items with 'x')"
            return False
        if x.dim() != 4:
            self.reasons[name] = f"inputs of {x.dim() - 1} dimensions, not images"
            return False
        module = spec.module.to(device)
        x = x.to(device)
        pool = spec.pool if spec.pool is not None else "avg"
        with capture(module, spec.layers, pool=pool) as cap:
            try:
                ref = cap.run(x.clone())
            except Exception:  # the extraction raises it again, in its own words (what to fix)
                self.reasons[name] = "the net raised on the check's batch as it is"
                return False
            self._convert(name, module)
            try:
                cl = cap.run(x.clone())
            except Exception as e:
                return self._reject(name, f"channels-last raised {type(e).__name__} in {name} on the first batch")
        worst, moved = compare_runs(ref, cl)
        moved = moved or 0
        self.checked[name] = {"samples": len(x), "max_rel_error": worst, "top1_differ": moved}
        if moved:
            return self._reject(name, f"channels-last moved {moved} of {len(x)} top-1 predictions of {name}")
        if not worst <= TOLERANCE:
            return self._reject(name, f"channels-last moved the activations of {name} by {worst:.2g} "
                                      f"(> {TOLERANCE:g}) on the first batch")
        return True

    def _reject(self, name: str, reason: str) -> bool:
        """Undo the conversion just made for ``name``, which stays as it came, for ``reason``."""
        self._undo_last()
        self.nets[name] = "contiguous"
        self.reasons[name] = reason
        return False

    def _undo_last(self) -> None:
        module, changed = self._converted.pop()
        _to_format(module, torch.contiguous_format, only=changed)

    def restore(self) -> None:
        """Give every converted weight its own format back (the audit's end)."""
        while self._converted:
            self._undo_last()

    def record(self) -> dict[str, Any]:
        """``cost.memory_format`` of ``audit.json``."""
        return {"requested": self.requested, "nets": dict(self.nets), "reasons": dict(self.reasons),
                "checked": {k: dict(v) for k, v in self.checked.items()}}

    def describe(self) -> str:
        """One line for stderr."""
        cl = [n for n, f in self.nets.items() if f == "channels_last"]
        if cl:
            return (f"memory format: channels-last for {', '.join(cl)} (checked on {CHECK_SAMPLES} images: outputs "
                    f"within {TOLERANCE:g} of the net as it was)")
        why = sorted(set(self.reasons.values()))
        return "memory format: as the nets are" + (f" ({'; '.join(why)})" if why else "")
