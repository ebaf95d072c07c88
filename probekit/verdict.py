"""``probekit.verdict``: every flag rule of the audit, its findings and the sentences that say them.

One module owns the verdict. The analyses (``probekit.analyses``) compute figures with intervals and
p-values; this module decides what they show, in three findings:

- ``shortcut``: the model's predictions take the background's class (its *reliance* on the
  background, see :data:`RULES`). ``flagged`` is this finding: ``True`` / ``False`` when it could be
  judged, ``None`` (with the reason) when it could not.
- ``background_sensitive``: backgrounds change the model's accuracy without favouring a class: a
  robustness problem, named as such and never called a shortcut.
- ``representation``: a layer's background component is above its reference (the teacher for a
  student, else the same architecture at initialisation).

Beside the findings, :data:`MARKS` holds the rules that mark one figure: the background pull where it
stands in for reliance, and the headline table's mark (a layer's figure above its reference).

The CLI's ``--fail-on-flag`` / ``--fail-on`` and printed verdict, the report's captions and glossary,
the JUnit and Markdown outputs, the headline's definition and the audit's sentences all read
:data:`RULES`, :data:`MARKS` and the functions here (:func:`judge`, :func:`headline_mark`,
:func:`interval_level`, :func:`shortcut_estimate`), as does ``probekit compare``, so prose cannot drift
from the code. No other module compares a figure with
a margin (tests/audit/test_verdict_prose.py checks both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import ProbekitError
from .vocab import (
    ALPHA,
    PULL_MARGIN,
    PULL_MAX_IMBALANCE,
    RATIO_MARGIN,
    RELIANCE_EFFECT_MARGIN,
    RELIANCE_MARGIN,
    pct,
    points,
)

__all__ = [
    "ALPHA",
    "EXIT_FINDING",
    "EXIT_NOT_JUDGED",
    "FINDINGS",
    "LEVEL",
    "MARKS",
    "RULES",
    "ModelVerdict",
    "Rule",
    "exit_status",
    "headline_mark",
    "interval_decides",
    "interval_level",
    "judge",
    "layer_above_reference",
    "level_pct",
    "parse_findings",
    "reliance_holds",
    "shortcut_estimate",
    "shortcut_figure",
]

#: exit status of ``--fail-on-flag`` / ``--fail-on`` when a gated finding holds, and when it could not be judged
EXIT_FINDING = 1
EXIT_NOT_JUDGED = 3

FINDINGS = ("shortcut", "background_sensitive", "representation")


#: the level of every interval a rule reads (two-sided; the rule reads its low end)
LEVEL = 1 - ALPHA


def interval_level(n_comparisons: int = 1) -> float:
    """The two-sided level of the intervals a rule reads, Bonferroni-corrected over ``n_comparisons``."""
    return 1 - ALPHA / max(int(n_comparisons), 1)


def level_pct(level: float = LEVEL) -> str:
    """An interval's level as the prose writes it: ``"95"`` (the caller adds the per-cent sign)."""
    return f"{100 * level:g}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule: what it means, the figure it reads and when it holds.

    Attributes
    ----------
    finding : str
        The finding it decides (a key of :data:`RULES`), or the mark's name (a key of :data:`MARKS`).
    title : str
        A few words for what holds (the CLI's gate lines, the headline table's mark).
    heading : str
        The finding named for a reader of the report, JUnit and the Markdown summary.
    figure : str
        Where the figure it reads lives in the audit document.
    template : str
        The whole rule in one sentence, ``{margin:g}`` / ``{margin_pct:.0f}`` (in per cent) standing for
        the margin used (:meth:`describe` fills it in; :attr:`rule` with the default).
    margin : float
        The default margin it compares the figure with (``probekit.vocab``).
    setting : str or None
        The audit's setting of the margin (a field of :class:`probekit.audit.AuditSpec`, recorded in the
        document's ``config``), None where the margin is fixed.
    when : str
        The rule as a clause on one figure, ``{margin:g}`` standing for the margin used, for the prose
        that states it beside a number (:meth:`holds_when` fills it in); empty where no prose does.
    """

    finding: str
    title: str
    heading: str
    figure: str
    template: str
    margin: float
    setting: str | None = None
    when: str = ""

    def describe(self, margin: float | None = None) -> str:
        """The rule with ``margin`` (default :attr:`margin`) filled in."""
        m = self.margin if margin is None else float(margin)
        return self.template.format(margin=m, margin_pct=100 * m)

    @property
    def rule(self) -> str:
        """The rule with its default margin."""
        return self.describe()

    def holds_when(self, margin: float | None = None) -> str:
        """:attr:`when` with ``margin`` (default :attr:`margin`) filled in."""
        return self.when.format(margin=self.margin if margin is None else margin)


RULES: dict[str, Rule] = {
    "shortcut": Rule(
        "shortcut", "takes the background's class", "relies on the background (shortcut)",
        "behaviour.reliance",
        f"reliance (the share of predictions that take the background's class beyond the same object's "
        f"predictions shuffled over its backgrounds; 1 = a complete shortcut) is above "
        f"{{margin_pct:.0f}} % at the low end of its {100 * LEVEL:.0f} % interval, with objects and "
        "backgrounds both resampled. Where the backgrounds carry no class (synthetic backgrounds), the background pull stands "
        f"in: the share of predictions backgrounds move towards the same classes, beyond the within-object "
        f"shuffle, above {100 * PULL_MARGIN:.0f} % at the low end of its interval (it cannot tell noise from a "
        f"shortcut when classes are imbalanced, so it stands in only while no class holds more than "
        f"{PULL_MAX_IMBALANCE:g}x its balanced share)",
        RELIANCE_MARGIN, "reliance_margin",
    ),
    "background_sensitive": Rule(
        "background_sensitive", "backgrounds change its accuracy",
        "background-sensitive (noisier on some backgrounds)",
        "behaviour.background_effect",
        f"the accuracy points that backgrounds move without favouring a class are above "
        f"{{margin_pct:.0f}} points at the low end of its {100 * LEVEL:.0f} % interval",
        RELIANCE_EFFECT_MARGIN, "effect_margin",
    ),
    "representation": Rule(
        "representation", "background component above its reference",
        "representation's background component above its reference",
        "layers.<l>.background_vs_reference",
        "at some layer, the background component's ratio to its reference (the teacher for a student, else "
        "the same architecture at initialisation) has its interval above {margin:g} (Bonferroni over "
        "layers x models)",
        RATIO_MARGIN, "ratio_margin", "its background component exceeds its reference's by {margin:g}x at the low end of a "
        "Bonferroni-corrected paired interval",
    ),
}

#: rules that mark one figure beside the findings: ``pull``, the background pull where it stands in for
#: reliance (it then decides the shortcut finding, see :func:`judge`); ``headline``, a row of the headline
#: table (a layer's background sensitivity or normalised mean shift against its reference: evidence,
#: never a finding)
MARKS: dict[str, Rule] = {
    "pull": Rule(
        "pull", "backgrounds pull its predictions together", "background pull (standing in for reliance)",
        "behaviour.pull",
        f"the background pull is above {{margin_pct:.0f}} % at the low end of its {100 * LEVEL:.0f} % "
        f"interval and its permutation test rejects at {ALPHA:g}, while no class holds more than "
        f"{PULL_MAX_IMBALANCE:g}x its balanced share of the objects",
        PULL_MARGIN, None, "its interval's low end lies above {margin:g}",
    ),
    "headline": Rule(
        "headline", "above reference", "above its reference", "headline.rows[]",
        f"the figure's {level_pct()}% interval has its low end above {{margin:g}} x its reference's value",
        RATIO_MARGIN, "ratio_margin", f"the {level_pct()}% CI's low end exceeds {{margin:g}} × the reference",
    ),
}


def headline_mark(low: float | None, reference: float | None, margin: float = RATIO_MARGIN) -> bool:
    """The headline table's mark (:data:`MARKS` ``["headline"]``): the figure's interval has its low end
    ``low`` above ``margin`` times its reference's value; ``False`` when either is missing."""
    return bool(reference is not None and low is not None and low > margin * reference)


def layer_above_reference(ratio_ci: Sequence[float] | None, margin: float = RATIO_MARGIN) -> bool:
    """A layer's part of the representation finding (``layers.<l>.background_flag``): its background
    component's ratio to its reference has its (Bonferroni-corrected, :func:`interval_level`) interval
    ``ratio_ci`` above ``margin``; ``False`` when no interval could be drawn."""
    return bool(ratio_ci is not None and ratio_ci[0] is not None and ratio_ci[0] > margin)


def _pull_holds(low: float, p_value: float | None, margin: float = PULL_MARGIN) -> bool:
    """The pull's rule (:data:`MARKS` ``["pull"]``): its low end above ``margin`` and its test rejecting."""
    return low > margin and (p_value if p_value is not None else 1.0) < ALPHA


@dataclasses.dataclass
class ModelVerdict:
    """What :func:`judge` says of one model (merged into ``models.<m>`` of the audit document)."""

    findings: list[str]
    judged: dict[str, bool]
    flagged: bool | None
    verdict: str
    verdict_reason: str | None
    flag_basis: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pct(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f} %"


def _ci(e: Mapping[str, Any] | None, digits: int = 0) -> str:
    return pct(e, digits)


def _share(e: Mapping[str, Any] | None) -> str:
    """A share with its interval, to 0.1 % below 10 % (a reliance of 0.4 % must not print as 0 %)."""
    v = (e or {}).get("value")
    return _ci(e, 1 if v is not None and abs(v) < 0.1 else 0)


def _pts(e: Mapping[str, Any] | None) -> str:
    return points(e, 0, "points")


def _holds(p_value: float) -> bool:
    """A finding's one-sided test against its margin: the low end of the two-sided interval is above it."""
    return p_value < ALPHA / 2


def reliance_holds(p_value: float | None) -> bool | None:
    """The shortcut finding on a reliance's p-value against its margin (:data:`RULES` ``["shortcut"]``):
    its :data:`LEVEL` interval's low end is above the margin; ``None`` when there is no p-value."""
    return None if p_value is None else _holds(p_value)


def interval_decides(ci: Sequence[float] | None, margin: float) -> bool:
    """Whether an interval decides a rule either way: it lies wholly above or wholly below ``margin``
    (``objects="auto"`` stops growing the split once reliance's does)."""
    return bool(ci is not None and (ci[0] > margin or ci[1] < margin))


def _reliance_measured(beh: Mapping[str, Any]) -> bool:
    rel = beh.get("reliance") or {}
    return rel.get("value") is not None and rel.get("p_value") is not None


def _pull_offered(beh: Mapping[str, Any]) -> bool:
    """The audit offers the pull in reliance's place (backgrounds without classes) and measured it."""
    return ((beh.get("reliance") or {}).get("stand_in") == "pull" and (beh.get("pull") or {}).get("value") is not None
            and beh.get("pull_low") is not None)


def _too_imbalanced(beh: Mapping[str, Any]) -> bool:
    """The objects' classes are too imbalanced for the pull to stand in (:data:`MARKS` ``["pull"]``)."""
    return (beh.get("class_imbalance") or 1.0) > PULL_MAX_IMBALANCE


def shortcut_figure(beh: Mapping[str, Any]) -> str | None:
    """The figure of a model's ``behaviour`` that its shortcut finding reads (:data:`RULES` ``["shortcut"]``).

    ``"reliance"`` where reliance was measured; ``"pull"`` where the background pull stands in for it
    (backgrounds that carry no class, the objects' classes balanced enough: :data:`MARKS` ``["pull"]``);
    None where the finding could not be judged. :func:`judge` decides on the same figure.
    """
    if _reliance_measured(beh):
        return "reliance"
    if _pull_offered(beh) and not _too_imbalanced(beh):
        return "pull"
    return None


def shortcut_estimate(beh: Mapping[str, Any]) -> dict[str, Any] | None:
    """The estimate the shortcut finding reads, as its rule reads it (:func:`shortcut_figure` says which).

    Reliance as the document records it (``value``, ``ci``, ``margin``, ``detectable``, ...), or the
    background pull where it stands in: its ``value``, the interval whose low end the pull's rule reads
    (``pull_low``, up to the pull's upper end), the pull's margin and ``stand_in: "pull"``. None where the
    finding could not be judged.
    """
    which = shortcut_figure(beh)
    if which == "reliance":
        return dict(beh["reliance"])
    if which == "pull":
        pull = beh["pull"]
        high = (pull.get("ci") or [None, pull["value"]])[1]
        return {"value": pull["value"], "ci": [beh["pull_low"], high], "margin": MARKS["pull"].margin,
                "detectable": None, "stand_in": "pull"}
    return None


def _shortcut(m: str, beh: Mapping[str, Any]) -> tuple[bool | None, str, str | None]:
    """(finding or None, sentence, reason when not judged)."""
    rel = beh.get("reliance") or {}
    where = (f"{beh.get('n_groups')} objects each on the same {beh.get('n_backgrounds')} backgrounds"
             if beh.get("n_groups") else "")
    how = "" if beh.get("from_output", True) else f" (predictions read through {beh.get('predictions')})"
    if not _reliance_measured(beh):
        reason = rel.get("reason") or "the crossed split has no background classes to follow"
        pull = beh.get("pull") or {}
        if _pull_offered(beh):
            if _too_imbalanced(beh):
                reason += (f"; the background pull cannot stand in with classes this imbalanced (one class holds "
                           f"{beh['class_imbalance']:.1f}x its balanced share of the objects)")
                return None, f"{m}: shortcut not judged: {reason}.", reason
            found = _pull_holds(beh["pull_low"], beh.get("pull_p_value"))
            stand = ("the background pull stands in for reliance: these backgrounds carry no class")
            if found:
                return True, (f"{m} relies on the background: backgrounds move {_ci(pull)} of its predictions "
                              f"towards the same classes for every object ({where}; {stand}){how}."), None
            return False, (f"No shortcut detected for {m}: backgrounds move {_ci(pull)} of its predictions towards "
                           f"the same classes for every object, not shown to be above {_pct(PULL_MARGIN)} "
                           f"({where}; {stand}){how}."), None
        return None, f"{m}: shortcut not judged: {reason}.", reason
    own, other = beh.get("accuracy_own_background") or {}, beh.get("accuracy_other_background") or {}
    acc = ""
    if own.get("value") is not None and other.get("value") is not None:
        acc = (f"; accuracy {_ci(own)} on backgrounds of the object's own class against {_ci(other)} on other "
               f"classes' ({_pts(beh.get('bg_gap_crossed'))})")
    found = _holds(rel["p_value"])
    margin = rel.get("margin", RELIANCE_MARGIN)
    if found:
        text = (f"{m} takes the background's class: {_share(rel)} of its predictions follow the background's class "
                f"beyond chance (1 = always; {where}){acc}{how}.")
    else:
        det = rel.get("detectable")
        above = rel["value"] > margin
        text = (f"No shortcut detected for {m}: reliance {_share(rel)}"
                + (f", above the {_pct(margin)} materiality but not shown to be (p = {rel['p_value']:.2g})"
                   if above else "")
                + (f"; this audit detects a reliance of {_pct(det)} or more with 80 % power" if det is not None
                   else "")
                + f" ({where}){acc}{how}.")
    return found, text, None


def _sensitive(beh: Mapping[str, Any]) -> tuple[bool | None, str]:
    eff = beh.get("background_effect") or {}
    if eff.get("value") is None or eff.get("p_value") is None:
        return None, ""
    if _holds(eff["p_value"]):
        return True, (f" Backgrounds change its accuracy without favouring a class: {_ci(eff)} of accuracy moves "
                      "with the background (background-sensitive: a robustness problem, not a shortcut).")
    return False, ""


def _representation(layers: Mapping[str, Any]) -> tuple[bool | None, str]:
    compared = {la: r for la, r in layers.items()
                if (r.get("background_vs_reference") or {}).get("ratio", {}).get("value") is not None}
    if not compared:
        return None, ""
    above = [la for la, r in compared.items() if r.get("background_flag")]
    ref = next(iter(compared.values()))["background_vs_reference"]["reference"]
    if above:
        return True, (f" Its representation's background component is above its reference ({ref}) at "
                      f"{len(above)} of {len(compared)} layers ({', '.join(above)}).")
    return False, (f" Its representation's background component is not above its reference ({ref}) at any of "
                   f"{len(compared)} layers.")


def _deployment(info: Mapping[str, Any], beh: Mapping[str, Any]) -> str:
    """The compositing control and the accuracy predicted at each deployment site."""
    text = ""
    gap = beh.get("composite_gap") or {}
    if gap.get("value") is not None and gap.get("material"):
        text += (f" The composites themselves cost {_pts(gap)} of accuracy (each object pasted back on its own "
                 "filled background): the counterfactual accuracies are pessimistic by about that much.")
    sites = info.get("predicted_accuracy") or {}
    if sites:
        parts = []
        for site, r in sites.items():
            corr = r.get("corrected") or {}
            parts.append(f"{site} {_ci(r)}" + (f" ({_ci(corr)} corrected for the composites)"
                                                 if corr.get("value") is not None else ""))
        text += (" Predicted accuracy where it is deployed (its objects on photos of each site's empty scenes): "
                 + "; ".join(parts) + ".")
    return text


def judge(m: str, info: Mapping[str, Any], *, no_behaviour: str | None = None) -> ModelVerdict:
    """Findings, ``flagged`` and the sentence of model ``m`` from its entry of the audit document;
    ``no_behaviour`` is why its behaviour could not be read, when it could not."""
    beh = info.get("behaviour") or {}
    why = no_behaviour or "no crossed split with labels (every object on the same backgrounds)"
    shortcut, text, reason = _shortcut(m, beh) if beh else (None, f"{m}: shortcut not judged: {why}.", why)
    sensitive, s_text = _sensitive(beh)
    rep, r_text = _representation(info.get("layers") or {})
    found = {"shortcut": shortcut, "background_sensitive": sensitive, "representation": rep}
    r_text += _deployment(info, beh)
    findings = [f for f in FINDINGS if found[f]]
    judged = {f: found[f] is not None for f in FINDINGS}
    return ModelVerdict(findings=findings, judged=judged, flagged=shortcut, verdict=text + s_text + r_text,
                        verdict_reason=reason, flag_basis="behaviour" if shortcut is not None else None)


def parse_findings(text: str | Sequence[str]) -> list[str]:
    """``"shortcut,representation"`` -> a checked list (the CLI's ``--fail-on``)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in FINDINGS and t != "any"]
    if bad or not items:
        raise ProbekitError(f"--fail-on takes findings from {', '.join(FINDINGS)} (or 'any'); got {text!r}.")
    return list(FINDINGS) if "any" in items else items


def exit_status(models: Mapping[str, Mapping[str, Any]], *, fail_on_flag: bool = False,
                fail_on: Iterable[str] = ()) -> tuple[int, list[str]]:
    """The exit status of a gated audit and one line per reason.

    ``fail_on_flag`` gates on the shortcut finding (``flagged``); ``fail_on`` on any findings. A gated
    finding that holds for some model gives :data:`EXIT_FINDING` (1); otherwise one that could not be
    judged for some model gives :data:`EXIT_NOT_JUDGED` (3), so a CI gate never passes a model that nothing
    judged; else 0.
    """
    gated = list(dict.fromkeys((["shortcut"] if fail_on_flag else []) + list(fail_on)))
    found, unjudged = [], []
    for m, info in models.items():
        for f in gated:
            if f in (info.get("findings") or []):
                found.append(f"{m}: {f} ({RULES[f].title}): {info.get('verdict', '')}")
            elif not (info.get("judged") or {}).get(f, False):
                why = info.get("verdict_reason") if f == "shortcut" else None
                unjudged.append(f"{m}: {f} not judged" + (f" ({why})" if why else ""))
    if found:
        return EXIT_FINDING, found
    if unjudged:
        return EXIT_NOT_JUDGED, unjudged
    return 0, []
