"""Reading a store lazily: one layer of one split at a time, never past the committed rows."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import NOT_ALLOWED, DataError, LayerNotFoundError, StoreFormatError, os_error_reason, short_path
from . import _format as F

_DEFAULT_CHUNK_BYTES = 64 << 20  # iter_chunks reads ~64 MiB at a time unless told otherwise


def check_format(path: str | os.PathLike) -> None:
    """Raise :class:`StoreFormatError` unless ``path`` is a store this probekit can read."""
    _open_checked(Path(path)).close()


def _open_checked(path: Path) -> h5py.File:
    """A read handle (no file lock) on ``path`` once it is known to be a store this probekit reads."""
    if not path.exists():
        raise StoreFormatError(f"The store {str(path)!r} does not exist. Check the path.")
    try:
        f = _open_read(path)  # see Store: readers never take HDF5's file lock
    except OSError as e:
        number, reason = os_error_reason(e)
        if number in NOT_ALLOWED:
            raise StoreFormatError(
                f"Cannot read the store {short_path(path)!r}: {reason}. Fix its permissions (or run as a "
                "user who may read it)."
            ) from e
        if path.is_dir():
            raise StoreFormatError(
                f"{short_path(path)!r} is a folder, not a store; give the store's file (e.g. DIR/acts.h5)."
            ) from e
        raise StoreFormatError(
            f"{str(path)!r} is not a readable HDF5 file ({_short(e)}). It may be truncated or another "
            "kind of file; re-run the extraction to produce it."
        ) from e
    try:
        _check_root(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check_root(f: h5py.File, path: Path) -> None:
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != F.FORMAT_NAME:
        raise StoreFormatError(
            f"{str(path)!r} is an HDF5 file but not a probekit store (its 'format' attribute is "
            f"{fmt!r}, expected {F.FORMAT_NAME!r}). See docs/FORMAT.md for the layout."
        )
    version = int(f.attrs.get("format_version", -1))
    if version > F.FORMAT_VERSION:
        raise StoreFormatError(
            f"{str(path)!r} was written by a newer probekit (store format version {version}; this "
            f"probekit reads versions up to {F.FORMAT_VERSION}). Upgrade probekit."
        )
    if version < 1:
        raise StoreFormatError(
            f"{str(path)!r} has an invalid store format version {version}; re-run the extraction."
        )


def _counters_of(f: h5py.File) -> dict[str, int]:
    """``rows_committed`` of every group of an open file, by HDF5 path."""
    out: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and F.ROWS_ATTR in obj.attrs:
            out[obj.name] = int(obj.attrs[F.ROWS_ATTR])

    f.visititems(visit)
    return out


def _read_counters(path: Path, tries: int = 5) -> dict[str, int]:
    """Check that ``path`` is a readable store, and read ``rows_committed`` of every group by HDF5 path,
    through one handle of their own (retried if a concurrent flush tears a read)."""
    for attempt in range(tries):
        try:
            with _open_checked(path) as f:
                return _counters_of(f)
        except (OSError, KeyError, RuntimeError):
            if attempt == tries - 1:
                raise
            time.sleep(0.02 * (attempt + 1))
    return {}


def _open_read(path: Path, swmr: bool = False, tries: int = 6) -> h5py.File:
    """Open without HDF5's file lock; retry briefly, since a writer's flush in progress can make the
    file look truncated (its superblock written before the data it counts)."""
    for attempt in range(tries):
        try:
            return h5py.File(path, "r", swmr=swmr, locking=False) if swmr else h5py.File(path, "r", locking=False)
        except OSError:
            if attempt == tries - 1 or not path.exists():
                raise
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def read_str_list(value: Any) -> list[str]:
    """An HDF5 attribute holding strings (absent: ``None``) as a list of ``str``."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        value = [value]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(value, dtype=object).reshape(-1)]


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key of a layer name: numbers by value (``blocks.4`` before ``blocks.11``), reserved
    ``@`` names (the model's output) last."""
    parts = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in _DIGITS.split(name) if t)
    return (name.startswith("@"), parts)


def in_depth_order(names: Any, order: list[str]) -> list[str]:
    """``names`` in the recorded ``order`` (a model's ``layer_order``); names it lacks follow, in
    :func:`natural_key` order."""
    names = list(dict.fromkeys(names))
    rank = {n: i for i, n in enumerate(order)}
    known = sorted((n for n in names if n in rank), key=rank.__getitem__)
    return known + sorted((n for n in names if n not in rank), key=natural_key)


def _short(e: BaseException) -> str:
    return str(e).split("\n")[0][:160]


class Activations:
    """A lazy view of one activation dataset, bounded by its committed rows.

    Indexing reads from disk (``acts[:100]``, ``acts[idx]``); :meth:`iter_chunks` streams it;
    ``np.asarray(acts)`` loads it whole. Attributes of the dataset are in :attr:`attrs`.
    """

    def __init__(self, dataset: h5py.Dataset, n_rows: int, name: str) -> None:
        self._ds = dataset
        self.n_rows = int(min(n_rows, dataset.shape[0]))
        self.name = name
        self.attrs: dict[str, Any] = {k: _attr(v) for k, v in dataset.attrs.items()}

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_rows, *self._ds.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self._ds.dtype

    @property
    def ndim(self) -> int:
        return self._ds.ndim

    @property
    def row_nbytes(self) -> int:
        return int(np.prod(self._ds.shape[1:], dtype=np.int64)) * self._ds.dtype.itemsize

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"Activations({self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, stride = key.indices(self.n_rows)
            return self._ds[start:stop:stride] if stride > 0 else self._ds[:self.n_rows][key]
        if isinstance(key, (int, np.integer)):
            k = int(key) + self.n_rows if key < 0 else int(key)
            if not 0 <= k < self.n_rows:
                raise IndexError(f"row {key} out of range for {self.n_rows} committed rows")
            return self._ds[k]
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + self.n_rows, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_rows):
            raise IndexError(f"row index out of range for {self.n_rows} committed rows")
        # h5py wants increasing unique indices: read sorted, then restore the asked order
        uniq, inverse = np.unique(idx, return_inverse=True)
        return self._ds[uniq][inverse] if uniq.size else self._ds[0:0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._ds[: self.n_rows]
        return out.astype(dtype) if dtype is not None else out

    def chunk_rows(self, max_bytes: int = _DEFAULT_CHUNK_BYTES) -> int:
        """Rows per chunk so that one chunk holds at most ``max_bytes`` (a multiple of HDF5 chunks)."""
        rows = max(1, max_bytes // max(1, self.row_nbytes))
        if self._ds.chunks:
            c = self._ds.chunks[0]
            rows = max(c, (rows // c) * c)
        return int(rows)

    def iter_chunks(self, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, array)`` pairs covering the committed rows in order."""
        step = rows or self.chunk_rows()
        for start in range(0, self.n_rows, step):
            yield start, self._ds[start : min(start + step, self.n_rows)]


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [_attr(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


class Store:
    """A store opened for reading (see docs/FORMAT.md).

    Use as a context manager, or call :meth:`close`. Nothing is loaded until asked for.

    Examples
    --------
    >>> with Store("acts.h5") as s:                                       # doctest: +SKIP
    ...     X = s.acts("student", "test_id", "layer4")[:]
    """

    def __init__(self, path: str | os.PathLike, *, swmr: bool = False) -> None:
        self.path = Path(path)
        self._owns = True
        # Readers do not take HDF5's file lock: with it, a store could not be read while an extraction
        # appends to it (HDF5 refuses the open), and a reader would block a resuming writer. Reading
        # is bounded by the committed counters, which move only after their rows are written and
        # flushed (docs/FORMAT.md, docs/RELIABILITY.md).
        # The counters are read first, through a handle of their own, and kept: the handle used for
        # reading is opened after them, so its view of the file (end of allocation, chunk index) is at
        # least as new as the rows they count, even while another process appends (docs/RELIABILITY.md).
        # A Store therefore shows the rows committed when it was opened. The first handle also checks
        # the format, so a Store opens the file twice.
        self._counters = _read_counters(self.path)
        self._f = _open_read(self.path, swmr)
        self.format_version = int(self._f.attrs["format_version"])

    @classmethod
    def _over(cls, f: h5py.File, path: Path) -> Store:
        """A view through a handle this process holds open for writing (:meth:`StoreWriter.view`): no
        file is opened, the counters are the handle's own (exact: no other process writes a file this
        one has open for writing), and :meth:`close` leaves the handle open."""
        self = cls.__new__(cls)
        self.path, self._owns, self._f = Path(path), False, f
        self._counters = _counters_of(f)
        self.format_version = int(f.attrs["format_version"])
        return self

    def _committed(self, g: h5py.Group) -> int:
        return int(self._counters.get(g.name, 0))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (a view of a writer's handle, :meth:`StoreWriter.view`, leaves it open)."""
        if self._owns and self._f.id.valid:
            self._f.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, models={self.models}, splits={self.splits})"

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: _attr(v) for k, v in self._f.attrs.items()}

    # -- samples -----------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return list(self._f["samples"]) if "samples" in self._f else []

    def _split(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise DataError(
                f"The store {str(self.path)!r} has no split {split!r}; it has {self.splits}. "
                "Run `probekit info` to see what it holds."
            )
        return self._f["samples"][split]

    def n_rows(self, split: str, model: str | None = None, step: int | None = None) -> int:
        """Committed rows of a split (its samples), or of one model's activations on it."""
        n = self._committed(self._split(split))
        if model is None:
            return n
        g = self._acts_split(model, split, step)
        return min(n, self._committed(g)) if g is not None else 0

    def n_expected(self, split: str) -> int | None:
        """Rows the split was declared with (``None`` when unknown at write time)."""
        n = int(self._split(split).attrs.get("n_rows", -1))
        return None if n < 0 else n

    def has_field(self, split: str, field: str) -> bool:
        return field in self._split(split)

    def sample_field(self, split: str, field: str) -> np.ndarray:
        """One sample field of a split (``index``, ``label``, ``factors``, ``group``, ``background``,
        ``background_label``, ``variant``), committed rows only."""
        g = self._split(split)
        if field not in g:
            raise DataError(
                f"The split {split!r} of {str(self.path)!r} has no {field!r}; it has {sorted(g)}."
            )
        return g[field][: self.n_rows(split)]

    def factor_names(self, split: str) -> list[str]:
        g = self._split(split)
        if "factors" not in g:
            return []
        return [str(_attr(n)) for n in g["factors"].attrs["names"]]

    def factor_periods(self, split: str) -> list[float]:
        """Each factor's period (0 = linear); all 0 when the store declares none (format version 1)."""
        g = self._split(split)
        if "factors" not in g:
            return []
        periods = g["factors"].attrs.get("periods")
        if periods is None:
            return [0.0] * len(self.factor_names(split))
        return [float(p) for p in np.asarray(periods).reshape(-1)]

    def variants(self, split: str) -> np.ndarray:
        """The split's ``variant`` field as names (``F.VARIANTS``), committed rows only."""
        codes = np.asarray(self.sample_field(split, "variant"))
        names = np.array(F.VARIANTS, dtype=object)
        bad = (codes < 0) | (codes >= len(names))
        if bad.any():
            raise DataError(
                f"The split {split!r} has variant codes {sorted(set(codes[bad].tolist()))[:5]} outside "
                f"0..{len(names) - 1} ({list(F.VARIANTS)}); the store is damaged or was written by other code."
            )
        return names[codes]

    # -- models ------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self._f["models"]) if "models" in self._f else []

    def _model(self, model: str) -> h5py.Group:
        if model not in self.models:
            raise DataError(
                f"The store {str(self.path)!r} has no model {model!r}; it has {self.models}."
            )
        return self._f["models"][model]

    def model_attrs(self, model: str) -> dict[str, Any]:
        return {k: _attr(v) for k, v in self._model(model).attrs.items()}

    def role(self, model: str) -> str:
        return str(self.model_attrs(model).get("role", "model"))

    def steps(self, model: str) -> list[int]:
        g = self._model(model)
        return sorted(int(s) for s in g["steps"]) if "steps" in g else []

    def _base(self, model: str, step: int | None) -> h5py.Group:
        g = self._model(model)
        if step is None:
            return g
        if "steps" not in g or str(int(step)) not in g["steps"]:
            raise DataError(f"The model {model!r} has no step {step}; it has {self.steps(model)}.")
        return g["steps"][str(int(step))]

    def _acts_split(self, model: str, split: str, step: int | None) -> h5py.Group | None:
        base = self._base(model, step)
        if "acts" not in base or split not in base["acts"]:
            return None
        return base["acts"][split]

    def acts_splits(self, model: str, step: int | None = None) -> list[str]:
        base = self._base(model, step)
        return list(base["acts"]) if "acts" in base else []

    def layer_order(self, model: str) -> list[str]:
        """The order in which the model's layers ran (its ``layer_order`` attribute; empty when the
        writer recorded none)."""
        return read_str_list(self._model(model).attrs.get("layer_order"))

    def layers(self, model: str, split: str | None = None, step: int | None = None) -> list[str]:
        """Layer names with activations for ``model`` (on ``split``, or on any split), in depth order.

        Depth order is the order the layers ran in, as the writer recorded it (``layer_order``); layers
        it does not name (a store written without it) follow in natural order (``blocks.4`` before
        ``blocks.11``), the model's ``@output`` last.
        """
        base = self._base(model, step)
        if "acts" not in base:
            return []
        splits = [split] if split is not None else list(base["acts"])
        names: dict[str, None] = {}
        for s in splits:
            if s in base["acts"]:
                for key in base["acts"][s]:
                    names[F.unescape_name(key)] = None
        return in_depth_order(names, self.layer_order(model))

    def acts(self, model: str, split: str, layer: str, step: int | None = None) -> Activations:
        """The lazy activations of one layer of one model on one split."""
        g = self._acts_split(model, split, step)
        if g is None:
            raise DataError(
                f"The model {model!r} has no activations on split {split!r}; it has "
                f"{self.acts_splits(model, step)}."
            )
        key = F.escape_name(layer)
        if key not in g:
            raise LayerNotFoundError(
                f"The model {model!r} has no layer {layer!r} on split {split!r}; it has "
                f"{[F.unescape_name(k) for k in g]}."
            )
        return Activations(g[key], self.n_rows(split, model, step), f"{model}/{split}/{layer}")

    def weight_layers(self, model: str, step: int | None = None) -> list[str]:
        """Layers with stored weight rows, in depth order (as :meth:`layers`)."""
        base = self._base(model, step)
        names = [F.unescape_name(k) for k in base["weights"]] if "weights" in base else []
        return in_depth_order(names, self.layer_order(model))

    def weights(self, model: str, layer: str, step: int | None = None) -> np.ndarray:
        """Neuron weight rows ``(units, fan_in)`` of one layer."""
        base = self._base(model, step)
        key = F.escape_name(layer)
        if "weights" not in base or key not in base["weights"]:
            raise LayerNotFoundError(
                f"The model {model!r} has no weights for layer {layer!r}; it has "
                f"{self.weight_layers(model, step)}."
            )
        return base["weights"][key][()]

    def weight_attrs(self, model: str, layer: str, step: int | None = None) -> dict[str, Any]:
        base = self._base(model, step)
        return {k: _attr(v) for k, v in base["weights"][F.escape_name(layer)].attrs.items()}

    # -- summary -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """A JSON-safe summary: splits with committed rows, models with layers and shapes."""
        out: dict[str, Any] = {"path": str(self.path), "attrs": self.attrs, "splits": {}, "models": {}}
        for s in self.splits:
            g = self._split(s)
            out["splits"][s] = {
                "rows_committed": self.n_rows(s),
                "rows_expected": self.n_expected(s),
                "fields": sorted(g),
                "factor_names": self.factor_names(s),
            }
        for m in self.models:
            info: dict[str, Any] = {"attrs": self.model_attrs(m), "acts": {}, "weights": {}}
            for s in self.acts_splits(m):
                info["acts"][s] = {
                    "rows_committed": self.n_rows(s, m),
                    "layers": {
                        name: {"shape": list(a.shape), "dtype": str(a.dtype), "pool": a.attrs.get("pool")}
                        for name in self.layers(m, s)
                        for a in [self.acts(m, s, name)]
                    },
                }
            for layer in self.weight_layers(m):
                info["weights"][layer] = list(self._base(m, None)["weights"][F.escape_name(layer)].shape)
            info["steps"] = self.steps(m)
            out["models"][m] = info
        return out


def open_store(path: str | os.PathLike, *, swmr: bool = False) -> Store:
    """Open a store for reading; see :class:`Store`."""
    return Store(path, swmr=swmr)
