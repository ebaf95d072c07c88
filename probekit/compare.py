"""Compare checkpoints of one architecture on background reliance: ``probekit compare``.

:func:`compare_checkpoints` builds the counterfactuals of an image folder once (the crossed stress split:
every test object on the same backgrounds; the same seed gives the same composites for every
checkpoint), runs every checkpoint on each batch of composites in one pass over the images, and reports
per checkpoint how its predictions follow the background:

**reliance** — the share of predictions that take the background's class beyond what the same predictions
shuffled across the backgrounds within each object would give, scaled so that a complete shortcut reads 1
and a model whose prediction ignores the background reads 0. Over the rows whose background came from
another class than the object's (``swapped``), with ``F`` the predictions equal to the background's class,
``N`` their expectation had the backgrounds been shuffled within each object (for row ``r`` of object
``g``: the share of ``g``'s predictions on its *other* backgrounds that equal ``r``'s background class;
leaving the row itself out removes a bias of order 1/B) and ``S`` the swapped rows::

    reliance = (F - N) / (S - N)

Intervals resample objects and backgrounds (a two-way bootstrap: independent multinomial weights on the
objects and on the backgrounds; a cell weighs the product), so they speak about the model, not about
these images. The **difference** between two checkpoints reuses the *same* weights for both (a paired
bootstrap): objects that every checkpoint finds hard cancel, and the interval is far narrower than the
two intervals side by side suggest.

Beside it: the flip rate, the background pull, the verdict of :func:`probekit.analyses.background_behaviour`
(the audit's), and accuracy on own-class and other-class backgrounds. Checkpoints are ranked by reliance,
lowest first; where their names carry a training step (``epoch=3``, ``step_1000``, ``ep12``, ``iter-500``,
else a last number), the figures are drawn over the steps as well. Writes ``OUT/compare.json`` and
``OUT/compare.html``.

Seam: the audit's own reliance statistic (``probekit.analyses.background_reliance``, with bootstrap
replicates reproducible from its ``random_state``) will replace :func:`reliance_replicates` where it is
available; the paired difference then takes the replicates of two checkpoints under the same seed.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["CompareResult", "compare_checkpoints", "expand_checkpoints", "reliance_replicates", "step_of"]

_STEP = re.compile(r"(?:epoch|step|steps|iter|iteration|it|ep)[=_\-]?(\d+)", re.IGNORECASE)


def step_of(name: str) -> int | None:
    """The training step a checkpoint's file name carries (``epoch=3``, ``step_1000``, ``ep12``,
    ``model-0042``), else None."""
    stem = Path(name).name
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    m = _STEP.findall(stem)
    if m:
        return int(m[-1])
    nums = re.findall(r"\d+", stem)
    return int(nums[-1]) if nums else None


def expand_checkpoints(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Checkpoint files from paths and glob patterns (``runs/*.ckpt``), each once, in training order
    when every name carries a step, else in the order given (a pattern's matches sorted by name)."""
    out: list[Path] = []
    for p in patterns:
        text = os.fspath(p)
        if glob.has_magic(text):
            hits = sorted(glob.glob(text))
            if not hits:
                raise DataError(f"No checkpoint matches {text!r}; check the pattern (quote it so the shell does "
                                "not expand it first) or list the files.")
            out += [Path(h) for h in hits]
        else:
            if not Path(text).is_file():
                raise DataError(f"The checkpoint {text!r} does not exist.")
            out.append(Path(text))
    seen: dict[Path, None] = {}
    for p in out:
        seen.setdefault(p.resolve(), None)
    files = list(seen)
    if len(files) < 2:
        raise DataError(f"compare needs two or more checkpoints; got {len(files)} ({[str(f) for f in files]}).")
    steps = [step_of(str(f)) for f in files]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        files = [f for _, f in sorted(zip(steps, files, strict=True), key=lambda t: t[0])]
    return files


def _names(files: Sequence[Path]) -> list[str]:
    """Short unique names: the file stems, else the paths relative to their common folder."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    root = os.path.commonpath([str(f) for f in files])
    return [os.path.relpath(f, root) for f in files]


# -- the statistic ------------------------------------------------------------------------------------


def _weights(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``size`` multinomial bootstrap weight vectors over ``n`` units."""
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(size)]).astype(np.float64)


def reliance_replicates(pred: np.ndarray, label: np.ndarray, background_label: np.ndarray,
                        weights: np.ndarray, object_weights: np.ndarray | None = None) -> np.ndarray:
    """Reliance of one checkpoint under each of ``R`` resamplings.

    ``pred``, ``label`` (the object's class), ``background_label`` (the background's class, -1 unknown): arrays
    of shape (G, B), object g on background b. ``weights`` (R, G, B): how many times each of an object's
    backgrounds is drawn in each replicate; ``object_weights`` (R, G): how many times each object is drawn
    (default once). All ones: the estimate itself. Each object's F, N and S are computed on its own drawn
    backgrounds (its null leaves the row itself out once), then summed with the object weights, so an
    object drawn twice counts twice without being its own null. Returns (R,); NaN where no swapped row has
    weight or the shuffle already explains every follow (S = N).
    """
    pred, label, bl = (np.asarray(a) for a in (pred, label, background_label))
    swap = ((bl != label) & (bl >= 0)).astype(np.float64)  # (G, B)
    follow = swap * (pred == bl)
    # same[g, b, b'] = object g's prediction on background b' equals background b's class
    same = (pred[:, None, :] == bl[:, :, None]).astype(np.float64)  # (G, B, B)
    own = (pred == bl).astype(np.float64)  # the row itself, left out of its own null
    W = np.asarray(weights, dtype=np.float64).reshape(-1, *pred.shape)
    V = (np.ones(W.shape[:2]) if object_weights is None
         else np.asarray(object_weights, dtype=np.float64).reshape(W.shape[0], -1))
    out = np.empty(W.shape[0])
    for r, w in enumerate(W):
        drawn = w > 0
        n_other = w.sum(axis=1, keepdims=True) - drawn  # (G, B)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(n_other > 0, (np.einsum("gbc,gc->gb", same, w) - own * drawn) / n_other, 0.0)
        v = V[r][:, None]
        F = float((v * w * follow).sum())
        S = float((v * w * swap).sum())
        N = float((v * w * swap * share).sum())
        out[r] = (F - N) / (S - N) if S > 0 and S - N > 1e-12 else np.nan
    return out


def _designs(rng: np.random.Generator, G: int, B: int, n_boot: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three resamplings of the pigeonhole bootstrap (Owen 2007) as ``(background weights (R, G, B),
    object weights (R, G))``: objects only, backgrounds only, and cells independently."""
    wg, wb = _weights(rng, G, n_boot), _weights(rng, B, n_boot)
    cells = _weights(rng, G * B, n_boot).reshape(n_boot, G, B)
    ones_gb, ones_g = np.ones((n_boot, G, B)), np.ones((n_boot, G))
    return {"objects": (ones_gb, wg), "backgrounds": (np.repeat(wb[:, None, :], G, axis=1), ones_g),
            "cells": (cells, ones_g)}


def _variance(boots: Mapping[str, np.ndarray]) -> float:
    """Var(objects) + Var(backgrounds) - Var(cells): the crossed design's variance, each resampling's
    share of the cell-level noise counted once (Owen 2007); never below the larger of the first two."""
    v = {k: float(np.nanvar(b)) if np.isfinite(b).sum() > 1 else np.nan for k, b in boots.items()}
    return max(v["objects"] + v["backgrounds"] - v["cells"], v["objects"], v["backgrounds"])


def _ci(est: float, var: float, level: float = 0.95) -> list[float] | None:
    """Normal interval ``est ± z sqrt(var)``."""
    from scipy.stats import norm

    if not (np.isfinite(est) and np.isfinite(var)):
        return None
    half = float(norm.ppf(0.5 + level / 2)) * float(np.sqrt(max(var, 0.0)))
    return [float(est - half), float(est + half)]


def _estimate(value: float | None, ci: Sequence[float] | None = None) -> dict[str, Any]:
    if value is None or not np.isfinite(value):
        return {"value": None, "ci": None}
    return {"value": float(value), "ci": None if ci is None else [float(ci[0]), float(ci[1])]}


def _accuracy(pred: np.ndarray, label: np.ndarray, rows: np.ndarray,
              designs: Mapping[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
    """Accuracy over the cells in ``rows`` (G, B mask), and its replicates under each resampling."""
    correct = (pred == label).astype(np.float64) * rows
    n = rows.astype(np.float64)
    est = float(correct.sum() / n.sum()) if n.sum() else float("nan")
    boots = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for k, (W, V) in designs.items():
            boots[k] = (np.einsum("rg,rgb,gb->r", V, W, correct) / np.einsum("rg,rgb,gb->r", V, W, n))
    return est, boots


# -- the comparison -----------------------------------------------------------------------------------


@dataclasses.dataclass
class CompareResult:
    """What :func:`compare_checkpoints` found; ``data`` is the JSON document (``compare.json``)."""

    data: dict[str, Any]

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        return path

    def to_html(self, path: str | os.PathLike) -> Path:
        from .report._compare import write_compare_report

        return write_compare_report(self.data, path)

    @property
    def ranking(self) -> list[str]:
        """Checkpoint names, lowest reliance first."""
        return list(self.data["ranking"])


def _predict_all(nets: Sequence[Any], data: Any, batch_size: int, device: str, progress: bool) -> np.ndarray:
    """Predicted class of every net on every item: one pass over the images, every net on each batch."""
    import torch

    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    out: list[list[np.ndarray]] = [[] for _ in nets]
    with torch.no_grad():
        for k, batch in enumerate(loader):
            x = batch["x"].to(device)
            for i, net in enumerate(nets):
                out[i].append(net(x).argmax(dim=1).cpu().numpy())
            if progress and k % 20 == 0:
                print(f"probekit compare: batch {k + 1} of {len(loader)}", flush=True)
    return np.stack([np.concatenate(o) for o in out])


def compare_rows(preds: Mapping[str, np.ndarray], label: np.ndarray, background_label: np.ndarray, *,
                 group: np.ndarray | None = None, background: np.ndarray | None = None, steps: Mapping[str, int | None]
                 | None = None, reference: str | None = None, n_boot: int = 500, n_perm: int = 200,
                 seed: int = 0) -> dict[str, Any]:
    """The comparison document from predictions on a crossed split, shape (G, B) each (object g, background b).

    ``preds`` maps a checkpoint's name to its predictions, in training order. ``reference``: the checkpoint
    every other is compared with (default: the last one). The behaviour figures of the audit
    (:func:`probekit.analyses.background_behaviour`) are added per checkpoint.
    """
    from .analyses import background_behaviour

    names = list(preds)
    if len(names) < 2:
        raise DataError("compare needs two or more checkpoints.")
    label = np.asarray(label)
    bl = np.asarray(background_label)
    G, B = label.shape
    if reference is None:
        reference = names[-1]
    if reference not in preds:
        raise DataError(f"The reference checkpoint {reference!r} is not among {names}.")
    rng = np.random.default_rng(seed)
    designs = _designs(rng, G, B, n_boot)  # shared by every checkpoint: the differences are paired
    ones = np.ones((1, G, B))
    group = np.repeat(np.arange(G), B) if group is None else np.asarray(group).reshape(-1)
    background = np.tile(np.arange(B), G) if background is None else np.asarray(background).reshape(-1)
    own = (bl == label)
    other = (bl != label) & (bl >= 0)
    rows: dict[str, Any] = {}
    boots: dict[str, dict[str, np.ndarray]] = {}
    for m in names:
        p = np.asarray(preds[m]).reshape(G, B)
        est = float(reliance_replicates(p, label, bl, ones)[0])
        boots[m] = {k: reliance_replicates(p, label, bl, W, V) for k, (W, V) in designs.items()}
        acc_own, own_b = _accuracy(p, label, own, designs)
        acc_oth, oth_b = _accuracy(p, label, other, designs)
        beh = background_behaviour(p.reshape(-1), group, background, label=label.reshape(-1),
                                   background_label=bl.reshape(-1), n_boot=n_boot, n_perm=n_perm, random_state=seed)
        gap = acc_own - acc_oth
        rows[m] = {
            "step": (steps or {}).get(m),
            "reliance": _estimate(est, _ci(est, _variance(boots[m]))),
            "accuracy_own_background": _estimate(acc_own, _ci(acc_own, _variance(own_b))),
            "accuracy_other_background": _estimate(acc_oth, _ci(acc_oth, _variance(oth_b))),
            "bg_gap_crossed": _estimate(gap, _ci(gap, _variance({k: own_b[k] - oth_b[k] for k in designs}))),
            "flip_rate": _estimate(beh.flip_rate, beh.flip_rate_ci),
            "pull": _estimate(beh.pull, beh.pull_ci),
            "follows_background": _estimate(beh.follows_background, beh.follows_background_ci),
            "accuracy": _estimate(beh.accuracy, beh.accuracy_ci),
            "flagged": bool(beh.flagged),
        }
    differences = []
    for m in names:
        if m == reference:
            continue
        a, b = rows[m]["reliance"]["value"], rows[reference]["reliance"]["value"]
        est = np.nan if a is None or b is None else a - b
        ci = _ci(est, _variance({k: boots[m][k] - boots[reference][k] for k in designs}))
        differences.append({"checkpoint": m, "reference": reference, "reliance_difference": _estimate(est, ci),
                            "excludes_zero": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))})
    ranking = sorted(names, key=lambda m: (np.inf if rows[m]["reliance"]["value"] is None
                                           else rows[m]["reliance"]["value"], names.index(m)))
    return {
        "schema": "probekit.compare", "schema_version": 1,
        "n_objects": int(G), "n_backgrounds": int(B), "n_boot": int(n_boot), "seed": int(seed),
        "reliance_definition": ("(F - N) / (S - N) over rows whose background came from another class: F predictions "
                                "equal to the background's class, N their expectation under a within-object "
                                "shuffle of the backgrounds (the row itself left out), S the rows; 1 = a complete "
                                "shortcut, 0 = a prediction that ignores the background"),
        "interval": ("95 %, normal, with the crossed design's variance: Var(objects resampled) + Var(backgrounds "
                     "resampled) - Var(cells resampled) (Owen's pigeonhole bootstrap); differences paired (the same "
                     "resamples for both checkpoints)"),
        "checkpoints": rows, "ranking": ranking, "reference": reference, "differences": differences,
        "has_steps": all(rows[m]["step"] is not None for m in names)
        and len({rows[m]["step"] for m in names}) == len(names),
    }


def compare_checkpoints(
    model: Any,
    checkpoints: Sequence[str | os.PathLike],
    data: str | os.PathLike,
    *,
    masks: str | os.PathLike | None = None,
    boxes: str | os.PathLike | None = None,
    foreground: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out: str | os.PathLike | None = "probekit-compare",
    reference: str | None = None,
    n_backgrounds: int = 8,
    test_fraction: float = 0.5,
    seed: int = 0,
    n_boot: int = 500,
    n_perm: int = 200,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> CompareResult:
    """Audit several checkpoints of one architecture on the same counterfactuals; rank them by reliance.

    Parameters
    ----------
    model : MODEL spec or torch.nn.Module
        The architecture (a module is copied for every checkpoint).
    checkpoints : sequence of paths or glob patterns
        Two or more checkpoints (safetensors, or state dicts read with ``torch.load(weights_only=True)``).
    data, masks, boxes, foreground : the image folder and its foreground, as for :func:`probekit.audit_model`
    model_args, allow_pickle, image_size, mean, std : how to build the model and preprocess the images
    out : folder for ``compare.json`` and ``compare.html`` (None: write nothing)
    reference : the checkpoint (name) every other is compared with, by a paired interval (default: the last)
    n_backgrounds, test_fraction, seed : the counterfactuals (the same seed gives the same composites)
    n_boot, n_perm : bootstrap resamples and permutations
    """
    from .datasets import Counterfactuals
    from .models import load_model, preprocessing_for

    if isinstance(foreground, str) and foreground != "auto":
        raise DataError(f"foreground must be 'auto' (GrabCut); got {foreground!r}. Give masks or boxes otherwise.")
    files = expand_checkpoints(checkpoints)
    names = _names(files)
    nets, loaded = [], None
    for f in files:
        spec = copy.deepcopy(model) if not isinstance(model, str) else model
        loaded = load_model(spec, weights=f, model_args=model_args, allow_pickle=allow_pickle)
        nets.append(loaded.module.to(device).eval())
    assert loaded is not None
    transform, pre = preprocessing_for(loaded, image_size=image_size, mean=mean, std=std)
    folder_kwargs = {k: v for k, v in (("masks", masks), ("boxes", boxes), ("foreground", foreground))
                     if v is not None}
    cf = Counterfactuals(data, seed=seed, n_backgrounds=n_backgrounds, test_fraction=test_fraction,
                         transform=transform, **folder_kwargs)
    if not cf.folder.has_labels:
        raise DataError(f"The image folder {str(data)!r} has no class folders; compare needs each image's class "
                        "(DIR/<class>/<image>).")
    stress = cf.split("stress")
    G, B = len(cf.stress_indices), len(cf.backgrounds)
    if progress:
        print(f"probekit compare: {len(nets)} checkpoints on {G} objects x {B} backgrounds", flush=True)
    P = _predict_all(nets, stress, batch_size, device, progress)
    labels = cf.folder.labels
    label = np.repeat(labels[cf.stress_indices], B).reshape(G, B)
    bl = np.tile(labels[cf.backgrounds], G).reshape(G, B)
    steps = {n: step_of(str(f)) for n, f in zip(names, files, strict=True)}
    doc = compare_rows({n: P[i].reshape(G, B) for i, n in enumerate(names)}, label, bl,
                       group=np.repeat(cf.stress_indices, B), background=np.tile(cf.backgrounds, G), steps=steps,
                       reference=reference, n_boot=n_boot, n_perm=n_perm, seed=seed)
    doc.update({"model": loaded.source, "data": str(data), "preprocessing": pre,
                "files": {n: str(f) for n, f in zip(names, files, strict=True)},
                "classes": list(cf.folder.classes)})
    result = CompareResult(doc)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result.to_json(out / "compare.json")
        result.to_html(out / "compare.html")
        if progress:
            print(f"probekit compare: wrote {out / 'compare.json'} and {out / 'compare.html'}", flush=True)
    return result
