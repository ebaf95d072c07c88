"""``probekit.audit``: run every check a store's contents allow and gather one result document.

The document's layout is docs/REPORT_SCHEMA.md (``schema = "probekit.audit"``, version 3). Each
figure is an *estimate* ``{"value": float, "ci": [low, high]}`` (95% intervals unless the metric says
otherwise). What cannot run is listed under ``skipped`` with the reason.

How it runs: an :class:`AuditSpec` (split roles, references, resampling counts, margins) and one
read-only view of the store (:class:`_View`, the file opened once). Per layer, the checks of
:data:`LAYER_CHECKS` each declare what they need (and say why when they cannot run) and write one key of
``models.<m>.layers.<l>``; per model, the behaviour and the weight directions; across models, the
representation's comparisons with their references and the teacher–student pairs. Then
:func:`probekit.verdict.judge` turns the figures into findings and one sentence per model: behaviour
first (on the crossed split, every object on the same backgrounds: does the prediction take the
background's class?), representation second (a layer's background component against its reference:
the teacher for a student, else seeded initialisations ``<m>@init<k>`` or a recorded step 0).
Calibration of every interval and flag: docs/METRICS.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from ._io import write_text
from ._json import jsonable
from ._version import __version__
from .errors import DataError, ProbekitError
from .store import Store, open_store
from .verdict import LEVEL, MARKS, headline_mark, interval_level, judge, layer_above_reference
from .vocab import (
    CROSSED_SPLIT,
    INIT_RE,
    OLD_CROSSED_SPLIT,
    OUTPUT_LAYER,
    RATIO_MARGIN,
    RELIANCE_EFFECT_MARGIN,
    RELIANCE_MARGIN,
    Estimate,
)

__all__ = ["LAYER_CHECKS", "Audit", "AuditSpec", "Check", "Extra", "audit", "parse_threshold"]

SCHEMA = "probekit.audit"
SCHEMA_VERSION = 3

Head = Literal["auto", "output", "probe", "label_free"]


def _estimate(value: Any, ci: Sequence[float] | None = None) -> dict[str, Any]:
    return Estimate.of(value, ci).to_dict()


@dataclasses.dataclass
class Audit:
    """The result of :func:`audit`: a JSON-safe dict (``.data``) with writers for JSON and HTML."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def to_json(self, path: str | os.PathLike) -> Path:
        return write_text(path, json.dumps(self.data, indent=1, allow_nan=False))

    def to_html(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        from .report import write_report

        return write_report(self.data, path, **kwargs)

    def values(self, metric: str) -> list[tuple[str, str, float]]:
        """``(model, layer, value)`` of a named metric (see :data:`METRICS`) wherever it was computed."""
        if metric not in METRICS and metric not in MODEL_METRICS:
            raise ProbekitError(
                f"Unknown metric {metric!r}; known metrics are {sorted({**METRICS, **MODEL_METRICS})}."
            )
        out = []
        if metric in MODEL_METRICS:  # one figure per model (its behaviour), layer "-"
            for m, info in self.data["models"].items():
                v = MODEL_METRICS[metric](info)
                if v is not None:
                    out.append((m, "-", float(v)))
            return out
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


def _get(res: Mapping[str, Any], *path: str) -> Any:
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
        [v["mean_excess_r2"]["value"] for v in (r.get("decodability") or {}).values()
         if v.get("mean_excess_r2", {}).get("value") is not None], default=None),
    "decodability_balanced_accuracy": lambda r: max(
        [v["mean_excess_balanced_accuracy"]["value"] for v in (r.get("decodability") or {}).values()
         if v.get("mean_excess_balanced_accuracy", {}).get("value") is not None], default=None),
    "correlated_units": lambda r: _get(r, "correlation", "share_significant"),
}

#: Model-level figures ``--fail-above`` can gate on (its behaviour on the crossed split).
MODEL_METRICS: dict[str, Callable[[Mapping[str, Any]], float | None]] = {
    "reliance": lambda i: _get(i, "behaviour", "reliance", "value"),
    "background_effect": lambda i: _get(i, "behaviour", "background_effect", "value"),
    "flip_rate": lambda i: _get(i, "behaviour", "flip_rate", "value"),
    "pull": lambda i: _get(i, "behaviour", "pull", "value"),
    "follows_background": lambda i: _get(i, "behaviour", "follows_background", "value"),
    "flagged": lambda i: None if i.get("flagged") is None else float(bool(i.get("flagged"))),
}


def parse_threshold(text: str) -> tuple[str, str | None, str | None, float]:
    """Parse ``METRIC[:MODEL[:LAYER]]=VALUE`` (the CLI's ``--fail-above``)."""
    m = re.fullmatch(r"([a-z_]+)(?::([^:=]+))?(?::([^=]+))?=(.+)", text.strip())
    if not m:
        raise ProbekitError(
            f"--fail-above expects METRIC[:MODEL[:LAYER]]=VALUE, e.g. sensitivity:student=0.1; got {text!r}."
        )
    metric, model, layer, value = m.groups()
    if metric not in METRICS and metric not in MODEL_METRICS:
        raise ProbekitError(f"--fail-above: unknown metric {metric!r}; known metrics are "
                            f"{sorted({**METRICS, **MODEL_METRICS})}.")
    try:
        limit = float(value)
    except ValueError:
        raise ProbekitError(f"--fail-above: {value!r} is not a number.") from None
    return metric, model, layer, limit


# -- the specification and the store view ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AuditSpec:
    """What an audit reads and how: split roles, references, resampling counts and the findings' margins.

    Parameters
    ----------
    train, test_id, test_ood : split names of the probe protocol (fit on train; score ID and OOD);
        ``""`` for none.
    crossed : the crossed split (every object ``group`` on the same ``background`` ids): behaviour, the
        verdict, the two-way decomposition and background sensitivity (``""`` or None: none). A store
        without a split of the default name that has one named ``stress`` (the name probekit wrote
        before) is read from that one, with a FutureWarning (see :func:`audit`).
    variants : the split of image variants (``variant`` field): accuracy per variant (None: none).
    models, layers, factors : restrict to these (default: all in the store).
    n_boot, n_perm : resamples for every interval; permutations for the correlation null. Used as
        given by every check (no check lowers them).
    random_state : seed of every resampling, so an audit is reproducible to the digit.
    head : how the model's predictions are read. ``"auto"``: its stored output (``@output``) as class
        scores when it has one unit per class (one logit for two classes), through ``class_map``
        when given, else in its own output space (label-free: does the prediction follow the model's
        own prediction on the image the background came from?); a linear probe only for a student
        whose output is a representation or a model with no stored output.
    behaviour_layer : the layer of that probe (default: the last hidden layer in depth order).
    class_map : output index -> label id (many-to-one allowed); an output index it does not name
        predicts no class of the folder (counted wrong).
    reliance_margin, effect_margin, ratio_margin : the findings' materiality (:mod:`probekit.vocab`).
    """

    train: str = "train"
    test_id: str = "test_id"
    test_ood: str = "test_ood"
    crossed: str | None = CROSSED_SPLIT
    variants: str | None = "variants"
    models: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    factors: tuple[str, ...] | None = None
    n_boot: int = 500
    n_perm: int = 200
    random_state: int = 0
    head: Head = "auto"
    behaviour_layer: str | None = None
    class_map: Mapping[int, int] | None = None
    reliance_margin: float = RELIANCE_MARGIN
    effect_margin: float = RELIANCE_EFFECT_MARGIN
    ratio_margin: float = RATIO_MARGIN

    def __post_init__(self) -> None:
        for name, low in (("n_boot", 1), ("n_perm", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise DataError(f"The {name!r} of the audit must be an integer >= {low}; got {v!r}.")
        if self.head not in ("auto", "output", "probe", "label_free"):
            raise DataError(f"The 'head' of the audit must be one of auto, output, probe, label_free; got "
                            f"{self.head!r}.")
        for name in ("reliance_margin", "effect_margin"):
            if not 0 <= getattr(self, name) < 1:
                raise DataError(f"The {name!r} of the audit must lie in [0, 1); got {getattr(self, name)!r}.")
        if self.ratio_margin <= 0:
            raise DataError(f"The 'ratio_margin' of the audit must be > 0; got {self.ratio_margin!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("models", "layers", "factors"):
            d[k] = None if d[k] is None else list(d[k])
        if self.class_map is not None:
            d["class_map"] = {str(k): int(v) for k, v in self.class_map.items()}
        return d


@dataclasses.dataclass(frozen=True)
class Extra:
    """One top-level entry of the audit document that the store does not hold, handed to :func:`audit`.

    ``probekit audit`` (:func:`probekit.model_audit.audit_model`) records what was audited and how
    (``preprocessing``, ``inputs``, ``cost``) and runs checks outside the store (``mask_sensitivity``,
    ``accuracy_check``); ``probekit demo`` adds ``attribution``. Each is an Extra, so :func:`audit`
    assembles the whole document once and checks it against the JSON schema; no entry is added after.

    Parameters
    ----------
    key : the document's top-level key (one of :data:`EXTRA_KEYS`; docs/REPORT_SCHEMA.md).
    value : the entry, when it is known before the audit runs.
    compute : ``compute(doc) -> entry``, called on the document once its figures and verdict are in,
        extras in the order given (an entry computed earlier is in ``doc``); ``None`` leaves the key out.
    """

    key: str
    value: Any = None
    compute: Callable[[Mapping[str, Any]], Any] | None = None


#: the top-level keys of the document an :class:`Extra` may write (the rest are the audit's own)
EXTRA_KEYS = ("attribution", "preprocessing", "mask_sensitivity", "cost", "inputs", "accuracy_check")


def _add_extras(doc: dict[str, Any], extras: Sequence[Extra]) -> None:
    for e in extras:
        if e.key not in EXTRA_KEYS or e.key in doc:
            raise ProbekitError(f"audit(extras=...): {e.key!r} is not a key an extra may write; they are "
                                f"{list(EXTRA_KEYS)}, each once.")
        value = e.compute(doc) if e.compute is not None else e.value
        if value is not None:
            doc[e.key] = value


def _check_schema(doc: Mapping[str, Any]) -> None:
    """Check the finished document against the shipped JSON schema (probekit/report/audit.schema.json)
    when ``jsonschema`` is installed (it is a development dependency; without it nothing is checked)."""
    try:
        import jsonschema
    except ImportError:
        return
    schema = json.loads((Path(__file__).parent / "report" / "audit.schema.json").read_text())
    try:  # the shipped schema itself is checked by the tests: validating it here too costs 0.5 s per audit
        jsonschema.validators.validator_for(schema)(schema).validate(doc)
    except jsonschema.ValidationError as e:
        where = "/".join(str(k) for k in e.absolute_path) or "(root)"
        raise ProbekitError(f"The audit document does not fit its schema at {where}: {e.message[:300]}. This is a "
                            "bug of probekit; please report it with the command that produced it.") from e


def read_class_map(path: str | os.PathLike, class_names: Sequence[str]) -> dict[int, int]:
    """Read ``--class-map CSV``: one row per output, ``folder_class,output_index`` (many outputs may name
    one class, as ImageNet-9 needs); a header row is allowed. Returns output index -> label id (the
    position of the class in ``class_names``)."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise DataError(f"The class map {str(path)!r} does not exist or is not a file; give a CSV of "
                        "folder_class,output_index rows.")
    ids = {name: i for i, name in enumerate(class_names)}
    out: dict[int, int] = {}
    with path.open(newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            if len(cells) != 2:
                raise DataError(f"{path.name} line {n}: expected 'folder_class,output_index'; got {row!r}.")
            name, idx = cells
            if not idx.lstrip("-").isdigit():
                if n == 1:
                    continue  # a header
                raise DataError(f"{path.name} line {n}: the output index {idx!r} is not an integer.")
            if name not in ids:
                raise DataError(f"{path.name} line {n}: {name!r} is not a class folder of the images; they are "
                                f"{list(class_names)}.")
            k = int(idx)
            if k < 0 or (k in out and out[k] != ids[name]):
                raise DataError(f"{path.name} line {n}: output {k} is negative or already mapped to another class.")
            out[k] = ids[name]
    missing = [c for c in class_names if ids[c] not in out.values()]
    if missing or not out:
        raise DataError(f"The class map {path.name} names no output for the classes {missing or list(class_names)}; "
                        "every folder class needs at least one.")
    return out


class _Layout:
    """A store with its layout read once: splits, models, layers, row counts, fields and attributes.

    The audit reads a store that does not change while it runs and asks for the same names hundreds of
    times (each an HDF5 lookup: 0.4 s of a 30-image audit); activations and sample fields are read as
    before (lazily, through :class:`~probekit.store.Activations`, whose handles are kept too). Lists and
    dicts are returned as copies, so a caller may change what it gets.
    """

    _MEMO = frozenset({"splits", "models", "attrs", "layers", "n_rows", "has_field", "acts_splits", "steps",
                       "factor_names", "factor_periods", "model_attrs", "role", "layer_order", "weight_layers",
                       "acts"})

    def __init__(self, store: Store) -> None:
        self._store = store
        self._memo: dict[Any, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name not in self._MEMO:
            return getattr(self._store, name)
        value = getattr(type(self._store), name, None)
        if isinstance(value, property):  # splits, models, attrs
            if name not in self._memo:
                self._memo[name] = getattr(self._store, name)
            return _copy(self._memo[name])
        method = getattr(self._store, name)

        def memo(*args: Any, **kwargs: Any) -> Any:
            key = (name, args, tuple(sorted(kwargs.items())))
            if key not in self._memo:
                self._memo[key] = method(*args, **kwargs)
            return _copy(self._memo[key])

        return memo


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


@dataclasses.dataclass
class _View:
    """One read-only view of the store for the whole audit, and the list of what was skipped."""

    store: Store
    spec: AuditSpec
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    _fields: dict[tuple[str, str], np.ndarray] = dataclasses.field(default_factory=dict)

    def skip(self, analysis: str, reason: str, model: str | None = None, layer: str | None = None,
             actionable: bool = True) -> None:
        self.skipped.append({"analysis": analysis, "model": model, "layer": layer, "reason": reason,
                             "actionable": actionable})

    def has(self, model: str, split: str | None, layer: str | None = None) -> bool:
        if not split or split not in self.store.splits or self.store.n_rows(split, model) == 0:
            return False
        return layer is None or layer in self.store.layers(model, split)

    def x(self, model: str, split: str, layer: str, step: int | None = None) -> Any:
        return self.store.acts(model, split, layer, step=step)

    def field(self, split: str, name: str, n: int) -> np.ndarray:
        key = (split, name)
        if key not in self._fields:
            self._fields[key] = self.store.sample_field(split, name)
        return self._fields[key][:n]

    def fields(self, split: str, n: int, *names: str) -> list[np.ndarray | None]:
        return [self.field(split, f, n) if self.store.has_field(split, f) else None for f in names]

    def crossed(self, split: str | None) -> bool:
        """Whether ``split`` shows objects on several backgrounds: fields 'group' and 'background', and some
        object on two or more backgrounds (a split of original images records group = background = the
        image: it is not crossed, and its factors vary from row to row)."""
        s = self.store
        if not (split and split in s.splits and s.has_field(split, "group") and s.has_field(split, "background")):
            return False
        key = (split, "@crossed")
        if key not in self._fields:
            n = s.n_rows(split)
            pairs = np.unique(np.stack([self.field(split, "group", n), self.field(split, "background", n)]), axis=1)
            self._fields[key] = np.array(pairs.shape[1] > np.unique(pairs[0]).size)
        return bool(self._fields[key])

    def inits(self, m: str) -> list[str]:
        """Seeded initialisations of ``m`` in the store (models named ``<m>@init<k>``)."""
        return sorted((x for x in self.store.models if (mt := INIT_RE.match(x)) and mt.group("base") == m),
                      key=lambda x: int(INIT_RE.match(x).group("k")))  # type: ignore[union-attr]

    def init_step(self, m: str, split: str, layer: str) -> int | None:
        """Step 0 of the model, when the store recorded it for this split and layer (the init reference)."""
        steps = self.store.steps(m)
        if steps and steps[0] == 0 and layer in self.store.layers(m, split, step=0):
            return 0
        return None

    def is_mask_layer(self, model: str, layer: str) -> bool:
        split = next((sp for sp in self.store.acts_splits(model) if layer in self.store.layers(model, sp)), None)
        return split is not None and str(self.store.acts(model, split, layer).attrs.get("pool", "")) == "mask"

    def model_layers(self, model: str, only: Sequence[str] | None = None) -> list[str]:
        """The model's layers in the store's order (depth order where recorded), its output last; an
        attention mask stored beside token activations (pool "mask") is the input's, not a layer's."""
        have = [la for la in self.store.layers(model) if not self.is_mask_layer(model, la)]
        have = [la for la in have if la != OUTPUT_LAYER] + [la for la in have if la == OUTPUT_LAYER]
        if only is None:
            return have
        missing = [la for la in only if la not in have]
        if missing:
            raise DataError(f"The model {model!r} has no layers {missing}; it has {have}.")
        return [la for la in have if la in only]


# -- per-layer checks -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    """One analysis of a layer: the document key it writes, what it needs, how it runs.

    ``needs(view, model, layer)`` returns ``None`` when the check can run, else ``(reason,
    actionable)``: ``actionable`` is false where the audit's mode never runs it (no OOD split was
    named), so the CLI lists only skips a user can act on. ``run`` returns the JSON-safe entry.
    ``report`` is the id of the report section that shows the entry: its title, glossary rows, the
    keys it reads and its renderer are declared in ``probekit.report._layers.LAYER_SECTIONS``.
    """

    key: str
    analysis: str
    title: str
    needs: Callable[[_View, str, str], tuple[str, bool] | None]
    run: Callable[[_View, str, str], Any]
    report: str = ""


def _needs_probe(v: _View, m: str, layer: str) -> tuple[str, bool] | None:
    sp = v.spec
    if not sp.test_ood:
        return "no OOD split was named (test_ood), so there is no ID/OOD gap to measure", False
    if not sp.train:
        return "no training split was named (train)", False
    if all(v.has(m, s, layer) and v.store.has_field(s, "label") for s in (sp.train, sp.test_id, sp.test_ood)):
        return None
    return f"needs labelled splits {sp.train!r}, {sp.test_id!r}, {sp.test_ood!r} with this layer", True


def _run_probe(v: _View, m: str, layer: str) -> dict[str, Any]:
    from .analyses import probe_id_ood

    sp = v.spec
    names = {"train": sp.train, "test_id": sp.test_id, "test_ood": sp.test_ood}
    xs = {k: v.x(m, s, layer) for k, s in names.items()}
    ys = {k: v.field(names[k], "label", len(xs[k])) for k in xs}
    r = probe_id_ood(xs["train"], ys["train"], xs["test_id"], ys["test_id"], xs["test_ood"], ys["test_ood"],
                     n_boot=sp.n_boot, random_state=sp.random_state)
    return {"train": sp.train, "id": _estimate(r.id_accuracy, r.id_ci),
            "ood": _estimate(r.ood_accuracy, r.ood_ci), "gap": _estimate(r.gap, r.gap_ci),
            "train_accuracy": r.train_accuracy, "C": r.C, "n_train": r.n_train, "paired": r.paired}


def _factor_splits(v: _View, m: str, layer: str) -> list[str]:
    """Splits with background factors for this layer, widest backgrounds first. A crossed split repeats
    its few backgrounds over every object (only B distinct factor rows), so it is left out."""
    sp = v.spec
    return [s for s in (sp.crossed, sp.test_ood, sp.test_id, sp.train)
            if v.has(m, s, layer) and v.store.factor_names(s) and not v.crossed(s)]


def _needs_factors(v: _View, m: str, layer: str) -> tuple[str, bool] | None:
    if _factor_splits(v, m, layer):
        return None
    return ("no split with background factors (give per-image factors, e.g. `probekit audit --factors CSV`, "
            "or extract a split whose rows carry 'factors')", True)


def _run_decodability(v: _View, m: str, layer: str) -> dict[str, Any] | None:
    from .analyses import background_decodability

    fs = _factor_splits(v, m, layer)
    ti = v.spec.test_id
    out = {}
    for split in dict.fromkeys([fs[0], ti] if ti in fs else [fs[0]]):
        X = v.x(m, split, layer)
        F = v.field(split, "factors", len(X))
        groups = v.field(split, "group", len(X)) if v.store.has_field(split, "group") else None
        names = v.store.factor_names(split)
        periods = dict(zip(names, v.store.factor_periods(split), strict=True))
        r = background_decodability(X, F, factor_names=names, use=v.spec.factors, periods=periods,
                                    groups=groups, n_boot=v.spec.n_boot, random_state=v.spec.random_state)
        factors = {f: {"metric": r.metric[f], "score": r.score[f], "control": r.control_mean[f],
                       "control_sd": r.control_sd[f], "excess": _estimate(r.excess[f], r.excess_ci[f]),
                       "period": (r.period or {}).get(f)}
                   for f in r.factor_names}
        out[split] = {"split": split, "factors": factors, "mean_excess_r2": _estimate(r.mean_excess_r2),
                      "mean_excess_balanced_accuracy": _estimate(r.mean_excess_balanced_accuracy)}
    return out or None


def _run_correlation(v: _View, m: str, layer: str) -> dict[str, Any]:
    from .analyses import BackgroundCorrelation

    split = _factor_splits(v, m, layer)[0]
    X = v.x(m, split, layer)
    n = len(X)
    F = v.field(split, "factors", n)
    label = v.field(split, "label", n) if v.store.has_field(split, "label") else None
    est = BackgroundCorrelation(n_permutations=v.spec.n_perm, random_state=v.spec.random_state)
    r = est.fit(X, F, label, factor_names=v.store.factor_names(split), use=v.spec.factors).result_
    absr = np.abs(np.asarray(r.pearson, dtype=float))
    absr = absr[np.isfinite(absr)]
    counts, edges = np.histogram(absr, bins=30, range=(0.0, max(0.05, float(absr.max(initial=0.0)))))
    return {
        "split": split, "n_samples": r.n_samples, "n_dead_units": r.n_dead_units,
        "mean_abs_r": float(np.mean(list(r.mean_abs_pearson.values()))),
        "per_factor_mean_abs_r": r.mean_abs_pearson,
        "noise_floor": r.noise_floor,
        "threshold": float(np.mean(list(r.threshold.values()))),
        "per_factor_share_significant": r.share_significant,
        "share_significant": r.share_any_factor_significant,
        "alpha": r.alpha,
        "variance_share_background": r.mean_factor_r2,
        "variance_share_background_null": r.null_factor_r2,
        "variance_share_label": r.mean_label_eta2,
        "hist": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def _needs_crossed(v: _View, m: str, layer: str) -> tuple[str, bool] | None:
    if layer == OUTPUT_LAYER:
        return "the model's output is judged by its behaviour, not decomposed", False
    st = v.spec.crossed
    if v.has(m, st, layer) and v.crossed(st):
        return None
    return (f"needs a crossed split {st!r} (fields 'group' and 'background': every object on the same "
            "backgrounds)", True)


def _run_crossed(v: _View, m: str, layer: str) -> dict[str, Any]:
    from .analyses import crossed_decomposition

    st = v.spec.crossed
    X = v.x(m, st, layer)
    group, background = v.fields(st, len(X), "group", "background")
    r = crossed_decomposition(X, group, background, n_boot=v.spec.n_boot, random_state=v.spec.random_state)
    return {"split": st, "foreground": _estimate(r.foreground, r.foreground_ci),
            "background": _estimate(r.background, r.background_ci),
            "interaction": _estimate(r.interaction, r.interaction_ci),
            "background_share": _estimate(r.background_share, r.background_share_ci),
            "n_groups": r.n_groups, "n_backgrounds": r.n_backgrounds, "n_dropped_groups": r.n_dropped_groups,
            "sketched": r.sketched}


def _needs_sensitivity(v: _View, m: str, layer: str) -> tuple[str, bool] | None:
    st = v.spec.crossed
    if v.has(m, st, layer) and v.store.has_field(st, "group"):
        return None
    return f"needs a split {st!r} with 'group' (the same object on several backgrounds)", True


def _run_sensitivity(v: _View, m: str, layer: str) -> dict[str, Any]:
    from .analyses import background_sensitivity

    st = v.spec.crossed

    def one(step: int | None) -> dict[str, Any]:
        X = v.x(m, st, layer, step)
        r = background_sensitivity(X, v.field(st, "group", len(X)), n_boot=v.spec.n_boot, ci_level=LEVEL,
                                   random_state=v.spec.random_state)
        return _estimate(r.layer, r.layer_ci)

    out = {"split": st, "value": one(None)}
    if v.init_step(m, st, layer) is not None:
        out["init"] = one(0)
    return out


def _needs_nms(v: _View, m: str, layer: str) -> tuple[str, bool] | None:
    ti, to = v.spec.test_id, v.spec.test_ood
    if not to:
        return "no OOD split was named (test_ood): no second background family", False
    if v.has(m, ti, layer) and v.has(m, to, layer):
        return None
    return f"needs splits {ti!r} and {to!r}", True


def _run_nms(v: _View, m: str, layer: str) -> dict[str, Any]:
    from .analyses import normalized_mean_shift

    a, b = v.spec.test_id, v.spec.test_ood

    def one(step: int | None) -> dict[str, Any]:
        r = normalized_mean_shift(v.x(m, a, layer, step), v.x(m, b, layer, step), n_boot=v.spec.n_boot,
                                  ci_level=LEVEL, random_state=v.spec.random_state)
        return _estimate(r.nms_debiased, r.ci)  # the interval is for the true NMS, which this estimates

    out = {"from": a, "to": b, "value": one(None)}
    if v.init_step(m, a, layer) is not None and v.init_step(m, b, layer) is not None:
        out["init"] = one(0)
    return out


#: The per-layer checks, in the order they run and appear in ``models.<m>.layers.<l>``.
LAYER_CHECKS: tuple[Check, ...] = (
    Check("probe", "probe", "linear-probe accuracy in and out of distribution", _needs_probe, _run_probe,
          report="probes"),
    Check("decodability", "decodability", "background factors decoded from the layer, minus a shuffled control",
          _needs_factors, _run_decodability, report="decodability"),
    Check("correlation", "correlation", "units correlated with background factors, against a permutation null",
          _needs_factors, _run_correlation, report="correlation"),
    Check("crossed", "crossed decomposition", "foreground / background / interaction components",
          _needs_crossed, _run_crossed, report="decomposition"),
    Check("sensitivity", "sensitivity", "share of variance from the background with the object fixed",
          _needs_sensitivity, _run_sensitivity, report="sensitivity"),
    Check("nms", "nms", "normalised mean shift between two background families", _needs_nms, _run_nms,
          report="sensitivity"),
)


def _run(v: _View, analysis: str, model: str, layer: str | None, fn: Callable[[], Any]) -> Any:
    """Run one analysis; a data problem becomes a 'skipped' entry with its message, not a crash."""
    try:
        return fn()
    except DataError as e:
        v.skip(analysis, str(e), model, layer)
        return None


def _layer(v: _View, m: str, layer: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    any_split = next(sp for sp in v.store.acts_splits(m) if layer in v.store.layers(m, sp))
    out["n_units"] = int(np.prod(v.x(m, any_split, layer).shape[1:]))
    for check in LAYER_CHECKS:
        missing = check.needs(v, m, layer)
        if missing is not None:
            v.skip(check.analysis, missing[0], m, layer, actionable=missing[1])
            continue
        r = _run(v, check.analysis, m, layer, lambda check=check: check.run(v, m, layer))
        if r is not None:
            out[check.key] = r
    return out


# -- the audit ------------------------------------------------------------------------------------


def _old_crossed_split(splits: Sequence[str], spec: AuditSpec, path: Path) -> AuditSpec:
    """``spec`` reading a store of an earlier release, whose crossed split is ``stress``, from that split
    (one FutureWarning that names the fix), when ``spec`` asks for the default name and the store lacks it."""
    if spec.crossed != CROSSED_SPLIT or CROSSED_SPLIT in splits or OLD_CROSSED_SPLIT not in splits:
        return spec
    warnings.warn(f"The store {str(path)!r} has no split {CROSSED_SPLIT!r} but one named {OLD_CROSSED_SPLIT!r}, the "
                  "crossed split's name in earlier releases: reading it as the crossed split. Pass "
                  f"crossed={OLD_CROSSED_SPLIT!r} (--crossed {OLD_CROSSED_SPLIT}) to read it without this warning; "
                  "the fallback goes in the next release.", FutureWarning, stacklevel=3)
    return dataclasses.replace(spec, crossed=OLD_CROSSED_SPLIT)


def audit(
    store: str | os.PathLike | Store,
    *,
    train: str = "train",
    test_id: str = "test_id",
    test_ood: str = "test_ood",
    crossed: str | None = CROSSED_SPLIT,
    variants: str | None = "variants",
    models: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    factors: Sequence[str] | None = None,
    n_boot: int = 500,
    n_perm: int = 200,
    random_state: int = 0,
    head: Head = "auto",
    behaviour_layer: str | None = None,
    class_map: Mapping[int, int] | None = None,
    progress: bool = True,
    spec: AuditSpec | None = None,
    stress: str | None = None,
    pull_threshold: float | None = None,
    extras: Sequence[Extra] = (),
) -> Audit:
    """Run every check the store allows; see the module docstring and docs/REPORT_SCHEMA.md.

    ``store`` is the store's path, or an open :class:`~probekit.store.Store` (read through and left
    open: ``probekit audit`` shares one read-only view between the audit and its report). ``extras``
    are the document's entries the store does not hold (:class:`Extra`), added once its figures and
    verdict are in; the finished document is checked against the JSON schema (when ``jsonschema`` is
    installed). The keyword arguments are those of :class:`AuditSpec` (or pass ``spec`` itself). ``stress`` is the
    old name of ``crossed`` and ``pull_threshold`` no longer decides anything (the pull is evidence
    since schema 3; the shortcut finding reads reliance): both are accepted with a FutureWarning for
    one release. So is a store written before the crossed split was named ``crossed``: with the default
    ``crossed``, a store that has no such split but one named ``stress`` is read from that one (one
    FutureWarning; ``config.crossed`` records ``"stress"``).
    """
    if stress is not None:
        warnings.warn("audit(stress=...) is now audit(crossed=...); the old name goes in the next release.",
                      FutureWarning, stacklevel=2)
        crossed = stress
    if pull_threshold is not None:
        warnings.warn("audit(pull_threshold=...) no longer decides the verdict (schema 3 flags on reliance, "
                      "see docs/METRICS.md); the argument is ignored and goes in the next release.",
                      FutureWarning, stacklevel=2)
    if spec is None:
        spec = AuditSpec(train=train, test_id=test_id, test_ood=test_ood, crossed=crossed, variants=variants,
                         models=None if models is None else tuple(models),
                         layers=None if layers is None else tuple(layers),
                         factors=None if factors is None else tuple(factors),
                         n_boot=int(n_boot), n_perm=int(n_perm), random_state=int(random_state), head=head,
                         behaviour_layer=behaviour_layer, class_map=class_map)
    path = store.path if isinstance(store, Store) else Path(store)
    with contextlib.nullcontext(store) if isinstance(store, Store) else open_store(path) as s:
        spec = _old_crossed_split(s.splits, spec, path)
        v = _View(_Layout(s), spec)  # type: ignore[arg-type]  # a Store with its layout read once
        names = list(spec.models) if spec.models is not None else [m for m in s.models if not INIT_RE.match(m)]
        for m in names:
            if m not in s.models:
                raise DataError(f"The store {str(path)!r} has no model {m!r}; it has {s.models}.")
        if not names:
            raise DataError(f"The store {str(path)!r} holds no models; extract one first.")
        if spec.factors is not None:
            for split in s.splits:
                unknown = [f for f in spec.factors if s.factor_names(split) and f not in s.factor_names(split)]
                if unknown:
                    raise DataError(
                        f"Unknown factor names {unknown} for split {split!r}; it has {s.factor_names(split)}."
                    )
        doc: dict[str, Any] = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "probekit_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "store": str(path), "config": spec.to_dict(),
            "splits": {sp: {"rows": s.n_rows(sp), "has_label": s.has_field(sp, "label"),
                            "has_group": s.has_field(sp, "group"), "factor_names": s.factor_names(sp)}
                       for sp in s.splits},
            "models": {}, "pairs": [], "skipped": v.skipped,
        }
        tasks = [(m, layer) for m in names for layer in v.model_layers(m, spec.layers)]
        for m in names:
            doc["models"][m] = {"role": s.role(m), "source": str(s.model_attrs(m).get("source", "")),
                                "inits": v.inits(m), "layers": {}, "directions": {}}
        bar = tqdm(tasks, desc="audit", unit="layer", disable=not progress, leave=False)
        for m, layer in bar:
            bar.set_postfix_str(f"{m}.{layer}"[-40:])
            doc["models"][m]["layers"][layer] = _layer(v, m, layer)
        for m in names:
            doc["models"][m]["directions"] = _directions(v, m)
            b = _run(v, "behaviour", m, None, lambda m=m: _behaviour(v, m))
            if b is not None:
                sites = b.pop("predicted_accuracy", None)
                doc["models"][m]["behaviour"] = b
                if sites:
                    doc["models"][m]["predicted_accuracy"] = sites
        _background_flags(v, names, doc)
        doc["pairs"] = _pairs(v, names, doc)
        doc["headline"] = _headline(doc, spec.ratio_margin)
        for m in names:
            why = next((k["reason"] for k in reversed(v.skipped) if k["analysis"] == "behaviour" and k["model"] == m),
                       None)
            doc["models"][m].update(judge(m, doc["models"][m], no_behaviour=why).to_dict())
        doc["verdict"] = [doc["models"][m]["verdict"] for m in names] + _evidence(doc)
        series_models = [m for m in names if len([st for st in s.steps(m) if st != 0]) >= 1
                         and len(s.steps(m)) >= 2]
        step_only = {m: bool(s.steps(m)) and not s.layers(m) for m in names}
        step_weights = {m: any(s.weight_layers(m, st) for st in s.steps(m)) and not s.weight_layers(m)
                        for m in names}
        series_inputs = {m: _series_inputs(s, m) for m in series_models}
    doc["series"] = {}
    for m in series_models:
        r = _run(v, "series", m, None, lambda m=m: _series(path, m, spec, series_inputs[m]))
        if r is not None:
            doc["series"][m] = r
            for k in r.get("skipped", []):
                v.skip(k["analysis"], k["reason"], m, None)
            if r.get("best_step") is not None:
                p = r["probe"][r["score_layer"]]
                how = (f"the probe accuracy cross-validated within split {p['train']!r}" if p["method"] == "cv"
                       else f"the probe accuracy on split {p['test']!r} (fit on {p['train']!r})")
                doc["verdict"].append(
                    f"{m}: over {len(r['steps'])} recorded steps (steps {r['steps'][0]}–{r['steps'][-1]}), "
                    f"{how} at layer {r['score_layer']} peaks at step {r['best_step']} "
                    f"({100 * r['best_accuracy']:.1f}%); see the figures over training.")
    drawn = {m for m, r in doc["series"].items()
             if any(r.get(k) for k in ("probe", "cka_to_last", "background_sensitivity", "background_share",
                                       "directions", "projections"))}
    for m in names:
        if step_only[m]:
            v.skip("per-layer analyses", "the model has activations only under recorded steps"
                   + ("; see the figures over training" if m in drawn else
                      (" and too few of them for figures over training (need two, one after step 0)"
                       if m not in series_models else "")), m, None)
        if step_weights[m]:
            for k in v.skipped:
                if k["analysis"] == "directions" and k["model"] == m and k["reason"].startswith("the store has no"):
                    k["reason"] = ("weight rows are stored only at recorded steps"
                                   + ("; direction counts per step are in the figures over training"
                                      if m in drawn and doc["series"][m].get("directions") else ""))
    _add_extras(doc, extras)
    doc = jsonable(doc)
    _check_schema(doc)
    return Audit(doc)


def _series_inputs(s: Store, m: str) -> dict[str, list[str]]:
    steps = s.steps(m)
    have = [sp for sp in s.acts_splits(m, steps[0]) if all(sp in s.acts_splits(m, st) for st in steps)]
    return {"labelled": [sp for sp in have if s.has_field(sp, "label")],
            "grouped": [sp for sp in have if s.has_field(sp, "group")]}


def _series(path: Path, m: str, spec: AuditSpec, have: Mapping[str, list[str]]) -> dict[str, Any]:
    """Figures per recorded step (probekit.series), for models with a checkpoint series.

    The audit's split names are used where the recorded steps have them (fit on ``train``, score on
    ``test_ood`` and ``test_id``, sensitivity on the crossed split); otherwise
    :func:`probekit.series.series` picks from whatever splits were recorded (one labelled split:
    cross-validated probe accuracy).
    """
    from .series import series

    def pick(name: str | None, among: list[str]) -> str | None:
        return name if name and name in among else None

    return series(path, m, train=pick(spec.train, have["labelled"]), test=pick(spec.test_ood, have["labelled"]),
                  test_id=pick(spec.test_id, have["labelled"]), grouped=pick(spec.crossed, have["grouped"]),
                  random_state=spec.random_state)


# -- behaviour: the model's predictions on the crossed split --------------------------------------


@dataclasses.dataclass
class _Predictions:
    """The model's predicted class per split and how they were read."""

    preds: dict[str, np.ndarray]
    source: str            # one line for the reader: where the predictions come from
    from_output: bool      # the model's own output (not a probe)
    space: str             # "labels": the folder's classes; "output": the model's own output indices


def _label_count(v: _View, m: str, splits: Sequence[str]) -> int:
    sp = v.spec
    labels = [v.field(s, "label", v.store.n_rows(s, m)) for s in dict.fromkeys([sp.train, *splits])
              if s and s in v.store.splits and v.store.has_field(s, "label") and v.store.n_rows(s, m)]
    return max((int(y.max()) + 1 for y in labels if y.size), default=0)


#: bytes of a model's output (as float64) read at a time to predict from it: a 1000-unit head on the 20,000
#: crossed rows of a 5,000-image audit is 160 MB in float64, which the audit's memory should not grow by
OUTPUT_BLOCK_BYTES = 16 << 20


def _argmax(o: np.ndarray) -> np.ndarray:
    return o.argmax(axis=1)


def read_output(acts: Any, read: Callable[[np.ndarray], Any] = _argmax) -> Any:
    """``read`` of a stored output (``Activations``), row by row, in blocks of :data:`OUTPUT_BLOCK_BYTES`: each
    block flattened per row and in float64, the results concatenated (row-wise functions give what they give
    on the whole output, without holding it). A ``read`` that returns a tuple of arrays gives the tuple of
    their concatenations (several readings in one pass over the output)."""
    width = max(1, int(np.prod(acts.shape[1:])))
    step = max(1, OUTPUT_BLOCK_BYTES // (8 * width))
    parts = [read(np.asarray(a, dtype=np.float64).reshape(len(a), width)) for _, a in acts.iter_chunks(step)]
    if not parts:
        return read(np.zeros((0, width)))
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))
    return np.concatenate(parts)


def _output_rows(v: _View, m: str, split: str, read: Callable[[np.ndarray], np.ndarray] = _argmax) -> np.ndarray:
    """``read`` (default: the argmax) of the model's output on ``split``, block by block (:func:`read_output`)."""
    return read_output(v.x(m, split, OUTPUT_LAYER), read)


def _predictions(v: _View, m: str, splits: Sequence[str]) -> _Predictions:
    """Read the model's predictions in its own output space whenever it has one (see AuditSpec.head)."""
    from .analyses import output_predictions  # analyses load lazily: `import probekit` loads this module

    s, sp = v.store, v.spec
    reading = sp.head
    has_output = all(OUTPUT_LAYER in s.layers(m, x) for x in splits)
    if reading in ("output", "label_free") and not has_output:
        raise DataError(f"head={reading!r} needs the model's output ({OUTPUT_LAYER!r}) on every behaviour split")
    if has_output and reading != "probe":
        width = int(np.prod(v.x(m, splits[0], OUTPUT_LAYER).shape[1:]))
        k = _label_count(v, m, splits)
        if sp.class_map is not None and reading != "label_free":
            for out_idx in sp.class_map:
                if not 0 <= int(out_idx) < width:
                    raise DataError(f"The class map names output {out_idx}, but the model's output has {width} "
                                    "units; fix the map (output indices count from 0).")
            preds = {x: _output_rows(v, m, x, lambda o: output_predictions(o, sp.class_map)) for x in splits}
            return _Predictions(preds, f"the model's own output through the class map ({len(sp.class_map)} "
                                "outputs named; any other output predicts no class of the folder)", True, "labels")
        if reading != "label_free" and width == k and width > 1:
            return _Predictions({x: _output_rows(v, m, x) for x in splits},
                                "the model's own output (argmax of @output)", True, "labels")
        if reading != "label_free" and width == 1 and k == 2:
            return _Predictions({x: _output_rows(v, m, x, output_predictions) for x in splits},
                                "the model's own output (one logit: class 1 where it is above 0)", True, "labels")
        if reading != "label_free" and s.role(m) == "student" and reading == "auto":
            pass  # a student's output is the representation it was fitted to: read through a probe below
        else:
            return _Predictions({x: _output_rows(v, m, x) for x in splits},
                                f"the model's own output ({width} units, not the folder's {k} classes: read "
                                "label-free, against its own prediction on the image each background came from)",
                                True, "output")
    return _probe_predictions(v, m, splits)


def _probe_predictions(v: _View, m: str, splits: Sequence[str]) -> _Predictions:
    from .analyses import LinearProbe

    s, sp = v.store, v.spec
    hidden = [la for la in v.model_layers(m) if la != OUTPUT_LAYER]
    layer = sp.behaviour_layer or (hidden[-1] if hidden else None)
    tr = sp.train
    if layer is None or not v.has(m, tr, layer) or not s.has_field(tr, "label"):
        raise DataError(f"the model has no class output and no labelled split {tr!r} with a hidden layer to fit a "
                        "linear probe on")
    for x in splits:
        if not v.has(m, x, layer):
            raise DataError(f"the probe layer {layer!r} has no rows on split {x!r}")
    Xtr = v.x(m, tr, layer)
    ytr = v.field(tr, "label", len(Xtr))
    counts = np.unique(np.asarray(ytr), return_counts=True)[1]
    if counts.size < 2 or counts.min() < 5:
        raise DataError(f"a linear probe on {layer} needs at least 5 training images of each of 2 or more classes; "
                        f"split {tr!r} has {int(counts.min(initial=len(ytr)))} for some class (add images or give "
                        "the model's class output)")
    probe = LinearProbe(C="cv", random_state=sp.random_state).fit(Xtr, ytr)
    return _Predictions({x: np.asarray(probe.predict(v.x(m, x, layer))) for x in splits},
                        f"a linear probe on {layer} fit on {tr!r}, the model having no class output", False, "labels")


def _original_predictions(v: _View, m: str, reading: _Predictions) -> dict[int, int] | None:
    """Image index -> the model's prediction on the original image, from splits of original images
    (``group`` = the image's index and no crossed background), for label-free reading."""
    out: dict[int, int] = {}
    sp = v.spec
    for split in dict.fromkeys([sp.train, sp.test_id, sp.test_ood, "test", "train"]):
        if not split or not v.has(m, split) or split == sp.crossed or OUTPUT_LAYER not in v.store.layers(m, split):
            continue
        if not v.store.has_field(split, "group") or v.crossed(split):
            continue
        n = v.store.n_rows(split, m)
        pred = _output_rows(v, m, split)
        for g, p in zip(v.field(split, "group", n).tolist(), pred.tolist(), strict=True):
            out.setdefault(int(g), int(p))
    return out or None


def _behaviour(v: _View, m: str) -> dict[str, Any]:
    from .analyses import background_behaviour, background_reliance, variant_behaviour

    s, sp = v.store, v.spec
    st, va = sp.crossed, sp.variants
    splits = [x for x in (st,) if v.has(m, x) and v.crossed(x) and s.has_field(x, "label")]
    vsplits = [x for x in (va,) if v.has(m, x) and x in s.splits and s.has_field(x, "variant")
               and s.has_field(x, "label") and s.has_field(x, "group")]
    if not splits and not vsplits:
        raise DataError(f"behaviour needs a crossed split {st!r} (fields 'label', 'group', 'background') or a "
                        f"variants split {va!r} (fields 'label', 'group', 'variant')")
    dsplits = [x for x in s.splits if x.startswith(DEPLOY_PREFIX) and v.has(m, x) and s.has_field(x, "label")
               and s.has_field(x, "group") and s.has_field(x, "background")]
    reading = _predictions(v, m, splits + vsplits + dsplits)
    preds = reading.preds
    out: dict[str, Any] = {"predictions": reading.source, "from_output": reading.from_output,
                           "space": reading.space}
    if splits:
        n = s.n_rows(st, m)
        label, group, background, bl = v.fields(st, n, "label", "group", "background", "background_label")
        basis = "background_label"
        reason = None
        if reading.space == "output":
            orig = _original_predictions(v, m, reading)
            basis = "model_prediction"
            if orig is None or not all(int(g) in orig for g in np.unique(group)) or \
                    not all(int(b) in orig for b in np.unique(background)):
                reason = ("the model's output is not the folder's classes and its predictions on the original "
                          "images (of the objects and of the backgrounds) are not in the store; give a class "
                          "map (--class-map) or extract the original images")
                label = bl = None
            else:
                label = np.array([orig[int(g)] for g in group])
                bl = np.array([orig[int(b)] for b in background])
        beh = background_behaviour(preds[st], group, background, label=label, background_label=bl, n_boot=sp.n_boot,
                                   n_perm=max(sp.n_perm, 1), ci_level=LEVEL, random_state=sp.random_state)
        out.update({
            "split": st, "n_groups": beh.n_groups, "n_backgrounds": beh.n_backgrounds,
            "flip_rate": _estimate(beh.flip_rate, beh.flip_rate_ci),
            "pull": _estimate(beh.pull, beh.pull_ci), "pull_raw": beh.pull_raw, "pull_null": beh.pull_null,
            "pull_p_value": beh.pull_p_value,
            "accuracy_crossed": _estimate(beh.accuracy, beh.accuracy_ci),
            "follows_background": _estimate(beh.follows_background, beh.follows_background_ci),
            "follows_background_null": beh.follows_background_null, "n_swapped": beh.n_swapped,
        })
        if bl is None or label is None:
            out["reliance"] = {**_estimate(None), "p_value": None, "margin": sp.reliance_margin,
                               "detectable": None, "basis": None, "stand_in": None if reason else "pull",
                               "reason": reason or "the crossed split records no class for its backgrounds "
                                                   "(field 'background_label')"}
            out["pull_low"] = beh.pull_low
            if label is not None:  # how far the objects' classes are from balanced (the pull's limit)
                per_object = np.unique(np.stack([group, label]), axis=1)[1]
                counts = np.bincount(np.unique(per_object, return_inverse=True)[1])
                out["class_imbalance"] = float(counts.max() / counts.mean())
        else:
            r = background_reliance(preds[st], group, background, label=label, background_label=bl, basis=basis,
                                    n_boot=sp.n_boot, ci_level=LEVEL, margin=sp.reliance_margin,
                                    effect_margin=sp.effect_margin, random_state=sp.random_state)
            out["reliance"] = {**_estimate(r.reliance, r.reliance_ci), "p_value": r.p_value, "margin": r.margin,
                               "detectable": r.detectable, "basis": r.basis, "reason": r.reason,
                               "n_background_classes": r.n_background_classes, "n_swapped": r.n_swapped}
            out["accuracy_own_background"] = _estimate(r.accuracy_own, r.accuracy_own_ci)
            out["accuracy_other_background"] = _estimate(r.accuracy_other, r.accuracy_other_ci)
            out["bg_gap_crossed"] = _estimate(r.bg_gap, r.bg_gap_ci)
            out["background_effect"] = {**_estimate(r.effect, r.effect_ci), "p_value": r.effect_p_value,
                                        "margin": r.effect_margin}
    if vsplits and reading.space == "labels":
        n = s.n_rows(va, m)
        vb = variant_behaviour(preds[va], v.field(va, "label", n), s.variants(va)[:n], v.field(va, "group", n),
                               n_boot=sp.n_boot, random_state=sp.random_state)
        out["variants_split"] = va
        out["accuracy"] = {k: {"value": e["value"], "ci": e["ci"], "n": e["n"]} for k, e in vb.accuracy.items()}
        out["bg_gap"] = _estimate(*(vb.bg_gap["value"], vb.bg_gap["ci"]) if vb.bg_gap else (None,))
        only = vb.only_bg_accuracy
        out["only_bg_accuracy"] = _estimate(*(only["value"], only["ci"]) if only else (None,))
        out["chance"] = vb.chance
    for key in ("bg_gap", "only_bg_accuracy", "follows_background"):
        out.setdefault(key, _estimate(None))
    gap = None
    if vsplits and reading.space == "labels":
        gap = _composite_gap(v, m, va, preds[va])
        if gap is not None:
            out["composite_gap"] = {**_estimate(gap.value, gap.ci), "material": gap.material,
                                    "accuracy_original": gap.accuracy_original,
                                    "accuracy_composite": gap.accuracy_composite, "n_objects": gap.n_objects}
    if dsplits and reading.space == "labels":
        out["predicted_accuracy"] = {x[len(DEPLOY_PREFIX):]: _site(v, m, x, preds[x], gap) for x in dsplits}
    return out


#: deployment splits are named ``deploy:<site>`` (probekit.datasets.Counterfactuals(deploy_backgrounds=...))
DEPLOY_PREFIX = "deploy:"


def _composite_gap(v: _View, m: str, va: str, pred: np.ndarray) -> Any:
    """Accuracy on the original images minus on each object pasted back on its own filled background."""
    from .analyses import composite_gap

    n = v.store.n_rows(va, m)
    names = np.asarray(v.store.variants(va)[:n]).astype(str)
    o, c = names == "original", names == "composite_self"
    if not o.any() or not c.any():
        return None
    label, group = v.field(va, "label", n), v.field(va, "group", n)
    oi = np.flatnonzero(o)[np.argsort(group[o], kind="stable")]
    ci = np.flatnonzero(c)[np.argsort(group[c], kind="stable")]
    if oi.size != ci.size or not np.array_equal(group[oi], group[ci]):
        return None
    return composite_gap(pred[oi], pred[ci], label[oi], group[oi])


def _site(v: _View, m: str, split: str, pred: np.ndarray, gap: Any) -> dict[str, Any]:
    """Predicted accuracy at one deployment site: objects x scenes, both resampled as samples."""
    from .analyses import predicted_accuracy

    n = v.store.n_rows(split, m)
    label, group, background = v.fields(split, n, "label", "group", "background")
    settings = _counterfactual_settings(v.store)
    site = split[len(DEPLOY_PREFIX):]
    unit = None
    deploy = settings.get("deploy") or {}
    if site in deploy.get("sites", []):  # scene slots cut from one photo are one unit of the site's sample
        unit = np.asarray(deploy["slot_photos"][deploy["sites"].index(site)])[np.asarray(background, dtype=int)]
    material = gap is not None and gap.material
    r = predicted_accuracy(pred, label, group, background, scene_unit=unit, composite=gap if material else None)
    names = settings.get("class_names") or []
    per_class = {(names[int(k)] if int(k) < len(names) else str(k)): {"value": d["value"], "ci": d["ci"]}
                 for k, d in r.per_class.items()}
    corrected = None if not r.corrected else _estimate(r.corrected["value"], r.corrected["ci"])
    return {**_estimate(r.value, r.ci), "n_objects": r.n_objects, "n_backgrounds": r.n_backgrounds,
            "per_class": per_class, "corrected": corrected}


def _counterfactual_settings(s: Store) -> dict[str, Any]:
    raw = s.attrs.get("counterfactuals")
    if not raw:
        return {}
    try:
        return dict(json.loads(raw))
    except (TypeError, ValueError):
        return {}


# -- representation: each layer's background component against its reference ---------------------


def _init_rows(v: _View, m: str, split: str, layer: str) -> tuple[list[Any], str] | None:
    """The init reference of a layer: seeded inits (``<m>@init<k>``) or the recorded step 0."""
    seeded = [i for i in v.inits(m) if v.has(i, split, layer)]
    if seeded:
        return [v.x(i, split, layer) for i in seeded], f"{len(seeded)} seeded initialisations"
    if v.init_step(m, split, layer) is not None:
        return [v.x(m, split, layer, 0)], "the recorded step 0"
    return None


def _background_flags(v: _View, names: Sequence[str], doc: dict[str, Any]) -> None:
    """``layers.<l>.background_flag`` of every model: its background component against its reference,
    with Bonferroni over every comparison made (layers x models)."""
    from .analyses import compare_background

    s, sp = v.store, v.spec
    st = sp.crossed
    if not v.crossed(st):
        return
    teachers = [t for t in names if s.role(t) == "teacher"] or [t for t in s.models if s.role(t) == "teacher"]
    plans = []
    for m in names:
        for layer in doc["models"][m]["layers"]:
            if layer == OUTPUT_LAYER or not v.has(m, st, layer):
                continue
            ref = None
            if s.role(m) == "student":
                t = next((t for t in teachers if v.has(t, st, layer)), None)
                if t is not None and s.n_rows(st, t) == s.n_rows(st, m):
                    ref = ([v.x(t, st, layer)], "absolute", "teacher" if t == "teacher" else f"teacher {t}")
            if ref is None:
                init = _init_rows(v, m, st, layer)
                if init is not None:
                    # background over interaction: a figure a weaker foreground barely moves (the inits'
                    # units are not the model's, so "absolute" cannot compare them; docs/METRICS.md)
                    ref = (init[0], "within_odds", f"at initialisation: {init[1]}")
            if ref is None:
                v.skip("background flag", "no reference: a teacher at this layer (for a student), seeded "
                       f"initialisations '{m}@init<k>' or a recorded step 0", m, layer)
                continue
            plans.append((m, layer, ref))
    if not plans:
        return
    level = interval_level(len(plans))  # Bonferroni over layers x models (two-sided intervals)
    for m, layer, (refs, kind, ref_name) in plans:
        def run(m: str = m, layer: str = layer, refs: list[Any] = refs, kind: str = kind) -> Any:
            X = v.x(m, st, layer)
            group, background = v.fields(st, len(X), "group", "background")
            sub = {}
            if len(refs[0]) < len(X):  # inits on the first of the split's objects (probekit audit's init_objects)
                sub = dict(zip(("reference_group", "reference_background"),
                               v.fields(st, len(refs[0]), "group", "background"), strict=True))
            return compare_background(X, refs, group, background, kind=kind, n_boot=sp.n_boot,
                                      ci_level=level, margin=sp.ratio_margin, random_state=sp.random_state, **sub)

        r = _run(v, "background flag", m, layer, run)
        if r is None:
            continue
        res = doc["models"][m]["layers"][layer]
        res["background_flag"] = layer_above_reference(r.ratio_ci, r.margin)
        res["background_vs_reference"] = {
            "reference": ref_name, "kind": r.kind, "value": r.value, "reference_value": r.reference,
            "ratio": _estimate(r.ratio, r.ratio_ci), "ci_level": r.ci_level, "margin": r.margin,
            "n_comparisons": len(plans), "reason": r.reason, "p_value": r.p_value, "scale": r.scale,
            "n_objects": r.n_groups, "n_reference_objects": r.n_reference_groups,
        }


# -- evidence lines -------------------------------------------------------------------------------

#: the headline figures: (name, definition); ``{split}`` and ``{margin:g}`` are filled in, and the
#: definition states the mark's rule in the words of :data:`probekit.verdict.MARKS` ``["headline"]``
HEADLINE_DEFINITIONS = {
    "sensitivity": (
        "background sensitivity",
        "Share of the layer's variance that comes from the background with the foreground held fixed, on "
        "the grouped split with broad backgrounds ({split}): Σ_u Σ_i (x_iu − x̄_g(i)u)² / Σ_u Σ_i (x_iu − x̄_u)². "
        "0 = ignores the background. Reference: the teacher at the same layer for a student, else the same "
        f"network at initialisation. Marked when {MARKS['headline'].when} "
        "(evidence: the verdict reads behaviour and the two-way decomposition).",
    ),
    "nms": (
        "normalised mean shift",
        "Σ_u (mean OOD − mean ID)² / Σ_u var_ID on the same foregrounds ({split}); 0 = the background "
        "family does not move the layer. Reference: the teacher at the same layer for a student, else the "
        f"same network at initialisation. Marked when {MARKS['headline'].when} "
        "(evidence: the verdict reads behaviour and the two-way decomposition).",
    ),
}


def _headline(doc: dict[str, Any], margin: float) -> dict[str, Any]:
    models = doc["models"]
    has = {k: any(k in res for info in models.values() for res in info["layers"].values())
           for k in HEADLINE_DEFINITIONS}
    metric = "sensitivity" if has["sensitivity"] else "nms" if has["nms"] else None
    if metric is None:
        return {"metric": None, "name": None, "definition": "", "rows": []}
    teachers = [m for m, info in models.items() if info["role"] == "teacher"]
    rows = []
    split = ""
    for m, info in models.items():
        for layer, res in info["layers"].items():
            if metric not in res:
                continue
            fig = res[metric]
            split = fig.get("split") or f"{fig.get('from')} → {fig.get('to')}"
            est = fig["value"]
            ref_name, ref_value = None, None
            if info["role"] == "student" and teachers:
                t = teachers[0]
                t_fig = models[t]["layers"].get(layer, {}).get(metric)
                if t_fig and t_fig["value"]["value"] is not None:
                    ref_name = "teacher" if t == "teacher" else f"teacher {t}"
                    ref_value = t_fig["value"]["value"]
            init_value = (fig.get("init") or {}).get("value")
            if ref_value is None and init_value is not None:
                ref_name, ref_value = "at initialisation", init_value
            ratio = est["value"] / ref_value if ref_value and est["value"] is not None else None
            flag = headline_mark((est.get("ci") or [None])[0], ref_value, margin)
            rows.append({"model": m, "layer": layer, "estimate": est, "reference": ref_name,
                         "reference_value": ref_value, "init_value": init_value, "ratio": ratio, "flag": flag})
    name, definition = HEADLINE_DEFINITIONS[metric]
    return {"metric": metric, "name": name, "definition": definition.format(split=split, margin=margin),
            "rows": rows}


def _evidence(doc: dict[str, Any]) -> list[str]:
    """Lines after the models' verdicts: the probe gap at the last hidden layer, the teacher fit."""
    lines = []
    for m, info in doc["models"].items():
        probes = [(la, res["probe"]) for la, res in info["layers"].items() if "probe" in res and la != OUTPUT_LAYER]
        if probes:
            la, p = probes[-1]
            if p["id"]["value"] is not None and p["ood"]["value"] is not None:
                lines.append(
                    f"{m}: linear-probe accuracy at {la} falls from {100 * p['id']['value']:.1f}% (ID) to "
                    f"{100 * p['ood']['value']:.1f}% (OOD), a gap of {100 * p['gap']['value']:.1f} points."
                )
    last_pairs = {}  # the last layer pair of each teacher/student: the representation that was fitted
    for pair in doc.get("pairs", []):
        last_pairs[(pair["teacher"], pair["student"])] = pair
    for pair in last_pairs.values():
        rm = pair.get("rel_mse") or {}
        vals = {sp: (rm.get(sp) or {}).get("value") for sp in rm}
        if len(vals) >= 2 and all(x is not None for x in vals.values()):
            text = ", ".join(f"{x:.3f} on {sp}" for sp, x in vals.items())
            lines.append(f"{pair['student']} fits {pair['teacher']} at {pair['student_layer']} with relative "
                         f"MSE {text}.")
    return lines


# -- weights and pairs ----------------------------------------------------------------------------


def _directions(v: _View, m: str) -> dict[str, Any]:
    from .analyses import DirectionClusters

    out = {}
    for layer in v.store.weight_layers(m):
        W = v.store.weights(m, layer)

        def run(W: np.ndarray = W) -> dict[str, Any]:
            est = DirectionClusters().fit(W)
            return {"n_units": int(W.shape[0]), "fan_in": int(W.shape[1]),
                    "n_directions": int(est.n_directions_), "shares": np.asarray(est.shares_).tolist(),
                    "spreads": np.asarray(est.spread_).tolist(),
                    "stability": {str(int(t)) if float(t).is_integer() else str(t): int(k)
                                  for t, k in est.stability_.items()},
                    "stable": bool(est.stable_), "note": est.result_.note}

        r = _run(v, "directions", m, layer, run)
        if r is not None:
            out[layer] = r
    if not out:
        v.skip("directions", "the store has no weight rows for this model", m, None)
    return out


def _pairs(v: _View, names: Sequence[str], doc: dict[str, Any]) -> list[dict[str, Any]]:
    from .analyses import linear_cka, relative_mse

    s, sp = v.store, v.spec
    teachers = [m for m in names if s.role(m) == "teacher"]
    students = [m for m in names if s.role(m) == "student"]
    if not teachers or not students:
        v.skip("teacher-student", "needs one model with role 'teacher' and one with role 'student'",
               actionable=False)
        return []
    pairs = []
    splits = [x for x in (sp.test_id, sp.test_ood, sp.crossed) if x and x in s.splits]
    for t in teachers:
        for st in students:
            # hidden layers only: a student's output (its representation) and a teacher's (its class
            # scores) share the name @output but not the meaning
            common = [la for la in v.model_layers(st) if la in s.layers(t) and la != OUTPUT_LAYER]
            layer_pairs = [(la, la) for la in common] or [(s.layers(st)[-1], s.layers(t)[-1])]
            for ls, lt in layer_pairs:
                pair: dict[str, Any] = {"teacher": t, "student": st, "teacher_layer": lt, "student_layer": ls,
                                        "cka": {}, "rel_mse": {}}
                for x in splits:
                    if not (v.has(st, x, ls) and v.has(t, x, lt)):
                        continue
                    if s.n_rows(x, st) != s.n_rows(x, t):
                        v.skip("teacher-student", f"split {x!r} has different row counts for the two models", st, ls)
                        continue
                    X, Y = v.x(st, x, ls), v.x(t, x, lt)
                    # the debiased estimator: the plain one reads 0.46 for independent features at d = 512
                    cka = _run(v, "cka", st, ls, lambda X=X, Y=Y: linear_cka(X, Y, debiased=True))
                    pair["cka"][x] = _estimate(cka)
                    fit = {}
                    if v.has(st, sp.train, ls) and v.has(t, sp.train, lt):
                        fit = {"student_fit": v.x(st, sp.train, ls), "teacher_fit": v.x(t, sp.train, lt)}
                    r = _run(v, "relative_mse", st, ls, lambda X=X, Y=Y, fit=fit: relative_mse(X, Y, **fit))
                    if r is not None:
                        value = r.raw if r.raw is not None else r.mapped
                        pair["rel_mse"][x] = _estimate(value)
                        pair.setdefault("rel_mse_mapped", {})[x] = _estimate(r.mapped)
                pair["differences"] = _differences(doc["models"][st]["layers"].get(ls, {}),
                                                   doc["models"][t]["layers"].get(lt, {}))
                pairs.append(pair)
    return pairs


def _differences(student: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, float]:
    """Student minus teacher of every per-layer figure both have (the gating metrics)."""
    out = {}
    for name, get in METRICS.items():
        a, b = get(student), get(teacher)
        if a is not None and b is not None:
            out[name] = float(a) - float(b)
    return out
