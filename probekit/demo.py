"""``probekit demo``: the whole pipeline on built-in data, on CPU, in minutes, in two parts.

**Your own images.** A folder of generated shapes with masks is written as a user's folder would be
(``DIR/own-images/images/<class>/*.png`` and ``masks/``), whose background colour equals the class.
Two copies of a small CNN are trained: one on such images (it learns the colour: a shortcut) and one
on random background colours (it learns the shape). Each is saved as a safetensors checkpoint and
audited with :func:`probekit.model_audit` (the ``probekit audit`` command) on the folder: one verdict
flagged, one clean, each with its report in ``DIR/own-images/<model>/``.

**Distillation.** A teacher CNN learns digits on backgrounds from a broad family (so it becomes
background-invariant); a student of the same architecture is distilled to the teacher's 128-d
representation with MSE on in-distribution backgrounds only (the feature-contamination paper's first
experiment, in miniature; docs/EXPERIMENTS.md). Both are extracted on the same samples into one
store, together with both networks at initialisation (``/models/<m>/steps/0``, the reference that
separates learned sensitivity from features never removed); every analysis runs; the report is
written (``DIR/acts.h5``, ``DIR/audit.json``, ``DIR/report.html``).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .analyses import LinearProbe, background_attribution_share
from .audit import Extra, audit
from .datasets import get_dataset, write_image_folder
from .errors import DataError
from .experiments import DigitCNN, torch_threads, train_student, train_teacher
from .experiments.shortcut import train_shapes_cnn
from .extraction import extract
from .model_audit import audit_model
from .store import open_store

__all__ = ["DemoResult", "run_demo"]

LAYERS = ["block1", "block2", "block3", "rep", "@output"]
SPLITS = ["train", "test_id", "test_ood", "crossed", "variants"]


@dataclass
class DemoResult:
    out_dir: Path
    store: Path
    audit_json: Path
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)
    image_audits: dict[str, Path] = field(default_factory=dict)  # model -> its audit.json (own images)


def run_demo(
    out_dir: str | os.PathLike = "probekit-demo",
    *,
    seed: int = 0,
    teacher_epochs: int = 60,
    student_epochs: int = 150,
    n_attribution: int = 6,
    images: bool = True,
    shapes_epochs: int = 20,
    progress: bool = True,
    overwrite: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """The two parts of the demo (module docstring); ``images=False`` runs the distillation part only.

    Writes ``out_dir/acts.h5``, ``out_dir/audit.json``, ``out_dir/report.html`` and, for the images
    part, ``out_dir/own-images/{images,masks,shortcut,robust}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "acts.h5"
    if store.exists() and not overwrite:
        raise DataError(f"{str(store)!r} exists; remove it or run the demo with another -o DIR.")
    times: dict[str, float] = {}
    image_audits = _own_images(out / "own-images", seed, shapes_epochs, progress, times) if images else {}

    t0 = time.perf_counter()
    # One torch thread, always: the result then does not depend on the machine's load (summation
    # order changes with the thread count: seed 0 gave student rep sensitivity 0.178 with 2 threads and
    # 0.182 with 1). It costs ~1.4x on an idle 2-core machine and is 10-25x faster than 2 threads
    # when other processes keep the cores busy (15+40 epochs: 261 s with 2 threads under load 4).
    with torch_threads(1):
        torch.manual_seed(seed)
        teacher_init = DigitCNN("classifier")  # train_teacher seeds the same way: this is its init
        with _epochs_bar(teacher_epochs, "train teacher (broad backgrounds)", progress) as bar:
            teacher = train_teacher(seed=seed, epochs=teacher_epochs, on_epoch=lambda e, m: bar.update(1))
        torch.manual_seed(seed + 1000)
        student_init = DigitCNN("representation")
        with _epochs_bar(student_epochs, "distil student (ID backgrounds)", progress) as bar:
            student = train_student(teacher, seed=seed, epochs=student_epochs,
                                    init=copy.deepcopy(student_init), on_epoch=lambda e, m: bar.update(1))
    times["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mode = "overwrite"
    for split in SPLITS:
        data = get_dataset("bgdigits", split, seed=seed)
        extract({"teacher": teacher, "student": student}, data, layers=LAYERS, out=store, split=split,
                mode=mode, batch_size=256, progress=progress, source="probekit.demo:DigitCNN",
                weights_layers=["block1.0", "block2.0", "block3.0"])
        mode = "resume"
        extract({"teacher": teacher_init, "student": student_init}, data, layers=LAYERS, out=store,
                split=split, mode="resume", batch_size=256, progress=progress, step=0,
                source="probekit.demo:DigitCNN", weights_layers=["block1.0", "block2.0", "block3.0"])
    times["extract"] = time.perf_counter() - t0

    def attribution(doc: Any) -> dict[str, Any]:  # an entry of the document, handed to audit()
        t1 = time.perf_counter()
        entry = _attribution({"teacher": teacher, "student": student}, store, seed, n_attribution)
        times["attribution"] = time.perf_counter() - t1
        return entry

    t0 = time.perf_counter()
    result = audit(store, progress=progress, extras=[Extra("attribution", compute=attribution)])
    times["audit"] = time.perf_counter() - t0 - times["attribution"]
    audit_json = result.to_json(out / "audit.json")
    report = result.to_html(out / "report.html")
    return DemoResult(out, store, audit_json, report, times, image_audits)


def _own_images(out: Path, seed: int, epochs: int, progress: bool, times: dict[str, float]) -> dict[str, Path]:
    """Part one: a shortcut-prone and a robust CNN, saved and audited on a folder of images with masks."""
    t0 = time.perf_counter()
    images, masks = write_image_folder(out, split="test", background="class", seed=seed, n=120)
    weights = {}
    for name, bg in (("shortcut", "class"), ("robust", "random")):
        if progress:
            print(f"probekit demo: training the {name} CNN on shapes with {bg} background colours", flush=True)
        net = train_shapes_cnn(bg, seed=seed, epochs=epochs)
        weights[name] = out / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights[name]))
    times["own images: train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = {}
    for name, w in weights.items():
        audit_model("probekit.experiments.shortcut:ShapesCNN", images, masks=masks, weights=w, out=out / name,
                    name=name, n_inits=3, seed=seed, progress=progress)
        done[name] = out / name / "audit.json"
    times["own images: audit"] = time.perf_counter() - t0
    return done


def _epochs_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, leave=False)


def _attribution(models: dict[str, torch.nn.Module], store: Path, seed: int, n: int) -> dict[str, Any]:
    """Integrated gradients of the class logit of a linear probe on each model's representation.

    The probe (fit on the train split's ``rep`` activations) turns both networks into classifiers the
    same way, so their attributions are comparable. Images: the first ``n`` OOD test digits.
    """
    data = get_dataset("bgdigits", "test_ood", seed=seed).arrays(np.arange(max(n, 64)))
    x = torch.from_numpy(data["x"])
    out: dict[str, Any] = {}
    with open_store(store) as s:
        for name, net in models.items():
            X = s.acts(name, "train", "rep")[:]
            probe = LinearProbe(C=1.0).fit(X, s.sample_field("train", "label")[: len(X)])
            head = torch.nn.Linear(X.shape[1], len(probe.classes_))
            with torch.no_grad():
                coef = np.atleast_2d(probe.coef_)
                head.weight.copy_(torch.from_numpy(coef).float())
                head.bias.copy_(torch.from_numpy(np.atleast_1d(probe.intercept_)).float())
            clf = torch.nn.Sequential(_Features(net), head).eval()
            r = background_attribution_share(clf, x, data["mask"], target=[int(t) for t in data["label"]],
                                             n_steps=32, batch_size=16, return_maps=True)
            shares = np.asarray(r.per_sample, dtype=float)
            boot = np.random.default_rng(seed).integers(0, shares.size, (500, shares.size))
            means = shares[boot].mean(axis=1)
            ex = []
            for i in range(min(n, len(x))):
                ex.append({
                    "input": np.transpose(data["x"][i], (1, 2, 0)).round(3).tolist(),
                    "attr": r.maps[i].round(5).tolist(),
                    "mask": data["mask"][i].astype(int).tolist(),
                    "background_share": float(shares[i]),
                })
            out[name] = {"split": "test_ood", "n_samples": int(shares.size),
                         "share": {"value": float(shares.mean()),
                                   "ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]},
                         "background_pixel_fraction": float(1 - data["mask"].mean()),
                         "examples": ex}
    return out


class _Features(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)
