"""Analyses over training steps of a recorded run (``/models/<model>/steps/<step>/`` of a store).

:func:`series` reads the steps a :class:`probekit.Recorder` wrote, whatever its probe splits are
called, and per step and layer computes:

- **probe accuracy**: a linear probe fit on one labelled split (``train`` when there is one, else the
  first labelled split) and scored on every other labelled split; with a single labelled split (the
  Recorder's default, ``probe``), the accuracy is cross-validated within it (stratified folds);
- **CKA to the last step**: debiased linear CKA of the step's representation of the probe split to the
  last step's (1 = the representation has settled);
- **background figures** where a split allows them: background sensitivity on a split with a
  ``group`` field, the background factors' share of variance on a split with ``factors``;
- **direction counts** from the stored neuron weight rows, and optional projections on known core /
  background bases.

It returns a plain JSON-safe dict with one aligned list per metric (``steps[i]`` <-> ``values[i]``), a
``by_step`` view, ``best_step`` (the step of best probe accuracy on the scoring split) and ``skipped``
(what could not be computed, and why). :func:`plot_series` draws the curves to a PNG.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from .analyses import (
    BackgroundCorrelation,
    LinearProbe,
    background_sensitivity,
    direction_series,
    linear_cka,
    projection_series,
)
from .errors import DataError
from .store import open_store

__all__ = ["plot_series", "series"]


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _cv_folds(y: np.ndarray, n_folds: int) -> int:
    """Folds of a stratified split: at most ``n_folds``, at most the rarest class's count (0: impossible)."""
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2:
        return 0
    k = min(int(n_folds), int(counts.min()))
    return k if k >= 2 else 0


def _cv_accuracy(X: np.ndarray, y: np.ndarray, k: int, C: float, seed: int) -> float | None:
    """Mean held-out accuracy of a LinearProbe over ``k`` stratified folds (pooled over rows)."""
    correct = 0
    for tr, te in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y):
        p = LinearProbe(C=C, backend="sklearn").fit(X[tr], y[tr])
        correct += int(np.sum(p.predict(X[te]) == y[te]))
    return _num(correct / len(y))


def series(
    store_path: str | os.PathLike,
    model: str = "model",
    *,
    train: str | None = None,
    test: str | None = None,
    test_id: str | None = None,
    layers: Sequence[str] | None = None,
    score_layer: str | None = None,
    grouped: str | None = None,
    factored: str | None = None,
    weight_layers: Sequence[str] | None = None,
    bases: Mapping[str, tuple[Any, Any]] | None = None,
    steps: Sequence[int] | None = None,
    probe_C: float = 1.0,
    cv_folds: int = 5,
    random_state: int = 0,
    direction_tol: float = 10.0,
    direction_mass: float = 0.9,
) -> dict[str, Any]:
    """Per-step probe accuracy, CKA to the last step, background figures, direction counts, projections.

    Parameters
    ----------
    store_path : str or PathLike
        A store with recorded steps (see :class:`probekit.Recorder`).
    model : str, default "model"
    train : str, optional
        The split a :class:`probekit.analyses.LinearProbe` (``C=probe_C``) is fit on at every step and
        layer. Default: ``"train"`` when recorded with labels, else the first recorded split with labels.
    test : str, optional
        The scoring split behind ``accuracy`` and ``best_step``. Default: ``"test_ood"`` when recorded
        with labels, else the first other labelled split. Every other labelled split is scored too
        (``probe[layer]["scores"]``). With no second labelled split, ``accuracy`` is the accuracy
        cross-validated within ``train`` (``cv_folds`` stratified folds; ``method`` "cv").
    test_id : str, optional
        An in-distribution scoring split, reported as ``probe[layer]["id_accuracy"]``. Default:
        ``"test_id"`` when recorded with labels and not the scoring split.
    layers : sequence of str, optional
        Activation layers to analyse; default every layer recorded at the first step.
    score_layer : str, optional
        The layer whose probe accuracy picks ``best_step``; default the last of ``layers``.
    grouped : str, optional
        A split with a ``group`` field for :func:`probekit.analyses.background_sensitivity`; default
        the first recorded split that has one (none: the entry is empty).
    factored : str, optional
        A split with background ``factors`` for :class:`probekit.analyses.BackgroundCorrelation`
        (parametric null): each unit's R² on the factors (least squares with intercept), mean over units,
        and its null; default
        the first recorded split that has factors.
    weight_layers : sequence of str, optional
        Layers for :class:`probekit.analyses.DirectionClusters` (``tol=direction_tol``,
        ``mass=direction_mass``); default every layer with recorded weight rows.
    bases : dict of str to (core_basis, bg_basis), optional
        Orthonormal bases per weight layer for :func:`probekit.analyses.projection_series`
        (relative to the first step).
    steps : sequence of int, optional
        A subset of the recorded steps.
    cv_folds, random_state : int
        Folds and seed of the cross-validated accuracy.

    Returns
    -------
    dict
        ``{"model", "steps", "splits", "layers", "score_layer", "probe": {layer: {"method": "holdout" |
        "cv", "train", "test", "accuracy", "id_accuracy", "scores": {split: [...]}, "folds"}},
        "cka_to_last": {layer: {"split", "values"}}, "background_sensitivity": {layer: {"split",
        "values"}}, "background_share": {layer: {"split", "values", "null"}}, "directions": {layer:
        {"n_directions", "n_clusters", "shares"}}, "projections": {layer: {"core", "background",
        "core_ratio", "background_ratio"}}, "best_step", "best_accuracy", "skipped": [{"analysis",
        "reason"}], "by_step": {str(step): {...}}}``; non-finite numbers are None.

    Raises
    ------
    DataError
        When the model has no recorded steps, or a named layer / step is not in the store. A named split
        that is not recorded at every step skips its analysis (an entry in ``skipped``).
    """
    with open_store(store_path) as s:
        all_steps = _recorded_steps(s, store_path, model, steps)
        plan = _plan(s, model, all_steps, train=train, test=test, test_id=test_id, layers=layers,
                     score_layer=score_layer, grouped=grouped, factored=factored)
        skipped = plan.skipped
        probe = _probe_accuracy(s, plan, probe_C, cv_folds, random_state)
        cka = _cka_to_last(s, plan)
        sens, share = _background_figures(s, plan, random_state)
        dirs = _directions(s, plan, weight_layers, direction_tol, direction_mass)
        proj = _projections(s, plan, bases)
    out: dict[str, Any] = {
        "model": model, "steps": all_steps, "splits": plan.recorded, "layers": plan.layers,
        "score_layer": plan.score_layer, "probe": probe, "cka_to_last": cka, "background_sensitivity": sens,
        "background_share": share, "directions": dirs, "projections": proj,
    }
    out["best_step"], out["best_accuracy"] = _best_step(probe, plan.score_layer, all_steps)
    out["skipped"] = skipped
    out["by_step"] = _by_step(all_steps, probe, cka, sens, share, dirs, proj)
    return out


def _recorded_steps(s: Any, store_path: str | os.PathLike, model: str, steps: Sequence[int] | None) -> list[int]:
    """The recorded steps of ``model`` to analyse (all, or the ``steps`` asked for, each recorded)."""
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
    return all_steps


@dataclasses.dataclass
class _Plan:
    """Which splits and layers each analysis of :func:`series` reads, and what it skips (and why)."""

    model: str
    steps: list[int]
    recorded: list[str]  # splits recorded at every step
    absent: dict[str, str]  # argument name -> a named split that is not recorded at every step
    labelled: list[str]
    fit: str | None  # the probe's training split
    primary: str | None  # the scoring split (None: cross-validate within ``fit``)
    id_split: str | None
    lay_split: str | None  # the split whose layers are read (and CKA is computed on)
    layers: list[str]
    score_layer: str | None
    grouped: str | None
    factored: str | None
    skipped: list[dict[str, str]]


def _plan(s: Any, model: str, all_steps: list[int], *, train: str | None, test: str | None, test_id: str | None,
          layers: Sequence[str] | None, score_layer: str | None, grouped: str | None,
          factored: str | None) -> _Plan:
    """Resolve the split and layer arguments against the store; record the named splits that are absent."""
    recorded = [sp for sp in s.acts_splits(model, all_steps[0])
                if all(sp in s.acts_splits(model, st) for st in all_steps)]
    absent = {name: sp for name, sp in (("train", train), ("test", test), ("test_id", test_id),
                                         ("grouped", grouped), ("factored", factored))
              if sp is not None and sp not in recorded}
    skipped: list[dict[str, str]] = []
    for name, sp in absent.items():
        analysis = {"grouped": "background sensitivity over training",
                    "factored": "background share over training"}.get(name, "probe accuracy")
        skipped.append({"analysis": analysis, "reason": f"the split {sp!r} ({name}) is not recorded at "
                        f"every step; the recorded splits are {recorded}"})
    labelled = [sp for sp in recorded if s.has_field(sp, "label")]
    fit = train if train in recorded else ("train" if "train" in labelled else next(iter(labelled), None))
    lay_split = fit if fit is not None else next(iter(recorded), None)
    if layers is not None:
        lay = list(layers)
        have = s.layers(model, lay_split, all_steps[0]) if lay_split is not None else []
        missing_l = [la for la in lay if la not in have]
        if missing_l:
            raise DataError(f"The model {model!r} has no recorded layers {missing_l}; it has {have}.")
    else:
        lay = s.layers(model, lay_split, all_steps[0]) if lay_split is not None else []
    score = score_layer if score_layer is not None else (lay[-1] if lay else None)
    others = [sp for sp in labelled if sp != fit]
    primary = test if test is not None else ("test_ood" if "test_ood" in others else next(iter(others), None))
    id_split = test_id if test_id is not None else (
        "test_id" if "test_id" in others and primary != "test_id" else None)
    if "grouped" in absent:
        grouped = None
    elif grouped is None:
        grouped = next((sp for sp in recorded if s.has_field(sp, "group")), None)
    if "factored" in absent:
        factored = None
    elif factored is None:
        factored = next((sp for sp in recorded if s.factor_names(sp)), None)
    return _Plan(model=model, steps=all_steps, recorded=recorded, absent=absent, labelled=labelled, fit=fit,
                 primary=primary, id_split=id_split, lay_split=lay_split, layers=lay, score_layer=score,
                 grouped=grouped, factored=factored, skipped=skipped)


def _probe_accuracy(s: Any, plan: _Plan, probe_C: float, cv_folds: int, random_state: int) -> dict[str, Any]:
    """Per layer: a probe fit on one split and scored on the others (or cross-validated within it)."""
    fit, primary, id_split, model = plan.fit, plan.primary, plan.id_split, plan.model
    probe: dict[str, Any] = {}
    if plan.absent.keys() & {"train", "test", "test_id"}:
        return probe  # the absent split is in skipped already
    if fit is None or fit not in plan.labelled:
        plan.skipped.append({"analysis": "probe accuracy", "reason": (
            "no recorded probe split has labels" if fit is None else f"the split {fit!r} has no labels")})
        return probe
    if primary is not None and primary not in plan.labelled:
        plan.skipped.append({"analysis": "probe accuracy", "reason": f"the split {primary!r} has no labels"})
        return probe
    y_fit = np.asarray(s.sample_field(fit, "label"))
    folds = _cv_folds(y_fit, cv_folds) if primary is None else 0
    if primary is None and folds == 0:
        plan.skipped.append({"analysis": "probe accuracy", "reason": (
            f"one labelled split ({fit!r}) and too few rows per class in it to cross-validate "
            "(a class with fewer than 2 rows, or a single class)")})
        return probe
    others = [sp for sp in plan.labelled if sp != fit]
    ys = {sp: np.asarray(s.sample_field(sp, "label")) for sp in others}
    for layer in plan.layers:
        scores: dict[str, list[float | None]] = {sp: [] for sp in others}
        cv: list[float | None] = []
        for st in plan.steps:
            X = np.asarray(s.acts(model, fit, layer, st)[:])
            if primary is None:
                cv.append(_cv_accuracy(X, y_fit, folds, probe_C, random_state))
            if others:
                p = LinearProbe(C=probe_C, backend="sklearn").fit(X, y_fit)
                for sp in others:
                    scores[sp].append(_num(p.score(s.acts(model, sp, layer, st)[:], ys[sp])))
        probe[layer] = {
            "method": "cv" if primary is None else "holdout", "train": fit,
            "test": primary if primary is not None else fit,
            "accuracy": cv if primary is None else scores[primary],
            "id_accuracy": scores[id_split] if id_split is not None else None,
            "scores": scores, "folds": folds or None,
        }
    return probe


def _cka_to_last(s: Any, plan: _Plan) -> dict[str, Any]:
    """Debiased linear CKA of each step's representation of the layer split to the last step's."""
    cka: dict[str, Any] = {}
    sp, steps = plan.lay_split, plan.steps
    if sp is None or len(steps) < 2:
        return cka
    n = s.n_rows(sp, plan.model, steps[-1])
    if n < 4:
        plan.skipped.append({"analysis": "CKA to the last step",
                             "reason": f"the split {sp!r} has {n} rows; debiased CKA needs 4"})
        return cka
    for layer in plan.layers:
        last = np.asarray(s.acts(plan.model, sp, layer, steps[-1])[:])
        vals = [_num(linear_cka(np.asarray(s.acts(plan.model, sp, layer, st)[:]), last, debiased=True))
                for st in steps]
        cka[layer] = {"split": sp, "values": vals}
    return cka


def _background_figures(s: Any, plan: _Plan, random_state: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Background sensitivity on the grouped split, the factors' share of unit variance on the factored one."""
    grouped, factored, model = plan.grouped, plan.factored, plan.model
    sens: dict[str, Any] = {}
    if grouped is not None:
        g = s.sample_field(grouped, "group")
        for layer in plan.layers:
            vals = [_num(background_sensitivity(s.acts(model, grouped, layer, st), g, n_boot=1).layer)
                    for st in plan.steps]
            sens[layer] = {"split": grouped, "values": vals}
    share: dict[str, Any] = {}
    if factored is not None:
        F = np.asarray(s.sample_field(factored, "factors"), dtype=float)
        names = s.factor_names(factored)
        for layer in plan.layers:
            vals, null = [], []
            for st in plan.steps:
                r = BackgroundCorrelation(n_permutations=0, random_state=random_state).fit(
                    s.acts(model, factored, layer, st), F, factor_names=names).result_
                vals.append(_num(r.mean_factor_r2))
                null.append(_num(r.null_factor_r2))
            share[layer] = {"split": factored, "values": vals, "null": null}
    if grouped is None and factored is None and not plan.absent.keys() & {"grouped", "factored"}:
        plan.skipped.append({"analysis": "background over training", "reason": (
            "no recorded probe split has a group field (the same foreground on several backgrounds) "
            "or background factors")})
    return sens, share


def _directions(s: Any, plan: _Plan, weight_layers: Sequence[str] | None, tol: float,
                mass: float) -> dict[str, Any]:
    """Direction counts and cluster shares of the stored weight rows, per layer stored at every step."""
    model, steps = plan.model, plan.steps
    wl = list(weight_layers) if weight_layers is not None else s.weight_layers(model, steps[0])
    wl = [la for la in wl if all(la in s.weight_layers(model, st) for st in steps)]
    if not wl:
        plan.skipped.append({"analysis": "directions over training",
                             "reason": "no weight rows are stored at every recorded step"})
    dirs: dict[str, Any] = {}
    for layer in wl:
        ws = {st: s.weights(model, layer, st) for st in steps}
        r = direction_series(ws, tol=tol, mass=mass)
        dirs[layer] = {
            "n_directions": [int(v) for v in r.series("n_directions")],
            "n_clusters": [int(v) for v in r.series("n_clusters")],
            "shares": [[float(x) for x in np.asarray(res.shares)[: int(res.n_directions)]] for res in r.results],
        }
    return dirs


def _projections(s: Any, plan: _Plan, bases: Mapping[str, tuple[Any, Any]] | None) -> dict[str, Any]:
    """Norms of the weights' projections on the given core / background bases, per step."""
    proj: dict[str, Any] = {}
    for layer, (core, bg) in (bases or {}).items():
        ws = {st: s.weights(plan.model, layer, st) for st in plan.steps}
        r = projection_series(ws, core, bg)
        proj[layer] = {k: [None if v is None else _num(v) for v in r.series(k)]
                       for k in ("core", "background", "core_ratio", "background_ratio")}
    return proj


def _best_step(probe: Mapping[str, Any], score: str | None, steps: list[int]) -> tuple[int | None, float | None]:
    """The step of best probe accuracy on the score layer (the first on ties), and that accuracy."""
    if score not in probe:
        return None, None
    acc = np.array([-np.inf if a is None else a for a in probe[score]["accuracy"]])
    if not np.isfinite(acc).any():
        return None, None
    i = int(np.argmax(acc))
    return int(steps[i]), float(acc[i])


def _by_step(steps: list[int], probe: Mapping[str, Any], cka: Mapping[str, Any], sens: Mapping[str, Any],
             share: Mapping[str, Any], dirs: Mapping[str, Any], proj: Mapping[str, Any]) -> dict[str, Any]:
    """The per-metric lists regrouped by step: ``{str(step): {metric: {layer: value}}}``."""
    by_step: dict[str, Any] = {}
    for i, st in enumerate(steps):
        by_step[str(st)] = {
            "probe_ood": {k: v["accuracy"][i] for k, v in probe.items()},
            "probe_id": {k: v["id_accuracy"][i] for k, v in probe.items() if v["id_accuracy"] is not None},
            "cka_to_last": {k: v["values"][i] for k, v in cka.items()},
            "background_sensitivity": {k: v["values"][i] for k, v in sens.items()},
            "background_share": {k: v["values"][i] for k, v in share.items()},
            "n_directions": {k: v["n_directions"][i] for k, v in dirs.items()},
            "projections": {k: {m: v[m][i] for m in v} for k, v in proj.items()},
        }
    return by_step


_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _probe_curves(result: Mapping[str, Any]) -> dict[str, tuple[list, str]]:
    curves: dict[str, tuple[list, str]] = {}
    for layer, v in result["probe"].items():
        if v.get("method") == "cv":
            curves[f"{layer} · {v['train']} ({v.get('folds')}-fold cross-validated)"] = (v["accuracy"], "-")
            continue
        order = [v["test"]] + [sp for sp in (v.get("scores") or {}) if sp != v["test"]]
        for j, sp in enumerate(order):
            ys = v["accuracy"] if sp == v["test"] else v["scores"][sp]
            curves[f"{layer} · {sp}"] = (ys, _STYLES[j % len(_STYLES)])
    return curves


def plot_series(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw the curves of a :func:`series` result over steps to a PNG (matplotlib, Agg backend).

    One panel per metric present (probe accuracy, CKA to the last step, background sensitivity,
    background factors' share of variance, direction count, weight projections), in a grid up to three
    wide. Colour and marker name the layer, line style the split (probe panel: solid the scoring split,
    dashed / dotted the other scored splits). A dotted grey vertical line marks ``best_step`` when
    there is one. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = list(result["steps"])
    # (title, y label, {legend: (values, line style)}, y limits)
    panels: list[tuple[str, str, dict[str, tuple[list, str]], tuple[float, float] | None]] = []
    if result.get("probe"):
        cv = all(v.get("method") == "cv" for v in result["probe"].values())
        title = "linear probe accuracy" + (" (cross-validated)" if cv else
                                           f" (fit on {next(iter(result['probe'].values()))['train']})")
        panels.append((title, "accuracy (fraction correct)", _probe_curves(result), (0.0, 1.02)))
    if result.get("cka_to_last"):
        sp = next(iter(result["cka_to_last"].values()))["split"]
        panels.append((f"similarity to the last step ({sp})", "debiased linear CKA (1 = same)",
                       {k: (v["values"], "-") for k, v in result["cka_to_last"].items()}, (0.0, 1.02)))
    if result.get("background_sensitivity"):
        sp = next(iter(result["background_sensitivity"].values()))["split"]
        panels.append((f"background sensitivity ({sp})", "background share of variance (0–1)",
                       {k: (v["values"], "-") for k, v in result["background_sensitivity"].items()}, (0.0, 1.02)))
    if result.get("background_share"):
        sp = next(iter(result["background_share"].values()))["split"]
        curves = {k: (v["values"], "-") for k, v in result["background_share"].items()}
        curves |= {f"{k} · chance level (no relation)": (v["null"], "--")
                   for k, v in result["background_share"].items() if v.get("null")}
        panels.append((f"background factors' share of unit variance ({sp})", "R² of each unit on the factors, mean over units",
                       curves, (0.0, 1.02)))
    if result.get("directions"):
        panels.append(("neuron weight directions", "directions holding 90% of the weight mass",
                       {k: (v["n_directions"], "-") for k, v in result["directions"].items()}, None))
    if result.get("projections"):
        panels.append(("weight projection", "norm of the weights' projection",
                       {f"{k} · {m}": (v[m], "-" if m == "core" else "--") for k, v in result["projections"].items()
                        for m in ("core", "background")}, None))
    if not panels:
        raise DataError("The series result has no metric to plot (no probe, CKA, background figure, directions "
                        "or projections).")
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    layer_order: list[str] = []
    for _, _, curves, _ in panels:
        for label in curves:
            la = label.split(" · ")[0]
            if la not in layer_order:
                layer_order.append(la)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    best = result.get("best_step")
    for ax, (title, ylabel, curves, ylim) in zip(axes.flat, panels, strict=False):
        for label, (ys, ls) in curves.items():
            k = layer_order.index(label.split(" · ")[0])
            ax.plot(steps, [np.nan if y is None else y for y in ys], ls=ls, marker=_MARKERS[k % len(_MARKERS)],
                    ms=3, color=colours[k % len(colours)], label=f"layer {label}")
        if best is not None:
            ax.axvline(best, color="grey", ls=":", lw=1, label=f"best probe step ({best})")
        if ylim is not None:  # shares and similarities on their whole range: a flat curve looks flat
            ax.set_ylim(*ylim)
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{result.get('model', 'model')} over {len(steps)} recorded steps", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
