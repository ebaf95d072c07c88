"""Keyword inputs (transformers' ``input_ids``, ``attention_mask``, ...): batching with padding.

A dataset item may be a dict of the model's forward keyword arguments plus probekit's reserved keys
(see :func:`probekit.datasets.as_samples`). Items of different lengths are padded per batch:

- the sequence length of an item is the length of its ``attention_mask``, else of its ``input_ids``;
- every 1-D input of that length (``input_ids``, ``attention_mask``, ``token_type_ids``,
  ``position_ids``, ...) and ``inputs_embeds`` (``(T, D)``) is padded along its first axis, on the
  right by default (``padding_side="left"`` pads on the left): ``input_ids`` with the pad id, every
  other input with 0;
- an ``attention_mask`` is built (1 for each real token) when the items have none, and extended with
  0 over the padding; inputs of any other shape must have one shape in a batch.

Right padding leaves each real token at the position it has unpadded, so a model with an attention
mask (and a causal decoder even without one) gives the same features as on the item alone. With left
padding the positions shift: ``position_ids`` are then built from the mask (as transformers'
``generate`` does) when the model's forward takes them and the items give none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data._utils.collate import default_collate

from probekit.errors import DataError
from probekit.vocab import Padding

__all__ = ["Padding", "collate_inputs", "default_pad_id", "describe_inputs"]

MASK_KEY = "attention_mask"
_SEQ_KEYS_2D = ("inputs_embeds",)


def default_pad_id(model: Any) -> int:
    """The model's ``config.pad_token_id`` (transformers), else 0."""
    cfg = getattr(model, "config", None)
    pid = getattr(cfg, "pad_token_id", None)
    return int(pid) if isinstance(pid, int) and pid >= 0 else 0


def _seq_len(inputs: Mapping[str, torch.Tensor]) -> int | None:
    for key in (MASK_KEY, "input_ids"):
        if key in inputs and inputs[key].ndim == 1:
            return int(inputs[key].shape[0])
    return None


def describe_inputs(inputs: Mapping[str, torch.Tensor]) -> str:
    """``input_ids (8, 12) int64, attention_mask (8, 12) int64`` for error messages."""
    return ", ".join(f"{k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" for k, v in inputs.items())


def collate_inputs(items: Sequence[Mapping[str, Any]], padding: Padding, pad_id: int) -> dict[str, Any]:
    """Batch sample dicts whose ``inputs`` are keyword inputs, padding them to one length.

    Returns the batch of the other sample fields (``index``, ``label``, ...) as ``default_collate``
    makes it, with ``inputs`` (key -> batched tensor, ``attention_mask`` always present when the
    items have a sequence length) and ``padded`` (whether any item was padded).
    """
    rest = default_collate([{k: v for k, v in it.items() if k != "inputs"} for it in items])
    seqs = [it["inputs"] for it in items]
    lengths = [_seq_len(s) for s in seqs]
    keys = list(seqs[0])
    if lengths[0] is None:  # no sequence: one shape per input
        rest["inputs"] = _stack_same(seqs, keys, rest)
        rest["padded"] = False
        return rest
    if any(n == 0 for n in lengths):
        i = int(rest["index"][lengths.index(0)])
        raise DataError(f"Dataset item {i} has no token (an empty sequence); give every item at least one.")
    T = max(lengths)  # type: ignore[type-var]
    if padding.max_length is not None:
        if T > padding.max_length:
            i = int(rest["index"][lengths.index(T)])
            raise DataError(
                f"Dataset item {i} has {T} tokens, more than max_length={padding.max_length}; truncate the "
                "items in the dataset (e.g. the tokenizer's truncation=True), or raise max_length."
            )
        T = padding.max_length
    batched: dict[str, torch.Tensor] = {}
    padded = False
    for key in [*keys, *([MASK_KEY] if MASK_KEY not in keys else [])]:
        rows = []
        for s, n in zip(seqs, lengths, strict=True):
            v = s[key] if key in s else torch.ones(n, dtype=torch.long)  # a built mask: every token is real
            if (v.ndim == 1 and v.shape[0] == n) or (key in _SEQ_KEYS_2D and v.ndim == 2 and v.shape[0] == n):
                if n < T:
                    padded = True
                    fill = pad_id if key == "input_ids" else 0
                    pad = torch.full((T - n, *v.shape[1:]), fill, dtype=v.dtype)
                    v = torch.cat([v, pad] if padding.side == "right" else [pad, v])
            rows.append(v)
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) > 1:
            raise DataError(
                f"The input {key!r} has several shapes in one batch ({sorted(shapes)[:3]}) and is no "
                f"sequence of the items' lengths; give it one shape per item (only inputs as long as "
                f"{MASK_KEY} / input_ids are padded)."
            )
        batched[key] = torch.stack(rows)
    rest["inputs"] = batched
    rest["padded"] = padded
    return rest


def _stack_same(seqs: Sequence[Mapping[str, torch.Tensor]], keys: list[str], rest: Mapping[str, Any]
                ) -> dict[str, torch.Tensor]:
    out = {}
    for key in keys:
        shapes = {tuple(s[key].shape) for s in seqs}
        if len(shapes) > 1:
            raise DataError(
                f"The input {key!r} has several shapes in one batch ({sorted(shapes)[:3]}); only token "
                "sequences (with input_ids or attention_mask) are padded. Give it one shape per item."
            )
        out[key] = torch.stack([s[key] for s in seqs])
    return out


def left_position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... of the real tokens of left-padded rows (0 over the padding)."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)
