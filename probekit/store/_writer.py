"""Writing a store: committed batches of rows, resumable after an interruption.

Crash safety rests on three rules (docs/FORMAT.md, "Commit protocol"):

1. every dataset of a batch is written before any ``rows_committed`` counter moves;
2. the file is flushed right after the counters move, so what is on disk is always a state where
   every counter covers fully written rows;
3. activations are stored uncompressed by default, so a chunk that is rewritten keeps its place in
   the file and an interrupted write can never leave committed rows pointing at reused space.

A reader never looks past ``rows_committed``; a writer opened on an existing store resumes at it.

A write the operating system refuses (disk full, a file size limit, permission denied, an I/O error;
h5py raises these as ``OSError`` or ``RuntimeError`` with HDF5's text) becomes one
:class:`~probekit.errors.WriteError` naming the file, the reason and what to do. The rows committed
before it stay readable, and a resumed write continues from them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

import h5py
import numpy as np

from .._version import __version__
from ..errors import (
    NO_SPACE,
    NOT_ALLOWED,
    DataError,
    ProbekitError,
    StoreExistsError,
    WriteError,
    os_error_reason,
    short_path,
)
from . import _format as F
from ._reader import Store, check_format, read_str_list

WriteMode = Literal["create", "resume", "overwrite"]
_CHUNK_BYTES = 1 << 20  # aim for ~1 MiB chunks: large enough for fast I/O, small enough to stay lazy
_MAX_CHUNK_ROWS = 4096


_Method = TypeVar("_Method", bound=Callable[..., Any])
#: text of HDF5's errors for a write the operating system refused (a RuntimeError without it is a bug,
#: and is raised as it is)
_IO_TEXT = re.compile(r"errno = \d+|write failed|flush|Input/output|No space", re.IGNORECASE)


def _translate_io_errors(method: _Method) -> _Method:
    """Turn a write the operating system refused, inside ``method``, into one :class:`WriteError`."""

    @functools.wraps(method)
    def wrapper(self: StoreWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except ProbekitError:
            raise
        except (OSError, RuntimeError) as e:
            err = self._write_error(e)
            if err is None:
                raise
            raise err from e

    return wrapper  # type: ignore[return-value]


def chunk_rows(row_shape: Sequence[int], itemsize: int, n_rows: int | None = None) -> int:
    """Rows per chunk for a dataset whose rows have ``row_shape``: about 1 MiB per chunk."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    rows = max(1, min(_MAX_CHUNK_ROWS, _CHUNK_BYTES // row_bytes))
    if n_rows:
        rows = min(rows, n_rows)
    return int(rows)


class StoreWriter:
    """Append activations, sample metadata and weights to a store file.

    Parameters
    ----------
    path : str or Path
        The ``.h5`` file to write.
    mode : {"create", "resume", "overwrite"}
        ``create`` refuses an existing file; ``resume`` opens an existing store (or creates a new one)
        and continues where its committed rows end, or adds new models and splits to it;
        ``overwrite`` replaces an existing file.
    compression : {None, "gzip", "lzf"}
        Compression of activation datasets. Off by default: see the module docstring on crash safety.
    dataset_kwargs : mapping
        Extra keyword arguments for ``h5py.Group.create_dataset`` of activation datasets.
    """

    @_translate_io_errors
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        mode: WriteMode = "create",
        compression: str | None = None,
        dataset_kwargs: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        if mode not in ("create", "resume", "overwrite"):
            raise ProbekitError(
                f"The 'mode' parameter of StoreWriter must be one of {{'create', 'resume', 'overwrite'}}. "
                f"Got {mode!r} instead."
            )
        if compression not in (None, "gzip", "lzf"):
            raise ProbekitError(
                "The 'compression' parameter of StoreWriter must be one of {None, 'gzip', 'lzf'}. "
                f"Got {compression!r} instead."
            )
        self.path = Path(path)
        self.compression = compression
        self.dataset_kwargs = dict(dataset_kwargs)
        self._broken = False  # a write failed: the handle is closed without another flush
        self._last_commit: tuple[str, int] | None = None  # (split, rows) of the last committed batch
        self._last_declared: dict[str, str] = {}  # model -> the layer add_layer declared last
        if not self.path.parent.exists():
            raise DataError(
                f"Cannot write the store {str(self.path)!r}: the directory {str(self.path.parent)!r} "
                "does not exist. Create it first or choose another output path."
            )
        exists = self.path.exists()
        if exists and not self.path.is_file():
            what = "a folder" if self.path.is_dir() else "not a regular file (a device, a pipe, ...)"
            raise DataError(
                f"Cannot write the store {short_path(self.path)!r}: it is {what}. Give the path of a file, "
                "e.g. DIR/acts.h5."
            )
        if exists and mode == "create":
            raise StoreExistsError(
                f"The output {str(self.path)!r} already exists. Pass --resume to continue or extend it, "
                "or --overwrite to replace it."
            )
        if exists and mode == "resume":
            check_format(self.path)  # refuses a foreign or newer file before opening it for writing
            self._f = _open_for_writing(self.path, "r+")
        else:
            if exists:  # overwrite
                _refuse_if_being_written(self.path)
                self.path.unlink()
            try:
                self._f = _open_for_writing(self.path, "w")
                root = self._f
                root.attrs["format"] = F.FORMAT_NAME
                root.attrs["format_version"] = F.FORMAT_VERSION
                root.attrs["probekit_version"] = __version__
                root.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                F.mark(root, "probekit.store")
                F.mark(root.create_group("samples"), "probekit.samples")
                F.mark(root.create_group("models"), "probekit.models")
                self._f.flush()
            except BaseException:  # e.g. the disk filled up: leave no unreadable file for the rerun
                self._broken = True
                self.close()
                with contextlib.suppress(OSError):
                    self.path.unlink()
                raise
        self.resumed = exists and mode == "resume"
        # handles of the datasets write_rows fills, built on first use and dropped by every
        # declaration (add_split/add_model/add_layer): looking them up by name cost more per batch
        # than writing pooled rows (1.4 ms per batch of 3 sample fields + 4 layers, cProfile)
        self._sample_rows: dict[str, dict[str, _Rows]] = {}
        self._act_rows: dict[tuple[str, str, int | None], tuple[h5py.Group, dict[str, _Rows]]] = {}

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error in flight says more than a failed close after it
            self.close()

    @_translate_io_errors
    def close(self) -> None:
        f = getattr(self, "_f", None)
        if f is None or not f.id.valid:
            return
        if self._broken:  # after a failed write: close only if what HDF5 holds can now be written
            try:
                f.flush()
            except Exception:
                _abandon(f)
                self._f = None
                return
        f.flush()
        f.close()

    @_translate_io_errors
    def flush(self) -> None:
        self._f.flush()

    def view(self) -> Store:
        """A read-only :class:`Store` through this writer's own handle, showing the rows committed now.

        No file is opened: a session that writes several splits (the audit) reads what it wrote (a
        resume's checks, a look of ``objects="auto"``) without opening the store again. The view is valid
        while the writer is open; closing it leaves the writer open.
        """
        return Store._over(self._f, self.path)

    @_translate_io_errors
    def set_attrs(self, attrs: Mapping[str, str | int | float]) -> None:
        """Set root attributes of the store (e.g. the audit's ``inputs_fingerprint``) and flush."""
        for k, v in attrs.items():
            self._f.attrs[k] = v
        self._f.flush()

    def _write_error(self, e: BaseException) -> WriteError | None:
        """The :class:`WriteError` for an ``OSError`` / ``RuntimeError`` of h5py, or ``None`` when ``e``
        is no refused write (a bug: raised as it is)."""
        number, reason = os_error_reason(e)
        if number is None and not _IO_TEXT.search(str(e)):
            return None
        self._broken = True
        path = short_path(getattr(self, "path", "?"))
        if number in NOT_ALLOWED:
            return WriteError(
                f"Cannot write the store {path!r}: {reason}. Write it to a folder you may write to, or fix "
                "the permissions.", errno=number, path=str(path))
        if self._last_commit is None:
            kept = "no row was committed yet"
        else:
            kept = f"{self._last_commit[1]} rows of split {self._last_commit[0]!r} are committed"
        what = "Free disk space (or write the store elsewhere)" if number in NO_SPACE else "Check the disk"
        code = f" (errno {number})" if number is not None else ""
        return WriteError(
            f"Writing the store {path!r} failed: {reason}{code}. {what}, then rerun: it continues from the "
            f"last committed row ({kept}).", errno=number, path=str(path))

    def _forget_handles(self) -> None:
        self._sample_rows.clear()
        self._act_rows.clear()

    # -- declarations ---------------------------------------------------------------------------
    @_translate_io_errors
    def add_split(
        self,
        split: str,
        *,
        n_rows: int | None,
        has_label: bool,
        factor_names: Sequence[str] | None = None,
        has_group: bool = False,
        fields: Sequence[str] | None = None,
        factor_periods: Sequence[float] | None = None,
    ) -> int:
        """Declare a split's sample metadata; return the rows it already has committed.

        ``fields`` names the optional integer fields the rows carry (any of ``F.INT_FIELDS``: label,
        group, background, background_label, variant); when given it replaces ``has_label`` /
        ``has_group``. ``factor_periods`` gives each factor's period (0 = linear; e.g. 1.0 for a hue in
        [0, 1), 180 for an orientation in degrees), stored as the ``periods`` attribute of ``factors``.
        """
        self._forget_handles()
        _check_name("split", split)
        if fields is None:
            fields = [f for f, on in (("label", has_label), ("group", has_group)) if on]
        unknown = [f for f in fields if f not in F.INT_FIELDS]
        if unknown:
            raise DataError(f"Unknown sample fields {unknown}; the store knows {list(F.INT_FIELDS)}.")
        want_fields = sorted(fields)
        samples = self._f["samples"]
        if split in samples:
            g = samples[split]
            stored_names = [str(n) for n in g["factors"].attrs["names"]] if "factors" in g else None
            want_names = list(factor_names) if factor_names is not None else None
            stored_fields = sorted(f for f in g if f in F.INT_FIELDS)
            if stored_names != want_names or stored_fields != want_fields:
                raise DataError(
                    f"The split {split!r} in {str(self.path)!r} was written from data with other fields "
                    f"(factors {stored_names}, fields {stored_fields}) than this data (factors {want_names}, "
                    f"fields {want_fields}). Write this data to another split (--split) or another store."
                )
            stored_n = g.attrs.get("n_rows", -1)
            if n_rows is not None and stored_n >= 0 and stored_n != n_rows:
                raise DataError(
                    f"The split {split!r} in {str(self.path)!r} holds {stored_n} samples but this data has "
                    f"{n_rows}. Use the same data to resume, or another split name."
                )
            return int(g.attrs[F.ROWS_ATTR])
        g = samples.create_group(split)
        F.mark(g, "probekit.split")
        g.attrs[F.ROWS_ATTR] = 0
        g.attrs["n_rows"] = -1 if n_rows is None else int(n_rows)
        shapes: dict[str, tuple[int, ...]] = {"index": ()}
        for f in F.INT_FIELDS:
            if f in fields:
                shapes[f] = ()
        if factor_names is not None:
            shapes["factors"] = (len(factor_names),)
        for field, row_shape in shapes.items():
            dtype = np.dtype(F.SAMPLE_DTYPES[field])
            ds = g.create_dataset(
                field,
                shape=(n_rows or 0, *row_shape),
                maxshape=(None, *row_shape),
                dtype=dtype,
                chunks=(chunk_rows(row_shape, dtype.itemsize, n_rows), *row_shape),
                **_preallocated(n_rows),
            )
            F.mark(ds, f"probekit.{field}")
            if field == "factors":
                ds.attrs["names"] = [str(n) for n in factor_names]  # type: ignore[union-attr]
                if factor_periods is not None:
                    periods = np.asarray(factor_periods, dtype=np.float64).reshape(-1)
                    if periods.size != len(factor_names) or not np.all(np.isfinite(periods) & (periods >= 0)):
                        raise DataError(
                            f"factor_periods must give one period >= 0 per factor ({len(factor_names)}; 0 = "
                            f"linear). Got {list(factor_periods)}."
                        )
                    ds.attrs["periods"] = periods
            if field == "variant":
                ds.attrs["names"] = list(F.VARIANTS)
        self._f.flush()
        return 0

    @_translate_io_errors
    def add_model(
        self,
        name: str,
        *,
        role: str = "model",
        source: str = "",
        weights_sha256: str = "",
        param_count: int = -1,
        preprocessing: str = "",
    ) -> None:
        """Declare a model; on an existing store, refuse one whose weights differ.

        ``preprocessing`` (a JSON string, see :func:`probekit.models.preprocessing_for`) is stored as the
        model's ``preprocessing`` attribute; a model already stored with other preprocessing is refused.
        """
        self._forget_handles()
        _check_name("model", name)
        if role not in F.ROLES:
            raise DataError(
                f"The 'role' parameter must be one of {set(F.ROLES)}. Got {role!r} instead."
            )
        models = self._f["models"]
        if name in models:
            stored = models[name].attrs.get("weights_sha256", "")
            if stored and weights_sha256 and stored != weights_sha256:
                raise DataError(
                    f"The model {name!r} in {str(self.path)!r} was extracted from other weights "
                    f"(sha256 {stored[:12]}..., now {weights_sha256[:12]}...). Give this model another "
                    "name (--name) or write to another store."
                )
            if preprocessing:
                before = models[name].attrs.get("preprocessing", "")
                if before and before != preprocessing:
                    raise DataError(
                        f"The model {name!r} in {str(self.path)!r} was extracted with other preprocessing "
                        f"(stored {before[:200]}; now {preprocessing[:200]}). Use the same --image-size/--mean/"
                        "--std, give this model another name (--name), or write to another store."
                    )
                if not before:
                    models[name].attrs["preprocessing"] = preprocessing
                    self._f.flush()
            return
        g = models.create_group(name)
        F.mark(g, "probekit.model")
        g.attrs["role"] = role
        g.attrs["source"] = source
        g.attrs["weights_sha256"] = weights_sha256
        g.attrs["param_count"] = int(param_count)
        if preprocessing:
            g.attrs["preprocessing"] = preprocessing
        self._f.flush()

    def _acts_group(self, model: str, split: str, step: int | None, create: bool) -> h5py.Group:
        base = self._f["models"][model]
        if step is not None:
            base = _require(base, "steps", "probekit.steps", create)
            base = _require(base, str(int(step)), "probekit.step", create)
        acts = _require(base, "acts", "probekit.acts", create)
        if split not in acts:
            if not create:
                raise KeyError(split)
            g = acts.create_group(split)
            F.mark(g, "probekit.acts_split")
            g.attrs[F.ROWS_ATTR] = 0
        return acts[split]

    @_translate_io_errors
    def add_layer(
        self,
        model: str,
        split: str,
        layer: str,
        *,
        feature_shape: Sequence[int],
        dtype: str = "float32",
        attrs: Mapping[str, Any] = MappingProxyType({}),
        step: int | None = None,
    ) -> int:
        """Declare one activation dataset; return the rows committed for this model and split.

        The model's ``layer_order`` attribute records the order in which layers are declared: a layer
        new to the model goes right after the layer declared before it (else last). Declare a model's
        layers in the order its forward pass runs them, and readers list them by depth.
        """
        self._forget_handles()
        if dtype not in F.ACT_DTYPES:
            raise DataError(
                f"The 'dtype' parameter must be one of {set(F.ACT_DTYPES)}. Got {dtype!r} instead."
            )
        n_rows = int(self._f["samples"][split].attrs["n_rows"])
        n_rows = None if n_rows < 0 else n_rows
        g = self._acts_group(model, split, step, create=True)
        self._record_order(model, layer)
        key = F.escape_name(layer)
        feature_shape = tuple(int(s) for s in feature_shape)
        committed = int(g.attrs[F.ROWS_ATTR])
        if key in g:
            ds = g[key]
            if tuple(ds.shape[1:]) != feature_shape or ds.dtype != np.dtype(dtype):
                raise DataError(
                    f"The layer {layer!r} of model {model!r}, split {split!r} is stored with features "
                    f"{tuple(ds.shape[1:])} {ds.dtype}, but this run gives {feature_shape} {dtype}. "
                    "Resume with the same --pool and --dtype, or write to another store."
                )
            if n_rows is None and ds.shape[0] > committed:  # drop rows an interrupted run left behind
                ds.resize(committed, axis=0)
            return committed
        if committed > 0:
            raise DataError(
                f"Cannot add layer {layer!r} to model {model!r}, split {split!r}: that split already has "
                f"{committed} committed rows for other layers. Write the new layer under another --name."
            )
        np_dtype = np.dtype(dtype)
        ds = g.create_dataset(
            key,
            shape=(n_rows or 0, *feature_shape),
            maxshape=(None, *feature_shape),
            dtype=np_dtype,
            chunks=(chunk_rows(feature_shape, np_dtype.itemsize, n_rows), *feature_shape),
            compression=self.compression,
            **(_preallocated(n_rows) if self.compression is None and not self.dataset_kwargs else {}),
            **self.dataset_kwargs,
        )
        F.mark(ds, "probekit.activations")
        ds.attrs["layer"] = layer
        for k, v in attrs.items():
            ds.attrs[k] = v
        self._f.flush()
        return committed

    def _record_order(self, model: str, layer: str) -> None:
        g = self._f["models"][model]
        order = read_str_list(g.attrs.get("layer_order"))
        if layer not in order:
            before = self._last_declared.get(model)
            order.insert(order.index(before) + 1 if before in order else len(order), layer)
            g.attrs["layer_order"] = order
        self._last_declared[model] = layer

    # -- rows ----------------------------------------------------------------------------------------
    @_translate_io_errors
    def committed(self, split: str, model: str | None = None, step: int | None = None) -> int:
        """Rows committed for a split's samples, or for one model's activations on it."""
        if model is None:
            return int(self._f["samples"][split].attrs[F.ROWS_ATTR])
        try:
            return int(self._acts_group(model, split, step, create=False).attrs[F.ROWS_ATTR])
        except KeyError:
            return 0

    @_translate_io_errors
    def write_rows(
        self,
        split: str,
        start: int,
        samples: Mapping[str, np.ndarray],
        acts: Mapping[str, Mapping[str, np.ndarray]],
        *,
        step: int | None = None,
    ) -> None:
        """Write one batch of rows ``[start, start + b)`` and commit it.

        ``samples`` holds ``index`` and the split's declared fields (``label``, ``factors``, ``group``,
        ``background``, ``background_label``, ``variant``); ``acts`` maps
        model -> layer -> array of shape ``(b, *feature_shape)``. Sample rows already committed (a
        second model on the same split) are checked against the stored index instead of rewritten.
        """
        g = self._f["samples"][split]
        index = np.asarray(samples["index"], dtype=np.int64)
        b = len(index)
        stop = start + b
        s_committed = int(g.attrs[F.ROWS_ATTR])
        if start > s_committed:
            raise ProbekitError(
                f"write_rows for split {split!r} starts at row {start} but only {s_committed} rows are "
                "committed; rows must be written in order."
            )
        fields = self._sample_rows.get(split)
        if fields is None:
            fields = self._sample_rows[split] = {name: _Rows(g[name]) for name in g}
        if stop > s_committed:  # new sample rows
            for field, rows in fields.items():
                if field not in samples:
                    raise DataError(f"The batch for split {split!r} lacks the field {field!r}.")
                value = np.asarray(samples[field], dtype=rows.dtype)
                if len(value) != b:
                    raise DataError(
                        f"The field {field!r} of a batch for split {split!r} has {len(value)} rows, "
                        f"the index has {b}."
                    )
                rows.write(start, value)
        # rows the store already had must be the same samples, in the same order
        overlap = min(stop, s_committed)
        if overlap > start and not np.array_equal(fields["index"].ds[start:overlap], index[: overlap - start]):
            raise DataError(
                f"The samples of split {split!r} rows {start}..{overlap} differ from those stored "
                f"in {str(self.path)!r}: the data or its order changed. Use the same data, unshuffled."
            )
        groups = []
        for model, layers in acts.items():
            cached = self._act_rows.get((model, split, step))
            if cached is None:
                ag = self._acts_group(model, split, step, create=False)
                cached = self._act_rows[(model, split, step)] = (ag, {name: _Rows(ag[name]) for name in ag})
            ag, layer_rows = cached
            a_committed = int(ag.attrs[F.ROWS_ATTR])
            if a_committed != start:
                raise ProbekitError(
                    f"write_rows for model {model!r}, split {split!r} starts at row {start} but "
                    f"{a_committed} rows are committed; rows must be written in order."
                )
            keys = {F.escape_name(name): name for name in layers}
            missing = set(layer_rows) - set(keys)
            if missing:
                raise DataError(f"The batch for model {model!r} lacks layers {sorted(missing)}.")
            for key, layer in keys.items():
                value = layers[layer]
                if value.shape[0] != b:
                    raise DataError(
                        f"Layer {layer!r} of model {model!r} gave {value.shape[0]} rows for a batch of {b}."
                    )
                if key not in layer_rows:  # not declared: the same KeyError as a lookup by name
                    layer_rows[key] = _Rows(ag[key])
                layer_rows[key].write(start, value)
            groups.append(ag)
        # commit: counters move only after every dataset of the batch is written, and on disk: the
        # flush before the counters move puts the rows and their chunk index in the file first, so
        # neither a crash inside the next flush nor a concurrent reader can see a counter ahead of them
        self._f.flush()
        if stop > s_committed:
            g.attrs[F.ROWS_ATTR] = stop
        for ag in groups:
            ag.attrs[F.ROWS_ATTR] = stop
        self._f.flush()
        self._last_commit = (split, stop)

    @_translate_io_errors
    def write_weights(
        self,
        model: str,
        layer: str,
        rows: np.ndarray,
        *,
        step: int | None = None,
        attrs: Mapping[str, Any] = MappingProxyType({}),
    ) -> None:
        """Store neuron weight rows ``(units, fan_in)`` of one layer (replacing an earlier copy)."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            raise DataError(f"Weight rows of layer {layer!r} must be 2-D (units, fan_in); got {rows.shape}.")
        base = self._f["models"][model]
        if step is not None:
            base = _require(base, "steps", "probekit.steps", True)
            base = _require(base, str(int(step)), "probekit.step", True)
        wg = _require(base, "weights", "probekit.weights", True)
        key = F.escape_name(layer)
        if key in wg:
            del wg[key]
        ds = wg.create_dataset(key, data=rows)
        F.mark(ds, "probekit.weight_rows")
        ds.attrs["layer"] = layer
        for k, v in attrs.items():
            ds.attrs[k] = v
        self._f.flush()


def _open_for_writing(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if "lock" in str(e).lower() and os_error_reason(e)[0] not in NOT_ALLOWED:
            raise DataError(
                f"Cannot write the store {str(path)!r}: another process has it open for writing (an "
                "extraction still running?). Wait for it to finish, or write to another store."
            ) from e
        raise


def _preallocated(n_rows: int | None) -> dict[str, Any]:
    """``create_dataset`` arguments that give a dataset of known length all its file space at once.

    The file then reaches its full size when the datasets are declared (sparse: no byte is written,
    the fill value is never written), and writing rows never moves HDF5's metadata again: a disk that
    fills up fails a write of raw rows, before the counters move, and never a flush that has already
    recorded a larger file than the disk could take (which leaves a file no reader opens: "truncated
    file"). Rows past the committed ones hold whatever the disk held: readers never read them.
    """
    if not n_rows:
        return {}
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return {"dcpl": dcpl, "fill_time": "never"}


def _abandon(f: h5py.File) -> None:
    """Leave a file open whose cached rows HDF5 cannot write (a full disk), until the process ends.

    Closing such a file fails, and so does the release of any of its objects (each release flushes
    what it holds); h5py's cleanup of the half-closed objects then crashes the interpreter at exit
    (segmentation fault; h5py 3.16 with HDF5 2.0). One more HDF5 reference on every open object of the
    file keeps them from being released at all: the operating system closes the file when the process
    ends. The rows committed before the failure are on disk already (each commit is flushed).
    """
    for oid in h5py.h5f.get_obj_ids(f.id, h5py.h5f.OBJ_ALL):
        h5py.h5i.inc_ref(oid)


def _refuse_if_being_written(path: Path) -> None:
    """Refuse to replace a store another process is writing (anything else may be replaced)."""
    try:
        h5py.File(path, "r+").close()
    except OSError as e:
        if "lock" in str(e).lower():
            _open_for_writing(path, "r+")  # raises the DataError
        # not HDF5, truncated, ...: overwrite replaces it


class _Rows:
    """One dataset that ``write_rows`` fills, row by row: its handle and how to write ``[start, stop)``.

    Numeric rows go through HDF5's low-level write with a hyperslab of the file space: h5py's
    ``ds[a:b] = value`` rebuilds the selection and re-reads shape and dtype on every call, about
    0.1 ms per dataset, as much as writing a batch of pooled rows. Other dtypes (strings) and
    values of another shape take h5py's ordinary path (which converts, or raises its own error).

    Rows of 1 MiB or more (full feature maps) get one-row chunks (:func:`chunk_rows`). Writing those
    rows as raw chunks (``H5Dwrite_chunk``) skips HDF5's selection and type-conversion machinery,
    which costs about 10% of the write time of such rows. It applies only where the chunk's bytes are
    exactly the row's: an unfiltered dataset (no compression, shuffle or checksum), chunked as
    ``(1, *feature_shape)``, and rows of its shape and dtype (so no conversion is skipped). Either
    way the rows land in the file before the commit protocol's flush, so crash safety is unchanged.
    """

    __slots__ = ("ds", "dtype", "length", "numeric", "row_shape", "whole_chunks")

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds
        self.dtype = ds.dtype
        self.row_shape = tuple(ds.shape[1:])
        self.length = ds.shape[0]
        self.numeric = self.dtype.kind in "biuf"
        self.whole_chunks = (
            ds.chunks is not None
            and ds.chunks[0] == 1
            and tuple(ds.chunks[1:]) == self.row_shape
            and ds.id.get_create_plist().get_nfilters() == 0
        )

    def write(self, start: int, value: Any) -> None:
        stop = start + len(value)
        if self.length < stop:
            self.ds.resize(stop, axis=0)
            self.length = stop
        if not (self.numeric and isinstance(value, np.ndarray) and value.shape[1:] == self.row_shape):
            self.ds[start:stop] = value
            return
        if self.whole_chunks and value.dtype == self.dtype:
            rows = np.ascontiguousarray(value)
            offset = [0] * rows.ndim
            for i in range(len(rows)):
                offset[0] = start + i
                self.ds.id.write_direct_chunk(tuple(offset), rows[i:i + 1])
            return
        if stop == start:
            return
        rows = np.ascontiguousarray(value, dtype=self.dtype)
        fspace = self.ds.id.get_space()
        fspace.select_hyperslab((start,) + (0,) * len(self.row_shape), rows.shape)
        self.ds.id.write(h5py.h5s.create_simple(rows.shape), fspace, rows)


def _require(parent: h5py.Group, name: str, encoding_type: str, create: bool) -> h5py.Group:
    if name not in parent:
        if not create:
            raise KeyError(name)
        F.mark(parent.create_group(name), encoding_type)
    return parent[name]


def _check_name(kind: str, name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise DataError(
            f"The {kind} name {name!r} cannot be used: it must be non-empty and contain no '/'."
        )
    if name != name.strip():
        raise DataError(f"The {kind} name {name!r} has leading or trailing spaces; remove them.")


