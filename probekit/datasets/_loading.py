"""Turning a user's data into probekit samples.

A dataset item may be a tensor ``x``, a tuple ``(x, y)`` or ``(x, y, factors)``, or a dict with ``"x"``
and any of ``"label"``, ``"factors"``, ``"group"``. A dict without ``"x"`` holds the model's forward
keyword arguments beside those reserved keys, one of them named as transformers names its inputs
(``input_ids``, ``attention_mask``, ``token_type_ids``, ``pixel_values``, ...: ``KEYWORD_INPUTS``); they reach the model as ``model(**inputs)`` and token
sequences of different lengths are padded per batch (:class:`probekit.extractors.Padding`).
:func:`as_samples` wraps any such dataset into one whose items are dicts ``{"x" or "inputs", "index",
...}``; :func:`load_data` resolves a DATA spec of the CLI.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..vocab import VARIANTS, Padding, import_callable
from ._registry import builtin_datasets, get_dataset

__all__ = ["NpzDataset", "SampleDataset", "as_samples", "dataset_of", "import_callable", "load_data"]

_FIELDS = ("label", "factors", "group", "background", "background_label", "variant")
#: keys of a dict item that are never model inputs
RESERVED_KEYS = (*_FIELDS, "index")
#: the inputs (transformers' names) one of which makes a dict without "x" an item of keyword inputs; the
#: item may hold any other keyword inputs of the model beside them
KEYWORD_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids",
                  "pixel_values", "pixel_mask", "input_values", "input_features", "decoder_input_ids", "bbox")
_INT_FIELDS = ("label", "group", "background", "background_label", "variant")  # the store's INT_FIELDS


def _int_field(key: str, v: Any, i: int) -> int:
    if key == "variant" and isinstance(v, str):
        if v not in VARIANTS:
            raise DataError(f"Dataset item {i} has variant {v!r}; variants are {list(VARIANTS)}.")
        return VARIANTS.index(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    elif isinstance(v, np.ndarray) and v.size == 1:
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not (
            isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer())):
        raise DataError(
            f"Dataset item {i} has {key} {v!r}; {key} must be an integer id. Map it to integers in the dataset."
        )
    return int(v)


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        # PIL images and nested lists
        return torch.as_tensor(np.asarray(x))
    except Exception as e:
        raise DataError(
            f"A dataset item's input has type {type(x).__name__}, which is not a tensor or array. "
            "Give the dataset a transform that returns a tensor (e.g. torchvision.transforms.ToTensor())."
        ) from e


def _keyword_inputs(item: Mapping[str, Any], i: int) -> dict[str, torch.Tensor]:
    if not any(k in item for k in KEYWORD_INPUTS):
        raise DataError(
            f"Dataset item {i} is a dict without the key 'x' (keys: {sorted(map(str, item))}). Name the "
            "input 'x', or give the model's keyword inputs with transformers' names (input_ids, "
            "attention_mask, pixel_values, ...), beside any of 'label', 'factors', 'group', 'background', "
            "'background_label', 'variant'."
        )
    inputs: dict[str, torch.Tensor] = {}
    for k, v in item.items():
        if k in RESERVED_KEYS or v is None:
            continue
        if not isinstance(k, str) or not k.isidentifier():
            raise DataError(f"Dataset item {i} has the key {k!r}, which is no keyword argument name.")
        try:
            t = _to_tensor(v)
        except DataError as e:
            raise DataError(
                f"Dataset item {i} has the input {k!r} of type {type(v).__name__}, not a tensor, array or "
                "list of numbers; return tensors (e.g. the tokenizer's return_tensors='pt', squeezed)."
            ) from e
        if k in ("input_ids", "attention_mask", "token_type_ids") and t.ndim == 2 and t.shape[0] == 1:
            t = t[0]  # a tokenizer's (1, T) output for one text
        inputs[k] = t
    if not inputs:
        raise DataError(
            f"Dataset item {i} gives its model inputs {sorted(k for k in item if k not in RESERVED_KEYS)} as None; "
            "give them as tensors."
        )
    return inputs


def _normalise_item(item: Any, i: int) -> dict[str, Any]:
    if isinstance(item, Mapping) and "x" not in item:  # keyword inputs (transformers' style)
        out = {k: item[k] for k in _FIELDS if k in item and item[k] is not None}
        given = item.get("inputs")  # an item normalised before (its inputs under "inputs")
        out["inputs"] = _keyword_inputs(given if isinstance(given, Mapping) else item, i)
    elif isinstance(item, Mapping):
        out = {k: item[k] for k in ("x", *_FIELDS) if k in item and item[k] is not None}
    elif isinstance(item, (tuple, list)):
        if not 1 <= len(item) <= 3:
            raise DataError(
                f"Dataset item {i} is a {type(item).__name__} of length {len(item)}; expected (x,), "
                "(x, y) or (x, y, factors). Return a dict for other layouts."
            )
        out = dict(zip(("x", "label", "factors"), item, strict=False))
    else:
        out = {"x": item}
    if "inputs" not in out:
        out["x"] = _to_tensor(out["x"])
    if "label" in out:
        y = out["label"]
        if isinstance(y, torch.Tensor) and y.numel() == 1:  # np.size() misreads a tensor's .size method
            y = y.item()
        elif isinstance(y, np.ndarray) and y.size == 1:
            y = y.item()
        if not isinstance(y, (int, np.integer)) and not (isinstance(y, float) and float(y).is_integer()):
            raise DataError(
                f"Dataset item {i} has label {y!r}; labels must be integer class ids. "
                "Map them to integers (0..K-1) in the dataset."
            )
        out["label"] = int(y)
    if "factors" in out:
        f = np.asarray(out["factors"].numpy() if isinstance(out["factors"], torch.Tensor) else out["factors"],
                       dtype=np.float32).reshape(-1)
        out["factors"] = f
    for key in _INT_FIELDS[1:]:
        if key in out:
            out[key] = _int_field(key, out[key], i)
    out["index"] = i
    return out


class SampleDataset(Dataset):
    """A dataset whose items are dicts ``{"x", "index"}`` plus any of ``label``, ``factors``, ``group``,
    ``background``, ``background_label``, ``variant`` (a name of ``VARIANTS`` or its code).

    Items of keyword inputs have ``"inputs"`` (key -> tensor) instead of ``"x"``; ``pad_id``,
    ``padding_side`` and ``max_length`` say how their token sequences are padded per batch (see
    :class:`probekit.extractors.Padding`; ``pad_id=None`` takes the model's ``config.pad_token_id``,
    else 0).

    Attributes
    ----------
    input_keys : tuple of str or None
        The keyword inputs of every item (None: items with ``x``).
    padding : probekit.extractors.Padding
    factor_names : list of str or None
    factor_periods : the source's ``factor_periods`` (one period per factor, 0 = linear) or None
    fields : the integer fields every item has
    has_label, has_group : bool
    source : the wrapped dataset
    """

    def __init__(self, source: Any, factor_names: Sequence[str] | None = None, *, pad_id: int | None = None,
                 padding_side: str = "right", max_length: int | None = None) -> None:
        self.padding = Padding(pad_id, padding_side, max_length)
        self.source = source
        try:
            n = len(source)
        except TypeError as e:
            raise DataError(
                f"The dataset {type(source).__name__} has no length; probekit needs a map-style "
                "Dataset (with __len__ and __getitem__) so that rows can be resumed."
            ) from e
        if n == 0:
            raise DataError(f"The dataset {type(source).__name__} is empty; there is nothing to extract.")
        self._n = n
        first = _normalise_item(source[0], 0)
        self.fields = tuple(f for f in _INT_FIELDS if f in first)
        self.factor_periods = getattr(source, "factor_periods", None)
        self.input_keys: tuple[str, ...] | None = tuple(first["inputs"]) if "inputs" in first else None
        self.x_shape = tuple(first["x"].shape) if "x" in first else None
        names = factor_names if factor_names is not None else getattr(source, "factor_names", None)
        if "factors" in first:
            k = len(first["factors"])
            names = list(names) if names is not None else [f"factor{j}" for j in range(k)]
            if len(names) != k:
                raise DataError(
                    f"The dataset gives {k} factors per item but {len(names)} factor names ({names})."
                )
            self.factor_names: list[str] | None = [str(s) for s in names]
        else:
            self.factor_names = None

    @property
    def has_label(self) -> bool:
        return "label" in self.fields

    @property
    def has_group(self) -> bool:
        return "group" in self.fields

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = _normalise_item(self.source[i], int(i))
        for key, present in [*((f, f in self.fields) for f in _INT_FIELDS),
                             ("factors", self.factor_names is not None)]:
            if (key in item) != present:
                raise DataError(
                    f"Dataset item {i} {'has' if key in item else 'lacks'} a {key!r} but item 0 "
                    f"{'does not' if key in item else 'does'}; every item must have the same fields."
                )
        keys = tuple(item["inputs"]) if "inputs" in item else None
        if keys != self.input_keys:
            what = (f"the inputs {sorted(keys)}" if keys is not None else "the input 'x'")
            was = (f"the inputs {sorted(self.input_keys)}" if self.input_keys is not None else "the input 'x'")
            raise DataError(
                f"Dataset item {i} has {what} but item 0 has {was}; every item must give the same inputs."
            )
        if keys is None and tuple(item["x"].shape) != self.x_shape:
            raise DataError(
                f"Dataset item {i} has input shape {tuple(item['x'].shape)} but item 0 has {self.x_shape}; "
                "resize the inputs to one shape (a transform) before extraction."
            )
        return item


def as_samples(dataset: Any, factor_names: Sequence[str] | None = None, *, pad_id: int | None = None,
               padding_side: str | None = None, max_length: int | None = None) -> SampleDataset:
    """Wrap any supported dataset (see the module docstring) into a :class:`SampleDataset`.

    ``pad_id``, ``padding_side`` ("right" by default, or "left") and ``max_length`` set how token
    sequences of keyword-input items are padded per batch (:class:`probekit.extractors.Padding`); on a
    SampleDataset they replace its own settings.
    """
    if isinstance(dataset, SampleDataset):
        if pad_id is not None or padding_side is not None or max_length is not None:
            p = dataset.padding
            dataset.padding = Padding(p.pad_id if pad_id is None else pad_id, padding_side or p.side,
                                      p.max_length if max_length is None else max_length)
        return dataset
    return SampleDataset(dataset, factor_names, pad_id=pad_id, padding_side=padding_side or "right",
                         max_length=max_length)


class NpzDataset(Dataset):
    """Arrays from an ``.npz`` file: ``x`` (N, ...), optional ``y`` (N,), ``factors`` (N, F),
    ``factor_names`` (F,), ``group`` (N,). Loaded with ``allow_pickle=False``: object arrays are refused.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as e:
            raise DataError(
                f"Cannot read {str(path)!r}: it holds object arrays, which need unpickling; probekit never "
                "unpickles data. Save plain numeric arrays (and factor_names as a str array)."
            ) from e
        except (OSError, EOFError) as e:
            raise DataError(f"Cannot read {str(path)!r} as an .npz file ({e}).") from e
        if "x" not in arrays:
            raise DataError(
                f"The file {str(path)!r} has no array 'x' (it has {sorted(arrays)}). Save the inputs as x=..."
            )
        self.x = arrays["x"]
        n = len(self.x)
        self.y = arrays.get("y")
        self.factors = arrays.get("factors")
        self.group = arrays.get("group")
        for key, arr in (("y", self.y), ("factors", self.factors), ("group", self.group)):
            if arr is not None and len(arr) != n:
                raise DataError(
                    f"In {str(path)!r}, {key!r} has {len(arr)} rows but x has {n}; they must match."
                )
        if self.factors is not None and self.factors.ndim != 2:
            raise DataError(f"In {str(path)!r}, 'factors' must be 2-D (N, F); got shape {self.factors.shape}.")
        names = arrays.get("factor_names")
        self.factor_names = [str(s) for s in names.tolist()] if names is not None else None
        if self.y is not None and not np.issubdtype(self.y.dtype, np.integer):
            if not np.all(np.mod(self.y, 1) == 0):
                raise DataError(f"In {str(path)!r}, 'y' must hold integer class ids; got {self.y.dtype}.")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"x": torch.as_tensor(np.asarray(self.x[i], dtype=np.float32))}
        if self.y is not None:
            item["label"] = int(self.y[i])
        if self.factors is not None:
            item["factors"] = self.factors[i].astype(np.float32)
        if self.group is not None:
            item["group"] = int(self.group[i])
        return item


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_data(
    spec: Any,
    split: str | None = None,
    *,
    transform: Callable | None = None,
    model: Any = None,
) -> SampleDataset:
    """Resolve a DATA spec into a :class:`SampleDataset`.

    ``spec`` is a Dataset object (or a torch ``DataLoader``: its dataset is used), a built-in dataset
    name (with ``split``), a path to an image folder (class sub-folders, torchvision ``ImageFolder``),
    a path to an ``.npz``, or ``package.module:callable`` returning a Dataset or a DataLoader (called
    with ``split=`` when it accepts that keyword; the current directory is importable).

    An image folder's images become tensors through ``transform``; without one, through the
    preprocessing of ``model`` (a :class:`probekit.models.LoadedModel`, see
    :func:`probekit.models.preprocessing_for`) when given; otherwise each image is a [0, 1] tensor at its
    own size (all images must then have one size).
    """
    if not isinstance(spec, (str, os.PathLike)):
        return as_samples(dataset_of(spec, "the data"))
    text = os.fspath(spec)
    builtins = builtin_datasets()
    if text in builtins:
        entry = builtins[text]
        return as_samples(get_dataset(text, split or entry.default_splits[0]))
    path = Path(text)
    if path.suffix == ".npz":
        if not path.exists():
            raise DataError(f"The data file {text!r} does not exist.")
        return as_samples(NpzDataset(path))
    if path.is_dir():
        from torchvision import transforms as T
        from torchvision.datasets import ImageFolder

        tf = transform
        own_size = tf is None
        if tf is None and model is not None:
            if not callable(getattr(model, "preprocessing", None)):  # the datasets never import the models
                raise DataError(f"load_data(model=...) takes a loaded model (probekit.load_model(spec)); got "
                                f"{type(model).__name__}.")
            tf, info = model.preprocessing()
            own_size = info["input_size"] is None
        try:
            folder = ImageFolder(text, transform=tf or T.ToTensor())
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(
                f"Cannot read the image folder {text!r} ({e}). It needs one sub-folder per class holding "
                "images."
            ) from e
        if own_size:
            check_image_sizes(folder, text)
        return as_samples(folder)
    if ":" in text and not path.exists():
        fn = import_callable(text, "callable returning a Dataset")
        kwargs = {}
        if split is not None and "split" in _params(fn):
            kwargs["split"] = split
        try:
            data = fn(**kwargs)
        except Exception as e:
            raise DataError(f"{text} raised {type(e).__name__} building the data: {_first_line(e)}") from e
        return as_samples(dataset_of(data, f"{text} returned a DataLoader that"))
    raise DataError(
        f"Cannot interpret the data {text!r}: it is not a built-in dataset ({sorted(builtins)}), an existing "
        ".npz file, an image folder, or 'package.module:callable'."
    )


def check_image_sizes(folder: Any, where: str) -> None:
    """Refuse an image folder whose images have several sizes when they are used at their own size.

    Reads only image headers; stops at the first image whose size differs from the first one's.
    """
    from PIL import Image

    first: tuple[str, tuple[int, int]] | None = None
    for path, _ in getattr(folder, "samples", []):
        try:
            with Image.open(path) as im:
                size = im.size
        except OSError:
            continue  # an unreadable file is reported when it is read
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise DataError(
                f"The images in {where!r} have several sizes ({os.path.relpath(first[0], where)} is "
                f"{first[1][0]}x{first[1][1]}, {os.path.relpath(path, where)} is {size[0]}x{size[1]}) and this "
                "model takes them at their own size: resize them to one with --image-size S or H,W "
                "(Python: a transform, or load_data(..., model=...))."
            )


def dataset_of(data: Any, where: str = "the data") -> Any:
    """A DataLoader's dataset (probekit batches and reads rows in order itself); anything else as it is.

    A loader whose sampler takes other rows than all of them in some order, or whose collate_fn is its
    own, is refused: probekit would read other rows or other inputs than the loader gives.
    """
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
    from torch.utils.data._utils.collate import default_collate, default_convert

    if not isinstance(data, DataLoader):
        return data
    what = where if where.endswith("that") else f"{where} is a DataLoader that"
    ds = data.dataset
    if isinstance(ds, IterableDataset):
        raise DataError(
            f"{what} reads an IterableDataset; probekit needs a map-style Dataset (with __len__ and "
            "__getitem__) so that rows can be resumed. Give the Dataset itself."
        )
    sampler = data.sampler
    if not isinstance(sampler, (SequentialSampler, RandomSampler)) or (
            isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != len(ds))):
        raise DataError(
            f"{what} has the sampler {type(sampler).__name__}, which takes other rows than the dataset's; "
            "probekit reads every row in order. Give the Dataset itself (torch.utils.data.Subset(ds, indices) "
            "for some rows)."
        )
    if data.collate_fn not in (default_collate, default_convert):
        raise DataError(
            f"{what} has its own collate_fn, which probekit does not run (it batches items itself). Give "
            "a Dataset whose items are the inputs (and labels) as they should reach the model."
        )
    return ds


def _params(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
