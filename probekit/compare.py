"""Compare checkpoints of one architecture on background reliance: ``probekit compare``.

:func:`compare_checkpoints` builds the counterfactuals of an image folder once (the crossed split:
every test object on the same backgrounds; the same seed gives the same composites for every
checkpoint), runs every checkpoint on each batch of composites in one pass over the images, and reports
per checkpoint how its predictions follow the background:

**reliance** — the audit's own figure (:func:`probekit.analyses.background_reliance`): the share of
predictions that take the background's class beyond what the same predictions shuffled across each
object's other backgrounds would give, as a share of a complete shortcut's excess (1 = a complete
shortcut, 0 = a prediction that ignores the background; a partial shortcut of size r reads r), with its
interval (objects and backgrounds both resampled, at the verdict's level), its test against the
materiality margin and the smallest reliance the audit detects. The ``shortcut`` and
``background_sensitive`` findings are :func:`probekit.verdict.judge`'s on these figures, so a checkpoint
gets the verdict ``probekit audit`` gives the same predictions. Every checkpoint is resampled with the
same seed, so its bootstrap replicates are paired with every other's: the **difference** between two
checkpoints gets the standard deviation of the replicates' differences, in which what every checkpoint
finds hard (objects, backgrounds) cancels.

Beside it, from the same function: accuracy on own-class and other-class backgrounds, their difference,
the background effect (the ``background_sensitive`` finding) and the flip rate. Checkpoints are ranked by reliance,
lowest first; where their names carry a training step (``epoch=3``, ``step_1000``, ``ep12``, ``iter-500``,
else a last number), the figures are drawn over the steps as well. Writes ``OUT/compare.json`` and
``OUT/compare.html``.
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
from scipy.stats import norm

from .analyses import background_reliance
from .errors import DataError
from .verdict import LEVEL, judge, level_pct
from .vocab import CROSSED_SPLIT

__all__ = ["CompareResult", "compare_checkpoints", "compare_rows", "expand_checkpoints", "step_of"]

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


def _estimate(value: Any, ci: Sequence[float] | None = None) -> dict[str, Any]:
    if value is None or not np.isfinite(value):
        return {"value": None, "ci": None}
    return {"value": float(value), "ci": None if ci is None else [float(ci[0]), float(ci[1])]}


# -- the comparison -----------------------------------------------------------------------------------


@dataclasses.dataclass
class CompareResult:
    """What :func:`compare_checkpoints` found; ``data`` is the JSON document (``compare.json``)."""

    data: dict[str, Any]

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        return path

    def to_html(self, path: str | os.PathLike, gallery: Mapping[str, Any] | None = None) -> Path:
        """The report; ``gallery``: a :func:`probekit.report.build_gallery` result shown in it."""
        from .report import write_compare_report

        return write_compare_report(self.data, path, gallery=gallery)

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
                 group: np.ndarray | None = None, background: np.ndarray | None = None,
                 steps: Mapping[str, int | None] | None = None, reference: str | None = None, n_boot: int = 1000,
                 ci_level: float = LEVEL, seed: int = 0) -> dict[str, Any]:
    """The comparison document from predictions on a crossed split, shape (G, B) each (object g, background b).

    ``preds`` maps a checkpoint's name to its predictions, in training order; ``label`` and
    ``background_label`` (G, B) the object's and the background's class. ``reference``: the checkpoint every
    other is compared with (default: the last one). Each checkpoint's figures are the audit's
    (:func:`probekit.analyses.background_reliance` at the verdict's level, :data:`probekit.verdict.LEVEL`)
    and its findings are :func:`probekit.verdict.judge`'s on them; ``ci_level`` is the level of the paired
    differences' intervals (default: the same).

    Returns
    -------
    dict
        ``compare.json``: ``checkpoints`` (per name: ``step``, ``reliance`` {value, ci, p_value, margin,
        detectable, reason}, ``shortcut`` (the finding: true / false / null), ``accuracy_own_background``,
        ``accuracy_other_background``, ``bg_gap_crossed``, ``background_effect`` {value, ci, p_value,
        margin}, ``background_sensitive`` (the finding: true / false / null), ``flip_rate``), ``ranking``
        (names, lowest reliance first), ``reference``, ``differences`` ([{checkpoint, reference,
        reliance_difference {value, ci}, excludes_zero}]), ``has_steps``, ``n_objects``, ``n_backgrounds``,
        ``n_boot``, ``seed``, ``ci_level`` (the checkpoints' intervals), ``difference_ci_level`` and the
        definitions.
    """
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
    group = np.repeat(np.arange(G), B) if group is None else np.asarray(group).reshape(-1)
    background = np.tile(np.arange(B), G) if background is None else np.asarray(background).reshape(-1)
    rows: dict[str, Any] = {}
    boots: dict[str, np.ndarray] = {}
    for m in names:
        # the same seed for every checkpoint: the same resamples, so the replicates are paired
        r = background_reliance(np.asarray(preds[m]).reshape(-1), group, background, label=label.reshape(-1),
                                background_label=bl.reshape(-1), n_boot=n_boot, ci_level=LEVEL,
                                random_state=seed)
        boots[m] = np.asarray(r.reliance_boot, dtype=np.float64)
        row = {
            "step": (steps or {}).get(m),
            "reliance": {**_estimate(r.reliance, r.reliance_ci), "p_value": r.p_value, "margin": r.margin,
                         "detectable": r.detectable, "reason": r.reason},
            "shortcut": None,
            "accuracy_own_background": _estimate(r.accuracy_own, r.accuracy_own_ci),
            "accuracy_other_background": _estimate(r.accuracy_other, r.accuracy_other_ci),
            "bg_gap_crossed": _estimate(r.bg_gap, r.bg_gap_ci),
            "background_effect": {**_estimate(r.effect, r.effect_ci), "p_value": r.effect_p_value,
                                  "margin": r.effect_margin},
            "background_sensitive": None,
            "flip_rate": _estimate(r.flip_rate, r.flip_rate_ci),
        }
        # the findings as the audit decides them, on the audit document's figures (probekit.verdict)
        v = judge(m, {"behaviour": {**row, "n_groups": int(G), "n_backgrounds": int(B)}})
        row["shortcut"] = v.flagged
        row["background_sensitive"] = ("background_sensitive" in v.findings
                                       if v.judged["background_sensitive"] else None)
        rows[m] = row
    z = float(norm.ppf(0.5 + ci_level / 2))
    differences = []
    for m in names:
        if m == reference:
            continue
        a, b = rows[m]["reliance"]["value"], rows[reference]["reliance"]["value"]
        ci = None
        if a is not None and b is not None:
            d = boots[m] - boots[reference]
            d = d[np.isfinite(d)]
            if d.size > 1:
                half = z * float(np.std(d, ddof=1))
                ci = [a - b - half, a - b + half]
        differences.append({"checkpoint": m, "reference": reference,
                            "reliance_difference": _estimate(None if a is None or b is None else a - b, ci),
                            "excludes_zero": bool(ci is not None and (ci[0] > 0 or ci[1] < 0))})
    ranking = sorted(names, key=lambda m: (np.inf if rows[m]["reliance"]["value"] is None
                                           else rows[m]["reliance"]["value"], names.index(m)))
    return {
        "schema": "probekit.compare", "schema_version": 1,
        "n_objects": int(G), "n_backgrounds": int(B), "n_boot": int(n_boot), "seed": int(seed),
        "reliance_definition": ("the audit's reliance (probekit.analyses.background_reliance): the share of "
                                "predictions that take the background's class beyond a within-object shuffle of the "
                                "backgrounds, as a share of a complete shortcut's (1 = complete, 0 = none)"),
        "ci_level": LEVEL, "difference_ci_level": float(ci_level),
        "interval": (f"{level_pct()} %, objects and backgrounds resampled; a difference is paired (the same "
                     f"resamples for both checkpoints, normal {level_pct(ci_level)} % interval on the replicates' "
                     "differences)"),
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
    n_boot: int = 1000,
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
    n_boot : bootstrap resamples (the same ones for every checkpoint)
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
    crossed = cf.split(CROSSED_SPLIT)
    G, B = len(cf.crossed_indices), len(cf.backgrounds)
    if progress:
        print(f"probekit compare: {len(nets)} checkpoints on {G} objects x {B} backgrounds", flush=True)
    P = _predict_all(nets, crossed, batch_size, device, progress)
    P_test = _predict_all(nets, cf.split("test"), batch_size, device, False)  # the originals, for the gallery
    labels = cf.folder.labels
    label = np.repeat(labels[cf.crossed_indices], B).reshape(G, B)
    bl = np.tile(labels[cf.backgrounds], G).reshape(G, B)
    steps = {n: step_of(str(f)) for n, f in zip(names, files, strict=True)}
    doc = compare_rows({n: P[i].reshape(G, B) for i, n in enumerate(names)}, label, bl,
                       group=np.repeat(cf.crossed_indices, B), background=np.tile(cf.backgrounds, G), steps=steps,
                       reference=reference, n_boot=n_boot, seed=seed)
    doc.update({"model": loaded.source, "data": str(data), "preprocessing": pre,
                "files": {n: str(f) for n, f in zip(names, files, strict=True)},
                "classes": list(cf.folder.classes)})
    result = CompareResult(doc)
    if out is not None:
        from .report import build_gallery

        worst = doc["ranking"][-1]  # what was audited, as the most reliant checkpoint saw it
        k = names.index(worst)
        gallery = build_gallery(cf, {CROSSED_SPLIT: P[k], "test": P_test[k]}, model=worst, per_class=1, max_objects=12)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result.to_json(out / "compare.json")
        result.to_html(out / "compare.html", gallery=gallery)
        if progress:
            print(f"probekit compare: wrote {out / 'compare.json'} and {out / 'compare.html'}", flush=True)
    return result
