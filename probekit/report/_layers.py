"""The report's per-layer sections: where the checks of :data:`probekit.audit.LAYER_CHECKS` are shown.

Each :class:`LayerSection` declares its title, its introduction, the keys of
``models.<m>.layers.<l>`` it reads, its glossary rows and the function that lays out its figures and
tables; one section may show several checks (background sensitivity and NMS share one). A check names
its section (``Check.report``); the report builds the per-layer sections by iterating over
:data:`LAYER_SECTIONS`, in the order they appear. Adding an analysis: its
:class:`~probekit.audit.Check` (with ``report=``) and its entry here. The report cannot import the
audit (``Audit.to_html`` imports the report, and the package's rooms import without a cycle), so the
two registries meet by section id; tests/report/test_report_sections.py keeps them equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..verdict import RULES, level_pct
from . import _plots as P
from ._blocks import _cell, _fmt, _section

__all__ = ["LAYER_SECTIONS", "LayerSection"]

Render = Callable[[dict[str, Any], Mapping[str, Any], Mapping[str, str]], "dict[str, Any] | None"]


@dataclasses.dataclass(frozen=True)
class LayerSection:
    """One section of the report built from the per-layer entries of the audit document.

    Parameters
    ----------
    id : the section's HTML id (and the name a check gives as ``Check.report``).
    title, intro : its heading and the paragraph under it.
    reads : the keys of ``models.<m>.layers.<l>`` it shows; the section is left out when no layer has any.
    glossary : ``(term, meaning)`` rows of the report's glossary.
    render : ``render(section, audit, colors)`` fills the empty ``section`` dict (``figures``, ``tables``,
        ``lines``) from the audit document; returns it, or None when there is nothing to show.
    """

    id: str
    title: str
    intro: str
    reads: tuple[str, ...]
    glossary: tuple[tuple[str, str], ...]
    render: Render

    def build(self, audit: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
        """The section dict of ``audit`` (None when no layer has what it reads)."""
        if not any(k in res for info in audit.get("models", {}).values()
                   for res in (info.get("layers") or {}).values() for k in self.reads):
            return None
        return self.render(_section(self.id, self.title, self.intro), audit, colors)


def _decomposition(s: dict[str, Any], audit: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    models = audit.get("models", {})
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
    rule = RULES["representation"]
    s["intro"] = s["intro"].format(margin=(audit.get("config") or {}).get(rule.setting, rule.margin))
    s["figures"].append({"src": P.layer_lines(series, title="background share of each layer's variance",
                                              ylabel="background / total", colors=colors, ylim=(0, 1)),
                         "alt": "background share by layer",
                         "caption": "The background component over the layer's total variance on the crossed "
                                    "split (95% CI). A share is for orientation only: the flag compares the "
                                    "component itself with the reference (table)."})
    s["tables"].append(table)
    clean = [m for m, info in models.items() if info.get("flagged") is not True
             and any(r.get("background_flag") for r in (info.get("layers") or {}).values())]
    if clean:
        s["lines"].append(f"FLAG beside a model that is not flagged ({', '.join(clean)}): the layer carries more "
                          "background than its reference (the representation finding), but the verdict on a "
                          "shortcut reads the model's predictions, which do not follow the background beyond the "
                          "threshold.")
    return s


def _probes(s: dict[str, Any], audit: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    models = audit.get("models", {})
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
    has_ood = any(k.endswith(" · OOD") for k in series)
    s["figures"].append({"src": P.layer_lines(series, title="probe accuracy by layer", ylabel="accuracy",
                                              colors=colors, styles={"ID": "-", "OOD": "--"}, ylim=(0, 1)),
                         "alt": "probe accuracy ID and OOD by layer",
                         "caption": "Solid: ID; dashed: OOD. 95% intervals." if has_ood else "ID accuracy, 95% intervals."})
    s["tables"].append(table)
    return s


def _decodability(s: dict[str, Any], audit: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    models = audit.get("models", {})
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
    splits = list(dict.fromkeys(k.partition(" · ")[2] for k in series))  # one line style per split
    styles = dict(zip(splits, ["-", "--", "-.", (0, (5, 1, 1, 1))] * 4, strict=False))  # ":" is the control's
    s["figures"].append({"src": P.layer_lines(series, title="mean excess R² over continuous factors, by layer",
                                              ylabel="R² − shuffled-control R²", colors=colors, styles=styles,
                                              hline=0.0, hline_label="shuffled control", ylim=(0, 1)),
                         "alt": "background decodability by layer", "caption": "0 = the shuffled control."})
    for split, t in by_split.items():
        s["tables"].append({"title": f"excess over the shuffled control, within {split} (95% CI)",
                            "header": ["model", "layer", *t["factors"]], "rows": t["rows"], "left": 2})
    return s


def _sensitivity(s: dict[str, Any], audit: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    models = audit.get("models", {})
    sens: dict[str, list] = {}
    nms: dict[str, list] = {}
    table = {"title": "", "header": ["model", "layer", "bg sensitivity", "at init", "NMS", "NMS at init"],
             "rows": [], "left": 2}
    for m, info in models.items():
        for layer, res in info.get("layers", {}).items():
            se, nm = res.get("sensitivity"), res.get("nms")
            if se:
                sens.setdefault(f"{m} · trained", []).append((layer, se.get("value")))
                if (se.get("init") or {}).get("value") is not None:
                    sens.setdefault(f"{m} · init", []).append((layer, se.get("init")))
            if nm:
                nms.setdefault(f"{m} · trained", []).append((layer, nm.get("value")))
                if (nm.get("init") or {}).get("value") is not None:
                    nms.setdefault(f"{m} · init", []).append((layer, nm.get("init")))
            if se or nm:
                table["rows"].append([m, layer, _cell((se or {}).get("value")), _cell((se or {}).get("init")),
                                      _cell((nm or {}).get("value")), _cell((nm or {}).get("init"))])
    if not sens and not nms:
        return None
    styles = {"trained": "-", "init": ":"}
    for col in (5, 3):  # an "at init" column that is empty everywhere says nothing: left out
        if all(row[col] == "–" for row in table["rows"]):
            table["header"].pop(col)
            for row in table["rows"]:
                row.pop(col)
    if sens:
        split = next((r.get("sensitivity", {}).get("split") for info in models.values()
                      for r in info.get("layers", {}).values() if r.get("sensitivity")), "")
        s["figures"].append({"src": P.layer_lines(sens, title=f"background sensitivity on {split}",
                                                  ylabel="share of variance", colors=colors, styles=styles,
                                                  ylim=(0, 1)),
                             "alt": "background sensitivity by layer", "caption": _init_caption(sens)})
    if nms:
        s["figures"].append({"src": P.layer_lines(nms, title="normalised mean shift (ID → OOD)", ylabel="NMS",
                                                  colors=colors, styles=styles, ylim=(0, None)),
                             "alt": "normalised mean shift by layer", "caption": _init_caption(nms)})
    s["tables"].append(table)
    return s


def _init_caption(series: Mapping[str, Any]) -> str:
    """Name the dotted lines only where they are drawn (a series at initialisation with a value); the
    intervals are the headline mark's (:data:`probekit.verdict.MARKS`)."""
    drawn = any(k.endswith(" · init") and any((e or {}).get("value") is not None for _, e in pts)
                for k, pts in series.items())
    level = f"{level_pct()}% intervals."
    return f"Solid: trained; dotted: at initialisation. {level}" if drawn else level


def _correlation(s: dict[str, Any], audit: Mapping[str, Any], colors: Mapping[str, str]) -> dict[str, Any] | None:
    models = audit.get("models", {})
    n_perm = audit.get("config", {}).get("n_perm")
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
    s["intro"] = s["intro"].format(null=null)
    if panels:
        s["figures"].append({"src": P.histograms(panels[:16], xlabel="max |r| over factors",
                                                 vline_key="floor", vline_label="null threshold"),
                             "alt": "histograms of unit correlations", "caption": "", "wide": True})
    s["tables"].append(table)
    return s




#: The per-layer sections, in the order the report shows them.
LAYER_SECTIONS: tuple[LayerSection, ...] = (
    LayerSection(
        "decomposition", "Foreground, background and interaction per layer",
        "On the crossed split every object is shown on the same backgrounds, so each layer splits into a foreground "
        "component (what all backgrounds of an object share), a background component (what all objects on a "
        "background share) and an interaction, in the layer's own squared units per row. A weaker foreground "
        "shrinks the first and leaves the second alone. A layer is flagged when "
        + RULES["representation"].when + ": the teacher's at "
        "the same layer for a student (same units), otherwise the same architecture at initialisation, compared "
        "as background / (foreground + interaction) since the units differ.",
        reads=("crossed", "background_flag", "background_vs_reference"),
        glossary=(("foreground / background / interaction", "the two-way decomposition of a layer on the crossed "
                   "split, in the layer's squared units per row, summed over units"),),
        render=_decomposition),
    LayerSection(
        "probes", "Linear probes: ID vs OOD",
        "A linear probe fit on the training split, scored on the in-distribution and the shifted test split, with "
        "bootstrap 95% intervals. A large gap for the same foregrounds means the representation moved with the "
        "background.",
        reads=("probe",), glossary=(), render=_probes),
    LayerSection(
        "decodability", "Background decodability",
        "How well a linear probe predicts each background factor from the layer (cross-validated R² or balanced "
        "accuracy), minus the same probe on shuffled targets. Within a split whose backgrounds vary widely it is "
        "informative; on in-distribution data it often is not (see docs/METRICS.md).",
        reads=("decodability",),
        glossary=(("decodability (excess)", "cross-validated R² (or balanced accuracy) of a linear probe predicting "
                   "a background factor, minus the same probe on shuffled factors"),),
        render=_decodability),
    LayerSection(
        "sensitivity", "Background sensitivity under shift",
        "Background sensitivity: the share of a layer's variance that comes from the background with the "
        "foreground held fixed, on a split whose backgrounds reach beyond training. NMS: the squared shift of the "
        "mean activation between two background families on the same foregrounds, over the sum of unit "
        "variances. Both beside the same architecture at initialisation where known: the change from init "
        "separates learned sensitivity from features never removed.",
        reads=("sensitivity", "nms"),
        glossary=(("background sensitivity", "share of a layer's variance from the background with the object "
                   "held fixed"),
                  ("NMS", "normalised mean shift: squared shift of the mean activation between the ID and OOD "
                   "background families on the same objects, over the sum of unit variances (debiased)")),
        render=_sensitivity),
    LayerSection(
        "correlation", "Unit–background correlation",
        "Per unit, the largest |Pearson r| with any background factor; the dashed line is the {null}. 'Units above "
        "null' counts units significant after correction.",
        reads=("correlation",),
        glossary=(("units above null", "share of units whose correlation with a factor beats their own permutation "
                   "null"),),
        render=_correlation),
)
