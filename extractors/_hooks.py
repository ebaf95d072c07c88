"""The one hook context manager every extraction path is built on.

:func:`capture` registers forward hooks on the selected modules when entered and removes them in a
``finally`` when left (even if the forward pass raised), restoring every module's train/eval flag. Each
hook unwraps tuple / list / dict outputs, ``detach()``es and pools *immediately on the device*, so an
in-place operation later in the same forward pass (ResNet's ``out += identity``, ``ReLU(inplace=True)``)
cannot change what was captured.

With ``stop_when_done`` set, the hook that completes the set of requested outputs ends the forward pass
there (a private exception, caught by :meth:`Capture.run`), so the modules after the last requested
layer never run: extracting ``layer1`` of a ResNet costs the stem and ``layer1``, not the whole
network.

Inside :func:`forward_precision` (``torch.bfloat16`` or ``torch.float16``), :meth:`Capture.run` runs the
forward pass under ``torch.autocast`` on the model's device, and each captured output in that dtype is
pooled in float32; outside it (the default) nothing changes.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from probekit.errors import DataError

from ._layers import OUTPUT_LAYER, LayerSpec, first_tensor, parse_selector, resolve_layers_matched
from ._pooling import PoolSpec, pool, pool_for

__all__ = ["Capture", "OutputKey", "capture", "forward_precision"]

_REDUCED = (torch.bfloat16, torch.float16)
_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("probekit_autocast", default=None)


@contextmanager
def forward_precision(dtype: torch.dtype | None) -> Iterator[None]:
    """Run every :meth:`Capture.run` in this block (this thread) under ``torch.autocast(dtype)``.

    Parameters
    ----------
    dtype : torch.bfloat16, torch.float16 or None
        The autocast dtype; None (or float32) runs the forward passes as they are.
    """
    if dtype is not None and dtype != torch.float32 and dtype not in _REDUCED:
        raise DataError(f"forward_precision takes torch.bfloat16, torch.float16 or None; got {dtype!r}.")
    token = _AUTOCAST.set(None if dtype == torch.float32 else dtype)
    try:
        yield
    finally:
        _AUTOCAST.reset(token)


def _autocast(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """``torch.autocast`` on the device of the forward pass's first tensor (else the model's), or a null
    context outside :func:`forward_precision`."""
    dtype = _AUTOCAST.get()
    if dtype is None:
        return contextlib.nullcontext()
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
    if first is None:
        first = next(iter(model.parameters()), None)
    device_type = first.device.type if first is not None else "cpu"
    return torch.autocast(device_type=device_type, dtype=dtype)

OutputKey = int | str | None | Mapping[str, int | str]

# modules whose 3-D output is channels-first (N, C, L) rather than tokens (N, T, D)
_CHANNELS_FIRST_1D: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)


class _LayersDone(Exception):
    """Raised by the hook that captured the last requested output, to end the forward pass early.

    An ``Exception`` rather than a ``BaseException``: a model whose forward swallows exceptions then
    just runs to its end, as it would without early stopping.
    """


class Capture:
    """Hooks on a set of layers; use through :func:`capture`.

    Attributes
    ----------
    layers : list of str
        The resolved selectors, in the order results are returned.
    modes : dict of str to str
        The pooling mode of each selector.
    module_types : dict of str to str
        The class name of each selector's module.
    raw_shapes : dict of str to tuple of int
        Per-sample shape of each layer's output before pooling, as seen in the last forward pass.
    stop_when_done : bool
        End each forward pass as soon as every requested output is captured (default False). Set it
        after a first whole pass has checked the layers: a module selected without ``@K`` that runs
        twice is an error only if the second call happens, and a stopped pass never gets there. The
        modules after the last requested layer do not run, so neither do their side effects
        (forward hooks of their own, statistics they update). A model whose forward catches the
        stop (and runs on, or raises another exception from it) gets that pass run again without
        stopping, and this flag cleared.
    elide_final_copy : bool
        With ``stop_when_done``: keep the output that completes the set (and ends the pass) as the
        layer's own tensor, or a contiguous view of it, instead of copying it (default False). Safe only
        for a caller that consumes the results before the model runs again; nothing of the model runs
        after that hook (but the ``finally`` clauses and context-manager exits the stop passes
        through), so nothing can change the tensor in place before then; a model that catches the stop
        and runs on is detected, and the pass run again with copies. For a full feature map
        the copy is as large as the bytes written (``benchmarks/bench_feature_maps.py``).
    final_layer : str or None
        The selector whose output completed the set in the last pass (the last one to run).
    token_mask : torch.Tensor of shape (n_samples, T) or None
        The attention mask of the next forward pass (set by the caller; None: no padding). Token
        outputs ``(N, T, D)`` of that length are pooled over their real tokens only (see
        :func:`pool`), and ``tokens_mean`` then skips no prefix token unless ``num_prefix_tokens``
        was given or the model has ``num_prefix_tokens``.
    skipped : list of str
        Selectors a glob or predicate picked whose module never ran in a forward pass: left out of
        :attr:`layers` (with a warning) rather than failing; a module named exactly must run.
    masked_none : bool
        Whether a ``none`` layer of the last pass was a token output of the mask's length (its
        padding positions are stored as they are; the caller stores the mask beside them).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec,
        *,
        pool: PoolSpec = "avg",
        num_prefix_tokens: int | None = None,
        output_key: OutputKey = None,
        eval_mode: bool = True,
    ) -> None:
        self.model = model
        self.layers, self._optional = resolve_layers_matched(model, layers)
        self.modes = {sel: pool_for(pool, sel) for sel in self.layers}
        own = getattr(model, "num_prefix_tokens", None)
        self._prefix_given = num_prefix_tokens is not None or isinstance(own, int)
        self.num_prefix_tokens = (
            int(own if isinstance(own, int) else 1) if num_prefix_tokens is None else int(num_prefix_tokens)
        )
        self.token_mask: torch.Tensor | None = None
        self.skipped: list[str] = []
        self.masked_none = False
        self.output_key = output_key
        self.eval_mode = eval_mode
        modules = dict(model.named_modules())
        modules[OUTPUT_LAYER] = model  # the model's own output: a hook on the root module
        # module name -> {call index (None: the only call) -> selector}
        self._wanted: dict[str, dict[int | None, str]] = {}
        for sel in self.layers:
            base, call = parse_selector(sel)
            self._wanted.setdefault(base, {})[call] = sel
        for base, calls in self._wanted.items():
            if None in calls and len(calls) > 1:
                picked = sorted(k for k in calls if k is not None)
                raise DataError(
                    f"Layer {base!r} is requested both as a whole and as call(s) {picked}. Ask for "
                    f"'{base}@0', '{base}@1', ... only, or for {base!r} alone if it runs once."
                )
        self._modules = {base: modules[base] for base in self._wanted}
        self.module_types = {sel: type(self._modules[parse_selector(sel)[0]]).__name__ for sel in self.layers}
        self.raw_shapes: dict[str, tuple[int, ...]] = {}
        self._results: dict[str, torch.Tensor] = {}
        self._out: Mapping[str, torch.Tensor] = {}  # set by run_into for one forward pass only
        self._counts: dict[str, int] = {}
        self._handles: list[Any] = []
        self._saved_modes: dict[nn.Module, bool] = {}
        self.stop_when_done = False
        self.elide_final_copy = False
        self.final_layer: str | None = None
        self._stopped = False  # this pass raised the stop (run() checks that it ended the forward)

    # -- hooks -----------------------------------------------------------------------------------
    def _key_for(self, sel: str) -> int | str | None:
        key = self.output_key
        if isinstance(key, Mapping):
            return key.get(sel, key.get(parse_selector(sel)[0]))
        return key

    def _make_hook(self, base: str) -> Callable[..., None]:
        calls = self._wanted[base]
        module = self._modules[base]
        channels_first = isinstance(module, _CHANNELS_FIRST_1D)

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            k = self._counts.get(base, 0)
            self._counts[base] = k + 1
            if None in calls:
                if k >= 1:
                    raise DataError(
                        f"Layer {base!r} ({type(module).__name__}) runs more than once in one forward "
                        f"pass. Pick one call with '{base}@0' (first), '{base}@1' (second), and so on."
                    )
                sel = calls[None]
            else:
                sel = calls.get(k)  # type: ignore[assignment]
                if sel is None:
                    return
            t = first_tensor(output, self._key_for(sel))
            if t is None:
                key = self._key_for(sel)
                raise DataError(
                    f"Layer {sel!r} ({type(module).__name__}) returned {type(output).__name__}"
                    f"{'' if key is None else f' without a tensor at key {key!r}'}, not a tensor. "
                    "Choose another layer, or pick the output element with output_key."
                )
            t = t.detach()
            if t.dtype in _REDUCED and _AUTOCAST.get() is not None:  # autocast's output, pooled in float32
                t = t.float()
            self.raw_shapes[sel] = tuple(t.shape[1:])
            completes = sel not in self._results and len(self._results) == len(self.layers) - 1
            keep = completes and self.stop_when_done and self.elide_final_copy
            mask = self.token_mask
            if mask is not None and not (t.ndim == 3 and not channels_first
                                         and tuple(t.shape[:2]) == tuple(mask.shape)):
                mask = None  # not a token output of the mask's length: pooled as it is
            if mask is not None and self.modes[sel] == "none":
                self.masked_none = True
            prefix = self.num_prefix_tokens if (self._prefix_given or mask is None) else 0
            self._results[sel] = pool(
                t, self.modes[sel], prefix, layer=sel, channels_first=channels_first,
                out=None if keep else self._out.get(sel), copy=not keep, mask=mask,
            )
            if completes:
                self.final_layer = sel
                if self.stop_when_done:
                    self._stopped = True
                    raise _LayersDone

        return hook

    def __enter__(self) -> Capture:
        self._saved_modes = {m: m.training for m in self.model.modules()}
        try:
            for base, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(base)))
            if self.eval_mode:
                self.model.eval()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and restore each module's train/eval flag (idempotent)."""
        try:
            for h in self._handles:
                h.remove()
        finally:
            self._handles = []
            for m, flag in self._saved_modes.items():
                m.training = flag
            self._saved_modes = {}

    # -- running -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the outputs of an earlier forward pass; call before each pass."""
        self._results = {}
        self._counts = {}
        self._stopped = False
        self.masked_none = False

    def collect(self) -> dict[str, torch.Tensor]:
        """The pooled outputs of the last forward pass, keyed by selector in requested order.

        Raises
        ------
        DataError
            When a selected layer did not run, or ran fewer times than its ``@K`` asks for.
        """
        out: dict[str, torch.Tensor] = {}
        for sel in list(self.layers):
            if sel not in self._results:
                base, call = parse_selector(sel)
                n = self._counts.get(base, 0)
                if n == 0 and sel in self._optional and len(self.layers) > 1:
                    self._drop(sel)
                    continue
                if n == 0:
                    raise DataError(
                        f"Layer {base!r} did not run during the forward pass, so it has no output. "
                        "Choose a layer the model's forward uses (`probekit layers MODEL` shows n_calls)."
                    )
                raise DataError(
                    f"{sel!r} asks for call {call} of layer {base!r}, but it ran only {n} time(s) in one "
                    f"forward pass. Use '{base}@0' to '{base}@{n - 1}'."
                )
            out[sel] = self._results[sel]
        return out

    def _drop(self, sel: str) -> None:
        """Leave out a glob-matched selector whose module did not run (reported, not fatal)."""
        base, call = parse_selector(sel)
        self.layers.remove(sel)
        self.modes.pop(sel, None)
        self.module_types.pop(sel, None)
        self._wanted[base].pop(call, None)  # the hook holds this dict: it ignores the module from now on
        self.skipped.append(sel)
        warnings.warn(
            f"Layer {sel!r} ({type(self._modules[base]).__name__}), which a glob matched, did not run in the "
            "forward pass; it is left out. Name the layers to keep, or narrow the glob (`probekit layers "
            "MODEL` shows calls = 0).", stacklevel=3,
        )

    def run(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Run one forward pass under ``torch.no_grad()`` and return the pooled outputs.

        Parameters
        ----------
        *args, **kwargs
            Passed to ``model(...)``.

        Returns
        -------
        dict of str to torch.Tensor
            Selector -> pooled tensor of shape ``(n_samples, *feature_shape)`` on the model's device,
            in requested order.
        """
        if not self._handles:
            raise DataError("Capture.run needs the hooks in place: use it inside `with capture(...)`.")
        self.reset()
        try:
            with torch.no_grad(), _autocast(self.model, args, kwargs):
                try:
                    self.model(*args, **kwargs)
                except _LayersDone:
                    pass  # every requested output is in: the rest of the forward pass is not needed
                except Exception:
                    if not self._stopped:
                        raise
                    # the model turned the stop into another exception (``raise ... from e``): run the
                    # pass again without stopping; a real error shows itself there
                    self._run_whole(*args, **kwargs)
                else:
                    if self._stopped:
                        # the model caught the stop and ran on, so an output kept without a copy may
                        # have been changed in place since: run this pass again, copying
                        self._run_whole(*args, **kwargs)
            return self.collect()
        finally:
            self._results = {}

    def _run_whole(self, *args: Any, **kwargs: Any) -> None:
        """The forward pass once more with copies and without stopping; this model is not stopped again
        (its forward does not let the stop through)."""
        self.stop_when_done = self.elide_final_copy = False
        self.reset()
        self.model(*args, **kwargs)

    def run_into(self, out: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """:meth:`run`, with the pooled output of each selector in ``out`` written into ``out[selector]``.

        Lets a caller reuse its buffers across batches instead of a new tensor per batch and layer
        (see the ``out`` parameter of :func:`pool`). The Capture keeps no reference to ``out`` after
        the call.

        Parameters
        ----------
        out : dict of str to torch.Tensor
            Selector -> tensor of shape ``(n_samples, *feature_shape)``; selectors not in it get new
            tensors.
        *args, **kwargs
            Passed to ``model(...)``.

        Returns
        -------
        dict of str to torch.Tensor
            As :meth:`run`; the tensors of the selectors in ``out`` are ``out``'s.
        """
        self._out = out
        try:
            return self.run(*args, **kwargs)
        finally:
            self._out = {}


@contextmanager
def capture(
    model: nn.Module,
    layers: LayerSpec,
    *,
    pool: PoolSpec = "avg",
    num_prefix_tokens: int | None = None,
    output_key: OutputKey = None,
    eval_mode: bool = True,
) -> Iterator[Capture]:
    """Hook ``layers`` of ``model`` for the duration of a ``with`` block.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    layers : str, sequence of str, or callable
        Which modules to hook; see :func:`resolve_layers` (names, globs, ``name@K``, predicates).
    pool : str or dict of str to str, default "avg"
        One pooling mode for every layer, or a dict layer (selector, name or glob) -> mode; see
        :func:`pool`.
    num_prefix_tokens : int, optional
        Prefix tokens skipped by ``tokens_mean``; defaults to ``model.num_prefix_tokens`` when the
        model has it (timm ViTs), else 1.
    output_key : int, str or dict, optional
        Which element of a tuple / dict output to keep (default: the first tensor); a dict maps a
        layer to its key.
    eval_mode : bool, default True
        Put the model in eval mode inside the block (every module's flag is restored on exit).

    Yields
    ------
    Capture
        Call ``cap.run(x)`` for a forward pass that returns ``{selector: pooled tensor}``, or run the
        model yourself between ``cap.reset()`` and ``cap.collect()``.

    Raises
    ------
    LayerNotFoundError
        When a requested layer matches no module.
    DataError
        From the forward pass, when a module selected without ``@K`` runs twice, or a pool does not
        fit a layer's output.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> with capture(net, ["0", "1"], pool="avg") as cap:
    ...     feats = cap.run(torch.zeros(2, 3, 8, 8))
    >>> {k: tuple(v.shape) for k, v in feats.items()}
    {'0': (2, 4), '1': (2, 4)}
    """
    cap = Capture(
        model, layers, pool=pool, num_prefix_tokens=num_prefix_tokens, output_key=output_key,
        eval_mode=eval_mode,
    )
    with cap:
        yield cap
