"""Mixed precision for the audit's forward passes, only where it cannot move a verdict.

``precision="auto"`` (the default) runs float32 on the CPU and on MPS. On CUDA it tries bfloat16
(float16 where the GPU has no bfloat16) after a guard: the first batch runs through every net in
float32 and in the reduced precision (``torch.autocast``), and the audit falls back to float32, saying
why, when any top-1 prediction of a net with an output differs, or when the pooled activations of any
stored layer move by more than :data:`TOLERANCE` (relative error, Frobenius norm per layer and net).
``"bf16"`` / ``"fp16"`` ask for that precision on any device, behind the same guard; ``"fp32"`` never
reduces. The choice is recorded in ``audit.json`` ``cost.precision``.

The guard samples the first batch only: a near-tie elsewhere in the folder can still flip a
prediction. What it bounds is the systematic error of the reduced precision on these nets and images;
tests/audit/test_precision.py checks that a planted near-tie net falls back and that a planted shortcut
model gets the same verdict in bfloat16 as in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import DataError

__all__ = ["PRECISIONS", "TOLERANCE", "PrecisionChoice", "check_precision", "choose_precision", "compare_runs",
           "guard"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""The values of ``precision`` (``--precision``)."""

TOLERANCE = 0.02
"""Largest relative error ``||a_low - a_fp32|| / ||a_fp32||`` of a layer's pooled activations on the first
batch that keeps the reduced precision. bfloat16 keeps 8 significant bits (a rounding error of at most
0.4 % per operation); a net whose layers drift by more than 2 % after its depth of operations is one whose
probes and distances could move, so it runs in float32."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecisionChoice:
    """What the audit's forward passes run in, and why.

    Attributes
    ----------
    requested : str
        One of :data:`PRECISIONS`.
    used : str
        ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    reason : str or None
        Why the reduced precision was not used (the guard's finding, or the device), else None.
    checked : dict
        The guard's figures on the first batch (empty when it did not run): ``tried``, ``tolerance``,
        ``max`` (the largest relative error), and per net ``samples`` (its batch), ``top1_differ`` (nets
        with an output) and ``max_rel_error``.
    """

    requested: str
    used: str
    reason: str | None = None
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: float32, no autocast)."""
        return None if self.used == "fp32" else _DTYPES[self.used]

    def record(self) -> dict[str, Any]:
        """``cost.precision`` of ``audit.json``."""
        return {"requested": self.requested, "used": self.used, "reason": self.reason, "checked": self.checked}

    def describe(self) -> str:
        """One line for stderr."""
        if self.used != "fp32":
            c = self.checked
            return (f"precision {self.used} (checked on a first batch of each net: no top-1 prediction moved, "
                    f"activations within {100 * c.get('max', 0.0):.2g} % <= {100 * c.get('tolerance', TOLERANCE):.0f} %)")
        return "precision fp32" + (f" ({self.reason})" if self.reason else "")


def compare_runs(ref: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> tuple[float, int | None]:
    """Two captures of one batch (layer -> pooled activations), the net as it is and changed (reduced
    precision, another memory format): the largest relative error ``||b - a|| / ||a||`` over the layers (NaN,
    an overflow, counts as too far: inf), and how many top-1 predictions of ``@output`` differ (None when the
    net has no class output)."""
    worst = 0.0
    for layer, a in ref.items():
        a64, b64 = a.double(), other[layer].double()
        denom = float(torch.linalg.vector_norm(a64))
        err = float(torch.linalg.vector_norm(b64 - a64))
        e = err / denom if denom > 0 else (0.0 if err == 0 else float("inf"))
        worst = max(worst, e if e == e else float("inf"))
    out = ref.get("@output")
    if out is None or out.ndim != 2 or out.shape[1] < 2:
        return worst, None
    return worst, int((out.argmax(1) != other["@output"].argmax(1)).sum())


def check_precision(precision: str) -> str:
    """Validate ``precision`` (one of :data:`PRECISIONS`) before any work."""
    if precision not in PRECISIONS:
        raise DataError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}.")
    return precision


def _candidate(requested: str, device: str) -> tuple[str, str | None]:
    """The reduced precision to try on ``device``, or fp32 with the reason."""
    kind = torch.device(device).type
    if requested == "fp32":
        return "fp32", None
    if kind == "cuda" and not torch.cuda.is_available():
        return "fp32", "CUDA is not available"  # the extraction refuses the device in its own words
    if requested in ("bf16", "fp16"):
        return requested, None
    if kind != "cuda":
        return "fp32", f"auto on {kind}: reduced precision is tried on CUDA only"
    bf16 = getattr(torch.cuda, "is_bf16_supported", lambda: False)()
    return ("bf16" if bf16 else "fp16"), None


def _first_batch(data: Any, n: int) -> torch.Tensor | None:
    from .datasets import as_samples

    samples = as_samples(data)
    items = [samples[i] for i in range(min(n, len(samples)))]
    if not items or "x" not in items[0]:
        return None
    return torch.stack([it["x"] for it in items])


def choose_precision(requested: str, device: str) -> PrecisionChoice:
    """The precision to try on ``device`` (before the guard): fp32 for ``"fp32"`` and for ``"auto"`` off CUDA
    (with the reason), else the reduced one (``"auto"`` on CUDA: bf16 where supported, else fp16)."""
    check_precision(requested)
    tried, reason = _candidate(requested, device)
    return PrecisionChoice(requested, tried, reason)


def guard(choice: PrecisionChoice, device: str, models: Mapping[str, Any], data: Any, batch_size: int, *,
          tolerance: float = TOLERANCE) -> PrecisionChoice:
    """Keep ``choice``'s reduced precision only if ``models`` pass the guard on the first batch of ``data``.

    Each net runs the batch in float32 and under autocast; the choice falls back to float32 (with the
    reason) when a top-1 prediction of a net with an output (``@output`` among its layers) differs, or the
    pooled activations of a layer move by more than ``tolerance`` (relative error).

    Parameters
    ----------
    choice : PrecisionChoice
        From :func:`choose_precision` (or an earlier guard: its figures are kept and extended).
    device : the device the nets run on
    models : dict of str to ModelSpec
        The nets (``module``, ``layers``, ``pool``); each is moved to ``device``.
    data : a dataset whose first ``batch_size`` items are the guard's batch
    batch_size : int
    tolerance : float, default :data:`TOLERANCE`

    Returns
    -------
    PrecisionChoice
        ``choice`` updated in place (and returned).
    """
    from .extractors import capture, forward_precision

    if choice.used == "fp32" or not models:
        return choice
    tried = choice.used
    x = _first_batch(data, batch_size)
    if x is None:
        choice.used, choice.reason = "fp32", "the guard needs tensor inputs (items with 'x')"
        return choice
    x = x.to(device)
    c = choice.checked
    c.update({"tried": tried, "tolerance": tolerance})
    n: dict[str, int] = c.setdefault("samples", {})
    top1: dict[str, int] = c.setdefault("top1_differ", {})
    rel: dict[str, float] = c.setdefault("max_rel_error", {})
    for name, spec in models.items():
        module = spec.module.to(device)
        pool = spec.pool if spec.pool is not None else "avg"
        try:
            with capture(module, spec.layers, pool=pool) as cap:
                ref = cap.run(x.clone())
                with forward_precision(_DTYPES[tried]):
                    low = cap.run(x.clone())
        except Exception as e:  # the extraction raises it again, in its own words (what to fix)
            choice.used = "fp32"
            choice.reason = f"the guard's first batch raised {type(e).__name__} in {name}"
            return choice
        rel[name], moved = compare_runs(ref, low)
        n[name] = len(x)
        if moved is not None:
            top1[name] = moved
    c["max"] = max(rel.values(), default=0.0)
    moved = {k: v for k, v in top1.items() if v}
    if moved:
        nm, k = next(iter(moved.items()))
        choice.used = "fp32"
        choice.reason = f"{tried} moved {k} of {len(x)} top-1 predictions of {nm} on the first batch"
    elif not c["max"] <= tolerance:
        nm = max(rel, key=lambda m: rel[m])
        choice.used = "fp32"
        choice.reason = (f"{tried} moved the activations of {nm} by {100 * rel[nm]:.2g} % (> {100 * tolerance:.0f} %) "
                         "on the first batch")
    return choice
