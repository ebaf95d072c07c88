"""``probekit.audit``: run every analysis a store's contents allow and gather one result document.

The document's layout is docs/REPORT_SCHEMA.md (``schema = "probekit.audit"``, version 1). Each
figure is an *estimate* ``{"value": float, "ci": [low, high]}`` (95% bootstrap intervals unless the
metric says otherwise). What cannot run is listed under ``skipped`` with the reason.

Headline contamination figure (per model and layer): the **background sensitivity** on the split
whose rows are grouped by foreground and whose backgrounds reach beyond training (``stress``): the
share of the layer's variance that comes from the background with the foreground held fixed. It is
0 for a representation that ignores the background, rises with planted background dependence
(tests/test_audit.py), and is compared with a reference: the teacher's value at the same layer for a
student, and the same network at initialisation (recorded step 0) where the store has it. Without a
grouped split the headline falls back to the normalised mean shift between ``test_id`` and
``test_ood``. Why this and not in-distribution correlation or decodability: ../shared/PILOT.md and
docs/METRICS.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ._version import __version__
from .errors import DataError, ProbekitError
from .store import Store, open_store

__all__ = ["Audit", "audit", "parse_threshold"]

SCHEMA = "probekit.audit"
SCHEMA_VERSION = 1
HEADLINE_FLAG_RATIO = 1.25  # flagged when the CI's low end exceeds the reference by this factor


def _estimate(value: Any, ci: Sequence[float] | None = None) -> dict[str, Any]:
    v = None if value is None or not np.isfinite(value) else float(value)
    c = None
    if ci is not None and all(x is not None and np.isfinite(x) for x in ci):
        c = [float(ci[0]), float(ci[1])]
    return {"value": v, "ci": c}


@dataclass
class Audit:
    """The result of :func:`audit`: a JSON-safe dict (``.data``) with writers for JSON and HTML."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False))
        tmp.replace(path)
        return path

    def to_html(self, path: str | os.PathLike) -> Path:
        from .report import write_report

        return write_report(self.data, path)

    def values(self, metric: str) -> list[tuple[str, str, float]]:
        """``(model, layer, value)`` of a named metric (see :data:`METRICS`) wherever it was computed."""
        if metric not in METRICS:
            raise ProbekitError(
                f"Unknown metric {metric!r}; known metrics are {sorted(METRICS)}."
            )
        out = []
        for m, info in self.data["models"].items():
            for layer, res in info["layers"].items():
                v = METRICS[metric](res)
                if v is not None:
                    out.append((m, layer, float(v)))
        return out

    def check(self, thresholds: Sequence[tuple[str, str | None, str | None, float]]) -> list[str]:
        """Return one line per figure above its threshold (empty when every figure passes)."""
        failures = []
        for metric, model, layer, limit in thresholds:
            rows = [(m, la, v) for m, la, v in self.values(metric)
                    if (model is None or m == model) and (layer is None or la == layer)]
            if not rows:
                raise ProbekitError(
                    f"--fail-above {metric}: no such figure in this audit"
                    f"{f' for model {model!r}' if model else ''}{f' layer {layer!r}' if layer else ''}."
                )
            for m, la, v in rows:
                if v > limit:
                    failures.append(f"{metric} of {m}.{la} is {v:.4g}, above {limit:g}")
        return failures


def _get(res: Mapping[str, Any], *path: str) -> float | None:
    cur: Any = res
    for p in path:
        if not isinstance(cur, Mapping) or p not in cur:
            return None
        cur = cur[p]
    return cur


#: Figures ``--fail-above`` can gate on (per model and layer).
METRICS: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
    "sensitivity": lambda r: _get(r, "sensitivity", "value", "value"),
    "nms": lambda r: _get(r, "nms", "value", "value"),
    "gap": lambda r: _get(r, "probe", "gap", "value"),
    "decodability": lambda r: max(
        [v["mean_excess"]["value"] for v in (r.get("decodability") or {}).values()
         if v.get("mean_excess", {}).get("value") is not None], default=None),
    "correlated_units": lambda r: _get(r, "correlation", "share_significant"),
}


def parse_threshold(text: str) -> tuple[str, str | None, str | None, float]:
    """Parse ``METRIC[:MODEL[:LAYER]]=VALUE`` (the CLI's ``--fail-above``)."""
    m = re.fullmatch(r"([a-z_]+)(?::([^:=]+))?(?::([^=]+))?=(.+)", text.strip())
    if not m:
        raise ProbekitError(
            f"--fail-above expects METRIC[:MODEL[:LAYER]]=VALUE, e.g. sensitivity:student=0.1; got {text!r}."
        )
    metric, model, layer, value = m.groups()
    if metric not in METRICS:
        raise ProbekitError(f"--fail-above: unknown metric {metric!r}; known metrics are {sorted(METRICS)}.")
    try:
        limit = float(value)
    except ValueError:
        raise ProbekitError(f"--fail-above: {value!r} is not a number.") from None
    return metric, model, layer, limit


# -- the audit -------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    store: Store
    cfg: dict[str, Any]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, analysis: str, reason: str, model: str | None = None, layer: str | None = None) -> None:
        self.skipped.append({"analysis": analysis, "model": model, "layer": layer, "reason": reason})

    def has_split(self, model: str, split: str | None, layer: str | None = None) -> bool:
        if split is None or split not in self.store.splits:
            return False
        if self.store.n_rows(split, model) == 0:
            return False
        return layer is None or layer in self.store.layers(model, split)

    def x(self, model: str, split: str, layer: str, step: int | None = None) -> Any:
        return self.store.acts(model, split, layer, step=step)


def audit(
    store: str | os.PathLike,
    *,
    train: str = "train",
    test_id: str = "test_id",
    test_ood: str = "test_ood",
    stress: str | None = "stress",
    models: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    factors: Sequence[str] | None = None,
    n_boot: int = 500,
    n_perm: int = 200,
    random_state: int = 0,
    progress: bool = True,
) -> Audit:
    """Run every analysis the store allows; see the module docstring and docs/REPORT_SCHEMA.md.

    Parameters
    ----------
    store : path of a store (docs/FORMAT.md)
    train, test_id, test_ood : split names of the probe protocol (fit on train; score ID and OOD).
    stress : the grouped split with broad backgrounds for background sensitivity (None: skip).
    models, layers : restrict to these (default: all in the store).
    factors : background factor names to use (default: all of the store's).
    n_boot, n_perm : bootstrap resamples for intervals; permutations for the correlation null.
    random_state : seed of every resampling, so an audit is reproducible to the digit.
    """
    path = Path(store)
    with open_store(path) as s:
        ctx = _Ctx(s, {"train": train, "test_id": test_id, "test_ood": test_ood, "stress": stress,
                       "factors": list(factors) if factors is not None else None, "n_boot": int(n_boot),
                       "n_perm": int(n_perm), "random_state": int(random_state)})
        names = list(models) if models is not None else s.models
        for m in names:
            if m not in s.models:
                raise DataError(f"The store {str(path)!r} has no model {m!r}; it has {s.models}.")
        if not names:
            raise DataError(f"The store {str(path)!r} holds no models; extract one first.")
        if factors is not None:
            for split in s.splits:
                unknown = [f for f in factors if s.factor_names(split) and f not in s.factor_names(split)]
                if unknown:
                    raise DataError(
                        f"Unknown factor names {unknown} for split {split!r}; it has {s.factor_names(split)}."
                    )
        doc: dict[str, Any] = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "probekit_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "store": str(path), "config": ctx.cfg,
            "splits": {sp: {"rows": s.n_rows(sp), "has_label": s.has_field(sp, "label"),
                            "has_group": s.has_field(sp, "group"), "factor_names": s.factor_names(sp)}
                       for sp in s.splits},
            "models": {}, "pairs": [], "skipped": ctx.skipped,
        }
        tasks = [(m, layer) for m in names for layer in _model_layers(s, m, layers)]
        for m in names:
            doc["models"][m] = {"role": s.role(m), "source": str(s.model_attrs(m).get("source", "")),
                                "layers": {}, "directions": {}}
        bar = tqdm(tasks, desc="audit", unit="layer", disable=not progress, leave=False)
        for m, layer in bar:
            bar.set_postfix_str(f"{m}.{layer}"[-40:])
            doc["models"][m]["layers"][layer] = _layer(ctx, m, layer)
        for m in names:
            doc["models"][m]["directions"] = _directions(ctx, m)
        doc["pairs"] = _pairs(ctx, names, doc)
        doc["headline"] = _headline(doc)
        doc["verdict"] = _verdict(doc)
    return Audit(_clean(doc))


def _model_layers(s: Store, model: str, only: Sequence[str] | None) -> list[str]:
    have = s.layers(model)
    if only is None:
        return have
    missing = [la for la in only if la not in have]
    if missing:
        raise DataError(f"The model {model!r} has no layers {missing}; it has {have}.")
    return [la for la in have if la in only]


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _run(ctx: _Ctx, analysis: str, model: str, layer: str | None, fn: Callable[[], Any]) -> Any:
    """Run one analysis; a data problem becomes a 'skipped' entry with its message, not a crash."""
    try:
        return fn()
    except DataError as e:
        ctx.skip(analysis, str(e), model, layer)
        return None


def _layer(ctx: _Ctx, m: str, layer: str) -> dict[str, Any]:
    s, c = ctx.store, ctx.cfg
    out: dict[str, Any] = {}
    any_split = next(sp for sp in s.acts_splits(m) if layer in s.layers(m, sp))
    out["n_units"] = int(np.prod(ctx.x(m, any_split, layer).shape[1:]))
    # probes: fit on train, score ID and OOD
    tr, ti, to = c["train"], c["test_id"], c["test_ood"]
    if all(ctx.has_split(m, sp, layer) and s.has_field(sp, "label") for sp in (tr, ti, to)):
        out["probe"] = _run(ctx, "probe", m, layer, lambda: _probe(ctx, m, layer))
    else:
        ctx.skip("probe", f"needs labelled splits {tr!r}, {ti!r}, {to!r} with this layer", m, layer)
    # background analyses need factors
    fsplits = [sp for sp in (c["stress"], to, ti, tr) if ctx.has_split(m, sp, layer) and s.factor_names(sp)]
    if fsplits:
        wide = fsplits[0]  # the split whose backgrounds vary most widely (stress, else OOD, ...)
        dec = {}
        for sp in dict.fromkeys([wide, ti] if ctx.has_split(m, ti, layer) and s.factor_names(ti) else [wide]):
            r = _run(ctx, "decodability", m, layer, lambda sp=sp: _decodability(ctx, m, layer, sp))
            if r is not None:
                dec[sp] = r
        out["decodability"] = dec or None
        out["correlation"] = _run(ctx, "correlation", m, layer, lambda: _correlation(ctx, m, layer, wide))
    else:
        ctx.skip("decodability", "no split with background factors", m, layer)
        ctx.skip("correlation", "no split with background factors", m, layer)
    # sensitivity with the foreground held fixed
    st = c["stress"]
    if ctx.has_split(m, st, layer) and s.has_field(st, "group"):
        out["sensitivity"] = _run(ctx, "sensitivity", m, layer, lambda: _sensitivity(ctx, m, layer, st))
    else:
        ctx.skip("sensitivity", f"needs a split {st!r} with 'group' (the same foreground on several "
                 "backgrounds)", m, layer)
    if ctx.has_split(m, ti, layer) and ctx.has_split(m, to, layer):
        out["nms"] = _run(ctx, "nms", m, layer, lambda: _nms(ctx, m, layer, ti, to))
    else:
        ctx.skip("nms", f"needs splits {ti!r} and {to!r}", m, layer)
    return {k: v for k, v in out.items() if v is not None}


def _init_step(ctx: _Ctx, m: str, split: str, layer: str) -> int | None:
    """Step 0 of the model, when the store recorded it for this split and layer (the init reference)."""
    steps = ctx.store.steps(m)
    if steps and steps[0] == 0 and layer in ctx.store.layers(m, split, step=0):
        return 0
    return None
