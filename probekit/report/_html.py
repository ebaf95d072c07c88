"""The HTML report: an audit result (the JSON of docs/REPORT_SCHEMA.md) -> one self-contained file.

Compute happens in :mod:`probekit.audit`; this module only lays the numbers out. Jinja2 renders with
autoescaping on, so every user-supplied string (model, layer, factor, split names, paths) is escaped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2

from .._io import write_text
from ..verdict import FINDINGS, MARKS, RULES, level_pct, shortcut_estimate
from . import _plots as P
from ._blocks import _cell, _fmt, _section
from ._findings import model_verdicts, pct, points
from ._layers import LAYER_SECTIONS

__all__ = ["render_html", "write_report"]


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("probekit.report", "templates"),
        autoescape=True,  # every string from the audit is escaped, whatever the template does
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _galleries(gallery: Any) -> list[Mapping[str, Any]]:
    if gallery is None:
        return []
    if isinstance(gallery, Mapping):
        return [gallery]
    return list(gallery)


def _gallery_section(galleries: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    galleries = [g for g in galleries if g.get("objects")]
    if not galleries:
        return None
    g0 = galleries[0]
    s = _section("gallery", "What was audited",
                 "The images each model was shown, for a few objects: "
                 f"{g0.get('selection', 'a few objects per class')}. Per object: the original; its mask (the "
                 "magenta outline; what it calls background is dimmed); the image variants (only_fg = the object "
                 "on black, no_fg = the object blacked out, only_bg = the background with the object's region "
                 "filled, mixed_same / mixed_rand / mixed_next = the object on the filled background of an image of "
                 "the same / a random / the next class); then the object on each background of the crossed "
                 "split. Under each: the model's prediction, in red where it differs from its prediction on the "
                 "original. Check here that the masks cover the objects and that the composites look as intended.")
    s["galleries"] = galleries
    return s


def _deployment(models: Mapping[str, Any], examples: Mapping[str, list[Mapping[str, Any]]]) -> dict[str, Any] | None:
    """Where you deploy it: accuracy predicted per site and class, the compositing control, example composites."""
    sites = {m: info.get("predicted_accuracy") or {} for m, info in models.items()}
    gaps = {m: (info.get("behaviour") or {}).get("composite_gap") for m, info in models.items()}
    if not any(sites.values()) and not any(gaps.values()):
        return None
    s = _section("deployment", "Where you deploy it",
                 "Every test object composited on the same photos of each site's empty scenes (cropped or tiled, "
                 "never stretched): the accuracy the model can be expected to reach there, with a 95 % interval "
                 "that counts both the objects and the scenes as samples. The compositing control pastes each "
                 "object back on its own image's filled background: what the composites cost by themselves. When "
                 "that cost is material, the counterfactual accuracies are pessimistic by about that much and "
                 "the prediction is given corrected beside the raw figure (docs/METRICS.md).")
    rows, per_class = [], []
    classes = list(dict.fromkeys(c for ss in sites.values() for r in ss.values() for c in (r.get("per_class") or {})))
    for m, ss in sites.items():
        for site, r in ss.items():
            rows.append([m, site, _cell(r, 2), _cell(r.get("corrected"), 2) if r.get("corrected") else "–",
                         f"{r.get('n_objects')} x {r.get('n_backgrounds')}"])
            pc = r.get("per_class") or {}
            per_class.append([m, site, *[_cell(pc.get(c), 2) if c in pc else "–" for c in classes]])
    if rows:
        s["tables"].append({"title": "predicted accuracy per site", "left": 2, "rows": rows,
                            "header": ["model", "site", "predicted accuracy", "corrected for the composites",
                                       "objects x scenes"]})
        s["tables"].append({"title": "per class", "left": 2, "rows": per_class,
                            "header": ["model", "site", *classes]})
    grows = [[m, _fmt(g.get("accuracy_original"), 3), _fmt(g.get("accuracy_composite"), 3), _cell(g, 3),
              "yes" if g.get("material") else "no"] for m, g in gaps.items() if g]
    if grows:
        s["tables"].append({"title": "compositing control (the object pasted back on its own filled background)",
                            "left": 1, "rows": grows,
                            "header": ["model", "accuracy, originals", "accuracy, pasted back", "gap", "material"]})
    shown = [{"model": f"at {site}", "n_shown": len(cells), "n_objects": len(cells),
              "objects": [{"path": f"{len(cells)} example composites", "label": f"on {site}'s scenes", "changes": None,
                           "n_backgrounds": 0, "cells": cells, "backgrounds": []}]}
             for site, cells in examples.items() if cells]
    s["galleries"] = shown
    return s


def _status_badge(status: str) -> str:
    return {"flagged": "bad", "not_flagged": "ok", "not_judged": "none"}[status]


def _verdict_lines(audit: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary's paragraph per model: badge, verdict, why not judged, a non-detection's power, and what
    a layer FLAG beside a clean verdict means."""
    models = audit.get("models", {})
    out = []
    for v in model_verdicts(audit):
        info = models[v.model]
        if not v.verdict and v.status != "not_judged":
            continue
        beh = info.get("behaviour") or {}
        notes = []
        if v.status == "not_judged" and v.reason and v.reason != v.verdict:
            notes.append(f"Not judged: {v.reason}")
        rel = beh.get("reliance") or {}
        if v.status == "not_flagged" and rel.get("value") is not None:
            det = rel.get("detectable")
            notes.append(f"Not detected: reliance {pct(rel, 1)}"
                         + (f"; this audit detects a reliance of {100 * float(det):.0f} % or more with 80 % power "
                            "(a smaller one could go unseen)." if det is not None else "."))
        elif rel.get("value") is None and rel.get("reason"):
            notes.append(f"Reliance not computed: {rel['reason']}")
        flagged_layers = [la for la, r in (info.get("layers") or {}).items() if r.get("background_flag")]
        if v.status != "flagged" and flagged_layers:
            notes.append(f"Its layer FLAG ({', '.join(flagged_layers)}) is the representation finding: those layers "
                         "carry more background than their reference, but the shortcut verdict reads what the model "
                         "predicts, and its predictions do not follow the background beyond the threshold.")
        basis = info.get("flag_basis")
        holds = [f.replace("_", " ") for f, h in v.findings.items() if h]
        out.append({"name": v.model, "badge": _status_badge(v.status), "label": v.badge, "text": v.verdict,
                    "notes": notes,
                    "basis": (f"basis: {basis}" if basis else "") if "findings" not in info else
                    ("findings: " + (", ".join(holds) if holds else "none"))})
    return out


def render_html(audit: Mapping[str, Any], gallery: Any = None,
                deploy_examples: Mapping[str, list[Mapping[str, Any]]] | None = None) -> str:
    """Render an audit dict into the report's HTML text.

    ``gallery``: one :func:`probekit.report.build_gallery` result, or a list of them (one per model): the
    images that were audited, with the model's predictions. ``deploy_examples``: per deployment site, a
    few composites (``{"src", "width", "height", "name"}`` thumbnails) shown in "Where you deploy it".
    """
    models: Mapping[str, Any] = audit.get("models", {})
    roles = {m: info.get("role", "model") for m, info in models.items()}
    colors = P.model_colors(roles)
    model_level: dict[str, Callable[[], dict[str, Any] | None]] = {
        "gallery": lambda: _gallery_section(_galleries(gallery)),
        "deployment": lambda: _deployment(models, deploy_examples or {}),
        "behaviour": lambda: _behaviour(models, colors),
        "directions": lambda: _directions(models, colors),
        "teacher-student": lambda: _pairs(audit.get("pairs", []), colors),
        "training": lambda: _series(audit.get("series", {})),
        "attribution": lambda: _attribution(audit.get("attribution", {}), colors),
        "inputs": lambda: _inputs(audit),
        "skipped": lambda: _skipped(audit.get("skipped", [])),
    }
    sections = [_section("summary", "Summary")]
    for sid in SECTION_ORDER:
        built = ([ls.build(audit, colors) for ls in LAYER_SECTIONS] if sid == LAYERS else [model_level[sid]()])
        sections += [s for s in built if s is not None]
    sections.append(_glossary(audit))
    verdicts = model_verdicts(audit)
    lines = _verdict_lines(audit)
    summary_class = ("bad" if any(v.status == "flagged" for v in verdicts) else
                     "clean" if verdicts and all(v.status == "not_flagged" for v in verdicts) else "")
    model_texts = {v.verdict for v in verdicts}
    other_lines = [line for line in audit.get("verdict", []) if line not in model_texts]
    return _env().get_template("report.html.j2").render(
        title=Path(str(audit.get("store", "store"))).name,
        store=audit.get("store", ""),
        n_models=len(models),
        splits=list(audit.get("splits", {})),
        version=audit.get("probekit_version", ""),
        created=audit.get("created", ""),
        sections=sections,
        model_verdicts=lines,
        verdict_figure=_verdict_figure(models, colors),
        findings_table=_findings_table(audit),
        verdict=other_lines if (other_lines or lines) else
        ["No verdict or headline figure could be computed; see the skipped analyses."],
        summary_class=summary_class,
    )


LAYERS = "layers"

#: The report's sections after the summary, in order: the model-level ones by id, and where
#: :data:`LAYERS` stands the per-layer ones (:data:`LAYER_SECTIONS`, one per check of the audit). The
#: glossary comes last.
SECTION_ORDER = ("gallery", "deployment", "behaviour", LAYERS, "directions", "teacher-student", "training",
                 "attribution", "inputs", "skipped")

#: Glossary rows of the model-level sections by id (``""``: terms of the whole report, listed last). The
#: per-layer sections carry their own (:attr:`probekit.report._layers.LayerSection.glossary`).
MODEL_GLOSSARY: dict[str, tuple[tuple[str, str], ...]] = {
    "behaviour": (
        ("flip rate", "share of objects whose predicted class is not the same on every background of the crossed "
                      "split"),
        ("background pull", "share of predictions that backgrounds move towards the same classes for every object, "
                            "beyond a shuffle of the backgrounds within each object; it decides the shortcut finding "
                            "only where the backgrounds carry no class (standing in for reliance): the finding then "
                            f"holds when {MARKS['pull'].holds_when()}"),
        ("follows background", "where a background came from an image of another class: how often the prediction "
                               "is that class"),
        ("crossed split", "every object (group) shown on the same set of backgrounds (the split named crossed)"),
        ("only_fg / no_fg / only_bg", "the object on black / the object's pixels blacked out / the background "
                                      "alone"),
        ("mixed_same / mixed_rand / mixed_next", "the object on the background of another image of the same / a "
                                                 "random / the next class; BG-gap = acc(mixed_same) − "
                                                 "acc(mixed_rand)"),
    ),
    "teacher-student": (
        ("CKA", "debiased linear centred kernel alignment between two representations (0 = unrelated, 1 = the same "
                "up to rotation and scale)"),
        ("relative MSE", "Σ‖student − teacher‖² / Σ‖teacher − mean‖²: the share of the teacher's variance the "
                         "student misses (units aligned only at the layer the student was fitted to)"),
    ),
    "": (
        *((f"{f} (finding)", f"{RULES[f].title}: holds when {RULES[f].rule}") for f in FINDINGS),
        ("ID / OOD", "in distribution (the training backgrounds) / out of distribution (a disjoint background "
                     "family)"),
    ),
}


def glossary() -> list[tuple[str, str]]:
    """Every term of the report, in the order of the sections that show it (terms of the whole report last)."""
    layer = {ls.id: ls.glossary for ls in LAYER_SECTIONS}
    ids = [x for sid in SECTION_ORDER for x in (list(layer) if sid == LAYERS else [sid])]
    return [row for sid in [*ids, ""] for row in layer.get(sid, MODEL_GLOSSARY.get(sid, ()))]


_FACTORS = {  # the built-in background digits' factors
    "hue": "background colour hue, 0-1, circular", "sat": "background colour saturation",
    "bright": "background brightness (HSV value)", "orient": "stripe orientation in degrees, circular (period 180)",
    "freq": "stripe frequency, cycles per image", "amp": "stripe amplitude (contrast of the texture)",
}


def _glossary(audit: Mapping[str, Any]) -> dict[str, Any]:
    s = _section("glossary", "Glossary")
    config = audit.get("config") or {}
    # each finding's rule with the margin this audit used (the glossary's own rows state the defaults)
    used = {f"{f} (finding)": f"{r.title}: holds when {r.describe(config.get(r.setting) if r.setting else None)}"
            for f, r in RULES.items()}
    rows = [[k, used.get(k, v)] for k, v in glossary()]
    factors = dict.fromkeys(f for sp in (audit.get("splits") or {}).values() for f in sp.get("factor_names", []))
    rows += [[f"factor {f}", _FACTORS.get(f, "a background factor of your data (see where the data came from)")]
             for f in factors]
    s["tables"].append({"title": "", "header": ["term", "meaning"], "rows": rows, "left": 2})
    s["lines"].append(f"Formulas, nulls and calibration: docs/METRICS.md of probekit {audit.get('probekit_version', '')} "
                      "(in the repository and the source distribution).")
    return s


def _inputs(audit: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the models were shown (``probekit audit``): the preprocessing, and how the verdict moves
    when approximate masks are eroded and dilated."""
    pre, ms = audit.get("preprocessing"), audit.get("mask_sensitivity")
    if not pre and not ms:
        return None
    s = _section("inputs", "Inputs: preprocessing and masks")
    if pre:
        s["tables"].append({"title": "preprocessing (what ran before the model)", "header": ["", ""], "left": 2,
                            "rows": [["settings from", str(pre.get("source", ""))],
                                     ["steps", " → ".join(str(x) for x in pre.get("steps", []))],
                                     ["input size", _fmt(pre.get("input_size"))],
                                     ["mean / std", f"{_fmt(pre.get('mean'))} / {_fmt(pre.get('std'))}"],
                                     ["overrides", ", ".join(f"{k}={v}" for k, v in (pre.get("overrides") or {}).items())
                                      or "none"]]})
        if pre.get("note"):
            s["lines"].append(str(pre["note"]))
    if ms:
        rows = []
        for m, per in (ms.get("models") or {}).items():
            for how, r in per.items():
                rows.append([m, f"{how} by {ms.get('pixels')} px", _fmt(r.get("flip_rate"), 2), _fmt(r.get("pull"), 3),
                             _fmt(r.get("follows_background"), 2), "FLAGGED" if r.get("flagged") else "not flagged"])
        s["tables"].append({"title": "the verdict with every mask eroded / dilated", "left": 2, "rows": rows,
                            "header": ["model", "masks", "flip rate", "background pull", "follows background",
                                       "verdict"]})
        s["lines"].append("The foreground came from boxes or GrabCut, so it is approximate: if the verdict changes "
                          "between these rows, it depends on where the mask's edge falls; give exact masks.")
    return s


def _shortcut_figure(b: Mapping[str, Any]) -> dict[str, Any]:
    """The figure the shortcut finding reads: reliance, or the background pull where it stands in
    (backgrounds that carry no class), drawn with the low end its flag reads and the pull's margin."""
    return shortcut_estimate(b) or dict(b.get("reliance") or {})


def _findings_table(audit: Mapping[str, Any]) -> dict[str, Any] | None:
    """The graded figures of each model beside its verdict (schema 3; absent figures read "–")."""
    models = audit.get("models", {})
    beh = {m: info.get("behaviour") or {} for m, info in models.items()}
    keys = ("reliance", "accuracy_own_background", "background_effect")
    if not any(b.get(k) for b in beh.values() for k in keys):
        return None
    rows = []
    for v in model_verdicts(audit):
        b = beh[v.model]
        rel = _shortcut_figure(b)
        margin = rel.get("margin")
        det = rel.get("detectable")
        eff = b.get("background_effect") or {}
        layers = models[v.model].get("layers") or {}
        compared = [la for la, r in layers.items() if "background_flag" in r]
        above = [la for la in compared if layers[la].get("background_flag")]
        rows.append([
            v.model, v.badge,
            (pct(rel, 1) + (" (background pull, standing in)" if rel.get("stand_in") else ""))
            if rel.get("value") is not None else (rel.get("reason") or "–"),
            "–" if margin is None else f"{100 * float(margin):.0f} %",
            "–" if det is None or v.status != "not_flagged" else f"{100 * float(det):.0f} %",
            pct(b.get("accuracy_own_background"), 1), pct(b.get("accuracy_other_background"), 1),
            points(b.get("bg_gap_crossed")),
            pct(eff, 1) + ("" if eff.get("margin") is None else f" (material above {100 * float(eff['margin']):.0f} %)"),
            f"{len(above)} of {len(compared)} layers above reference" if compared else "–",
        ])
    return {"title": f"the findings' figures ({level_pct()} % intervals over objects and backgrounds)", "left": 2,
            "rows": rows,
            "header": ["model", "shortcut", "reliance", "flagged above", "smallest detectable", "accuracy, own-class "
                       "backgrounds", "accuracy, other-class backgrounds", "own − other", "background effect",
                       "representation"]}


def _verdict_figure(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, str] | None:
    """The figures behind the verdict: reliance with the interval the flag reads and its threshold,
    accuracy on own-class vs other-class backgrounds, and the background effect (schema 3); else the
    schema-2 behaviour bars (flip rate, pull, follows background)."""
    beh = {m: info.get("behaviour") or {} for m, info in models.items()}
    if any(b.get("reliance") for b in beh.values()):
        return _graded_figure(beh, colors, {m: info.get("flagged") for m, info in models.items()})
    keys = [("flip_rate", "prediction changes\n(share of objects)"),
            ("pull", "pulled to shared classes\n(share of predictions)"),
            ("follows_background", "follows the background's\nclass (share)")]
    beh = {m: b for m, b in beh.items() if b.get("flip_rate")}
    if not beh:
        return None
    keys = [(k, lab) for k, lab in keys if any((b.get(k) or {}).get("value") is not None for b in beh.values())]
    bars = {m: [b.get(k) for k, _ in keys] for m, b in beh.items()}
    threshold = next(iter(beh.values())).get("pull_threshold")
    has = [k for k, _ in keys]
    marked = "pull" in has and threshold is not None
    parts = []
    if "flip_rate" in has:
        parts.append("the share of objects whose predicted class changes across the backgrounds")
    if "pull" in has:
        parts.append("the share of predictions that backgrounds move towards the same classes for every object, "
                     "beyond a within-object shuffle" + ("; a model is flagged when its interval lies above the "
                                                         "black tick (the threshold)" if marked else ""))
    if "follows_background" in has:
        parts.append("where a background came from an image of another class, how often the prediction is "
                     "that class")
    return {"src": P.grouped_bars([lab for _, lab in keys], bars, title="behaviour when only the background changes",
                                  ylabel="share", colors=colors, ylim=(0, 1),
                                  marks={i: (threshold, "flag threshold") for i, (k, _) in enumerate(keys)
                                         if k == "pull" and threshold is not None}),
            "alt": "flip rate, background pull and background following per model",
            "caption": "From left to right: " + "; ".join(parts) + ". Whiskers: 95% bootstrap intervals over "
                       "objects."}


def _graded_figure(beh: Mapping[str, Mapping[str, Any]], colors: Mapping[str, str],
                   models_flagged: Mapping[str, Any]) -> dict[str, str] | None:
    groups = list(beh)
    panels, parts = [], []
    if any(b.get("reliance") for b in beh.values()):
        rel = [_shortcut_figure(b) if b.get("reliance") else None for b in beh.values()]
        standing = any(r and r.get("stand_in") for r in rel)
        marks = {i: (float(r["margin"]), "flagged above") for i, r in enumerate(rel)
                 if r and r.get("margin") is not None}
        notes = {i: "not computed" for i, r in enumerate(rel) if not r or r.get("value") is None}
        flagged = [models_flagged.get(m) for m in groups]
        dotted = {i: (float(r["detectable"]), "smallest detectable (80 % power)") for i, r in enumerate(rel)
                  if r and r.get("detectable") is not None and flagged[i] is False}
        panels.append({"title": "reliance on the background" + (" (pull standing in)" if standing else ""),
                       "ylabel": "share of predictions (1 = complete)",
                       "groups": groups, "series": {"reliance": rel}, "marks": marks, "notes": notes,
                       "dotted": dotted, "ylim": (0, 1)})
        parts.append("reliance: the share of predictions that take the background's class beyond a within-object "
                     f"shuffle (1 = a complete shortcut); the whisker is its {level_pct()} % interval (objects and backgrounds "
                     "resampled), the one the flag reads"
                     + ("; a model is flagged when the whole interval lies above its black tick" if marks else "")
                     + ("; dotted grey: for a model not flagged, the smallest reliance this audit detects with 80 % "
                        "power (a smaller one could go unseen)" if dotted else "")
                     + ("; where the backgrounds carry no class, the background pull stands in (the share of "
                        "predictions backgrounds move towards the same classes beyond the within-object shuffle; "
                        "its whisker's low end is the one its flag reads)" if standing else ""))
    if any(b.get("accuracy_own_background") or b.get("accuracy_other_background") for b in beh.values()):
        chance = next((b.get("chance") for b in beh.values() if b.get("chance") is not None), None)
        panels.append({"title": "accuracy by background", "ylabel": "accuracy (%)", "scale": 100, "groups": groups,
                       "series": {"own-class backgrounds": [b.get("accuracy_own_background") for b in beh.values()],
                                  "other-class backgrounds": [b.get("accuracy_other_background")
                                                              for b in beh.values()]},
                       "hline": (float(chance), "chance") if chance is not None else None, "ylim": (0, 1),
                       "notes": {i: "not computed" for i, b in enumerate(beh.values())
                                 if (b.get("accuracy_own_background") or {}).get("value") is None
                                 and (b.get("accuracy_other_background") or {}).get("value") is None}})
        parts.append("accuracy with backgrounds from the object's own class (plain) and from other classes "
                     "(hatched), in %" + ("; dashed: chance (the majority class's share)" if chance is not None
                                          else ""))
    if any(b.get("background_effect") for b in beh.values()):
        eff = [b.get("background_effect") for b in beh.values()]
        marks = {i: (float(e["margin"]), "material above") for i, e in enumerate(eff) if e and e.get("margin") is not None}
        panels.append({"title": "background effect", "ylabel": "accuracy spread from backgrounds",
                       "groups": groups, "series": {"background effect": eff}, "marks": marks,
                       "notes": {i: "not computed" for i, e in enumerate(eff) if not e or e.get("value") is None},
                       "ylim": (0, 1)})
        parts.append("background effect: how much accuracy varies with backgrounds that favour no class (the "
                     "background-sensitive finding)" + ("; black tick: its materiality threshold" if marks else ""))
    if not panels:
        return None
    return {"src": P.finding_panels(panels, colors), "alt": "reliance, accuracy by background and background effect",
            "caption": "From left to right: " + "; ".join(parts) + f". Whiskers: {level_pct()} % intervals."}


def _behaviour(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    beh = {m: info["behaviour"] for m, info in models.items() if info.get("behaviour")}
    if not beh:
        return None
    s = _section("behaviour", "Behaviour under background swaps",
                 "What each model predicts when only the background changes, read from its own output (or, "
                 "for a representation without a head, from a linear probe fit on the training split). "
                 "Image variants after Xiao et al. 2020: original; only_fg = the object on black; no_fg = "
                 "the object's pixels blacked out; only_bg = the background alone; mixed_same / mixed_rand / "
                 "mixed_next = the object on the background of another image of the same / a random / the "
                 "next class. BG-gap = acc(mixed_same) − acc(mixed_rand).")
    t = {"title": "crossed split", "header": ["model", "predictions from", "flip rate", "background pull",
                                              "p (shuffle)", "follows background", "accuracy"],
         "rows": [], "left": 2}
    for m, b in beh.items():
        if "flip_rate" in b:
            t["rows"].append([m, b.get("predictions", ""), _cell(b["flip_rate"], 2), _cell(b.get("pull"), 3),
                              _fmt(b.get("pull_p_value")), _cell(b.get("follows_background"), 2),
                              _cell(b.get("accuracy_crossed"), 2)])
    if t["rows"]:
        s["tables"].append(t)
    variants = list(dict.fromkeys(v for b in beh.values() for v in (b.get("accuracy") or {})))
    if variants:
        s["tables"].append({
            "title": "accuracy per image variant (95% CI)",
            "header": ["model", *variants, "BG-gap", "chance"],
            "rows": [[m, *[_cell((b.get("accuracy") or {}).get(v), 2) for v in variants],
                      _cell(b.get("bg_gap"), 2), _fmt(b.get("chance"), 2)] for m, b in beh.items()],
            "left": 1})
    return s


def _directions(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    figs, rows = [], []
    for m, info in models.items():
        for layer, d in (info.get("directions") or {}).items():
            if d.get("shares"):
                figs.append({"src": P.cluster_shares(f"{m} · {layer}", d["shares"], d.get("spreads"),
                                                     d.get("n_directions"), colors.get(m, "#333")),
                             "alt": f"direction clusters of {m} {layer}", "caption": ""})
            stab = d.get("stability") or {}
            rows.append([m, layer, _fmt(d.get("n_units")), _fmt(d.get("n_directions")),
                         " / ".join(str(v) for v in stab.values()) or "–",
                         _fmt(max(d.get("shares") or [0.0]))])
    if not rows:
        return None
    header = ["model", "layer", "units", "directions (90% mass)", "at tol 5 / 10 / 15 / 20 / 30°", "largest share"]
    s = _section("directions", "Neuron weight directions",
                 "Unit-normalised weight rows clustered on the sphere: how many distinct directions carry 90% "
                 "of the squared weight norm.")
    s["figures"] += figs[:12]
    s["tables"].append({"title": "", "header": header, "rows": rows, "left": 2})
    s["lines"].append("A count is worth reading only when it holds over the clustering tolerance: the counts at "
                      "5-30° are beside it (a swing of more than 2x is flagged in the audit JSON as not stable).")
    return s


def _pairs(pairs: list[Mapping[str, Any]], colors: Mapping[str, str]) -> dict[str, Any] | None:
    if not pairs:
        return None
    groups = [f"{p['student']}.{p['student_layer']} ~ {p['teacher']}.{p['teacher_layer']}" for p in pairs]
    ticks = [f"{P.wrap_label(p['student'] + '.' + p['student_layer'], 20, 4)}\n~ "
             f"{P.wrap_label(p['teacher'] + '.' + p['teacher_layer'], 20, 4)}" for p in pairs]
    splits = sorted({k for p in pairs for k in (p.get("cka") or {})})
    s = _section("teacher-student", "Teacher vs student",
                 "Debiased linear CKA between the student's and the teacher's features on the same samples, and "
                 "the relative MSE Σ‖s−t‖²/Σ‖t−t̄‖² after an affine map from student to teacher fit on the "
                 "training split (the units of intermediate layers are not aligned; the raw relative MSE is "
                 "meaningful only at the layer the student was fitted to, the last pair, and is in the table). "
                 "A student that fits in distribution and departs out of distribution shows high ID CKA and a "
                 "large OOD relative MSE.")
    last = {(p["teacher"], p["student"]): i for i, p in enumerate(pairs)}  # the fitted (last) layer pair
    split_colors = dict(zip(splits, ["#1f77b4", "#d62728", "#9467bd", "#2ca02c"], strict=False))
    s["figures"].append({"src": P.grouped_bars(ticks, {sp: [(p.get("cka") or {}).get(sp) for p in pairs]
                                                       for sp in splits},
                                               title="linear CKA", ylabel="CKA", colors=split_colors, ylim=(0, 1)),
                         "alt": "CKA per layer pair", "caption": ""})
    s["figures"].append({"src": P.grouped_bars(ticks, {sp: [(p.get("rel_mse_mapped") or {}).get(sp) for p in pairs]
                                                       for sp in splits},
                                               title="relative MSE after an affine map (fit on train)",
                                               ylabel="rel. MSE (1 = the teacher's variance)", colors=split_colors,
                                               ylim=(0, 1)),
                         "alt": "relative MSE per layer pair", "caption": ""})
    s["tables"].append({"title": "", "header": ["pair", *[f"CKA {sp}" for sp in splits],
                                                *[f"rel. MSE mapped {sp}" for sp in splits],
                                                *[f"rel. MSE raw {sp}" for sp in splits]],
                        "rows": [[g, *[_cell((p.get("cka") or {}).get(sp)) for sp in splits],
                                  *[_cell((p.get("rel_mse_mapped") or {}).get(sp)) for sp in splits],
                                  *[_cell((p.get("rel_mse") or {}).get(sp)) if i in last.values() else "–"
                                    for sp in splits]]
                                 for i, (g, p) in enumerate(zip(groups, pairs, strict=True))], "left": 1})
    for p in pairs:
        diff = p.get("differences") or {}
        if diff:
            s["tables"].append({"title": f"student − teacher: {p['student']}.{p['student_layer']} vs "
                                         f"{p['teacher']}.{p['teacher_layer']}",
                                "header": ["metric", "student − teacher"],
                                "rows": [[k, _fmt(v)] for k, v in diff.items()], "left": 1})
    return s


def _attribution(attr: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    if not attr:
        return None
    s = _section("attribution", "Attribution on background pixels",
                 "Integrated gradients of the class logit; the share of |attribution| that falls outside the "
                 "foreground mask (cyan outline).")
    rows = []
    for m, a in attr.items():
        rows.append([m, a.get("split", ""), _cell(a.get("share")), _fmt(a.get("n_samples"))])
        if a.get("examples"):
            s["figures"].append({"src": P.attribution_grid(a["examples"], f"{m}"), "alt": f"attribution of {m}",
                                 "caption": f"{m}: inputs (top) and |attribution| (bottom).", "wide": True})
    s["tables"].append({"title": "", "header": ["model", "split", "background share", "samples"],
                        "rows": rows, "left": 2})
    return s


def _series(series: Mapping[str, Any]) -> dict[str, Any] | None:
    if not series:
        return None
    import base64
    import tempfile

    from ..series import plot_series

    s = _section("training", "Over training",
                 "Figures at every recorded checkpoint (probekit.Recorder): probe accuracy (held out on the "
                 "other splits, or cross-validated within a single split), CKA of each step to the last, "
                 "background sensitivity and factor share where the splits allow, direction counts from the "
                 "stored weights.")
    for m, r in series.items():
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_series(r, Path(tmp) / "series.png")
            src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        best = r.get("best_step")
        s["figures"].append({"src": src, "alt": f"{m} over training", "wide": True,
                             "caption": (f"{m}: the dotted grey line marks step {best}, where probe accuracy on the "
                                         "scoring split peaks (on a shifted split, the checkpoint whose features "
                                         "transfer best)." if best is not None else
                                         f"{m}: no probe accuracy, so no best step is marked.")})
    return s


def _skipped(skipped: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not skipped:
        return None
    s = _section("skipped", "Analyses not run", "What the store's contents did not allow, and why.")
    s["tables"].append({"title": "", "header": ["analysis", "model", "layer", "reason"],
                        "rows": [[k.get("analysis", ""), k.get("model") or "", k.get("layer") or "",
                                  k.get("reason", "")] for k in skipped], "left": 4})
    return s


def write_report(audit: Mapping[str, Any] | str | os.PathLike, out: str | os.PathLike,
                 gallery: Any = None, deploy_examples: Mapping[str, list[Mapping[str, Any]]] | None = None) -> Path:
    """Write the HTML report of an audit (a dict, or the path of its JSON) to ``out``.

    ``gallery``: one :func:`probekit.report.build_gallery` result or a list of them (one per model), shown
    as the section "What was audited".
    """
    if not isinstance(audit, Mapping):
        audit = json.loads(Path(audit).read_text())
    return write_text(out, render_html(audit, gallery=gallery, deploy_examples=deploy_examples))  # whole or not at all: never a half-written report
