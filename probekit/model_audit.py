"""``probekit audit``: one command from a model (and a checkpoint) and an image folder to the verdict.

:func:`audit_model` loads the model the way the user names it (``timm:NAME``, ``torchvision:NAME``,
``package.module:callable``, or a module), builds the image splits of the folder with the model's own
preprocessing (the counterfactuals of :class:`probekit.datasets.Counterfactuals`: ``train``,
``test``, ``variants`` and ``crossed``), extracts the model's output and a few layers
spread over its depth, the same layers (not the output) of seeded initialisations (``<name>@init<k>``,
the reference of the representation's background flag) and of an optional teacher, audits the store
and writes ``OUT/acts.h5``, ``OUT/audit.json`` and ``OUT/report.html``.

**One pass per split.** Every net that sees a split (the model, its teacher, the inits on the crossed
split) is fed the same batches, so each image is decoded and composited once per split, in
``workers`` DataLoader processes beside the forward passes; the model is built once (the inits are
re-initialised copies of it); GrabCut (``foreground="auto"``) runs once per image, its masks saved in
``OUT/auto-masks/`` and read by every split and the mask check. One progress bar counts every forward
pass of the audit; the plan (``cost`` in ``audit.json``) is printed before the work, with a time
estimate from the first batches.

**One store session, one view.** ``OUT/acts.h5`` is opened for writing once, for every split (and the
looks of ``objects="auto"`` read what it wrote through the same handle), then once for reading: one
read-only view serves the audit, its JSON and its report's gallery. The document is assembled once, by
:func:`probekit.audit.audit`: what the store does not hold (``preprocessing``, ``mask_sensitivity``,
``cost``, ``inputs``, ``accuracy_check``) is handed to it as :class:`probekit.audit.Extra` entries.

**Reruns.** A rerun continues an interrupted one (the extraction resumes at its last committed row)
only when its inputs are the stored run's: the store records a fingerprint of every input that shaped
its rows (:mod:`probekit._inputs`), and a rerun whose inputs differ is refused in one line naming what
differs (``overwrite=True`` recomputes). ``audit.json`` records what was audited under ``inputs``. A
store written before the crossed split was named ``crossed`` (its split is ``stress``) is continued
under that name, with one FutureWarning: its rows stay valid, and its document then names the split as
the store does (``overwrite=True`` rewrites it under the new name).

**The crossed split's size.** ``objects=N`` audits the first N objects of a seeded order;
``objects="auto"`` grows the split in up to :data:`AUTO_LOOKS` looks (a quarter, half, all of the
cap; :func:`auto_rounds`) and stops at the first look where ``decide`` says the question is decided
(default :func:`reliance_decided`: background reliance's interval at level ``1 - ALPHA / AUTO_LOOKS``,
:func:`probekit.verdict.interval_level`, excludes its margin). The verdict is then the audit's ordinary
rule on the rows it has. That rule at a fixed size falsely flags with probability at most 2.5 % at
the margin (one-sided); after optional stopping the union bound over looks is 2 x 0.83 % + 2.5 % = 4.2 %. Measured
(benchmarks/calibrate_objects_auto.py, docs/METRICS.md): 0 % false flags without reliance, 0.5-3.5 %
at the margin with a cap of 300 objects but 6.0 % with a cap of 100 (early looks of 25-50 objects);
clear shortcuts stop at the first look, clean models almost never stop early.

**Forward passes where the verdict needs them.** The seeded initialisations see only the first
``init_objects`` (:data:`INIT_OBJECTS`) objects of the crossed split's seeded order, on all its
backgrounds (the representation's interval adds their sampling variance); the mask check reruns the
objects near the decision and a seeded sample of the others (:func:`near_decision`, :func:`sentinels`).

When the foreground is approximate (boxes or GrabCut), the behaviour figures are recomputed with every
mask eroded and dilated by a few pixels (the model's and teacher's outputs only, on the objects the
audit used, with the audit's ``n_boot`` / ``n_perm``), so the report shows how much the verdict moves.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from . import _inputs
from ._inputs import fingerprint
from .audit import Extra
from .errors import DataError, ProbekitError
from .extractors import default_layers, weights_sha256
from .store import FINGERPRINT_ATTR, SETTINGS_ATTR, StoreWriter, open_store
from .verdict import interval_decides, interval_level, reliance_holds
from .vocab import CROSSED_SPLIT, OLD_CROSSED_SPLIT

__all__ = ["AUTO_LOOKS", "INIT_OBJECTS", "MASK_CHECK_MARGIN", "accuracy_check", "accuracy_lines", "audit_model",
           "auto_rounds", "default_layers", "default_workers", "near_decision", "reliance_decided", "resolve_device",
           "sentinels"]

SPLITS = ("train", "test", CROSSED_SPLIT, "variants")


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"probekit audit: {text}", file=sys.stderr, flush=True)


def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when available, then Apple's MPS, else the CPU; any other name as given."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def default_workers() -> int:
    """DataLoader worker processes for decoding, GrabCut and compositing: min(4, cores - 1), 0 on one core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 1 else min(4, cores - 1)


#: batches each DataLoader worker process should have before the audit starts one for a split
BATCHES_PER_WORKER = 4


def _workers_for(n_images: int, workers: int, batch_size: int) -> int:
    """Worker processes for a split of ``n_images``: at most ``workers``, one per
    :data:`BATCHES_PER_WORKER` batches, so that a split of a few batches is loaded in the main process
    (starting a worker costs more than decoding a few small batches). The rows are the same either way:
    the loader keeps their order."""
    n_batches = -(-n_images // batch_size)
    return min(workers, n_batches // BATCHES_PER_WORKER)


def _init_net(module: nn.Module, k: int) -> nn.Module:
    """The same architecture freshly initialised with seed ``10_000 + k``: a copy of the built model
    (not loaded again) whose every module with ``reset_parameters`` is reset, then the model's own
    ``init_weights()`` where it has one (timm's initialisation), so the copy starts as a fresh build
    would."""
    torch.manual_seed(10_000 + k)
    net = copy.deepcopy(module)
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    init = getattr(net, "init_weights", None)
    if callable(init):
        try:
            init()
        except TypeError:  # an init_weights that needs arguments: the reset above stands
            pass
    return net.eval()


class _Rows(Dataset):
    """Rows ``rows`` of a dataset, in that order (picklable, for DataLoader workers)."""

    def __init__(self, data: Any, rows: np.ndarray) -> None:
        self.data, self.rows = data, np.asarray(rows, dtype=np.int64)
        self.factor_names = getattr(data, "factor_names", None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> Any:
        return self.data[int(self.rows[k])]


class _MaskJob(Dataset):
    """The foreground mask of each image of a folder (GrabCut runs here, in the DataLoader's workers)."""

    def __init__(self, folder: Any, todo: Sequence[int]) -> None:
        self.folder, self.todo = folder, list(todo)

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray]:
        i = self.todo[k]
        return i, np.ascontiguousarray(self.folder.mask(i))


def _mask_path(dest: Path, rel: str) -> Path:
    return dest / Path(rel).with_suffix(".png")  # a mask folder mirrors the images' paths, any extension


def _auto_masks(folder: Any, dest: Path, workers: int) -> Path:
    """GrabCut once per image, in ``workers + 1`` processes (:func:`_grabcut`), saved as ``dest/<image path>`` with the
    extension ``.png`` (255 = foreground); masks already there (an interrupted run's) are kept. Every split and the mask check
    then read these files instead of running GrabCut again."""
    from . import _distributed_audit as da

    todo = [i for i, rel in enumerate(folder.paths) if not _mask_path(dest, rel).is_file()]
    if todo and da.world() > 1:  # under torchrun every rank runs GrabCut on a block of the images
        da.map_split(functools.partial(_grabcut, folder, dest, workers), todo)
    elif todo:
        _grabcut(folder, dest, workers, todo)
    return dest


def _grabcut_workers(workers: int) -> int:
    """DataLoader workers for GrabCut: ``workers + 1`` (0 stays 0: in this process), see :func:`_grabcut`."""
    return workers + 1 if workers else 0


def _grabcut(folder: Any, dest: Path, workers: int, todo: Sequence[int]) -> None:
    """The masks of the images ``todo`` of ``folder`` (GrabCut) into ``dest``, in ``workers + 1`` processes
    (``workers`` 0: in this one): no forward pass runs beside GrabCut, so the core the main process would
    give them is free (it only writes the PNGs). The masks do not depend on the processes (GrabCut is seeded
    per image)."""
    from PIL import Image

    loader = torch.utils.data.DataLoader(_MaskJob(folder, todo), batch_size=None,
                                         num_workers=_grabcut_workers(workers))
    for i, m in loader:
        path = _mask_path(dest, folder.paths[int(i)])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        Image.fromarray(np.asarray(m, dtype=np.uint8) * 255).save(tmp, format="PNG")
        os.replace(tmp, path)


class _Progress:
    """One bar over every forward pass of the audit, and the time estimate from its first batches."""

    def __init__(self, total: int, show: bool, batch_size: int) -> None:
        from tqdm.auto import tqdm

        self.total, self.show, self.batch_size = total, show, batch_size
        self.bar = tqdm(total=total, disable=not show, unit="pass", desc="probekit audit", leave=False)
        self.t0 = time.perf_counter()
        self.done = 0
        self._first: tuple[float, int] | None = None
        self.estimate: float | None = None

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if self._first is None:  # the first batch pays for warm-up: the estimate starts after it
            self._first = (now, self.done)
        elif self.estimate is None and self.done - self._first[1] >= 2 * self.batch_size:
            rate = (now - self._first[0]) / (self.done - self._first[1])
            self.estimate = (now - self.t0) + rate * max(0, self.total - self.done)
            if self.show:
                self.bar.write(f"probekit audit: about {_duration(self.estimate)} for {self.total:,} forward "
                               "passes (estimated from the first batches)")

    def set_total(self, total: int) -> None:
        """The passes left changed (``objects="auto"`` stopped early; the mask check's nets are known)."""
        self.total = self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


Decide = Callable[..., bool]


def reliance_decided(pred: np.ndarray, group: np.ndarray, background: np.ndarray, label: np.ndarray | None,
                     background_label: np.ndarray | None, *, ci_level: float, n_boot: int, seed: int) -> bool:
    """Default decision of ``objects="auto"``: background reliance's interval (at ``ci_level``) lies
    wholly above or wholly below its margin (:func:`probekit.analyses.background_reliance`); never
    decided when reliance cannot be computed (no background classes)."""
    from .analyses import background_reliance

    if label is None:
        return False
    r = background_reliance(pred, group, background, label=label, background_label=background_label,
                            n_boot=n_boot, ci_level=ci_level, random_state=seed)
    return interval_decides(r.reliance_ci, r.margin)


AUTO_LOOKS = 3
"""Looks of ``objects="auto"``: at a quarter, half and all of the cap (at least ``AUTO_MIN_OBJECTS``)."""
AUTO_MIN_OBJECTS = 50
"""No look before this many objects: on 25 objects the reliance interval covers a little less than its
level, and early looks at 25 / 50 of 100 objects flagged 5.8 % of models at the materiality boundary
(above the 4.2 % union bound); from 50 on, 3.8 % (docs/METRICS.md, benchmarks/calibrate_objects_auto.py)."""


def auto_rounds(n_cap: int, looks: int = AUTO_LOOKS, first: int | None = None) -> list[int]:
    """Object counts at each look of ``objects="auto"``: doubling up to ``n_cap``, at most ``looks``, none
    before ``first`` objects (default :data:`AUTO_MIN_OBJECTS`)."""
    first = AUTO_MIN_OBJECTS if first is None else first
    sizes = sorted({min(n_cap, max(first, -(-n_cap // 2 ** (looks - 1 - r)))) for r in range(looks)})
    return sizes


def _object_order(n: int, seed: int) -> np.ndarray:
    """The crossed split's objects in a seeded order: ``objects=N`` takes the first N, ``auto`` grows it."""
    return np.random.default_rng([seed, 3]).permutation(n)


def _crossed_rows(order: np.ndarray, n_objects: int, n_bg: int) -> np.ndarray:
    """Rows of the crossed split (object-major, ``n_bg`` per object) of the first ``n_objects`` of ``order``."""
    return (order[:n_objects, None] * n_bg + np.arange(n_bg)[None, :]).ravel()


INIT_OBJECTS = 30
"""Objects of the crossed split the seeded initialisations see by default (``init_objects``): the first
of the split's seeded order, all their backgrounds. Chosen by benchmarks/calibrate_init_subsample.py
(docs/METRICS.md, "The init reference on a subsample of objects")."""


def _check_init_objects(init_objects: int | str | None) -> int | None:
    """``init_objects`` as a count, or None for all of the crossed split's objects."""
    if init_objects is None or init_objects == "all":
        return None
    if isinstance(init_objects, bool) or not isinstance(init_objects, (int, np.integer)) or init_objects < 3:
        raise DataError(f"--init-objects must be a whole number >= 3 or 'all'; got {init_objects!r} (the init "
                        "reference needs at least 3 objects on every background).")
    return int(init_objects)


def _init_stages(done: int, n_obj: int, n_init: int) -> list[tuple[int, bool]]:
    """How the crossed split grows from ``done`` to ``n_obj`` objects: (objects, with the inits) stages.
    The inits see the first ``n_init`` objects only, so they are extracted with the other nets up to
    ``n_init`` and left out after it."""
    if done < n_init < n_obj:
        return [(n_init, True), (n_obj, False)]
    return [(n_obj, n_obj <= n_init)]


def _extract_stage(extract: Callable[..., Any], store: Any, specs: Mapping[str, Any], rows: Any, split: str,
                   common: Mapping[str, Any]) -> None:
    """Extract ``specs`` on ``rows`` (the split's first rows, open-ended): each net from the rows it has
    committed (an interrupted run's nets may stand at different rows), nets at the same row together.
    ``store``: the writer session's view of what it has committed."""
    at: dict[int, dict[str, Any]] = {}
    have = {m: store.n_rows(split, m) if split in store.splits and m in store.models else 0 for m in specs}
    for m, spec in specs.items():
        n = have.get(m, 0)
        if n < len(rows):
            at.setdefault(n, {})[m] = spec
    for group in at.values():
        extract(group, rows, split=split, open_ended=True, **common)


def audit_model(
    model: str | nn.Module,
    data: str | os.PathLike,
    *,
    masks: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    foreground: str | None = None,
    factors: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    model_args: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    allow_pickle: bool = False,
    teacher: str | nn.Module | None = None,
    teacher_weights: str | os.PathLike | None = None,
    teacher_args: Mapping[str, Any] | None = None,
    layers: Sequence[str] | None = None,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out: str | os.PathLike = "probekit-audit",
    name: str = "model",
    n_backgrounds: int = 8,
    n_inits: int = 3,
    test_fraction: float = 0.5,
    mask_check: int = 3,
    batch_size: int = 32,
    device: str = "auto",
    seed: int = 0,
    n_boot: int = 500,
    n_perm: int = 200,
    progress: bool = True,
    workers: int | None = None,
    objects: int | str | None = None,
    decide: Decide | None = None,
    init_objects: int | str | None = INIT_OBJECTS,
    mask_check_objects: str = "near",
    overwrite: bool = False,
    pool: str | Mapping[str, str] | None = None,
    teacher_layers: Sequence[str] | None = None,
    class_map: str | os.PathLike | Mapping[int, int] | None = None,
    deploy_backgrounds: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    n_deploy: int = 16,
    expected_accuracy: float | None = None,
    precision: str = "auto",
    memory_format: str = "auto",
) -> Any:
    """Audit a model on a folder of images with foregrounds; write the store, the JSON and the report.

    Every net that sees a split (the model, its teacher, the seeded initialisations on the crossed
    split) is fed the same batches in one pass over its images, so each image is decoded and
    composited once per split; GrabCut (``foreground="auto"``) runs once per image.

    Parameters
    ----------
    model : MODEL spec or torch.nn.Module
    data : the image folder (``DIR/<class>/<image>``)
    masks, boxes, foreground : exactly one of a mask folder mirroring ``data``, a CSV of boxes
        (``path,x0,y0,x1,y1``), or ``"auto"`` (GrabCut, seeded by ``boxes`` when given)
    factors : CSV ``path,<factor>,...`` of per-image background factors (decodability, correlation)
    weights, model_args, pretrained, allow_pickle : how to load the model (:func:`probekit.models.load_model`)
    teacher, teacher_weights, teacher_args : an optional teacher; the model is then its student
    layers : module names (default: :func:`default_layers`); ``@output`` is always added
    image_size, mean, std : override the model's preprocessing
    out : output folder: ``acts.h5``, ``audit.json``, ``report.html``
    n_backgrounds : backgrounds of the crossed split
    n_inits : seeded initialisations extracted as the representation's reference (0: none); they see
        the crossed split's layers only (their output is not compared)
    mask_check : erode and dilate approximate masks by this many pixels to show how the verdict moves
    mask_check_objects : ``"near"`` (default): the mask check reruns the objects near the decision
        (:func:`near_decision` on the stored outputs: predictions that differ across backgrounds, or a
        top-2 margin below :data:`MASK_CHECK_MARGIN`) and a seeded sample of the rest (:func:`sentinels`);
        the rest keep their stored predictions unless a sampled one moved with the mask, and then every
        object is rerun. ``"all"``: every object
    device : ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA, then MPS, else CPU; said on stderr)
    n_boot, n_perm : resamples of every interval and permutation null (the mask check's too)
    workers : DataLoader worker processes decoding, running GrabCut and compositing beside the forward
        passes (default :func:`default_workers`); the figures do not depend on it
    objects : objects (foreground images) of the crossed split: all (None), the first N of a seeded
        order, or ``"auto"``: grown in up to :data:`AUTO_LOOKS` looks (:func:`auto_rounds`) until
        ``decide`` says the model's predictions decide the question
    decide : ``decide(pred, group, background, label, background_label) -> bool`` for ``objects="auto"``;
        default: :func:`reliance_decided` at level ``1 - ALPHA / AUTO_LOOKS`` (Bonferroni over the looks,
        :func:`probekit.verdict.interval_level`)
    init_objects : objects of the crossed split the seeded initialisations see (default
        :data:`INIT_OBJECTS`; ``"all"`` or None: every object the model sees): the first of the split's
        seeded order, on all its backgrounds. The representation's interval then adds the reference's
        own sampling variance over those objects (:func:`probekit.analyses.compare_background`)
    overwrite : replace a store computed from other inputs (default: refuse it in one line naming what
        differs; a store of the same inputs is continued)
    pool : pooling per layer (``"cls"``, ``"LAYER=MODE,..."`` or a dict; default: each layer's own, CLS or
        the token mean for token layers: :func:`probekit.extractors.resolve_pools`)
    teacher_layers : the teacher's layers (default: the model's when the teacher has them all, else its
        own spread over its depth); the teacher gets seeded initialisations of its own as its reference
    class_map : a CSV (``folder_class,output_index`` rows) or a dict output index -> label id: how the
        model's outputs map to the folder's classes (many-to-one allowed). Without one, a head of another
        width is read label-free (see :class:`probekit.audit.AuditSpec`)
    deploy_backgrounds : folders of photos of empty scenes, one per deployment site: every test object
        is composited on ``n_deploy`` scenes of each, and the audit predicts accuracy there
    expected_accuracy : the model's own accuracy on its test data (a fraction): a warning when its accuracy
        on the folder's original images is far below it (:func:`accuracy_check`)
    precision : ``"auto"`` (float32 on the CPU; on CUDA bf16 after a guard on the first batch), ``"fp32"``,
        ``"bf16"`` or ``"fp16"``: the forward passes' precision (:mod:`probekit._precision`), recorded in
        ``cost.precision``. Under ``torchrun`` the forward passes are split across the ranks
        (:func:`probekit._distributed_audit.run_distributed`)
    memory_format : ``"auto"`` (a convolutional net's weights channels-last on the CPU and CUDA, where a check on
        the first images shows its outputs unmoved) or ``"contiguous"`` (the nets as they are)
        (:mod:`probekit._layout`), recorded in ``cost.memory_format``; the weights get their own format back
        when the audit ends
    """
    from ._distributed_audit import forward_runner
    from .audit import audit, read_class_map
    from .datasets import Counterfactuals
    from .extractors import ModelSpec, choose_layers, extract_models, resolve_pools
    from .models import check_model_name, check_n_inits, load_model, preprocessing_for
    from .report import build_gallery, deploy_examples, predictions_from_store

    check_model_name(name)
    check_n_inits(n_inits)
    if expected_accuracy is not None and not 0 < float(expected_accuracy) <= 1:
        raise DataError(f"--expected-accuracy must be a fraction in (0, 1]; got {expected_accuracy!r}.")

    if isinstance(foreground, str) and foreground != "auto":
        raise DataError(f"--foreground must be 'auto' (GrabCut); got {foreground!r}. Give --masks or --boxes otherwise.")
    if objects is not None and objects != "auto" and (not isinstance(objects, int) or objects < 1):
        raise DataError(f"--objects must be a whole number >= 1 or 'auto'; got {objects!r}.")
    init_k = _check_init_objects(init_objects)
    if mask_check_objects not in ("near", "all"):
        raise DataError(f"--mask-check-objects must be 'near' or 'all'; got {mask_check_objects!r}.")
    for what, v in (("n_boot", n_boot), ("n_perm", n_perm)):
        if not isinstance(v, int) or v < 1:
            raise DataError(f"--{what.replace('_', '-')} must be a whole number >= 1; got {v!r}.")
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise DataError(f"--workers must be 0 or more; got {workers}.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"The output {str(out)!r} is a file; give a folder for -o (acts.h5, audit.json, report.html).")
    dev = resolve_device(device)
    if device == "auto":
        _say(progress, f"device: {dev}")
    # the one hook on the forward passes: their precision, their weights' memory format, and under torchrun their
    # split across the ranks
    runner = extract_models = forward_runner(extract_models, precision=precision, device=dev,
                                             say=lambda text: _say(progress, text), memory_format=memory_format)
    t_start = time.perf_counter()
    loaded = load_model(model, weights=weights, model_args=model_args, pretrained=pretrained,
                        allow_pickle=allow_pickle)
    transform, pre = preprocessing_for(loaded, image_size=image_size, mean=mean, std=std)
    pre_json = json.dumps(pre, sort_keys=True)
    _say(progress, f"preprocessing: {pre.get('note') or ', '.join(pre.get('steps', []))}")
    folder_kwargs = {k: v for k, v in (("masks", masks), ("boxes", boxes), ("foreground", foreground),
                                       ("factors", factors)) if v is not None}
    cf_kwargs = {"seed": seed, "n_backgrounds": n_backgrounds, "test_fraction": test_fraction,
                 "transform": transform}
    if deploy_backgrounds is not None:
        sites = [deploy_backgrounds] if isinstance(deploy_backgrounds, (str, os.PathLike)) else deploy_backgrounds
        cf_kwargs.update(deploy_backgrounds=[str(d) for d in sites], n_deploy=n_deploy)
    cf = Counterfactuals(data, **cf_kwargs, **folder_kwargs)
    folder = cf.folder
    if not folder.has_labels:
        raise DataError(f"The image folder {str(data)!r} has no class folders; the audit needs each image's "
                        "class (DIR/<class>/<image>).")
    t_model = None
    if teacher is not None:
        t_model = load_model(teacher, weights=teacher_weights, model_args=teacher_args, allow_pickle=allow_pickle)
    cmap = class_map
    if isinstance(class_map, (str, os.PathLike)):
        cmap = read_class_map(class_map, folder.classes)
    # layers in depth order (one dry pass on a dummy input), each pooled its own way (tokens: CLS or mean)
    example = cf.split("test")[0]["x"].unsqueeze(0)  # one of the user's images, the model's way
    given = [la for la in layers or [] if la != "@output"]
    chosen = [*choose_layers(loaded.module, given or None, example_input=example), "@output"]
    pools = resolve_pools(loaded.module, chosen, pool, example)
    t_chosen = t_pools = None
    if t_model is not None:
        t_chosen = [*choose_layers(t_model.module, teacher_layers, like=given or None, example_input=example, flag="--teacher-layers"), "@output"]
        t_pools = resolve_pools(t_model.module, t_chosen, pool, example)
    inputs = _inputs_record(data, folder, cf, model, loaded, weights, t_model, teacher, teacher_weights)
    n_all = len(cf.crossed_indices)
    n_init = n_all if init_k is None else min(init_k, n_all)  # the inits' objects: the first of the seeded order
    fp = fingerprint({
        "images": inputs["images_sha256"], "classes": inputs["classes"],
        "foreground": {k: v for k, v in inputs["foreground"].items() if k != "masks"},  # contents, not paths
        "factors": inputs["factors"], "fill": inputs["fill"],
        "splits": {"seed": seed, "test_fraction": test_fraction, "backgrounds": n_backgrounds,
                   "variants": list(cf.variants), "objects": objects},
        "model": _contents(inputs["model"]), "teacher": _contents(inputs["teacher"]),
        "preprocessing": pre_json, "layers": chosen, "pools": pools, "teacher_layers": t_chosen,
        "inits": n_inits, "init_objects": n_init if n_inits and n_init < n_all else "all",
        "counterfactuals": cf.settings})
    inputs["fingerprint"] = fp

    out.mkdir(parents=True, exist_ok=True)
    store = out / "acts.h5"
    auto_dir = out / "auto-masks"
    continuing = False if overwrite else _inputs.check_store(store, fp)  # read-only: a refusal changes nothing
    if not continuing and auto_dir.exists():
        shutil.rmtree(auto_dir)

    # the nets, built once: the model, its teacher, seeded inits as copies of the model re-initialised
    # (their weights hashed once, in the inputs record, for every split)
    nets: dict[str, ModelSpec] = {name: ModelSpec(loaded.module, chosen, role="student" if t_model else "model",
                                                  source=loaded.source, pool=pools, preprocessing=pre_json,
                                                  weights_sha256=inputs["model"]["weights_sha256"])}
    if t_model is not None:
        nets["teacher"] = ModelSpec(t_model.module, t_chosen, role="teacher", source=t_model.source, pool=t_pools,
                                    preprocessing=pre_json, weights_sha256=inputs["teacher"]["weights_sha256"])
    inner = [la for la in chosen if la != "@output"]
    inits = {f"{name}@init{k}": ModelSpec(_init_net(loaded.module, k), inner, role="model", source=loaded.source,
                                          pool=pools, weights_layers=False, preprocessing=pre_json)
             for k in range(n_inits if inner else 0)}
    if t_model is not None:  # the teacher's own reference: its architecture at initialisation
        t_inner = [la for la in t_chosen if la != "@output"]
        inits.update({f"teacher@init{k}": ModelSpec(_init_net(t_model.module, k), t_inner, role="model",
                                                    source=t_model.source, pool=t_pools, weights_layers=False,
                                                    preprocessing=pre_json)
                      for k in range(n_inits if t_inner else 0)})

    # one writer session for every split (the store is opened for writing once); a new store records the
    # inputs' fingerprint first, so that a run interrupted even during GrabCut is continued by its rerun
    writer = StoreWriter(store, mode="resume" if continuing else "overwrite")
    bar: _Progress | None = None
    try:
        if not continuing:
            writer.set_attrs({FINGERPRINT_ATTR: json.dumps(dict(fp), sort_keys=True)})
        if folder.mode == "auto":  # GrabCut once per image; every split and the mask check read the files
            _say(progress, f"foreground: GrabCut on {len(folder):,} images ({max(1, _grabcut_workers(workers))} processes)")
            folder_kwargs = {"masks": _auto_masks(folder, auto_dir, workers),
                             **({"factors": factors} if factors is not None else {})}
            cf = Counterfactuals(data, **cf_kwargs, verify="header", **folder_kwargs)

        # the crossed split's name in the store: an earlier release's store, continued, keeps its own
        crossed = _stored_crossed_name(writer.view(), store) if continuing else CROSSED_SPLIT
        splits = {(crossed if sp == CROSSED_SPLIT else sp): cf.split(sp)
                  for sp in (*SPLITS, *cf.deploy_splits) if sp != "train" or len(cf.train_indices)}
        n_bg = len(cf.backgrounds)
        order = _object_order(len(cf.crossed_indices), seed)
        cap = n_all if objects in (None, "auto") else min(int(objects), n_all)
        looks = auto_rounds(cap) if objects == "auto" else [cap]
        crossed_full = splits[crossed]
        seeded = not (objects is None and (n_init >= n_all or not inits))  # the crossed split in the seeded order
        plan = {sp: {nm: len(ds) for nm in nets} for sp, ds in splits.items() if sp != crossed}
        plan[crossed] = {**{nm: cap * n_bg for nm in nets}, **{nm: min(cap, n_init) * n_bg for nm in inits}}
        heads = list(nets)  # the nets whose output the mask check reads (narrowed to those with one below)
        check = folder.mode != "masks" and mask_check > 0
        if check:
            plan["mask check"] = {nm: 2 * cap * n_bg for nm in heads}
        total = sum(sum(v.values()) for v in plan.values())
        cost: dict[str, Any] = {
            "device": dev, "workers": workers, "batch_size": batch_size,
            "forward_passes": plan, "forward_passes_total": total,
            "images": {sp: (cap * n_bg if sp == crossed else len(ds)) for sp, ds in splits.items()},
            "images_composited": {"variants": len(cf.test_indices) * sum(v != "original" for v in cf.variants),
                                  crossed: cap * n_bg, **({"mask check": 2 * cap * n_bg} if check else {})},
            "grabcut": len(folder) if folder.mode == "auto" else 0,
            "objects": {"requested": objects, "available": n_all, "looks": looks},
            "init_objects": {"requested": "all" if init_k is None else init_k,
                             "used": min(cap, n_init) if inits else 0},
        }
        _say(progress, f"layers {chosen}; {len(cf.test_indices)} test images, {cap} of {n_all} objects x {n_bg} "
                       f"backgrounds" + (f" (up to {len(looks)} looks: {looks})" if objects == "auto" else "")
                       + f"; {total:,} forward passes on {dev}, {workers} workers; store {store}"
                       + (" (continuing)" if continuing else ""))
        bar = _Progress(total, progress, batch_size)
        n_used = cap
        # stop_early=False: every net but the inits needs its output anyway, and the early stop's check pass
        # over two samples per split would be a duplicate forward pass
        common = {"out": writer, "batch_size": batch_size, "device": dev, "progress": False, "progress_bar": bar,
                  "stop_early": False}
        looks_done: list[dict[str, Any]] = []
        for sp, ds in splits.items():
            # DataLoader workers only where a split has the images to keep them busy (see _workers_for)
            common["num_workers"] = _workers_for(len(ds) if sp != crossed else cap * n_bg, workers, batch_size)
            if sp != crossed:
                extract_models(nets, ds, split=sp, **common)
                continue
            specs = {**nets, **inits}
            if not seeded:
                extract_models(specs, ds, split=sp, **common)
                continue
            for r, n_obj in enumerate(looks):  # the seeded order: --objects, auto's looks, the inits' subsample
                for upto, with_inits in _init_stages(n_used if r else 0, n_obj, n_init):
                    _extract_stage(extract_models, writer.view(), specs if with_inits else nets,
                                   _Rows(crossed_full, _crossed_rows(order, upto, n_bg)), sp, common)
                n_used = n_obj
                if r == len(looks) - 1:
                    break
                decided = _decided(writer.view(), name, sp, n_obj * n_bg, decide, n_boot, seed)
                looks_done.append({"objects": n_obj, "decided": decided})
                if decided:
                    break
        writer.set_attrs({SETTINGS_ATTR: json.dumps({**cf.settings, "class_names": list(folder.classes)},
                                                    sort_keys=True, default=str)})
    except BaseException as e:
        if bar is not None:
            bar.close()
        runner.restore()
        # a run that fails on its inputs before any row leaves nothing behind
        remove = isinstance(e, ProbekitError) and not continuing and _empty(writer)
        writer.close()
        if remove:
            store.unlink(missing_ok=True)
            shutil.rmtree(auto_dir, ignore_errors=True)
            if not any(out.iterdir()):
                out.rmdir()
        raise
    writer.close()
    t_extract = time.perf_counter() - t_start

    def mask_sensitivity(doc: Mapping[str, Any]) -> dict[str, Any]:
        assert bar is not None
        # the models whose behaviour was read from their own output in the folder's classes (a label-free
        # reading compares with predictions on the backgrounds' source images, which the check does not rerun)
        nm = [m for m in heads if (b := doc["models"].get(m, {}).get("behaviour") or {}).get("from_output")
              and b.get("space", "labels") == "labels"]
        # the stored outputs, through the audit's read-only view (opened below, open while audit() runs this)
        stored = _stored_outputs(view, nm, crossed, class_map=cmap) if nm and mask_check_objects == "near" else None
        near = None if stored is None else np.unique(np.concatenate(
            [near_decision(v["group"], v["pred"], v["margin"], MASK_CHECK_MARGIN) for v in stored.values()]))
        n_first = n_used if near is None else near.size + sentinels(np.arange(n_used - near.size), seed).size
        bar.set_total(bar.done + 2 * n_first * n_bg * len(nm))
        _say(progress, f"how the verdict moves with the masks (eroded / dilated by {mask_check} px; "
                       f"{n_first} of {n_used} objects first)")
        start = bar.done
        entry = _mask_sensitivity({m: nets[m].module for m in nm}, data, folder_kwargs, cf_kwargs, order, n_used,
                                  mask_check, batch_size, dev, seed, n_boot, n_perm, workers, bar, stored, near,
                                  class_map=cmap)
        entry.update({
            "objects": mask_check_objects, "margin": MASK_CHECK_MARGIN if near is not None else None,
            "n_objects_near": None if near is None else int(near.size),
            "forward_passes": bar.done - start, "forward_passes_all_objects": 2 * n_used * n_bg * len(nm)})
        return entry

    def cost_record(doc: Mapping[str, Any]) -> dict[str, Any]:  # after the mask check: its seconds count
        assert bar is not None
        bar.close()
        cost["objects"].update({"used": n_used, "looks_done": looks_done})
        cost["init_objects"]["used"] = min(n_used, n_init) if inits else 0
        cost.update({"estimated_seconds": bar.estimate, "forward_passes_done": bar.done,
                     "seconds_extraction": t_extract, "seconds": time.perf_counter() - t_start, **runner.record()})
        return cost

    if not check:
        bar.set_total(bar.done)
    extras = [Extra("preprocessing", pre), *([Extra("mask_sensitivity", compute=mask_sensitivity)] if check else []),
              Extra("cost", compute=cost_record),
              Extra("inputs", {k: v for k, v in inputs.items() if k != "images_sha256"}),
              Extra("accuracy_check", compute=lambda doc: accuracy_check(doc, expected_accuracy))]
    _say(progress, "auditing")
    # one read-only view of the store for the audit, its JSON and its report
    with open_store(store) as view:
        try:
            result = audit(view, train="train", test_id="test", test_ood="", crossed=crossed, variants="variants",
                           n_boot=n_boot, n_perm=n_perm, random_state=seed, class_map=cmap, progress=progress,
                           extras=extras)
        finally:
            bar.close()
            runner.restore()  # the mask check (in audit()) was the last forward pass
        doc = result.data
        result.to_json(out / "audit.json")

        def shown(m: str) -> dict[str, Any]:  # a split cut short (--objects) has fewer rows than its dataset
            preds = predictions_from_store(view, m, splits=("variants", crossed), class_map=cmap)
            if crossed in preds:  # the gallery's word for the split, whatever the store calls it
                preds[CROSSED_SPLIT] = preds.pop(crossed)
            if seeded and len(preds.get(CROSSED_SPLIT, ())) == n_all * n_bg:  # all objects, in the seeded order
                p = np.empty_like(preds[CROSSED_SPLIT])
                p[_crossed_rows(order, n_all, n_bg)] = preds[CROSSED_SPLIT]
                preds[CROSSED_SPLIT] = p
            return {sp: p for sp, p in preds.items() if len(p) == len(cf.split(sp))}

        gallery = [build_gallery(cf, shown(m), model=m)
                   for m in nets if (doc["models"].get(m, {}).get("behaviour") or {}).get("from_output")]
    result.to_html(out / "report.html", gallery=gallery, deploy_examples=deploy_examples(cf))
    _say(progress, f"wrote {out / 'audit.json'} and {out / 'report.html'}")
    return result


def _stored_crossed_name(view: Any, store: Path) -> str:
    """The crossed split's name in a store being continued: ``stress`` (one FutureWarning) when an earlier
    release wrote it so, else :data:`~probekit.vocab.CROSSED_SPLIT`. ``view``: the writer session's view."""
    splits = view.splits
    if OLD_CROSSED_SPLIT not in splits or CROSSED_SPLIT in splits:
        return CROSSED_SPLIT
    warnings.warn(f"The store {str(store)!r} was written by an earlier probekit, whose crossed split is named "
                  f"{OLD_CROSSED_SPLIT!r}; continuing it under that name (its audit.json names the split as the "
                  f"store does). Rerun with --overwrite (overwrite=True) to recompute it under {CROSSED_SPLIT!r}; "
                  "continuing under the old name goes in the next release.", FutureWarning, stacklevel=3)
    return OLD_CROSSED_SPLIT


def _empty(writer: Any) -> bool:
    """Whether a writer's store holds no committed row (a run that failed before its first)."""
    try:
        view = writer.view()
        return all(view.n_rows(sp) == 0 for sp in view.splits)
    except (OSError, RuntimeError, ProbekitError):
        return False


def _decided(store: Any, name: str, split: str, n_rows: int, decide: Decide | None, n_boot: int,
             seed: int) -> bool:
    """Whether the model's predictions on the first ``n_rows`` rows of the crossed split decide (``store``:
    the writer session's view of what it has written)."""
    pred = np.asarray(store.acts(name, split, "@output")[:n_rows]).argmax(axis=1)
    f = {k: np.asarray(store.sample_field(split, k))[:n_rows] if store.has_field(split, k) else None
         for k in ("group", "background", "label", "background_label")}
    if decide is None:
        return reliance_decided(pred, f["group"], f["background"], f["label"], f["background_label"],
                                ci_level=interval_level(AUTO_LOOKS), n_boot=n_boot, seed=seed)
    return bool(decide(pred, f["group"], f["background"], f["label"], f["background_label"]))


def _contents(net: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A net's record without the checkpoint's path (a moved file with the same bytes is the same input)."""
    return None if net is None else {k: v for k, v in net.items() if k != "checkpoint"}


def _inputs_record(data: Any, folder: Any, cf: Any, model: Any, loaded: Any, weights: Any, t_model: Any,
                   teacher: Any, teacher_weights: Any) -> dict[str, Any]:
    """What was audited (``audit.json`` ``inputs``), with the hashes the store's fingerprint is made of."""
    try:
        import cv2
        opencv = str(cv2.__version__)
    except ImportError:
        opencv = None
    counts = np.bincount(folder.labels, minlength=folder.num_classes)
    fg: dict[str, Any] = {"mode": folder.mode, "mask_adjust": folder.mask_adjust}
    if folder.mode == "masks":
        fg["masks"] = str(Path(folder.masks_dir).resolve())
        fg["masks_sha256"] = _inputs.files_sha256(folder.masks_dir, folder._mask_files)
        fg["mask_threshold"] = folder.mask_threshold
    if folder.boxes is not None:
        fg["boxes_sha256"] = _inputs.fingerprint({"b": sorted(folder.boxes.items())})["b"]
    if folder.mode == "auto":
        fg["auto_box"] = folder.auto_box
        fg["opencv"] = opencv  # GrabCut's masks may differ between OpenCV versions

    def net(spec: Any, lm: Any, w: Any) -> dict[str, Any]:
        return {"spec": lm.source if not isinstance(spec, nn.Module) else type(spec).__name__,
                "checkpoint": None if w is None else str(Path(w).resolve()),
                "checkpoint_sha256": None if w is None else _inputs.file_sha256(w),
                "weights_sha256": weights_sha256(lm.module), "model_args": dict(lm.model_args)}

    factors = folder.factors
    return {
        "folder": str(Path(folder.root).resolve()), "n_images": len(folder),
        "classes": {c: int(n) for c, n in zip(folder.classes, counts, strict=True)},
        "images_sha256": _inputs.files_sha256(folder.root, folder.paths),
        "foreground": fg,
        "factors": None if factors is None else {"names": folder.factor_names,
                                                 "sha256": _inputs.fingerprint({"f": factors.tolist()})["f"]},
        "fill": {"method": cf.fill, "opencv": opencv},
        "model": net(model, loaded, weights),
        "teacher": None if t_model is None else net(teacher, t_model, teacher_weights),
    }


#: the mask check reruns an object when its stored predictions differ across backgrounds or its
#: top-2 probability margin (softmax of the stored output) is below this on some background
#: (benchmarks/bench_mask_check_subset.py; docs/BENCHMARKS.md, "The mask check on the objects near the decision")
MASK_CHECK_MARGIN = 0.5


def _softmax_margin(out: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row of a model's output (one logit: |2 sigmoid - 1|)."""
    out = np.asarray(out, dtype=np.float64)
    if out.shape[1] == 1:
        return np.abs(2.0 / (1.0 + np.exp(-out[:, 0])) - 1.0)
    z = np.exp(out - out.max(axis=1, keepdims=True))
    p = np.sort(z / z.sum(axis=1, keepdims=True), axis=1)
    return p[:, -1] - p[:, -2]


def _stored_outputs(s: Any, models: Sequence[str], split: str = CROSSED_SPLIT,
                    class_map: Mapping[int, int] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Each model's stored output on the crossed split: ``group``, ``background``, ``pred`` (the class its
    head predicts, :func:`probekit.analyses.output_predictions`, as the mask check's own forward passes
    read it) and ``margin`` (:func:`_softmax_margin`), row by row. ``s``: the audit's read-only view of the
    store."""
    from .analyses import output_predictions
    from .audit import read_output

    out: dict[str, dict[str, np.ndarray]] = {}
    for m in models:
        n = s.n_rows(split, m)
        # one pass over the output, in blocks: a wide head on many rows is never held whole
        pred, margin = read_output(s.acts(m, split, "@output"),
                                   lambda o: (output_predictions(o, class_map), _softmax_margin(o)))
        out[m] = {"group": np.asarray(s.sample_field(split, "group"))[:n],
                  "background": np.asarray(s.sample_field(split, "background"))[:n], "pred": pred, "margin": margin}
    return out


def near_decision(group: np.ndarray, pred: np.ndarray, margin: np.ndarray, threshold: float) -> np.ndarray:
    """The objects whose prediction could move with the mask: those predicted differently on some of
    their backgrounds, or with a top-2 margin below ``threshold`` on some background (sorted ids)."""
    ids, gi = np.unique(np.asarray(group), return_inverse=True)
    gi = gi.reshape(-1)
    lo, hi = np.full(ids.size, np.iinfo(np.int64).max), np.full(ids.size, np.iinfo(np.int64).min)
    np.minimum.at(lo, gi, pred)
    np.maximum.at(hi, gi, pred)
    weak = np.zeros(ids.size, bool)
    np.logical_or.at(weak, gi, np.asarray(margin) < threshold)
    return ids[(lo != hi) | weak]


#: the mask check also reruns this share (at least :data:`MASK_CHECK_SENTINELS_MIN`) of the other objects,
#: seeded: when any of their predictions moves with the mask, every object is rerun
MASK_CHECK_SENTINELS = 0.25
MASK_CHECK_SENTINELS_MIN = 8


def sentinels(far: np.ndarray, seed: int) -> np.ndarray:
    """A seeded sample of the objects not near the decision, rerun to check that they do not move:
    :data:`MASK_CHECK_SENTINELS` of them, at least :data:`MASK_CHECK_SENTINELS_MIN` (all when fewer)."""
    far = np.sort(np.asarray(far))
    n = min(far.size, max(MASK_CHECK_SENTINELS_MIN, int(np.ceil(MASK_CHECK_SENTINELS * far.size))))
    return np.sort(np.random.default_rng([seed, 11]).choice(far, n, replace=False)) if n else far


def _mask_sensitivity(heads: Mapping[str, nn.Module], data: Any, folder_kwargs: Mapping[str, Any],
                      cf_kwargs: Mapping[str, Any], order: np.ndarray, n_objects: int, k: int, batch_size: int,
                      device: str, seed: int, n_boot: int, n_perm: int, workers: int,
                      bar: _Progress, stored: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                      near: np.ndarray | None = None, class_map: Mapping[int, int] | None = None) -> dict[str, Any]:
    """Behaviour figures of the models read from their own output, with every mask eroded / dilated by k
    px, on the crossed split's objects the audit used; intervals with the audit's n_boot / n_perm.

    With ``stored`` (:func:`_stored_outputs`) and ``near`` (object ids, :func:`near_decision`), the
    models first see only the objects near the decision and a seeded sample of the others
    (:func:`sentinels`); when none of the sample's predictions moved with the mask, the other objects keep
    their stored predictions (those of the audit's own masks); when any moved, every object is rerun."""
    from .analyses import background_behaviour, background_reliance
    from .datasets import Counterfactuals

    out: dict[str, Any] = {"pixels": k, "models": {}, "n_objects": n_objects, "n_objects_rerun": {}}
    for adjust in (-k, k):
        key = "eroded" if adjust < 0 else "dilated"
        try:
            alt = Counterfactuals(data, **cf_kwargs, mask_adjust=adjust, verify="header", **folder_kwargs)
        except DataError as e:  # e.g. a mask that erodes to nothing
            out.setdefault("skipped", {})[key] = str(e)
            continue
        full = alt.split(CROSSED_SPLIT)
        rows = _crossed_rows(order, n_objects, len(alt.backgrounds)) if n_objects < len(alt.crossed_indices) \
            else np.arange(len(full))
        where = np.array([full.locate(int(i))[::2] for i in rows])  # (foreground image, background image)
        preds = {m: np.empty(len(rows), np.int64) for m in heads}
        done = np.zeros(len(rows), bool)

        def run(sel: np.ndarray, full: Any = full, rows: np.ndarray = rows, preds: dict[str, np.ndarray] = preds,
                done: np.ndarray = done) -> None:
            for m, got in _predict(heads, _Rows(full, rows[sel]), batch_size, device, workers, bar,
                                   class_map).items():
                preds[m][sel] = got
            done[sel] = True

        if near is None or stored is None:
            run(np.ones(len(rows), bool))
        else:
            obj = np.unique(where[:, 0])
            check = sentinels(np.setdiff1d(obj, near), seed)
            first = np.isin(where[:, 0], np.union1d(near, check))
            if first.any():
                run(first)
            pos = {m: {(int(g), int(b)): i for i, (g, b) in enumerate(zip(st["group"], st["background"], strict=True))}
                   for m, st in stored.items()}
            old = {m: stored[m]["pred"][[pos[m][(int(g), int(b))] for g, b in where]] for m in heads}
            sent = np.isin(where[:, 0], check)
            if any((preds[m][sent] != old[m][sent]).any() for m in heads):  # the far objects move too: all of them
                bar.set_total(bar.total + int((~done).sum()) * len(heads))
                run(~done)
            for m in heads:
                preds[m][~done] = old[m][~done]
        out["n_objects_rerun"][key] = int(np.unique(where[done, 0]).size)
        labels = alt.folder.labels
        for m, pred in preds.items():
            g, b, lab, blab = where[:, 0], where[:, 1], labels[where[:, 0]], labels[where[:, 1]]
            r = background_behaviour(pred, g, b, label=lab, background_label=blab, n_boot=n_boot, n_perm=n_perm,
                                     random_state=seed)
            rel = background_reliance(pred, g, b, label=lab, background_label=blab, n_boot=n_boot,
                                      random_state=seed)
            out["models"].setdefault(m, {})[key] = {
                "flip_rate": r.flip_rate, "pull": r.pull, "follows_background": r.follows_background,
                "reliance": {"value": rel.reliance, "ci": None if rel.reliance_ci is None else list(rel.reliance_ci)},
                "flagged": reliance_holds(rel.p_value)}  # the shortcut finding's rule (probekit.verdict)
    return out


def _predict(nets: Mapping[str, nn.Module], data: Any, batch_size: int, device: str, workers: int,
             bar: _Progress, class_map: Mapping[int, int] | None = None) -> dict[str, np.ndarray]:
    """Each net's predicted classes on ``data``, every net fed the same batches, its head read as the audit
    reads it (:func:`probekit.analyses.output_predictions`: through ``class_map``, one logit's sign, or the
    argmax)."""
    from . import _distributed_audit as da
    from .analyses import output_predictions

    if da.world() > 1:  # under torchrun the ranks share the rows
        return da.predict_split(nets, data, batch_size, device, workers, bar, class_map)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    out: dict[str, list[np.ndarray]] = {m: [] for m in nets}
    with torch.no_grad():
        for batch in loader:
            x = batch["x"].to(device)
            for m, net in nets.items():
                out[m].append(output_predictions(net(x), class_map))
            bar.update(len(x) * len(nets))
    return {m: np.concatenate(v) for m, v in out.items()}


#: accuracy on the original images is called far below the model's own when the interval's high end is this
#: many points under it
FAR_BELOW = 0.10


def accuracy_check(doc: Mapping[str, Any], expected: float | None = None) -> dict[str, dict[str, Any]]:
    """Each model's accuracy on the original images (``behaviour.accuracy.original``) beside chance.

    ``near_chance`` when the 95 % interval's low end does not clear chance (1 / classes): the model
    does not recognise these images as its own classes, most often because the preprocessing differs
    from its training (image size, mean / std) or the folder's classes are not its outputs in order;
    every other figure of the audit is then read from a model that is guessing. ``far_below`` when
    ``expected`` (the model's own accuracy on its test data, ``--expected-accuracy``) is more than
    :data:`FAR_BELOW` above the interval's high end: the same hint, for a model that is not guessing but
    sees these images differently from its training data.
    """
    out: dict[str, dict[str, Any]] = {}
    pre = doc.get("preprocessing") or {}
    for m, info in (doc.get("models") or {}).items():
        beh = info.get("behaviour") or {}
        acc = (beh.get("accuracy") or {}).get("original")
        chance = beh.get("chance")
        if not acc or acc.get("value") is None or chance is None:
            continue
        ci = acc.get("ci") or [acc["value"], acc["value"]]
        near = bool(ci[0] <= chance)
        far = bool(expected is not None and ci[1] < expected - FAR_BELOW)
        warning = None
        if far and not near:
            warning = (f"{m}: accuracy on the original images {100 * acc['value']:.0f} % is far below its own "
                       f"{100 * expected:.0f} %: check that the preprocessing matches the model's training (input "
                       f"size {pre.get('input_size')}, mean {pre.get('mean')}, std {pre.get('std')}; "
                       "--image-size/--mean/--std) and that the folder's classes are the model's outputs in order")
        if near:
            warning = (f"{m}: accuracy on the original images {100 * acc['value']:.0f} % is near chance "
                       f"({100 * chance:.0f} %): check that the preprocessing matches the model's training "
                       f"(input size {pre.get('input_size')}, mean {pre.get('mean')}, std {pre.get('std')}; "
                       "--image-size/--mean/--std) and that the folder's classes are the model's outputs in order")
        out[m] = {"value": acc["value"], "ci": ci, "chance": chance, "near_chance": near, "expected": expected,
                  "far_below": far, "warning": warning}
    return out


def accuracy_lines(doc: Mapping[str, Any]) -> list[str]:
    """The CLI's lines: each model's accuracy on the original images, and a warning near chance."""
    lines = []
    for m, a in (doc.get("accuracy_check") or accuracy_check(doc)).items():
        ci = a["ci"]
        lines.append(f"accuracy on the original images, {m}: {100 * a['value']:.0f} % [{100 * ci[0]:.0f}, "
                     f"{100 * ci[1]:.0f}] (chance {100 * a['chance']:.0f} %)")
        if a["warning"]:
            lines.append(f"WARNING: {a['warning']}")
    return lines
