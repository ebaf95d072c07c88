"""Pooling a layer's output to one feature vector (or array) per sample, on the tensor's device.

Layouts: 4-D and 5-D tensors are channels-first maps ``(N, C, H, W[, D])``; 3-D tensors are token
sequences ``(N, T, D)`` (transformers) unless the caller says they are channels-first ``(N, C, L)``
(Conv1d outputs); 2-D tensors ``(N, D)`` are already vectors.

Token sequences may come with an attention mask ``(N, T)`` (1 = a real token, 0 = padding): ``avg``,
``max`` and ``tokens_mean`` then reduce over the real tokens only, ``cls`` takes the first real token
and ``last`` the last one, so padding never enters a feature.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from probekit.errors import DataError

from ._layers import glob_match, parse_selector

__all__ = ["POOLS", "PoolMode", "PoolSpec", "pool", "pool_for", "pools_for_rank"]

#: the store name of the attention mask written beside token layers pooled with ``none``
MASK_LAYER = "@attention_mask"

PoolMode = Literal["avg", "max", "cls", "tokens_mean", "last", "flatten", "none"]
PoolSpec = str | Mapping[str, str]
POOLS: tuple[str, ...] = ("avg", "max", "cls", "tokens_mean", "last", "flatten", "none")
"""Every pooling mode, in the order the CLI lists them."""


def pools_for_rank(ndim: int, channels_first: bool = False) -> list[str]:
    """The pooling modes that apply to a tensor of ``ndim`` dimensions (batch axis included)."""
    if ndim <= 1:
        return ["none"]
    if ndim == 2:
        return ["avg", "max", "flatten", "none"]
    if ndim == 3 and not channels_first:
        return ["avg", "max", "cls", "tokens_mean", "last", "flatten", "none"]
    return ["avg", "max", "flatten", "none"]


def _shape_txt(t: torch.Tensor) -> str:
    return "(N, " + ", ".join(str(s) for s in t.shape[1:]) + ")"


def pool(
    t: torch.Tensor,
    mode: str,
    num_prefix_tokens: int = 1,
    *,
    layer: str = "",
    channels_first: bool = False,
    out: torch.Tensor | None = None,
    copy: bool = True,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool a batch of layer outputs to per-sample features.

    Parameters
    ----------
    t : torch.Tensor of shape (n_samples, ...)
        One layer's output for a batch.
    mode : {"avg", "max", "cls", "tokens_mean", "last", "flatten", "none"}
        ``avg`` / ``max``: mean / maximum over the spatial axes of a channels-first map (H, W for
        NCHW), over the tokens T of a ``(N, T, D)`` sequence, or over L of a channels-first
        ``(N, C, L)`` output; 2-D input is returned as is. ``cls``: the first token ``t[:, 0]`` of a
        ``(N, T, D)`` sequence. ``tokens_mean``: the mean over the tokens after the
        ``num_prefix_tokens`` prefix (class / register) tokens. ``last``: the last token
        ``t[:, -1]`` (decoder models). ``flatten``: ``(N, -1)``. ``none``: the raw output. With a
        ``mask``, the token modes see the real tokens only (see ``mask``).
    num_prefix_tokens : int, default 1
        Prefix tokens skipped by ``tokens_mean`` (timm models carry it as ``model.num_prefix_tokens``);
        with a ``mask``, the first ``num_prefix_tokens`` real tokens of each row.
    layer : str, default ""
        The layer's name, for error messages.
    channels_first : bool, default False
        Treat a 3-D tensor as ``(N, C, L)`` (Conv1d-style) rather than tokens ``(N, T, D)``.
    out : torch.Tensor of shape (n_samples, *feature_shape), optional
        A preallocated tensor to write the result into (cast to ``out``'s dtype), which is returned.
        The modes that copy (``none``, ``flatten``, ``cls``, ``avg`` / ``max`` of 2-D input) copy ``t``
        straight into it, so a caller that reuses one buffer across batches allocates nothing per
        batch (a fresh 100 MB tensor costs its page faults every time); reductions are computed and
        then copied in. It must not overlap ``t``.
    copy : bool, default True
        With ``out=None``, whether the modes that give ``t`` or a view of it copy it. ``False`` returns
        the view when it is contiguous (a non-contiguous one is still copied): only for a caller that
        consumes the result before anything can change ``t`` in place (the capture hook that ends the
        forward pass).
    mask : torch.Tensor of shape (n_samples, T), optional
        Attention mask of a ``(N, T, D)`` token output (nonzero = a real token; the padding side does
        not matter). ``tokens_mean`` averages exactly the real tokens after the prefix (sentence-
        transformers' mean pooling with ``num_prefix_tokens=0``), ``avg`` / ``max`` reduce over the real
        tokens, ``cls`` takes the first real token (position 0 with right padding) and ``last`` the last
        one. Ignored by the other layouts; ``none`` and ``flatten`` keep every position.

    Returns
    -------
    torch.Tensor of shape (n_samples, *feature_shape)
        ``out`` when given, else a new tensor; never a view of ``t`` (unless ``copy=False``), so later
        in-place operations on ``t`` cannot change it. Reductions of half-precision input are
        accumulated and returned in float32 (unless ``out`` has another dtype).

    Raises
    ------
    DataError
        When ``mode`` is unknown or does not fit the tensor's rank; the message names the layer and
        the modes that fit. When ``out`` does not have the pooled shape.

    Examples
    --------
    >>> import torch
    >>> pool(torch.ones(2, 3, 4, 4), "avg").shape
    torch.Size([2, 3])
    >>> pool(torch.arange(12.).reshape(1, 3, 4), "tokens_mean")
    tensor([[6., 7., 8., 9.]])
    """
    if mode not in POOLS:
        raise DataError(
            f"The 'pool' parameter must be one of {{{', '.join(repr(p) for p in POOLS)}}}. "
            f"Got {mode!r} instead."
        )
    fits = pools_for_rank(t.ndim, channels_first)
    if mode not in fits:
        where = f"layer {layer!r}" if layer else "a layer"
        need = {
            "cls": "a 3-D token tensor (N, T, D)",
            "tokens_mean": "a 3-D token tensor (N, T, D)",
            "last": "a 3-D token tensor (N, T, D)",
        }.get(mode, "a tensor with a batch axis")
        raise DataError(
            f"Pool {mode!r} does not fit {where}, whose output has shape {_shape_txt(t)} "
            f"(rank {t.ndim}): {mode!r} needs {need}. Pools that fit: {', '.join(fits)}. "
            f"Pass another pool for this layer, e.g. pool={{{layer!r}: {fits[0]!r}}}."
        )
    tokens = t.ndim == 3 and not channels_first
    if mask is not None and tokens and mode not in ("flatten", "none"):
        if tuple(mask.shape) != tuple(t.shape[:2]):
            raise DataError(
                f"The attention mask has shape {tuple(mask.shape)} but {('layer ' + repr(layer)) if layer else 'a layer'} "
                f"gives tokens of shape {_shape_txt(t)}; pass a mask of shape (N, T) or none."
            )
        return _fit(_masked_pool(t, mode, num_prefix_tokens, layer, mask), True, out, mode, layer, copy)
    res, fresh = _pool(t, mode, num_prefix_tokens, layer, channels_first)
    return _fit(res, fresh, out, mode, layer, copy)


def _fit(res: torch.Tensor, fresh: bool, out: torch.Tensor | None, mode: str, layer: str,
         copy: bool) -> torch.Tensor:
    if out is None:
        return res if fresh or (not copy and res.is_contiguous()) else res.clone()
    if tuple(out.shape) != tuple(res.shape):
        where = f"layer {layer!r}" if layer else "a layer"
        raise DataError(
            f"Pool {mode!r} of {where} gives features of shape {tuple(res.shape)} but the 'out' tensor "
            f"has shape {tuple(out.shape)}. The layer's output shape changed, or 'out' was made for "
            "another batch size: pass an 'out' of the pooled shape, or none."
        )
    return out.copy_(res)


def _masked_pool(t: torch.Tensor, mode: str, num_prefix_tokens: int, layer: str,
                 mask: torch.Tensor) -> torch.Tensor:
    """A token pool over the real tokens of each row of ``t`` (N, T, D), as ``mask`` (N, T) marks them."""
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    real = mask.to(device=t.device) != 0
    rows = torch.arange(t.shape[0], device=t.device)
    where = f"layer {layer!r}" if layer else "a layer"
    if mode in ("cls", "last"):
        if not bool(real.any(dim=1).all()):
            raise DataError(f"A row of the attention mask of {where} has no real token; give every sample at least one token.")
        pos = torch.arange(1, t.shape[1] + 1, device=t.device)
        # the first real token: the largest (T + 1 - position); the last: the largest position
        idx = ((real * (t.shape[1] + 1 - pos)) if mode == "cls" else (real * pos)).argmax(dim=1)
        return t[rows, idx]
    k = int(num_prefix_tokens) if mode == "tokens_mean" else 0
    if k < 0:
        raise DataError(f"tokens_mean on {where} skips {k} prefix tokens; set num_prefix_tokens >= 0.")
    if k:
        real = real & (real.cumsum(dim=1) > k)  # drop each row's first k real tokens
    counts = real.sum(dim=1)
    if not bool((counts > 0).all()):
        bad = int(torch.nonzero(counts == 0)[0, 0])
        raise DataError(
            f"Row {bad} of the batch has no real token in {where} after skipping {k} prefix token(s) "
            "(its attention mask is all 0 there); give every sample more tokens, or set num_prefix_tokens."
        )
    if mode == "max":
        filled = t.masked_fill(~real.unsqueeze(-1), float("-inf"))
        return filled.amax(dim=1).to(acc)
    w = real.unsqueeze(-1).to(acc)
    total = (t.to(acc) * w).sum(dim=1)
    return total / counts.unsqueeze(-1).to(acc)


def _pool(
    t: torch.Tensor, mode: str, num_prefix_tokens: int, layer: str, channels_first: bool
) -> tuple[torch.Tensor, bool]:
    """The pooled result and whether it is a new tensor: the reductions compute one; the modes that copy
    give ``t`` or a view of it, which the caller copies (into a new tensor or into ``out``)."""
    acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    if mode in ("avg", "max"):
        if t.ndim == 2:
            return t, False
        if t.ndim == 3 and not channels_first:
            dims: tuple[int, ...] = (1,)
        else:
            dims = tuple(range(2, t.ndim))
        if mode == "avg":
            return (t.mean(dim=dims, dtype=acc) if acc is not None else t.mean(dim=dims)), True
        return (t.amax(dim=dims).to(acc) if acc is not None else t.amax(dim=dims)), True
    if mode == "cls":
        return t[:, 0], False
    if mode == "last":
        return t[:, -1], False
    if mode == "tokens_mean":
        k = int(num_prefix_tokens)
        if not 0 <= k < t.shape[1]:
            raise DataError(
                f"tokens_mean on {('layer ' + repr(layer)) if layer else 'a layer'} skips {k} prefix "
                f"tokens but the output has only {t.shape[1]} tokens; set num_prefix_tokens to fit."
            )
        rest = t[:, k:]
        return (rest.mean(dim=1, dtype=acc) if acc is not None else rest.mean(dim=1)), True
    if mode == "flatten":
        return t.reshape(t.shape[0], -1), False  # a view, or a copy of a non-contiguous t: copied again
    return t, False  # none


def pool_for(pool_spec: PoolSpec, layer: str) -> str:
    """The pooling mode ``pool_spec`` gives to ``layer`` (a mode, or a dict layer -> mode).

    A dict may be keyed by the exact selector (``"blocks.0@1"``), the module name, or a glob
    (``"blocks.*"``, ``"*"`` as a default), tried in that order; a layer it does not cover is an error,
    so nothing is pooled by accident.
    """
    if isinstance(pool_spec, str):
        return pool_spec
    if layer in pool_spec:
        return pool_spec[layer]
    base, _ = parse_selector(layer)
    if base in pool_spec:
        return pool_spec[base]
    for key, mode in pool_spec.items():  # globs ("layer*", "*") last, in the dict's order
        if glob_match(base, key):
            return mode
    raise DataError(
        f"The 'pool' dict names no mode for layer {layer!r} (it has {sorted(pool_spec)}). Add the layer "
        "to the dict, or pass one mode for every layer."
    )
