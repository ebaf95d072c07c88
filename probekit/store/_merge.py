"""Merging shard stores (one per rank of a distributed extraction) into one standard store.

Each shard is a complete store of its own (docs/FORMAT.md) holding a contiguous block of the dataset's
rows: its ``samples/<split>/index`` gives each row's position in the full dataset. :func:`merge_shards`
concatenates the shards' rows in dataset order into one store with the same layout, copying every row
dataset block by block (a few MiB at a time: a shard is never loaded whole) and every other dataset
(neuron weight rows) with HDF5's own object copy. Attributes of the root, splits, models, activation
groups and datasets are kept; ``rows_committed`` and ``n_rows`` become the totals.

The merged file is written under a temporary name next to ``out`` and renamed onto it at the end, so an
interrupted merge never leaves a half-written store under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DataError, StoreExistsError
from . import _format as F
from ._reader import _open_read, check_format
from ._writer import chunk_rows

__all__ = ["merge_shards"]

_COPY_BYTES = 16 << 20  # bytes per block copied (bounds the merge's memory, whatever the shard size)


def _walk(f: h5py.File) -> tuple[dict[str, h5py.Group], dict[str, h5py.Dataset]]:
    groups: dict[str, h5py.Group] = {}
    datasets: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group):
            groups[name] = obj
        elif isinstance(obj, h5py.Dataset):
            datasets[name] = obj

    f.visititems(visit)
    return groups, datasets


def _is_row_group(g: h5py.Group) -> bool:
    return F.ROWS_ATTR in g.attrs


def _split_of(path: str) -> str:
    """``samples/<split>`` or ``.../acts/<split>`` -> ``<split>``."""
    return path.rsplit("/", 1)[-1]


def _committed_rows(groups: dict[str, h5py.Group], path: str) -> int:
    """Readable rows of a row group, as a reader sees them (docs/FORMAT.md, commit protocol)."""
    g = groups[path]
    n = int(g.attrs[F.ROWS_ATTR])
    if not path.startswith("samples/"):
        n = min(n, int(groups["samples/" + _split_of(path)].attrs[F.ROWS_ATTR]))
    return n


def merge_shards(
    shard_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Merge complete shard stores into one store, rows in dataset order.

    Parameters
    ----------
    shard_paths : sequence of str or PathLike
        The shard files (any order: they are ordered by the dataset index of their first row). Every
        shard must hold the same splits, models, layers, feature shapes and dtypes, and be complete:
        every split's ``rows_committed`` equal to its declared ``n_rows``, and every model's activations
        committed up to it.
    out : str or PathLike
        The merged store.
    overwrite : bool, default False
        Replace ``out`` if it exists (otherwise an existing ``out`` is refused).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    DataError
        A shard is incomplete (the message names it and its committed rows), the shards differ in
        layout or overlap, or there is no shard.
    StoreExistsError
        ``out`` exists and ``overwrite`` is False.
    StoreFormatError
        A shard is not a probekit store.
    """
    paths = [Path(p) for p in shard_paths]
    out = Path(out)
    if not paths:
        raise DataError("merge_shards needs at least one shard file; got none.")
    if out.exists() and not overwrite:
        raise StoreExistsError(
            f"The merged store {str(out)!r} already exists. Pass overwrite=True to replace it, or choose "
            "another output path."
        )
    if any(p.resolve() == out.resolve() for p in paths):
        raise DataError(f"The merged store {str(out)!r} is also one of the shards; write it elsewhere.")
    for p in paths:
        check_format(p)

    files = [_open_read(p) for p in paths]
    try:
        trees = [_walk(f) for f in files]
        _check_same_layout(paths, trees)
        _check_complete(paths, trees)
        order = _dataset_order(paths, files, trees)
        files = [files[i] for i in order]
        paths = [paths[i] for i in order]
        trees = [trees[i] for i in order]
        tmp = out.with_name(out.name + ".merging")
        if tmp.exists():
            tmp.unlink()
        try:
            _write_merged(files, trees, tmp)
            os.replace(tmp, out)
        except BaseException:
            if tmp.exists():
                tmp.unlink()
            raise
    finally:
        for f in files:
            f.close()
    return out


def _check_same_layout(paths: list[Path], trees: list[tuple[dict, dict]]) -> None:
    g0, d0 = trees[0]
    for p, (g, d) in zip(paths[1:], trees[1:], strict=True):
        if set(g) != set(g0) or set(d) != set(d0):
            extra = sorted((set(g) | set(d)) - (set(g0) | set(d0)))
            missing = sorted((set(g0) | set(d0)) - (set(g) | set(d)))
            raise DataError(
                f"The shard {str(p)!r} does not have the layout of {str(paths[0])!r} (it has extra "
                f"{extra[:5]} and lacks {missing[:5]}). Merge shards of one extraction run only."
            )
        for name, ds in d.items():
            ref = d0[name]
            if ds.shape[1:] != ref.shape[1:] or ds.dtype != ref.dtype:
                raise DataError(
                    f"The dataset {name!r} of shard {str(p)!r} has rows {ds.shape[1:]} {ds.dtype}, but "
                    f"{str(paths[0])!r} has {ref.shape[1:]} {ref.dtype}. Merge shards of one run only."
                )
        for name, grp in g.items():
            if "weights_sha256" in grp.attrs:
                a, b = str(grp.attrs["weights_sha256"]), str(g0[name].attrs["weights_sha256"])
                if a and b and a != b:
                    raise DataError(
                        f"The model {name.split('/')[-1]!r} of shard {str(p)!r} has other weights (sha256 {a[:12]}...) than "
                        f"in {str(paths[0])!r} ({b[:12]}...). Merge shards of one run only."
                    )


def _check_complete(paths: list[Path], trees: list[tuple[dict, dict]]) -> None:
    for p, (groups, _) in zip(paths, trees, strict=True):
        for name, g in groups.items():
            if not _is_row_group(g):
                continue
            committed = int(g.attrs[F.ROWS_ATTR])
            split = _split_of(name)
            expected = int(groups["samples/" + split].attrs.get("n_rows", -1))
            if name.startswith("samples/"):
                if expected >= 0 and committed != expected:
                    raise DataError(
                        f"The shard {str(p)!r} is incomplete: split {split!r} has {committed} of {expected} "
                        "rows committed. Finish it first (rerun the extraction with mode='resume'), then merge."
                    )
            else:
                s_committed = int(groups["samples/" + split].attrs[F.ROWS_ATTR])
                if committed != s_committed:
                    model = name.split("/")[1]
                    raise DataError(
                        f"The shard {str(p)!r} is incomplete: model {model!r} has {committed} of "
                        f"{s_committed} rows committed on split {split!r} ({name}). Finish it first (rerun "
                        "the extraction with mode='resume'), then merge."
                    )


def _dataset_order(paths: list[Path], files: list[h5py.File], trees: list[tuple[dict, dict]]) -> list[int]:
    """Order shards by the dataset index of their rows; refuse overlapping or interleaved shards."""
    splits = [s for s in trees[0][0] if s.startswith("samples/") and s.count("/") == 1]
    if not splits:
        return list(range(len(files)))

    def first(i: int, split: str) -> int:
        n = _committed_rows(trees[i][0], split)
        return int(files[i][split]["index"][0]) if n else -1

    order = sorted(range(len(files)), key=lambda i: tuple(first(i, s) for s in splits))
    for split in splits:
        last, last_path = -1, None
        for i in order:
            n = _committed_rows(trees[i][0], split)
            if n == 0:
                continue
            idx = files[i][split]["index"]
            lo, hi = int(idx[0]), int(idx[n - 1])
            if lo <= last:
                raise DataError(
                    f"The shards {str(last_path)!r} and {str(paths[i])!r} overlap or interleave on split "
                    f"{split.split('/', 1)[1]!r} (dataset index {lo} after {last}); each shard must hold a "
                    "contiguous block of rows. Merge the shards of one run only."
                )
            last, last_path = hi, paths[i]
    return order


def _write_merged(files: list[h5py.File], trees: list[tuple[dict, dict]], tmp: Path) -> None:
    groups0, datasets0 = trees[0]
    totals = {
        name: sum(_committed_rows(t[0], name) for t in trees)
        for name, g in groups0.items() if _is_row_group(g)
    }
    with h5py.File(tmp, "w") as o:
        for k, v in files[0].attrs.items():
            o.attrs[k] = v
        o.attrs["merged_from_shards"] = len(files)
        # groups first (sorted: parents before children), with their attributes
        for name in sorted(groups0, key=lambda s: s.count("/")):
            g = o.require_group(name)
            for k, v in groups0[name].attrs.items():
                g.attrs[k] = v
            if name in totals:
                g.attrs[F.ROWS_ATTR] = 0  # moved to the total only once every row is copied
                if name.startswith("samples/"):
                    g.attrs["n_rows"] = totals[name]
        for name, src in datasets0.items():
            parent = name.rsplit("/", 1)[0]
            if parent not in totals:  # not a row dataset (weight rows): copied whole by HDF5
                o.copy(src, name)
                continue
            n = totals[parent]
            row_shape = src.shape[1:]
            dst = o.create_dataset(
                name, shape=(n, *row_shape), maxshape=(None, *row_shape), dtype=src.dtype,
                chunks=(chunk_rows(row_shape, src.dtype.itemsize, n or None), *row_shape) if n else True,
                compression=src.compression, compression_opts=src.compression_opts,
            )
            for k, v in src.attrs.items():
                dst.attrs[k] = v
            row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * src.dtype.itemsize)
            block = max(1, _COPY_BYTES // row_bytes)
            at = 0
            for f, t in zip(files, trees, strict=True):
                rows = _committed_rows(t[0], parent)
                ds = f[name]
                for s in range(0, rows, block):
                    e = min(rows, s + block)
                    dst[at + s : at + e] = ds[s:e]
                at += rows
        o.flush()
        for name, n in totals.items():  # commit: every row is written
            o[name].attrs[F.ROWS_ATTR] = n
        o.flush()
