"""The front door of extraction: ``probekit.extract`` and ``probekit.extract_pair``.

(The module is ``probekit.extraction`` so that its name never shadows the function ``probekit.extract``.)

Both stream pooled activations of chosen layers into one HDF5 store (docs/FORMAT.md), with bounded
memory and safe resumption; the work is done by :func:`probekit.extractors.extract_models`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .datasets import dataset_of
from .errors import DataError
from .extractors import LayerSpec, ModelSpec, OutputKey, PoolSpec, extract_models
from .store import ROLES

__all__ = ["extract", "extract_pair", "record_preprocessing"]

Mode = Literal["create", "resume", "overwrite"]


def _module_and_source(model: Any, source: str) -> tuple[nn.Module, str]:
    if isinstance(model, nn.Module):
        return model, source
    if isinstance(model, str):
        from .models import load_model

        loaded = load_model(model)
        return loaded.module, source or loaded.source
    module = getattr(model, "module", None)  # a probekit.models.LoadedModel
    if isinstance(module, nn.Module):
        return module, source or str(getattr(model, "source", ""))
    raise DataError(
        f"The model must be a torch nn.Module or a MODEL spec ('timm:NAME', 'torchvision:NAME', "
        f"'package.module:callable'). Got {type(model).__name__} instead."
    )


def extract(
    model: nn.Module | str | Mapping[str, nn.Module],
    data: Any,
    *,
    layers: LayerSpec | Mapping[str, LayerSpec],
    out: str | os.PathLike,
    split: str = "data",
    pool: PoolSpec = "avg",
    name: str = "model",
    role: str = "model",
    source: str = "",
    batch_size: int = 64,
    device: str = "cpu",
    dtype: Literal["float32", "float16"] = "float32",
    mode: Mode = "create",
    num_workers: int = 0,
    weights_layers: Any = None,
    progress: bool = True,
    writer_thread: bool | None = None,
    output_key: OutputKey = None,
    num_prefix_tokens: int | None = None,
    compression: str | None = None,
    step: int | None = None,
    stop_early: bool = True,
    preprocessing: Mapping[str, Any] | str | None = None,
) -> Path:
    """Stream the pooled activations of chosen layers of a model on a dataset into a store.

    Parameters
    ----------
    model : torch.nn.Module, str, or dict of str to torch.nn.Module
        The model, a MODEL spec (``"timm:resnet18"``; loaded with random weights unless it is a
        ``package.module:callable``), or several models by store name, all extracted on the same
        batches in one pass (a name among ``"teacher"``, ``"student"`` gives that role). The model is
        moved to ``device`` and left there.
    data : Dataset or DataLoader
        Items ``x``, ``(x, y)``, ``(x, y, factors)``, dicts with ``"x"`` and optional ``"label"``,
        ``"factors"``, ``"group"``, ``"background"``, ``"background_label"``, ``"variant"``, or dicts
        of the model's forward keyword arguments (``input_ids``, ``attention_mask``, ``pixel_values``,
        ...) plus those fields, padded per batch when their lengths differ (see
        :func:`probekit.datasets.as_samples`). Read in order. Of a DataLoader, its dataset is read (one
        with its own sampler or collate_fn is refused).
    layers : str, sequence of str, callable, or dict of model name to these
        Exact module names, globs (``"layer*"``; a dotted glob matches part by part, ``**`` spans
        levels), ``name@K`` for the K-th call of a module that runs several times, ``"@output"`` for
        the model's own output (its class scores: the audit's verdict then reads its predictions), or
        a predicate; see :func:`probekit.extractors.resolve_layers`. With several models, a dict gives
        each its own layers.
    out : str or PathLike
        The store file (``.h5``).
    split : str, default "data"
        Split name of these rows (``train``, ``test_id``, ``test_ood``, ``crossed``, ...).
    pool : str or dict of str to str, default "avg"
        ``avg``, ``max``, ``cls``, ``tokens_mean``, ``last``, ``flatten`` or ``none``, or a dict layer ->
        mode. With an attention mask the token pools use the real tokens only.
    name : str, default "model"
        Store name of the model (``/models/<name>``).
    role : {"teacher", "student", "model"}, default "model"
    source : str, default ""
        Provenance stored with the model (e.g. ``"timm:resnet18"``).
    batch_size : int, default 64
    device : str, default "cpu"
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``... On CUDA, pooling runs on the device, copies are
        non-blocking into pinned buffers and a writer thread commits to disk.
    dtype : {"float32", "float16"}, default "float32"
        Storage dtype of activations.
    mode : {"create", "resume", "overwrite"}, default "create"
        ``create`` refuses an existing file; ``resume`` continues an interrupted run at its last
        committed row (the result equals an uninterrupted run's) or adds a model or split to a store;
        ``overwrite`` replaces the file.
    num_workers : int, default 0
        DataLoader worker processes.
    weights_layers : None, False, str, sequence of str, or callable
        Whose neuron weight rows to store under ``/models/<name>/weights``: None, every selected
        Linear / Conv layer; False, none; otherwise a layer selection.
    progress : bool, default True
        Show a tqdm progress bar.
    writer_thread : bool, optional
        Write on a background thread (default: on CUDA only).
    output_key : int, str or dict, optional
        Which element of tuple / dict layer outputs to keep (default: the first tensor).
    num_prefix_tokens : int, optional
        Prefix tokens skipped by ``tokens_mean`` (default ``model.num_prefix_tokens``; else 0 for token
        inputs and 1 for others).
    compression : {None, "gzip", "lzf"}
        Compression of activation datasets.
    step : int, optional
        Write under ``/models/<name>/steps/<step>/`` (a checkpoint of a series; step 0 = the network
        at initialisation, which the audit uses as the reference of every sensitivity figure).
    stop_early : bool, default True
        End each forward pass once the last requested layer has run (after one whole pass over the
        first two samples, which checks the layers): extracting an early layer costs only the network
        up to it. Pass False when the modules after it have side effects that must happen (hooks of their
        own, statistics they update).
    preprocessing : dict or str, optional
        What turned the data into inputs (the ``info`` of :func:`probekit.models.preprocessing_for`),
        stored as the model's ``preprocessing`` attribute (a JSON string). Resuming a model stored with
        other preprocessing is refused before anything is written.

    Returns
    -------
    pathlib.Path
        The store's path; open it with :func:`probekit.open_store`.

    Raises
    ------
    LayerNotFoundError
        A layer matches no module (raised before anything is written).
    StoreExistsError
        ``out`` exists and ``mode="create"``.
    DataError
        Data or options that do not fit (pool of the wrong rank, resuming with other data...).

    Examples
    --------
    >>> import torch, tempfile, os
    >>> from torch import nn
    >>> from torch.utils.data import TensorDataset
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> data = TensorDataset(torch.randn(10, 4))
    >>> path = os.path.join(tempfile.mkdtemp(), "acts.h5")
    >>> store = extract(net, data, layers=["1", "2"], out=path, progress=False)
    >>> import probekit
    >>> with probekit.open_store(store) as s:
    ...     s.acts("model", "data", "1").shape
    (10, 8)
    """
    if isinstance(model, Mapping):
        specs = {}
        for key, m in model.items():
            module, src = _module_and_source(m, source)
            lay = layers[key] if isinstance(layers, Mapping) else layers
            specs[str(key)] = ModelSpec(module, lay, role=key if key in ROLES else role, source=src,
                                        weights_layers=weights_layers)
    else:
        if isinstance(layers, Mapping):
            raise DataError("A dict of layers needs a dict of models; pass one layer selection for one model.")
        module, src = _module_and_source(model, source)
        specs = {name: ModelSpec(module, layers, role=role, source=src, weights_layers=weights_layers)}
    data = dataset_of(data, "the data")
    pre = _preprocessing_json(preprocessing)
    for spec in specs.values():
        spec.preprocessing = pre  # recorded as each model is declared (checked read-only on resume)
    return extract_models(
        specs, data, out=out, split=split, pool=pool, batch_size=batch_size, device=device, dtype=dtype,
        mode=mode, num_workers=num_workers, progress=progress, writer_thread=writer_thread,
        num_prefix_tokens=num_prefix_tokens, output_key=output_key, compression=compression, step=step,
        stop_early=stop_early,
    )


def _preprocessing_json(preprocessing: Mapping[str, Any] | str | None) -> str:
    if preprocessing is None or preprocessing == "":
        return ""
    if isinstance(preprocessing, str):
        try:
            json.loads(preprocessing)
        except ValueError as e:
            raise DataError(f"The 'preprocessing' parameter must be a dict or a JSON string; got {preprocessing[:80]!r}.") from e
        return preprocessing
    try:
        return json.dumps(dict(preprocessing), sort_keys=True)
    except (TypeError, ValueError) as e:
        raise DataError(f"The 'preprocessing' parameter must be JSON-able ({e}).") from e


def record_preprocessing(out: str | os.PathLike, models: Mapping[str, tuple[str, str]],
                         preprocessing: Mapping[str, Any] | str) -> None:
    """Store what preprocessing made the inputs as each model's ``preprocessing`` attribute.

    ``models`` maps store names to ``(role, source)``; ``preprocessing`` is the ``info`` of
    :func:`probekit.models.preprocessing_for` or its JSON.
    """
    from .store import StoreWriter

    pre = _preprocessing_json(preprocessing)
    if not pre:
        return
    with StoreWriter(out, mode="resume") as w:
        for name, (role, source) in models.items():
            w.add_model(name, role=role, source=source, preprocessing=pre)


def extract_pair(
    teacher: nn.Module | str,
    student: nn.Module | str,
    data: Any,
    *,
    layers: LayerSpec | Mapping[str, LayerSpec],
    out: str | os.PathLike,
    names: Sequence[str] = ("teacher", "student"),
    sources: Sequence[str] = ("", ""),
    **kwargs: Any,
) -> Path:
    """Extract a teacher and a student on the same batches into one store.

    The two models are stored as ``/models/<names[0]>`` (role ``teacher``) and ``/models/<names[1]>``
    (role ``student``) and share the split's sample rows: row i of both is the same input.

    Parameters
    ----------
    teacher, student : torch.nn.Module or str
        The two models (or MODEL specs).
    data : Dataset
        As in :func:`extract`.
    layers : layer selection, or dict of name to layer selection
        One selection for both models, or ``{names[0]: ..., names[1]: ...}``.
    out : str or PathLike
        The store file.
    names : pair of str, default ("teacher", "student")
        Store names of the two models.
    sources : pair of str, default ("", "")
        Provenance of each model.
    **kwargs
        Every other keyword of :func:`extract` (split, pool, batch_size, device, dtype, mode, ...).

    Returns
    -------
    pathlib.Path
        The store's path.
    """
    if len(names) != 2 or names[0] == names[1]:
        raise DataError(f"The 'names' parameter of extract_pair must be two different names. Got {names!r}.")
    for bad in ("name", "role", "source"):
        if bad in kwargs:
            raise DataError(f"extract_pair takes 'names' and 'sources', not {bad!r}.")
    weights_layers = kwargs.pop("weights_layers", None)
    pre = _preprocessing_json(kwargs.pop("preprocessing", None))
    specs = {}
    for key, m, role, src in zip(names, (teacher, student), ("teacher", "student"), sources, strict=True):
        module, src = _module_and_source(m, src)
        lay = layers[key] if isinstance(layers, Mapping) else layers
        specs[key] = ModelSpec(module, lay, role=role, source=src, weights_layers=weights_layers,
                               preprocessing=pre)
    return extract_models(specs, dataset_of(data, "the data"), out=out, **kwargs)
