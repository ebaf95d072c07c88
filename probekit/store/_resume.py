"""Whether a run may continue a store: the checks made before any row is appended to it.

A resumed extraction appends to the rows already committed, so they must come from the same data,
weights, preprocessing and pooling; :func:`check_resume` refuses, in one line, a run that would mix
them. It reads through a :class:`~probekit.store.Store` (a read-only handle, or a writer's own
:meth:`~probekit.store.StoreWriter.view`), so a refused resume opened nothing for writing.
:func:`stored_fingerprint` reads the fingerprint of the inputs a whole audit was computed from
(``probekit._inputs`` makes and compares it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py

from ..errors import DataError
from . import _format as F
from ._reader import Store

#: the root attribute holding the fingerprint of the inputs a store was computed from (JSON)
FINGERPRINT_ATTR = "inputs_fingerprint"
#: the root attribute holding how the counterfactual images were made (JSON: fill, feather, deployment
#: scenes and their photos, class names), read by the audit's deployment figures
SETTINGS_ATTR = "counterfactuals"


def check_resume(
    store: Store,
    split: str,
    *,
    n_rows: int,
    fields: Sequence[str],
    factor_names: Sequence[str] | None,
    weights_sha256: Mapping[str, str],
    preprocessing: Mapping[str, str],
    pools: Mapping[str, Mapping[str, str]],
    step: int | None = None,
) -> None:
    """Refuse to append rows of ``split`` that do not fit what ``store`` holds.

    Parameters
    ----------
    store : the store as it is now (read-only).
    split, n_rows, fields, factor_names : the split about to be written: its length, its integer sample
        fields and its factor names (None: no factors).
    weights_sha256, preprocessing : per model name, the hash of its weights and its preprocessing JSON
        (empty: not checked).
    pools : per model name, the pooling of each layer about to be written.
    step : the recorded step written under (the pools of that step are checked).

    Raises
    ------
    DataError
        Naming what differs and how to resume, as ``StoreWriter.add_split`` / ``add_model`` /
        ``add_layer`` would once the file is open for writing.
    """
    out = str(store.path)
    for name, modes in pools.items():
        if name not in store.models or (step is not None and step not in store.steps(name)):
            continue
        if split not in store.acts_splits(name, step):
            continue
        stored = set(store.layers(name, split, step))
        for layer, mode in modes.items():
            if layer not in stored:
                continue
            was = store.acts(name, split, layer, step).attrs.get("pool")
            if was is not None and was != mode:
                raise DataError(
                    f"Layer {layer!r} of model {name!r} on split {split!r} in {out!r} was stored "
                    f"with pool {was!r}, but this run asks for {mode!r}. Resume with the "
                    "same pool, or write to another store."
                )
    if split in store.splits:
        stored_n = store.n_expected(split)
        if stored_n is not None and stored_n != n_rows:
            raise DataError(
                f"The split {split!r} in {out!r} holds {stored_n} samples but this data has "
                f"{n_rows}. Use the same data to resume, or another split name."
            )
        stored_names = store.factor_names(split) if store.has_field(split, "factors") else None
        want = list(factor_names) if factor_names is not None else None
        stored_fields = sorted(f for f in F.INT_FIELDS if store.has_field(split, f))
        want_fields = sorted(fields)
        if stored_names != want or stored_fields != want_fields:
            raise DataError(
                f"The split {split!r} in {out!r} was written from data with other fields (factors "
                f"{stored_names}, fields {stored_fields}) than this data (factors {want}, fields "
                f"{want_fields}). Write this data to another split (--split) or another store."
            )
    for name, sha in weights_sha256.items():
        if name in store.models:
            stored_sha = str(store.model_attrs(name).get("weights_sha256", ""))
            if stored_sha and sha and stored_sha != sha:
                raise DataError(
                    f"The model {name!r} in {out!r} was extracted from other weights (sha256 "
                    f"{stored_sha[:12]}..., now {sha[:12]}...). Give this model another name (--name) or "
                    "write to another store."
                )
    for name, pre in preprocessing.items():
        if name in store.models and pre:
            before = store.model_attrs(name).get("preprocessing", "")
            before = before.decode() if isinstance(before, bytes) else str(before or "")
            if before and before != pre:
                raise DataError(
                    f"The model {name!r} in {out!r} was extracted with other preprocessing (stored "
                    f"{before[:200]}; now {pre[:200]}). Use the same --image-size/--mean/--std, give this "
                    "model another name (--name), or write to another store."
                )


def stored_fingerprint(path: str | os.PathLike) -> tuple[dict[str, str] | None, bool]:
    """The fingerprint of the inputs an existing store was computed from (None when it records none), and
    whether it holds any model. Read-only: one handle, no file lock, nothing written.

    Raises
    ------
    DataError
        When the file cannot be read as HDF5.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            raw = f.attrs.get(FINGERPRINT_ATTR)
            has_models = "models" in f and len(f["models"]) > 0
    except OSError as e:
        raise DataError(f"Cannot read the store {str(path)!r} ({e}); rerun with --overwrite to replace it, or "
                        "give another -o.") from e
    if raw is None:
        return None, has_models
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(json.loads(raw)), has_models
