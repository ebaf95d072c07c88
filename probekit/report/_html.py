"""The HTML report: an audit result (the JSON of docs/REPORT_SCHEMA.md) -> one self-contained file.

Compute happens in :mod:`probekit.audit`; this module only lays the numbers out. Jinja2 renders with
autoescaping on, so every user-supplied string (model, layer, factor, split names, paths) is escaped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from .._io import write_text
from . import _plots as P

__all__ = ["render_html", "write_report"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _est(e: Mapping[str, Any] | None, digits: int = 3) -> tuple[str, str]:
    if not e or e.get("value") is None:
        return "–", ""
    ci = e.get("ci")
    ci_text = f"[{_fmt(ci[0], digits)}, {_fmt(ci[1], digits)}]" if ci else ""
    return _fmt(float(e["value"]), digits), ci_text


def _cell(e: Mapping[str, Any] | None, digits: int = 3) -> str:
    v, ci = _est(e, digits)
    return f"{v} {ci}".strip()


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("probekit.report", "templates"),
        autoescape=True,  # every string from the audit is escaped, whatever the template does
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _section(sid: str, title: str, intro: str = "") -> dict[str, Any]:
    return {"id": sid, "title": title, "intro": intro, "figures": [], "tables": [], "lines": []}


def render_html(audit: Mapping[str, Any]) -> str:
    """Render an audit dict into the report's HTML text."""
    models: Mapping[str, Any] = audit.get("models", {})
    roles = {m: info.get("role", "model") for m, info in models.items()}
    colors = P.model_colors(roles)
    sections = [_section("summary", "Summary")]
    sections += [s for s in (
        _behaviour(models, colors),
        _decomposition(models, colors),
        _probes(models, colors),
        _decodability(models, colors),
        _sensitivity(models, colors, audit),
        _correlation(models, colors, audit.get("config", {}).get("n_perm")),
        _directions(models, colors),
        _pairs(audit.get("pairs", []), colors),
        _series(audit.get("series", {})),
        _attribution(audit.get("attribution", {}), colors),
        _inputs(audit),
        _skipped(audit.get("skipped", [])),
        _glossary(audit),
    ) if s is not None]
    judged = [info for info in models.values() if info.get("flag_basis")]
    model_verdicts = [{"name": m, "flagged": bool(info.get("flagged")), "text": info.get("verdict", ""),
                       "basis": info.get("flag_basis") or "no verdict"}
                      for m, info in models.items() if info.get("verdict")]
    summary_class = ("bad" if any(i.get("flagged") for i in judged) else "clean") if judged else ""
    model_texts = {v["text"] for v in model_verdicts}
    other_lines = [line for line in audit.get("verdict", []) if line not in model_texts]
    return _env().get_template("report.html.j2").render(
        title=Path(str(audit.get("store", "store"))).name,
        store=audit.get("store", ""),
        n_models=len(models),
        splits=list(audit.get("splits", {})),
        version=audit.get("probekit_version", ""),
        created=audit.get("created", ""),
        sections=sections,
        model_verdicts=model_verdicts,
        verdict_figure=_verdict_figure(models, colors),
        verdict=other_lines if (other_lines or model_verdicts) else
        ["No verdict or headline figure could be computed; see the skipped analyses."],
        summary_class=summary_class,
    )


_GLOSSARY = [
    ("flip rate", "share of objects whose predicted class is not the same on every background of the crossed split"),
    ("background pull", "share of predictions that backgrounds move towards the same classes for every object, "
                        "beyond a shuffle of the backgrounds within each object; a model is flagged when its "
                        "interval lies above 0.05"),
    ("follows background", "where a background came from an image of another class: how often the prediction is "
                           "that class"),
    ("crossed split", "every object (group) shown on the same set of backgrounds (the stress split)"),
    ("only_fg / no_fg / only_bg", "the object on black / the object's pixels blacked out / the background alone"),
    ("mixed_same / mixed_rand / mixed_next", "the object on the background of another image of the same / a random "
                                             "/ the next class; BG-gap = acc(mixed_same) − acc(mixed_rand)"),
    ("foreground / background / interaction", "the two-way decomposition of a layer on the crossed split, in the "
                                              "layer's squared units per row, summed over units"),
    ("background sensitivity", "share of a layer's variance from the background with the object held fixed"),
    ("NMS", "normalised mean shift: squared shift of the mean activation between the ID and OOD background "
            "families on the same objects, over the sum of unit variances (debiased)"),
    ("decodability (excess)", "cross-validated R² (or balanced accuracy) of a linear probe predicting a background "
                              "factor, minus the same probe on shuffled factors"),
    ("units above null", "share of units whose correlation with a factor beats their own permutation null"),
    ("CKA", "debiased linear centred kernel alignment between two representations (0 = unrelated, 1 = the same "
            "up to rotation and scale)"),
    ("relative MSE", "Σ‖student − teacher‖² / Σ‖teacher − mean‖²: the share of the teacher's variance the student "
                     "misses (units aligned only at the layer the student was fitted to)"),
    ("ID / OOD", "in distribution (the training backgrounds) / out of distribution (a disjoint background family)"),
]
_FACTORS = {  # the built-in background digits' factors
    "hue": "background colour hue, 0-1, circular", "sat": "background colour saturation",
    "bright": "background brightness (HSV value)", "orient": "stripe orientation in degrees, circular (period 180)",
    "freq": "stripe frequency, cycles per image", "amp": "stripe amplitude (contrast of the texture)",
}


def _glossary(audit: Mapping[str, Any]) -> dict[str, Any]:
    s = _section("glossary", "Glossary")
    rows = [[k, v] for k, v in _GLOSSARY]
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


def _verdict_figure(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, str] | None:
    """The figure behind the verdict: each model's behaviour on the crossed split, with 95% CIs."""
    keys = [("flip_rate", "prediction changes\n(share of objects)"),
            ("pull", "pulled to shared classes\n(share of predictions)"),
            ("follows_background", "follows the background's\nclass (share)")]
    beh = {m: info["behaviour"] for m, info in models.items() if (info.get("behaviour") or {}).get("flip_rate")}
    if not beh:
        return None
    keys = [(k, lab) for k, lab in keys if any((b.get(k) or {}).get("value") is not None for b in beh.values())]
    bars = {m: [b.get(k) for k, _ in keys] for m, b in beh.items()}
    threshold = next(iter(beh.values())).get("pull_threshold")
    return {"src": P.grouped_bars([lab for _, lab in keys], bars, title="behaviour when only the background changes",
                                  ylabel="share", colors=colors, ylim=(0, 1),
                                  marks={i: (threshold, "flag threshold") for i, (k, _) in enumerate(keys)
                                         if k == "pull" and threshold is not None}),
            "alt": "flip rate, background pull and background following per model",
            "caption": ("Left: share of objects whose predicted class changes across the backgrounds. Next: "
                        "the share of predictions that backgrounds move towards the same classes for every "
                        "object, beyond a within-object shuffle; a model is flagged when its interval lies above "
                        "the black tick (the threshold)."
                        + (" Right: where a background came from an image of another class, how often the "
                           "prediction is that class." if len(keys) == 3 else "")
                        + " Whiskers: 95% bootstrap intervals over objects.")}


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


def _decomposition(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    series: dict[str, list] = {}
    table = {"title": "", "header": ["model", "layer", "foreground", "background", "interaction",
                                     "background vs reference", "ratio (CI)", "flag"], "rows": [], "left": 2}
    for m, info in models.items():
        for layer, res in info.get("layers", {}).items():
            c = res.get("crossed")
            if not c:
                continue
            series.setdefault(f"{m} · background", []).append((layer, c.get("background_share")))
            ref = res.get("background_vs_reference") or {}
            table["rows"].append([m, layer, _cell(c.get("foreground"), 3), _cell(c.get("background"), 3),
                                  _cell(c.get("interaction"), 3), ref.get("reference", "–"),
                                  _cell(ref.get("ratio"), 2),
                                  "FLAG" if res.get("background_flag") else ("–" if not ref else "no")])
    if not series:
        return None
    s = _section("decomposition", "Foreground, background and interaction per layer",
                 "On the crossed split every object is shown on the same backgrounds, so each layer splits "
                 "into a foreground component (what all backgrounds of an object share), a background "
                 "component (what all objects on a background share) and an interaction, in the layer's own "
                 "squared units per row. A weaker foreground shrinks the first and leaves the second alone. "
                 "A layer is flagged when its background component exceeds its reference's by 1.25x at the "
                 "low end of a Bonferroni-corrected paired interval: the teacher's at the same layer for a "
                 "student (same units), otherwise the same architecture at initialisation, compared as "
                 "background / (foreground + interaction) since the units differ.")
    s["figures"].append({"src": P.layer_lines(series, title="background share of each layer's variance",
                                              ylabel="background / total", colors=colors),
                         "alt": "background share by layer",
                         "caption": "The background component over the layer's total variance on the crossed "
                                    "split (95% CI). A share is for orientation only: the flag compares the "
                                    "component itself with the reference (table)."})
    s["tables"].append(table)
    return s


def _probes(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    series: dict[str, list] = {}
    table = {"title": "", "header": ["model", "layer", "ID accuracy", "OOD accuracy", "gap (ID − OOD)"],
             "rows": [], "left": 2}
    for m, info in models.items():
        for layer, res in info.get("layers", {}).items():
            p = res.get("probe")
            if not p:
                continue
            series.setdefault(f"{m} · ID", []).append((layer, p.get("id")))
            if p.get("ood"):
                series.setdefault(f"{m} · OOD", []).append((layer, p.get("ood")))
            table["rows"].append([m, layer, _cell(p.get("id")), _cell(p.get("ood")), _cell(p.get("gap"))])
    if not series:
        return None
    s = _section("probes", "Linear probes: ID vs OOD",
                 "A linear probe fit on the training split, scored on the in-distribution and the shifted "
                 "test split, with bootstrap 95% intervals. A large gap for the same foregrounds means the "
                 "representation moved with the background.")
    s["figures"].append({"src": P.layer_lines(series, title="probe accuracy by layer", ylabel="accuracy",
                                              colors=colors, styles={"ID": "-", "OOD": "--"}),
                         "alt": "probe accuracy ID and OOD by layer", "caption": "Solid: ID; dashed: OOD."})
    s["tables"].append(table)
    return s


def _decodability(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    series: dict[str, list] = {}
    by_split: dict[str, dict[str, Any]] = {}  # split -> {"factors": [...], "rows": [...]}
    for m, info in models.items():
        for layer, res in info.get("layers", {}).items():
            for split, d in (res.get("decodability") or {}).items():
                series.setdefault(f"{m} · {split}", []).append((layer, d.get("mean_excess_r2")))
                t = by_split.setdefault(split, {"factors": list(d.get("factors", {})), "rows": []})
                t["rows"].append([m, layer, *[_cell((d["factors"].get(f) or {}).get("excess"), 2)
                                              for f in t["factors"]]])
    if not series:
        return None
    s = _section("decodability", "Background decodability",
                 "How well a linear probe predicts each background factor from the layer (cross-validated R² "
                 "or balanced accuracy), minus the same probe on shuffled targets. Within a split whose "
                 "backgrounds vary widely it is informative; on in-distribution data it often is not "
                 "(see docs/METRICS.md).")
    splits = list(dict.fromkeys(k.partition(" · ")[2] for k in series))  # one line style per split
    styles = dict(zip(splits, ["-", "--", "-.", (0, (5, 1, 1, 1))] * 4, strict=False))  # ":" is the control's
    s["figures"].append({"src": P.layer_lines(series, title="mean excess R² over continuous factors, by layer",
                                              ylabel="R² − shuffled-control R²", colors=colors, styles=styles,
                                              hline=0.0, hline_label="shuffled control"),
                         "alt": "background decodability by layer", "caption": "0 = the shuffled control."})
    for split, t in by_split.items():
        s["tables"].append({"title": f"excess over the shuffled control, within {split} (95% CI)",
                            "header": ["model", "layer", *t["factors"]], "rows": t["rows"], "left": 2})
    return s


def _sensitivity(models: Mapping[str, Any], colors: Mapping[str, str], audit: Mapping[str, Any]) -> dict | None:
    sens: dict[str, list] = {}
    nms: dict[str, list] = {}
    table = {"title": "", "header": ["model", "layer", "bg sensitivity", "at init", "NMS", "NMS at init"],
             "rows": [], "left": 2}
    for m, info in models.items():
        for layer, res in info.get("layers", {}).items():
            se, nm = res.get("sensitivity"), res.get("nms")
            if se:
                sens.setdefault(f"{m} · trained", []).append((layer, se.get("value")))
                if se.get("init"):
                    sens.setdefault(f"{m} · init", []).append((layer, se.get("init")))
            if nm:
                nms.setdefault(f"{m} · trained", []).append((layer, nm.get("value")))
                if nm.get("init"):
                    nms.setdefault(f"{m} · init", []).append((layer, nm.get("init")))
            if se or nm:
                table["rows"].append([m, layer, _cell((se or {}).get("value")), _cell((se or {}).get("init")),
                                      _cell((nm or {}).get("value")), _cell((nm or {}).get("init"))])
    if not sens and not nms:
        return None
    s = _section("sensitivity", "Background sensitivity under shift",
                 "Background sensitivity: the share of a layer's variance that comes from the background "
                 "with the foreground held fixed, on a split whose backgrounds reach beyond training. NMS: the "
                 "squared shift of the mean activation between two background families on the same "
                 "foregrounds, over the sum of unit variances. Both beside the same architecture at "
                 "initialisation where known: the change from init separates learned sensitivity from "
                 "features never removed.")
    styles = {"trained": "-", "init": ":"}
    if sens:
        split = next((r.get("sensitivity", {}).get("split") for info in models.values()
                      for r in info.get("layers", {}).values() if r.get("sensitivity")), "")
        s["figures"].append({"src": P.layer_lines(sens, title=f"background sensitivity on {split}",
                                                  ylabel="share of variance", colors=colors, styles=styles),
                             "alt": "background sensitivity by layer", "caption": "Dotted: at initialisation."})
    if nms:
        s["figures"].append({"src": P.layer_lines(nms, title="normalised mean shift (ID → OOD)", ylabel="NMS",
                                                  colors=colors, styles=styles),
                             "alt": "normalised mean shift by layer", "caption": "Dotted: at initialisation."})
    s["tables"].append(table)
    return s


def _correlation(models: Mapping[str, Any], colors: Mapping[str, str],
                 n_perm: int | None = None) -> dict[str, Any] | None:
    panels = []
    table = {"title": "", "header": ["model", "layer", "split", "mean |r|", "noise floor", "units above null (%)",
                                     "var. share bg", "var. share label"], "rows": [], "left": 3}
    for m, info in models.items():
        for layer, res in info.get("layers", {}).items():
            c = res.get("correlation")
            if not c:
                continue
            if c.get("hist"):
                panels.append((f"{m} · {layer}", {**c["hist"], "floor": c.get("threshold")}, colors.get(m, "#333")))
            table["rows"].append([m, layer, c.get("split", ""), _fmt(c.get("mean_abs_r")),
                                  _fmt(c.get("noise_floor")),
                                  "–" if c.get("share_significant") is None else f"{100 * c['share_significant']:.1f}",
                                  _fmt(c.get("variance_share_background")), _fmt(c.get("variance_share_label"))])
    if not table["rows"]:
        return None
    null = ("Student-t null threshold (run with --n-perm 0)" if n_perm == 0 else "permutation-null threshold")
    s = _section("correlation", "Unit–background correlation",
                 "Per unit, the largest |Pearson r| with any background factor; the dashed line is the "
                 f"{null}. 'Units above null' counts units significant after correction.")
    if panels:
        s["figures"].append({"src": P.histograms(panels[:16], xlabel="max |r| over factors",
                                                 vline_key="floor", vline_label="null threshold"),
                             "alt": "histograms of unit correlations", "caption": "", "wide": True})
    s["tables"].append(table)
    return s


def _directions(models: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    figs, rows = [], []
    for m, info in models.items():
        for layer, d in (info.get("directions") or {}).items():
            if d.get("shares"):
                figs.append({"src": P.cluster_shares(f"{m} · {layer}", d["shares"], d.get("spreads"),
                                                     d.get("n_directions"), colors.get(m, "#333")),
                             "alt": f"direction clusters of {m} {layer}", "caption": ""})
            proj = d.get("projections") or {}
            stab = d.get("stability") or {}
            rows.append([m, layer, _fmt(d.get("n_units")), _fmt(d.get("n_directions")),
                         " / ".join(str(v) for v in stab.values()) or "–",
                         _fmt(max(d.get("shares") or [0.0])), _fmt(proj.get("core")), _fmt(proj.get("background"))])
    if not rows:
        return None
    header = ["model", "layer", "units", "directions (90% mass)", "at tol 5 / 10 / 15 / 20 / 30°", "largest share",
              "core proj.", "background proj."]
    if all(r[-2] == "–" and r[-1] == "–" for r in rows):  # no known bases: no projection columns
        header, rows = header[:-2], [r[:-2] for r in rows]
    s = _section("directions", "Neuron weight directions",
                 "Unit-normalised weight rows clustered on the sphere: how many distinct directions carry 90% "
                 "of the squared weight norm. Projections on core / background bases appear when the bases are "
                 "known (synthetic models, or estimated from image patches).")
    s["figures"] += figs[:12]
    s["tables"].append({"title": "", "header": header, "rows": rows, "left": 2})
    s["lines"].append("A count is worth reading only when it holds over the clustering tolerance: the counts at "
                      "5-30° are beside it (a swing of more than 2x is flagged in the audit JSON as not stable).")
    return s


def _pairs(pairs: list[Mapping[str, Any]], colors: Mapping[str, str]) -> dict[str, Any] | None:
    if not pairs:
        return None
    groups = [f"{p['student']}.{p['student_layer']} ~ {p['teacher']}.{p['teacher_layer']}" for p in pairs]
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
    s["figures"].append({"src": P.grouped_bars(groups, {sp: [(p.get("cka") or {}).get(sp) for p in pairs]
                                                        for sp in splits},
                                               title="linear CKA", ylabel="CKA", colors=split_colors),
                         "alt": "CKA per layer pair", "caption": ""})
    s["figures"].append({"src": P.grouped_bars(groups, {sp: [(p.get("rel_mse_mapped") or {}).get(sp) for p in pairs]
                                                        for sp in splits},
                                               title="relative MSE after an affine map (fit on train)",
                                               ylabel="rel. MSE (1 = the teacher's variance)", colors=split_colors),
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
                 "stored weights. The dotted line marks the step where probe accuracy on the scoring split "
                 "peaks: on a shifted split, the checkpoint whose features transfer best.")
    for m, r in series.items():
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_series(r, Path(tmp) / "series.png")
            src = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        s["figures"].append({"src": src, "alt": f"{m} over training",
                             "caption": f"{m}: probe accuracy peaks at step {r.get('best_step')}.", "wide": True})
    return s


def _skipped(skipped: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    if not skipped:
        return None
    s = _section("skipped", "Analyses not run", "What the store's contents did not allow, and why.")
    s["tables"].append({"title": "", "header": ["analysis", "model", "layer", "reason"],
                        "rows": [[k.get("analysis", ""), k.get("model") or "", k.get("layer") or "",
                                  k.get("reason", "")] for k in skipped], "left": 4})
    return s


def write_report(audit: Mapping[str, Any] | str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the HTML report of an audit (a dict, or the path of its JSON) to ``out``."""
    if not isinstance(audit, Mapping):
        audit = json.loads(Path(audit).read_text())
    return write_text(out, render_html(audit))  # whole or not at all: never a half-written report
