"""Analyses over training steps of a recorded run (``/models/<model>/steps/<step>/`` of a store).

:func:`series` reads the steps a :class:`probekit.Recorder` wrote and, per step, fits a linear probe
on one probe split and scores it on another (out-of-distribution), measures background sensitivity
on a grouped split, clusters neuron weight directions per weight layer, and projects weights on
known core / background bases. It returns a plain JSON-safe dict with one aligned list per metric
(``steps[i]`` <-> ``values[i]``), a ``by_step`` view, and ``best_step``: the step of best OOD probe
accuracy. :func:`plot_series` draws the curves to a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .store import open_store

__all__ = ["plot_series", "series"]


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def series(
    store_path: str | os.PathLike,
    model: str = "model",
    *,
    train: str = "train",
    test: str = "test_ood",
    test_id: str | None = None,
    layers: Sequence[str] | None = None,
    score_layer: str | None = None,
    grouped: str | None = None,
    weight_layers: Sequence[str] | None = None,
    bases: Mapping[str, tuple[Any, Any]] | None = None,
    steps: Sequence[int] | None = None,
    probe_C: float = 1.0,
    direction_tol: float = 10.0,
    direction_mass: float = 0.9,
) -> dict[str, Any]:
    """Per-step probe accuracy, background sensitivity, direction clusters and weight projections.

    Parameters
    ----------
    store_path : str or PathLike
        A store with recorded steps (see :class:`probekit.Recorder`).
    model : str, default "model"
    train, test : str, default "train", "test_ood"
        Probe splits: a :class:`probekit.analyses.LinearProbe` (``C=probe_C``) is fit on ``train``
        and scored on ``test`` at every step and layer. Skipped (``probe`` empty) when either split
        or the labels are missing.
    test_id : str, optional
        A second scoring split (in-distribution), reported as ``probe[layer]["id_accuracy"]``.
    layers : sequence of str, optional
        Activation layers to analyse; default every layer recorded on ``train``.
    score_layer : str, optional
        The layer whose OOD accuracy picks ``best_step``; default the last of ``layers``.
    grouped : str, optional
        A split with a ``group`` field for :func:`probekit.analyses.background_sensitivity`; default
        the first recorded split that has one (none: the entry is empty).
    weight_layers : sequence of str, optional
        Layers for :class:`probekit.analyses.DirectionClusters` (``tol=direction_tol``,
        ``mass=direction_mass``); default every layer with recorded weight rows.
    bases : dict of str to (core_basis, bg_basis), optional
        Orthonormal bases per weight layer for :func:`probekit.analyses.projection_series`
        (relative to the first step).
    steps : sequence of int, optional
        A subset of the recorded steps.

    Returns
    -------
    dict
        ``{"model", "steps", "layers", "score_layer", "probe": {layer: {"train", "test", "accuracy",
        "id_accuracy"}}, "background_sensitivity": {layer: {"split", "values"}}, "directions":
        {layer: {"n_directions", "n_clusters", "shares"}}, "projections": {layer: {"core",
        "background", "core_ratio", "background_ratio"}}, "best_step", "best_accuracy", "by_step":
        {str(step): {...}}}``; non-finite numbers are None.

    Raises
    ------
    DataError
        When the model has no recorded steps, or a named split / layer / step is not in the store.
    """
    from .analyses import LinearProbe, background_sensitivity, direction_series, projection_series

    out: dict[str, Any] = {"model": model}
    with open_store(store_path) as s:
        if model not in s.models:
            raise DataError(f"The store {str(store_path)!r} has no model {model!r}; it has {s.models}.")
        all_steps = s.steps(model)
        if not all_steps:
            raise DataError(
                f"The model {model!r} in {str(store_path)!r} has no recorded steps; record a run with "
                "probekit.Recorder first."
            )
        if steps is not None:
            missing = sorted(set(int(t) for t in steps) - set(all_steps))
            if missing:
                raise DataError(f"Steps {missing} are not recorded for {model!r}; it has {all_steps}.")
            all_steps = sorted(set(int(t) for t in steps))
        out["steps"] = all_steps
        recorded = s.acts_splits(model, all_steps[0])
        lay = list(layers) if layers is not None else s.layers(model, train if train in recorded else None,
                                                               all_steps[0])
        out["layers"] = lay
        score = score_layer if score_layer is not None else (lay[-1] if lay else None)
        out["score_layer"] = score

        # -- probe accuracy: fit on `train`, score on `test` (and `test_id`) -------------------------
        probe: dict[str, Any] = {}
        can_probe = all(sp in recorded and s.has_field(sp, "label") for sp in (train, test))
        if can_probe:
            y_tr, y_te = s.sample_field(train, "label"), s.sample_field(test, "label")
            y_id = s.sample_field(test_id, "label") if test_id is not None else None
            for layer in lay:
                acc, acc_id = [], []
                for st in all_steps:
                    p = LinearProbe(C=probe_C, backend="sklearn").fit(s.acts(model, train, layer, st)[:], y_tr)
                    acc.append(_num(p.score(s.acts(model, test, layer, st)[:], y_te)))
                    if test_id is not None:
                        acc_id.append(_num(p.score(s.acts(model, test_id, layer, st)[:], y_id)))
                probe[layer] = {"train": train, "test": test, "accuracy": acc,
                                "id_accuracy": acc_id if test_id is not None else None}
        out["probe"] = probe

        # -- background sensitivity on a grouped split ------------------------------------------------
        if grouped is None:
            grouped = next((sp for sp in recorded if s.has_field(sp, "group")), None)
        sens: dict[str, Any] = {}
        if grouped is not None:
            g = s.sample_field(grouped, "group")
            for layer in lay:
                vals = [_num(background_sensitivity(s.acts(model, grouped, layer, st), g, n_boot=1).layer)
                        for st in all_steps]
                sens[layer] = {"split": grouped, "values": vals}
        out["background_sensitivity"] = sens

        # -- weight directions and projections ---------------------------------------------------------
        wl = list(weight_layers) if weight_layers is not None else s.weight_layers(model, all_steps[0])
        dirs: dict[str, Any] = {}
        for layer in wl:
            ws = {st: s.weights(model, layer, st) for st in all_steps}
            r = direction_series(ws, tol=direction_tol, mass=direction_mass)
            dirs[layer] = {
                "n_directions": [int(v) for v in r.series("n_directions")],
                "n_clusters": [int(v) for v in r.series("n_clusters")],
                "shares": [[float(x) for x in np.asarray(res.shares)[: int(res.n_directions)]] for res in r.results],
            }
        out["directions"] = dirs
        proj: dict[str, Any] = {}
        for layer, (core, bg) in (bases or {}).items():
            ws = {st: s.weights(model, layer, st) for st in all_steps}
            r = projection_series(ws, core, bg)
            proj[layer] = {k: [None if v is None else _num(v) for v in r.series(k)]
                           for k in ("core", "background", "core_ratio", "background_ratio")}
        out["projections"] = proj

    # -- best step: the step of best OOD probe accuracy on the score layer ---------------------------------
    out["best_step"] = out["best_accuracy"] = None
    if score in probe:
        acc = np.array([-np.inf if a is None else a for a in probe[score]["accuracy"]])
        if np.isfinite(acc).any():
            i = int(np.argmax(acc))  # first step on ties
            out["best_step"], out["best_accuracy"] = int(all_steps[i]), float(acc[i])

    by_step: dict[str, Any] = {}
    for i, st in enumerate(all_steps):
        by_step[str(st)] = {
            "probe_ood": {k: v["accuracy"][i] for k, v in probe.items()},
            "probe_id": {k: v["id_accuracy"][i] for k, v in probe.items() if v["id_accuracy"] is not None},
            "background_sensitivity": {k: v["values"][i] for k, v in sens.items()},
            "n_directions": {k: v["n_directions"][i] for k, v in dirs.items()},
            "projections": {k: {m: v[m][i] for m in v} for k, v in proj.items()},
        }
    out["by_step"] = by_step
    return out


def plot_series(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw the curves of a :func:`series` result over steps to a PNG (matplotlib, Agg backend).

    One panel per metric present (probe accuracy, background sensitivity, direction count, weight
    projections); a dotted line marks ``best_step``. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(result["steps"])
    panels = []
    if result.get("probe"):
        panels.append(("probe accuracy", {f"{k} OOD": v["accuracy"] for k, v in result["probe"].items()}
                       | {f"{k} ID": v["id_accuracy"] for k, v in result["probe"].items() if v.get("id_accuracy")}))
    if result.get("background_sensitivity"):
        panels.append(("background sensitivity", {k: v["values"] for k, v in result["background_sensitivity"].items()}))
    if result.get("directions"):
        panels.append(("directions (90% mass)", {k: v["n_directions"] for k, v in result["directions"].items()}))
    if result.get("projections"):
        panels.append(("weight projection", {f"{k} {m}": v[m] for k, v in result["projections"].items()
                                             for m in ("core", "background")}))
    if not panels:
        raise DataError("The series result has no metric to plot (no probe, sensitivity, directions or projections).")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels, strict=True):
        for label, ys in curves.items():
            ax.plot(steps, [np.nan if y is None else y for y in ys], marker="o", ms=3, label=label)
        if result.get("best_step") is not None:
            ax.axvline(result["best_step"], color="grey", ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
