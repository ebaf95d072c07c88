"""The shipped JSON schema names exactly the fields the audit writes, and the result types behind them.

Three links, each able to fail on its own:

- real documents (``probekit.audit`` on a planted store with every per-layer check, a teacher–student
  pair and a reference; ``probekit audit`` on a folder of shapes with boxes, the mask check and two
  deployment sites) validate against the schema, whose objects are closed (``additionalProperties:
  false``) wherever their keys are fixed: a field the audit writes and the schema lacks fails;
- every field the schema's closed objects declare is written by one of those documents, or listed in
  :data:`CONDITIONAL` with the condition it needs: a field the schema keeps and the audit no longer
  writes fails;
- every field of every result type the audit serialises (``probekit.analyses`` results, the verdict,
  the specification) is either mapped to a schema field or listed as not written, with the reason; and
  every field of the schema objects they feed is one of those mapped fields or a field the audit adds
  from its context: a field added to a result type, or to the schema, without a decision fails.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

import probekit as pk
from probekit import analyses as A
from probekit.audit import AuditSpec
from probekit.cli import main
from probekit.datasets._shapes import write_image_folder
from probekit.verdict import ModelVerdict
from probekit.vocab import Estimate


def _schema() -> dict[str, Any]:
    return json.loads(resources.files("probekit.report").joinpath("audit.schema.json").read_text())


# -- documents from real audits ---------------------------------------------------------------------


def _planted_store(path: Path) -> Path:
    """A teacher and a student whose layers mix a foreground code with background factors; a crossed
    split (every object on the same backgrounds), factors on every split, and step 0 recorded."""
    n_fg, n_bg, d = 24, 5, 8
    rng = np.random.default_rng(0)
    w = np.random.default_rng(7)
    code, mix = w.normal(size=(n_fg, d)), w.normal(size=(3, d))

    def rows(per: int, scale: float, crossed: bool = False):
        g = np.repeat(np.arange(n_fg), per)
        if crossed:
            b = np.tile(np.arange(per), n_fg)
            return g, (rng.uniform(-1, 1, size=(per, 3)) * scale)[b], b
        return g, rng.uniform(-1, 1, size=(len(g), 3)) * scale, None

    splits = {"train": rows(3, 1.0), "test_id": rows(1, 1.0), "test_ood": rows(1, 3.0),
              "crossed": rows(n_bg, 3.0, crossed=True)}
    with pk.StoreWriter(path, mode="overwrite") as wr:
        for sp, (g, _, b) in splits.items():
            wr.add_split(sp, n_rows=len(g), factor_names=["hue", "bright", "freq"], has_label=True,
                         fields=["label", "group", "background"] if b is not None else ["label"])
        for name, p in {"teacher": 0.1, "student": 0.6}.items():
            wr.add_model(name, role=name, source="planted")
            for sp, (g, fac, b) in splits.items():
                for step in (None, 0):
                    for layer in ("l1", "l2"):
                        wr.add_layer(name, sp, layer, feature_shape=(d,), step=step)
                    samples = {"index": np.arange(len(g)), "label": g % 3, "factors": fac}
                    if b is not None:
                        samples.update(group=g, background=b)
                    level = 0.2 if step == 0 else p
                    acts = {la: (code[g] * s + level * fac @ mix).astype(np.float32)
                            for la, s in (("l1", 1.0), ("l2", 0.5))}
                    wr.write_rows(sp, 0, samples, {name: acts}, step=step)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Any]:
    path = _planted_store(tmp_path_factory.mktemp("schema") / "planted.h5")
    return pk.audit(path, n_boot=30, n_perm=20, progress=False).data


@pytest.fixture(scope="module")
def from_images(tmp_path_factory) -> dict[str, Any]:
    """``probekit audit`` on generated shapes: boxes (so the mask check), two deployment sites, two inits."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("images")
    images, masks = write_image_folder(tmp / "shapes", split="test", background="class", n=24)
    rows = []
    for p in sorted(images.rglob("*.png")):
        ys, xs = np.nonzero(np.asarray(Image.open(masks / p.relative_to(images))) > 0)
        rows.append(f"{p.relative_to(images).as_posix()},{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}")
    (tmp / "boxes.csv").write_text("path,x0,y0,x1,y1\n" + "\n".join(rows) + "\n")
    sites = []
    for k, site in enumerate(("siteA", "siteB")):
        d = tmp / site
        d.mkdir()
        for j in range(2):
            px = np.random.default_rng(10 * k + j).uniform(0, 255, (40, 40, 3)).astype("uint8")
            Image.fromarray(px).save(d / f"{j}.png")
        sites.append(str(d))
    out = tmp / "audit"
    assert main(["audit", "probekit.experiments.shortcut:ShapesCNN", "--data", str(images), "--boxes",
                 str(tmp / "boxes.csv"), "--out-dir", str(out), "--mask-check", "2", "--deploy-backgrounds", *sites,
                 "--deploy-scenes", "2", "--n-boot", "30", "--n-perm", "20", "--no-progress", "--inits", "2"]) == 0
    return json.loads((out / "audit.json").read_text())


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:160]}" for e in validator.iter_errors(doc)]


def test_an_audit_of_a_store_follows_the_closed_schema(planted):
    assert not _errors(planted), "\n".join(_errors(planted)[:10])


@pytest.mark.slow
def test_an_audit_of_images_follows_the_closed_schema(from_images):
    assert not _errors(from_images), "\n".join(_errors(from_images)[:10])


@pytest.mark.parametrize("where", ["layer", "probe", "behaviour", "model", "top", "pair", "skipped"])
def test_a_field_the_schema_does_not_name_is_refused(planted, where):
    doc = copy.deepcopy(planted)
    m = doc["models"]["student"]
    target = {"layer": m["layers"]["l1"], "probe": m["layers"]["l1"]["probe"], "behaviour": m["behaviour"],
              "model": m, "top": doc, "pair": doc["pairs"][0], "skipped": doc["skipped"][0]}[where]
    target["not_in_the_schema"] = 1
    with pytest.raises(jsonschema.ValidationError, match="not_in_the_schema"):
        jsonschema.validate(doc, _schema())


# -- every field the schema declares is written -----------------------------------------------------

#: Fields of closed schema objects the two documents above do not write (or write as null, their
#: contents absent), and the condition they need.
CONDITIONAL = {
    "attribution": "probekit demo only (integrated gradients of its two models)",
    "models.*.predicted_accuracy.*.corrected": "a material compositing cost (behaviour.composite_gap.material)",
}


def _closed_paths(schema: dict[str, Any]) -> set[str]:
    """Dotted paths of every property of every closed object (``*``: any name, ``[]``: any item)."""
    defs = schema["$defs"]
    out: set[str] = set()

    def walk(node: dict[str, Any], path: str, seen: tuple[str, ...]) -> None:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[1]
            if name not in seen:
                walk(defs[name], path, (*seen, name))
            return
        for alt in node.get("oneOf", []) + node.get("anyOf", []):
            walk(alt, path, seen)
        props = node.get("properties", {})
        for k, v in props.items():
            p = f"{path}.{k}" if path else k
            if node.get("additionalProperties") is False:
                out.add(p)
            walk(v, p, seen)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}.*" if path else "*", seen)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]", seen)

    walk(schema, "", ())
    return out


def _doc_paths(node: Any, schema_node: dict[str, Any], path: str, defs: dict[str, Any], out: set[str]) -> None:
    """The paths of ``node`` spelled as the schema spells them (names under a map become ``*``)."""
    while "$ref" in schema_node:
        schema_node = defs[schema_node["$ref"].rsplit("/", 1)[1]]
    alts = schema_node.get("oneOf", []) + schema_node.get("anyOf", [])
    if alts and isinstance(node, dict):
        schema_node = next((a for a in alts if a.get("type") == "object" or "$ref" in a), schema_node)
        while "$ref" in schema_node:
            schema_node = defs[schema_node["$ref"].rsplit("/", 1)[1]]
    if isinstance(node, dict):
        props = schema_node.get("properties", {})
        for k, v in node.items():
            if k in props:
                p = f"{path}.{k}" if path else k
                out.add(p)
                _doc_paths(v, props[k], p, defs, out)
            elif isinstance(schema_node.get("additionalProperties"), dict):
                p = f"{path}.*" if path else "*"
                out.add(p)
                _doc_paths(v, schema_node["additionalProperties"], p, defs, out)
    elif isinstance(node, list) and isinstance(schema_node.get("items"), dict):
        for v in node:
            _doc_paths(v, schema_node["items"], f"{path}[]", defs, out)


@pytest.mark.slow
def test_every_field_the_schema_declares_is_written(planted, from_images):
    schema = _schema()
    declared = _closed_paths(schema)
    written: set[str] = set()
    for doc in (planted, from_images):
        _doc_paths(doc, schema, "", schema["$defs"], written)

    def conditional(p: str) -> bool:
        return any(p == c or p.startswith(c + ".") for c in CONDITIONAL)

    unwritten = {p for p in declared - written if not conditional(p)}
    assert not unwritten, f"declared by the schema, written by neither audit: {sorted(unwritten)}"
    assert set(CONDITIONAL) <= declared, f"not in the schema: {sorted(set(CONDITIONAL) - declared)}"
    written_anyway = {p for p in written if any(p.startswith(c + ".") for c in CONDITIONAL)}
    assert not written_anyway, f"CONDITIONAL, yet written here (take them off the list): {sorted(written_anyway)}"


# -- the result types behind the fields ---------------------------------------------------------------

L, B = "models.*.layers.*.", "models.*.behaviour."


@dataclasses.dataclass(frozen=True)
class Serialised:
    """How the audit writes one result type: each field to the schema paths it fills, or None (not
    written) with the reason in ``why``; ``at`` the schema objects it fills, ``context`` the fields of
    the first of them that the audit adds from elsewhere (split names, references)."""

    type: type
    at: tuple[str, ...]
    fields: dict[str, tuple[str, ...] | None]
    why: str = ""
    context: tuple[str, ...] = ()


_CI = "ci_level: every interval is 95 % by the document's convention (Bonferroni levels are written where used)"
SERIALISED = (
    Serialised(A.ProbeIdOodResult, (L + "probe",), {
        "id_accuracy": (L + "probe.id",), "id_ci": (L + "probe.id",), "ood_accuracy": (L + "probe.ood",),
        "ood_ci": (L + "probe.ood",), "gap": (L + "probe.gap",), "gap_ci": (L + "probe.gap",),
        "train_accuracy": (L + "probe.train_accuracy",), "C": (L + "probe.C",), "n_train": (L + "probe.n_train",),
        "paired": (L + "probe.paired",), "n_id": None, "n_ood": None, "n_boot": None, "ci_level": None},
        why="n_id, n_ood: the splits' rows (splits.*.rows); n_boot: config.n_boot; " + _CI, context=("train",)),
    Serialised(A.DecodabilityResult, (L + "decodability.*", L + "decodability.*.factors.*"), {
        "metric": (L + "decodability.*.factors.*.metric",), "period": (L + "decodability.*.factors.*.period",),
        "score": (L + "decodability.*.factors.*.score",), "control_mean": (L + "decodability.*.factors.*.control",),
        "control_sd": (L + "decodability.*.factors.*.control_sd",),
        "excess": (L + "decodability.*.factors.*.excess",), "excess_ci": (L + "decodability.*.factors.*.excess",),
        "factor_names": (L + "decodability.*.factors",),
        "mean_excess_r2": (L + "decodability.*.mean_excess_r2",),
        "mean_excess_balanced_accuracy": (L + "decodability.*.mean_excess_balanced_accuracy",),
        "mode": None, "score_ci": None, "alpha": None, "n_fit": None, "n_score": None, "n_groups": None, "cv": None,
        "n_shuffles": None, "ci_level": None},
        why="the excess over the control is the figure; its parts' intervals, the penalty, the fold and shuffle "
            "counts are the estimator's working; " + _CI, context=("split",)),
    Serialised(A.BackgroundCorrelationResult, (L + "correlation",), {
        "n_samples": (L + "correlation.n_samples",), "n_dead_units": (L + "correlation.n_dead_units",),
        "mean_abs_pearson": (L + "correlation.per_factor_mean_abs_r", L + "correlation.mean_abs_r"),
        "noise_floor": (L + "correlation.noise_floor",), "threshold": (L + "correlation.threshold",),
        "share_significant": (L + "correlation.per_factor_share_significant",),
        "share_any_factor_significant": (L + "correlation.share_significant",), "alpha": (L + "correlation.alpha",),
        "mean_factor_r2": (L + "correlation.variance_share_background",),
        "null_factor_r2": (L + "correlation.variance_share_background_null",),
        "mean_label_eta2": (L + "correlation.variance_share_label",), "pearson": (L + "correlation.hist",),
        "n_units": None, "factor_names": None, "mean_abs_spearman": None, "null_mean_abs_r": None,
        "share_above_threshold": None, "fwer_threshold": None, "share_above_fwer_threshold": None,
        "layer_factor_r2": None, "layer_label_eta2": None, "null_label_eta2": None, "n_permutations": None,
        "spearman_exact": None, "spearman": None, "label_corr": None, "factor_r2": None, "label_eta2": None,
        "p_values": None},
        why="per-unit arrays are summarised (hist, shares); n_units is the layer's; the factor names are the "
            "split's; the Spearman, FWER and label-side variants are not read by the report or the verdict; "
            "n_permutations: config.n_perm", context=("split",)),
    Serialised(A.BackgroundSensitivityResult, (L + "sensitivity",), {
        "layer": (L + "sensitivity.value", L + "sensitivity.init"),
        "layer_ci": (L + "sensitivity.value", L + "sensitivity.init"),
        "mean_unit": None, "n_rows": None, "n_groups": None, "min_group_size": None, "n_dead_units": None,
        "ci_level": None, "per_unit": None},
        why="the layer's figure (trained, and at step 0 as init) is the evidence; " + _CI, context=("split",)),
    Serialised(A.NormalizedMeanShiftResult, (L + "nms",), {
        "nms_debiased": (L + "nms.value", L + "nms.init"), "ci": (L + "nms.value", L + "nms.init"),
        "nms": None, "null_level": None, "sum_var_a": None, "n_a": None, "n_b": None, "paired": None,
        "ci_level": None, "per_unit_shift2": None},
        why="the debiased estimate is written (the plug-in is biased up by its noise term); " + _CI,
        context=("from", "to")),
    Serialised(A.CrossedDecompositionResult, (L + "crossed",), {
        **{k: (L + f"crossed.{k}",) for k in ("foreground", "background", "interaction", "background_share",
                                               "n_groups", "n_backgrounds", "n_dropped_groups", "sketched")},
        **{f"{k}_ci": (L + f"crossed.{k}",) for k in ("foreground", "background", "interaction", "background_share")},
        "n_units": None, "ci_level": None},
        why="n_units is the layer's (layers.*.n_units); " + _CI, context=("split",)),
    Serialised(A.BackgroundComparisonResult, (L + "background_vs_reference",), {
        **{k: (L + f"background_vs_reference.{k}",)
           for k in ("kind", "value", "p_value", "scale", "ci_level", "margin", "reason")},
        "reference": (L + "background_vs_reference.reference_value",),
        "ratio": (L + "background_vs_reference.ratio",), "ratio_ci": (L + "background_vs_reference.ratio",),
        "flagged": (L + "background_flag",),
        "n_groups": (L + "background_vs_reference.n_objects",),
        "n_reference_groups": (L + "background_vs_reference.n_reference_objects",),
        "df": None, "n_references": None, "model": None, "references": None, "n_shared_groups": None,
        "subsample_weight": None},
        why="the references' own figures, the t interval's degrees of freedom and the subsample estimate's "
            "weight are the comparison's working",
        context=("reference", "n_comparisons")),
    Serialised(A.BackgroundBehaviourResult, (B.rstrip("."),), {
        **{k: (B + k,) for k in ("n_groups", "n_backgrounds", "pull_raw", "pull_null", "pull_p_value",
                                  "follows_background_null", "n_swapped", "pull_low")},
        **{k: (B + k,) for k in ("flip_rate", "pull", "follows_background")},
        **{f"{k}_ci": (B + k,) for k in ("flip_rate", "pull", "follows_background")},
        "accuracy": (B + "accuracy_crossed",), "accuracy_ci": (B + "accuracy_crossed",),
        "n_rows": None, "threshold": None, "ci_level": None, "flagged": None, "per_background_pull": None},
        why="flagged and threshold: the pull decides nothing since schema 3 (the verdict reads reliance, "
            "probekit.verdict); per-background pulls are the figure's working; " + _CI,
        context=("predictions", "from_output", "space", "split", "variants_split", "class_imbalance", "reliance",
                 "background_effect", "composite_gap")),
    Serialised(A.RelianceResult, (B + "reliance", B + "background_effect", B.rstrip(".")), {
        "reliance": (B + "reliance.value",), "reliance_ci": (B + "reliance.ci",),
        **{k: (B + f"reliance.{k}",) for k in ("p_value", "margin", "detectable", "reason", "basis",
                                                "n_background_classes", "n_swapped")},
        "accuracy_own": (B + "accuracy_own_background",), "accuracy_own_ci": (B + "accuracy_own_background",),
        "accuracy_other": (B + "accuracy_other_background",),
        "accuracy_other_ci": (B + "accuracy_other_background",),
        "bg_gap": (B + "bg_gap_crossed",), "bg_gap_ci": (B + "bg_gap_crossed",),
        "effect": (B + "background_effect.value",), "effect_ci": (B + "background_effect.ci",),
        "effect_p_value": (B + "background_effect.p_value",), "effect_margin": (B + "background_effect.margin",),
        "shortcut": None, "sensitive": None, "effect_reason": None, "n_objects": None, "n_backgrounds": None,
        "follows_background": None, "follows_background_null": None, "flip_rate": None, "flip_rate_ci": None,
        "ci_level": None, "n_boot": None, "reliance_boot": None},
        why="shortcut and sensitive become models.*.findings through probekit.verdict; the counts, following and "
            "flip rate are written from BackgroundBehaviourResult (the same rows); effect_reason is not written "
            "(a null background_effect has no reason in the document); the bootstrap draws are the interval's "
            "working; " + _CI, context=("stand_in",)),
    Serialised(A.VariantBehaviourResult, (B.rstrip("."),), {
        "accuracy": (B + "accuracy",), "bg_gap": (B + "bg_gap",), "only_bg_accuracy": (B + "only_bg_accuracy",),
        "chance": (B + "chance",), "n_classes": None, "ci_level": None},
        why="n_classes: the folder's classes (inputs.classes); " + _CI),
    Serialised(A.CompositeGapResult, (B + "composite_gap",), {
        **{k: (B + f"composite_gap.{k}",) for k in ("value", "ci", "accuracy_original", "accuracy_composite",
                                                     "n_objects", "material")},
        "threshold": None, "ci_level": None},
        why="material is the threshold's verdict (docs/METRICS.md gives the threshold); " + _CI),
    Serialised(A.PredictedAccuracyResult, ("models.*.predicted_accuracy.*",), {
        **{k: (f"models.*.predicted_accuracy.*.{k}",)
           for k in ("value", "ci", "n_objects", "n_backgrounds", "per_class", "corrected")},
        "variance_components": None, "ci_level": None},
        why="the variance components are the interval's working; " + _CI),
    Serialised(A.DirectionClustersResult, ("models.*.directions.*",), {
        **{k: (f"models.*.directions.*.{k}",) for k in ("n_directions", "n_units", "shares", "stable", "note")},
        "spread_degrees": ("models.*.directions.*.spreads",),
        "stability_tol_degrees": ("models.*.directions.*.stability",),
        "stability_n_directions": ("models.*.directions.*.stability",),
        "n_clusters": None, "n_zero_units": None, "mass": None, "tol_degrees": None, "centers": None},
        why="the cluster centres, the mass (90 %) and the tolerance are the clustering's working",
        context=("fan_in",)),
    Serialised(A.RelativeMSEResult, ("pairs[]",), {
        "raw": ("pairs[].rel_mse",), "mapped": ("pairs[].rel_mse_mapped", "pairs[].rel_mse"),
        "n_rows": None, "map_fit_rows": None, "alpha": None},
        why="the affine map's fit (rows, ridge) is the figure's working",
        context=("teacher", "student", "teacher_layer", "student_layer", "cka", "differences")),
    Serialised(ModelVerdict, ("models.*",), {f.name: (f"models.*.{f.name}",) for f in dataclasses.fields(ModelVerdict)},
               context=("role", "source", "inits", "layers", "directions", "behaviour", "predicted_accuracy")),
    Serialised(AuditSpec, ("config",), {f.name: (f"config.{f.name}",) for f in dataclasses.fields(AuditSpec)}),
    Serialised(Estimate, ("models.*.layers.*.probe.id",), {"value": ("models.*.layers.*.probe.id.value",),
                                                           "ci": ("models.*.layers.*.probe.id.ci",)}),
)


def _node(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema object at a dotted path (``*``: a map's values, ``[]``: an array's items)."""
    defs = schema["$defs"]

    def deref(n: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in n:
            n = defs[n["$ref"].rsplit("/", 1)[1]]
        alts = [deref(a) for a in n.get("oneOf", []) if a.get("type") != "null"]
        return alts[0] if len(alts) == 1 else n

    node = deref(schema)
    for tok in path.split("."):
        arrays = tok.count("[]")
        tok = tok.replace("[]", "")
        node = deref(node["additionalProperties"] if tok == "*" else node["properties"][tok])
        for _ in range(arrays):
            node = deref(node["items"])
    return node


@pytest.mark.parametrize("entry", SERIALISED, ids=lambda e: e.type.__name__)
def test_a_result_types_fields_are_each_written_or_left_out_with_a_reason(entry):
    schema = _schema()
    fields = {f.name for f in dataclasses.fields(entry.type)}
    assert set(entry.fields) == fields, (
        f"{entry.type.__name__}: fields not decided (map them to the schema or leave them out, with the reason): "
        f"{sorted(fields - set(entry.fields))}; gone from the type: {sorted(set(entry.fields) - fields)}")
    if any(v is None for v in entry.fields.values()):
        assert entry.why, f"{entry.type.__name__}: fields left out without a reason"
    for name, paths in entry.fields.items():
        for p in paths or ():
            parent, _, key = p.rpartition(".")
            assert key in _node(schema, parent).get("properties", {}), f"{entry.type.__name__}.{name} -> {p}"


def test_the_schema_objects_the_types_fill_hold_nothing_else():
    schema = _schema()
    filled: dict[str, set[str]] = {}
    for e in SERIALISED:
        for at in e.at:
            filled.setdefault(at, set())
        filled[e.at[0]].update(e.context)
        for paths in e.fields.values():
            for p in paths or ():
                parent, _, key = p.rpartition(".")
                if parent in e.at:
                    filled[parent].add(key)
    for at, keys in filled.items():
        declared = set(_node(schema, at).get("properties", {}))
        assert declared == keys, (f"{at}: in the schema, from no result type or context: {sorted(declared - keys)}; "
                                  f"from a type, not in the schema: {sorted(keys - declared)}")
