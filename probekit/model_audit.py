"""``probekit audit``: one command from a model (and a checkpoint) and an image folder to the verdict.

:func:`audit_model` loads the model the way the user names it (``timm:NAME``, ``torchvision:NAME``,
``package.module:callable``, or a module), builds the image splits of the folder with the model's own
preprocessing (the counterfactuals of :class:`probekit.datasets.Counterfactuals`: ``train``,
``test``, ``variants`` and the crossed ``stress``), extracts the model's output and a few layers
spread over its depth, the same layers of seeded initialisations (``<name>@init<k>``, the reference of
the representation's background flag) and of an optional teacher, audits the store and writes
``OUT/acts.h5``, ``OUT/audit.json`` and ``OUT/report.html``. A rerun continues an interrupted one: the
extraction resumes at its last committed row. When the foreground is approximate (boxes or GrabCut),
the behaviour figures are recomputed with every mask eroded and dilated by a few pixels, so the report
shows how much the verdict moves with the masks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DataError
from .extractors import default_layers

__all__ = ["audit_model", "default_layers"]

SPLITS = ("train", "test", "stress", "variants")


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"probekit audit: {text}", file=sys.stderr, flush=True)


def _seeded_init(spec: Any, loaded: Any, k: int) -> nn.Module:
    """The same architecture freshly initialised with seed ``k`` (no weights loaded)."""
    from .models import load_model

    torch.manual_seed(10_000 + k)
    if isinstance(spec, nn.Module):
        import copy

        net = copy.deepcopy(spec)
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return net.eval()
    return load_model(spec, model_args=loaded.model_args).module.eval()


def _predict(net: nn.Module, data: Any, batch_size: int, device: str) -> np.ndarray:
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    with torch.no_grad():
        for batch in loader:
            out.append(net(batch["x"].to(device)).argmax(dim=1).cpu().numpy())
    return np.concatenate(out)


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
    device: str = "cpu",
    seed: int = 0,
    n_boot: int = 500,
    n_perm: int = 200,
    progress: bool = True,
) -> Any:
    """Audit a model on a folder of images with foregrounds; write the store, the JSON and the report.

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
    n_backgrounds : backgrounds of the crossed stress split
    n_inits : seeded initialisations extracted as the representation's reference (0: none)
    mask_check : erode and dilate approximate masks by this many pixels to show how the verdict moves
    """
    from .audit import audit
    from .datasets import Counterfactuals
    from .extraction import extract
    from .models import load_model, preprocessing_for

    if isinstance(foreground, str) and foreground != "auto":
        raise DataError(f"--foreground must be 'auto' (GrabCut); got {foreground!r}. Give --masks or --boxes otherwise.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"The output {str(out)!r} is a file; give a folder for -o (acts.h5, audit.json, report.html).")
    loaded = load_model(model, weights=weights, model_args=model_args, pretrained=pretrained,
                        allow_pickle=allow_pickle)
    transform, pre = preprocessing_for(loaded, image_size=image_size, mean=mean, std=std)
    _say(progress, f"preprocessing: {pre.get('note') or ', '.join(pre.get('steps', []))}")
    folder_kwargs = {k: v for k, v in (("masks", masks), ("boxes", boxes), ("foreground", foreground),
                                       ("factors", factors)) if v is not None}
    cf = Counterfactuals(data, seed=seed, n_backgrounds=n_backgrounds, test_fraction=test_fraction,
                         transform=transform, **folder_kwargs)
    if not cf.folder.has_labels:
        raise DataError(f"The image folder {str(data)!r} has no class folders; the audit needs each image's "
                        "class (DIR/<class>/<image>).")
    splits = {sp: cf.split(sp) for sp in SPLITS if sp != "train" or len(cf.train_indices)}
    chosen = list(layers) if layers else default_layers(loaded.module)
    chosen = [la for la in chosen if la != "@output"] + ["@output"]
    nets: dict[str, nn.Module] = {name: loaded.module}
    roles = {name: "student" if teacher is not None else "model"}
    sources = {name: loaded.source}
    if teacher is not None:
        t = load_model(teacher, weights=teacher_weights, model_args=teacher_args, allow_pickle=allow_pickle)
        nets["teacher"], roles["teacher"], sources["teacher"] = t.module, "teacher", t.source
    inits = {f"{name}@init{k}": _seeded_init(model, loaded, k) for k in range(n_inits)}
    out.mkdir(parents=True, exist_ok=True)
    store = out / "acts.h5"
    mode = "resume" if store.exists() else "overwrite"
    _say(progress, f"layers {chosen}; {len(cf.test_indices)} test images, {len(cf.stress_indices)} objects x "
                   f"{n_backgrounds} backgrounds; store {store}" + (" (continuing)" if mode == "resume" else ""))
    for i, (sp, ds) in enumerate(splits.items()):
        _say(progress, f"[{i + 1}/{len(splits)}] extracting {sp} ({len(ds)} images): {', '.join(nets)}")
        for nm, net in nets.items():
            extract(net, ds, layers=chosen, out=store, split=sp, name=nm, role=roles[nm], source=sources[nm],
                    batch_size=batch_size, device=device, mode=mode, progress=progress,
                    preprocessing=pre)
            mode = "resume"
        if sp == "stress":  # the initialisations are the representation's reference: the crossed split only
            for nm, net in inits.items():
                extract(net, ds, layers=chosen, out=store, split=sp, name=nm, role="model",
                        source=loaded.source, batch_size=batch_size, device=device, mode="resume",
                        progress=progress, weights_layers=False, preprocessing=pre)
    _say(progress, "auditing")
    result = audit(store, train="train", test_id="test", test_ood="", stress="stress", variants="variants",
                   n_boot=n_boot, n_perm=n_perm, random_state=seed, progress=progress)
    doc = result.data
    doc["preprocessing"] = pre
    if cf.folder.mode != "masks" and mask_check > 0:
        _say(progress, f"how the verdict moves with the masks (eroded / dilated by {mask_check} px)")
        doc["mask_sensitivity"] = _mask_sensitivity(nets, doc, data, folder_kwargs, cf, transform, mask_check,
                                                    batch_size, device, seed)
    result.to_json(out / "audit.json")
    result.to_html(out / "report.html")
    _say(progress, f"wrote {out / 'audit.json'} and {out / 'report.html'}")
    return result


def _mask_sensitivity(nets: Mapping[str, nn.Module], doc: Mapping[str, Any], data: Any,
                      folder_kwargs: Mapping[str, Any], cf: Any, transform: Any, k: int, batch_size: int,
                      device: str, seed: int) -> dict[str, Any]:
    """Behaviour figures of models read from their own output, with every mask eroded / dilated by k px."""
    from .analyses import background_behaviour
    from .datasets import Counterfactuals

    out: dict[str, Any] = {"pixels": k, "models": {}}
    heads = [m for m in nets if (doc["models"].get(m, {}).get("behaviour") or {}).get("from_output")]
    for adjust in (-k, k):
        alt = Counterfactuals(data, seed=seed, n_backgrounds=cf.n_backgrounds, test_fraction=cf.test_fraction,
                              transform=transform, mask_adjust=adjust, **folder_kwargs)
        ds = alt.split("stress")
        where = np.array([ds.locate(i)[::2] for i in range(len(ds))])  # (foreground image, background image)
        labels = alt.folder.labels
        for m in heads:
            pred = _predict(nets[m], ds, batch_size, device)
            r = background_behaviour(pred, where[:, 0], where[:, 1], label=labels[where[:, 0]],
                                     background_label=labels[where[:, 1]], n_boot=200, n_perm=100,
                                     random_state=seed)
            out["models"].setdefault(m, {})["eroded" if adjust < 0 else "dilated"] = {
                "flip_rate": r.flip_rate, "pull": r.pull, "follows_background": r.follows_background,
                "flagged": r.flagged}
    return out
