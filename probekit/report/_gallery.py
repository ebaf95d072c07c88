"""A gallery of what was audited: the composited images of a few objects, with the model's predictions.

:func:`build_gallery` takes the :class:`probekit.datasets.Counterfactuals` the audit built and the model's
predicted class on its ``variants`` and ``crossed`` splits (item order), and picks a few objects per class,
those whose prediction changes on the most backgrounds first. Per object it renders (at the image's own
resolution, before the model's preprocessing) the original, its mask (outlined over the image), every
image variant of the audit (only_fg, no_fg, only_bg, mixed_same, mixed_rand, mixed_next: those the
audit built) and the object on each background of the crossed split, each with the model's prediction;
a prediction that differs from the one on the original image is marked. Thumbnails are embedded as
base64 (JPEG or PNG, whichever is smaller), so the one-file report stays small: about 2-3 kB per
thumbnail, 16 per object, ``max_objects`` objects.

The result is a JSON-safe dict that :func:`probekit.report.write_report` takes as ``gallery=``.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DataError
from ..store import Store, open_store
from ..vocab import CROSSED_SPLIT, OLD_CROSSED_SPLIT

__all__ = ["build_gallery", "predictions_from_store"]

_MASK_COLOUR = np.array([255, 0, 255], dtype=np.uint8)


def _encode(arr: np.ndarray, thumb: int, *, nearest: bool = False) -> tuple[str, int, int]:
    """A data URI of ``arr`` scaled so its longer side is ``thumb`` px (JPEG or PNG, the smaller)."""
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    w, h = img.size
    scale = thumb / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = img.resize(size, Image.NEAREST if nearest or scale > 1 else Image.LANCZOS)
    best = None
    for fmt, kw in (("JPEG", {"quality": 82}), ("PNG", {"optimize": True})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        data = buf.getvalue()
        if best is None or len(data) < len(best[1]):
            best = (fmt.lower(), data)
    assert best is not None
    return f"data:image/{best[0]};base64," + base64.b64encode(best[1]).decode("ascii"), size[0], size[1]


def _outline(image: np.ndarray, mask: np.ndarray, thumb: int) -> np.ndarray:
    """The image at thumbnail size, background dimmed, the mask's boundary drawn in magenta."""
    h, w = mask.shape
    scale = thumb / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    img = np.asarray(Image.fromarray(image).resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    out = img.astype(np.float32)
    out[~m] *= 0.45  # what the mask calls background, dimmed
    out = out.astype(np.uint8)
    out[edge] = _MASK_COLOUR
    return out


def predictions_from_store(store: str | os.PathLike | Store, model: str,
                           splits: Sequence[str] = ("variants", CROSSED_SPLIT),
                           class_map: Mapping[int, int] | None = None) -> dict[str, np.ndarray]:
    """The model's predicted class per item of ``splits``, read from its stored ``@output`` as the audit
    reads a head (:func:`probekit.analyses.output_predictions`: the argmax, or one logit's sign).

    ``class_map`` (output index -> the folder's class id, as the audit's ``class_map``) maps the argmax;
    an output it does not name becomes -1 (no class of the folder). Splits the model has no stored output
    on are left out (a representation without a head has no predictions of its own). ``store``: its path,
    or an open :class:`~probekit.store.Store` (read through and left open). A store of an earlier release,
    whose crossed split is ``stress``, is read from that split under the key ``crossed`` when ``crossed``
    is asked for (one FutureWarning).
    """
    from ..analyses import output_predictions  # the analyses (torch, scikit-learn) load only when needed

    out: dict[str, np.ndarray] = {}
    with contextlib.nullcontext(store) if isinstance(store, Store) else open_store(store) as s:
        for key in splits:
            sp = key
            if key == CROSSED_SPLIT and key not in s.splits and OLD_CROSSED_SPLIT in s.splits:
                warnings.warn(f"The store {str(s.path)!r} names its crossed split {OLD_CROSSED_SPLIT!r} (an earlier "
                              f"release's name): its predictions are read as {CROSSED_SPLIT!r}. Pass "
                              f"splits=('variants', {OLD_CROSSED_SPLIT!r}) to read it under its own name without "
                              "this warning; the fallback goes in the next release.", FutureWarning, stacklevel=2)
                sp = OLD_CROSSED_SPLIT
            if sp in s.splits and "@output" in s.layers(model, sp):
                n = s.n_rows(sp, model)
                x = np.asarray(s.acts(model, sp, "@output")[:n]).reshape(n, -1)
                out[key] = output_predictions(x, class_map)
    return out


def _check(preds: Mapping[str, Any], split: str, n: int) -> np.ndarray | None:
    if split not in preds or preds[split] is None:
        return None
    p = np.asarray(preds[split]).reshape(-1)
    if p.size != n:
        raise DataError(f"build_gallery: {p.size} predictions for the {split!r} split of {n} items; pass the "
                        f"model's predicted class for every item of Counterfactuals.split({split!r}), in order.")
    return p.astype(np.int64)


def build_gallery(
    counterfactuals: Any,
    predictions_by_split: Mapping[str, Any],
    *,
    model: str = "model",
    per_class: int = 2,
    max_objects: int = 24,
    max_backgrounds: int = 8,
    thumb: int = 72,
    prediction_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The gallery of one model's audit (see the module docstring).

    Parameters
    ----------
    counterfactuals : probekit.datasets.Counterfactuals
        The counterfactuals the audit extracted (same seed and options).
    predictions_by_split : mapping
        ``{"variants": array, "crossed": array}``: the model's predicted class id per item of
        ``counterfactuals.split(name)``, in item order (:func:`predictions_from_store` reads them from
        the store); ``"stress"``, the crossed split's old name, is read as ``"crossed"`` (one
        FutureWarning). Either may be missing; at least one must be given. Without ``variants``, a ``test``
        array (the originals) gives the prediction the others are compared with, else the object's most
        common prediction on the crossed split does.
    model : str
        The model's name (a heading of the report).
    per_class : int
        Objects shown per class, those whose prediction changes most first.
    max_objects : int
        At most this many objects in all (the most-changed ones over every class).
    max_backgrounds : int
        Crossed-split backgrounds shown per object.
    thumb : int
        Thumbnail size in px (longer side).
    prediction_names : sequence of str, optional
        The name of each prediction id (default: the folder's classes). Give the model's own class names
        when its predictions are its output indices (read label-free); -1 reads "no folder class".

    Returns
    -------
    dict
        ``{"model", "columns", "n_objects", "n_shown", "selection", "objects": [{"image", "path", "label",
        "changes", "n_backgrounds", "cells": [{"name", "src", "width", "height", "pred", "changed",
        "note"}], "backgrounds": [...]}]}``; ``pred`` is a class name, ``changed`` whether it differs
        from the prediction on the original image.
    """
    cf = counterfactuals
    if OLD_CROSSED_SPLIT in predictions_by_split and CROSSED_SPLIT not in predictions_by_split:
        warnings.warn(f"build_gallery: the predictions' key {OLD_CROSSED_SPLIT!r} is now {CROSSED_SPLIT!r} (the "
                      "crossed split's one name); the old key goes in the next release.", FutureWarning, stacklevel=2)
        predictions_by_split = {(CROSSED_SPLIT if k == OLD_CROSSED_SPLIT else k): p
                                for k, p in predictions_by_split.items()}
    if per_class < 1 or max_objects < 1 or thumb < 8:
        raise DataError(f"build_gallery: per_class={per_class}, max_objects={max_objects} and thumb={thumb} must be "
                        "at least 1, 1 and 8.")
    folder = cf.folder
    classes = list(folder.classes) if folder.has_labels else []
    labels = folder.labels if folder.labels is not None else np.zeros(len(folder), dtype=np.int64)

    def cls(c: int) -> str:
        return classes[c] if 0 <= c < len(classes) else str(int(c))

    pnames = list(prediction_names) if prediction_names is not None else classes

    def name(p: int) -> str:  # a prediction
        if p < 0:
            return "no folder class"
        return pnames[p] if p < len(pnames) else str(int(p))

    variants = list(cf.variants)
    V = len(variants)
    test = np.asarray(cf.test_indices)
    pv = _check(predictions_by_split, "variants", len(test) * V)
    try:
        crossed_n = len(cf.split(CROSSED_SPLIT))
    except DataError:
        crossed_n = 0
    B = len(cf.backgrounds) if crossed_n else 0
    crossed_objects = np.asarray(cf.crossed_indices) if crossed_n else np.zeros(0, dtype=np.int64)
    ps = _check(predictions_by_split, CROSSED_SPLIT, crossed_n) if crossed_n else None
    pt = _check(predictions_by_split, "test", len(test))
    if pv is None and ps is None:
        raise DataError("build_gallery needs the model's predictions on the 'variants' or the 'crossed' split "
                        "(predictions_by_split={'variants': ..., 'crossed': ...}).")

    # per object: the prediction on the original image, and how many of its images are predicted otherwise
    ref: dict[int, int] = {}
    if pt is not None:  # the originals' predictions, where no variants were predicted
        ref = {int(i): int(p) for i, p in zip(test.tolist(), pt, strict=True)}
    vpred: dict[int, np.ndarray] = {}
    if pv is not None:
        grid = pv.reshape(len(test), V)
        for pos, i in enumerate(test.tolist()):
            vpred[i] = grid[pos]
            if "original" in variants:
                ref[i] = int(grid[pos, variants.index("original")])
    spred: dict[int, np.ndarray] = {}
    if ps is not None:
        grid = ps.reshape(len(crossed_objects), B)
        for pos, i in enumerate(crossed_objects.tolist()):
            spred[i] = grid[pos]
            if i not in ref:  # no original predicted: the object's most common prediction
                vals, counts = np.unique(grid[pos], return_counts=True)
                ref[i] = int(vals[counts.argmax()])
    objects = sorted(set(vpred) | set(spred))
    changes = {i: int(np.sum(spred[i] != ref[i])) if i in spred else 0 for i in objects}
    vchanges = {i: int(np.sum(vpred[i] != ref[i])) if i in vpred and i in ref else 0 for i in objects}
    order = sorted(objects, key=lambda i: (-changes[i], -vchanges[i], i))
    picked: list[int] = []
    for c in sorted({int(labels[i]) for i in objects}):
        picked += [i for i in order if int(labels[i]) == c][:per_class]
    if len(picked) > max_objects:
        keep = set(sorted(picked, key=lambda i: (-changes[i], -vchanges[i], i))[:max_objects])
        picked = [i for i in picked if i in keep]

    crossed = cf.split(CROSSED_SPLIT) if crossed_n else None
    shown_bg = list(range(min(B, max_backgrounds)))
    out_objects = []
    for i in picked:
        img = folder.image(i)
        r = ref.get(i)
        cells = [dict(zip(("src", "width", "height"), _encode(img, thumb), strict=True), name="original",
                      pred=name(r) if r is not None else "", changed=False, note="")]
        cells.append(dict(zip(("src", "width", "height"), _encode(_outline(img, folder.mask(i), thumb), thumb,
                                                               nearest=True), strict=True),
                          name="mask", pred="", changed=False, note="outline: the mask's edge"))
        if i in vpred:
            pos = int(np.searchsorted(test, i))
            for vi, v in enumerate(variants):
                if v == "original":
                    cells[0]["pred"] = name(int(vpred[i][vi]))
                    continue
                _, _, j = cf.split("variants").locate(pos * V + vi)
                p = int(vpred[i][vi])
                note = f"background of {cls(int(labels[j]))}" if v.startswith("mixed") and j >= 0 else ""
                cells.append(dict(zip(("src", "width", "height"), _encode(cf.render(i, v, j if j >= 0 else None),
                                                                       thumb), strict=True),
                                  name=v, pred=name(p), changed=r is not None and p != r, note=note))
        bgs = []
        if i in spred and crossed is not None:
            pos = int(np.searchsorted(crossed_objects, i))
            for slot in shown_bg:
                _, rel, j = crossed.locate(pos * B + slot)
                p = int(spred[i][slot])
                bgs.append(dict(zip(("src", "width", "height"), _encode(cf.render(i, rel, j), thumb), strict=True),
                                name=f"background {slot + 1}", pred=name(p), changed=r is not None and p != r,
                                note=f"from {cls(int(labels[j]))}"))
        out_objects.append({"image": int(i), "path": str(folder.paths[i]), "label": cls(int(labels[i])),
                            "changes": changes[i] if i in spred else None, "n_backgrounds": B if i in spred else 0,
                            "cells": cells, "backgrounds": bgs})
    return {
        "model": str(model),
        "columns": ["original", "mask", *[v for v in variants if v != "original"]],
        "n_objects": len(objects),
        "n_shown": len(out_objects),
        "n_backgrounds_shown": len(shown_bg),
        "selection": (f"{per_class} object(s) per class (at most {max_objects} in all), those whose prediction "
                      "changes on the most backgrounds of the crossed split first"),
        "objects": out_objects,
    }


def deploy_examples(counterfactuals: Any, *, n: int = 6, thumb: int = 72) -> dict[str, list[dict[str, Any]]]:
    """A few composites per deployment site (different objects on different scene slots), as thumbnails
    for the report's "Where you deploy it"."""
    cf = counterfactuals
    out: dict[str, list[dict[str, Any]]] = {}
    objects = list(cf.test_indices)
    for k, split in enumerate(cf.deploy_splits):
        site = split.split(":", 1)[1]
        n_slots = len(cf.split(split)) // max(1, len(objects))
        cells = []
        for j in range(min(n, len(objects), max(n_slots, 1) * len(objects))):
            i, slot = int(objects[j * max(1, len(objects) // n) % len(objects)]), j % max(n_slots, 1)
            src, w, h = _encode(cf.render_deploy(i, k, slot), thumb)
            cells.append({"src": src, "width": w, "height": h, "name": f"scene {slot}", "pred": None,
                          "changed": False, "note": None})
        out[site] = cells
    return out
