"""Each model's verdict read from an audit document, the same way for the report, JUnit, Markdown and tests.

Schema 3 (docs/REPORT_SCHEMA.md) states per model the ``findings`` that hold, what could be ``judged``,
``flagged`` (the shortcut finding; ``null`` when it could not be judged) and ``verdict_reason``. Older
documents (schema 2) carry ``flagged`` and ``flag_basis``; there a model with ``flag_basis: null`` reached
no verdict, and ``background_sensitive`` was not a finding yet (so it reads "not judged").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from ..verdict import FINDINGS as FINDINGS
from ..verdict import RULES
from ..vocab import pct as pct  # the report's and the verdict's one formatting of estimates
from ..vocab import points as points

__all__ = ["FINDINGS", "ModelVerdict", "model_verdicts", "pct", "points"]

#: each finding named for a reader (:attr:`probekit.verdict.Rule.heading`), in the order every output lists them
FINDING_TITLES = {f: RULES[f].heading for f in FINDINGS}

Status = Literal["flagged", "not_flagged", "not_judged"]


@dataclasses.dataclass(frozen=True)
class ModelVerdict:
    """One model's verdict.

    Attributes
    ----------
    model : str
    status : {"flagged", "not_flagged", "not_judged"}
        The shortcut finding: ``flagged`` true / false / null.
    verdict : str
        The verdict sentence(s) of the document.
    reason : str or None
        Why no verdict was reached (``verdict_reason``; for a schema-2 document, its verdict sentence).
    findings : dict
        Per finding of :data:`FINDINGS`: ``True`` (holds), ``False`` (judged, does not hold) or ``None``
        (could not be judged).
    """

    model: str
    status: Status
    verdict: str
    reason: str | None
    findings: dict[str, bool | None]

    @property
    def badge(self) -> str:
        return {"flagged": "FLAGGED", "not_flagged": "not flagged", "not_judged": "not judged"}[self.status]


def _schema3(m: str, info: Mapping[str, Any]) -> ModelVerdict:
    holds = set(info.get("findings") or [])
    judged = info.get("judged") or {}
    findings = {f: (f in holds) if judged.get(f, f in holds) else None for f in FINDINGS}
    flagged = info.get("flagged")
    status: Status = "not_judged" if flagged is None else ("flagged" if flagged else "not_flagged")
    if status != "not_judged":
        findings["shortcut"] = bool(flagged)
    else:
        findings["shortcut"] = None
    reason = info.get("verdict_reason") if status == "not_judged" else None
    if status == "not_judged" and not reason:
        reason = "the audit could not judge the shortcut (no reason was recorded)"
    return ModelVerdict(m, status, str(info.get("verdict") or ""), reason, findings)


def _schema2(m: str, info: Mapping[str, Any]) -> ModelVerdict:
    basis = info.get("flag_basis")
    layers = info.get("layers") or {}
    compared = [r for r in layers.values() if "background_flag" in r]
    rep = any(r.get("background_flag") for r in compared) if compared else None
    verdict = str(info.get("verdict") or "")
    if basis is None:
        return ModelVerdict(m, "not_judged", verdict, verdict or "no verdict was reached",
                            {"shortcut": None, "background_sensitive": None, "representation": rep})
    status: Status = "flagged" if info.get("flagged") else "not_flagged"
    shortcut = bool(info.get("flagged")) if basis == "behaviour" else None
    if basis == "representation":  # schema 2 flagged on the representation where there was no behaviour
        shortcut = None
    return ModelVerdict(m, status, verdict, None,
                        {"shortcut": shortcut, "background_sensitive": None, "representation": rep})


def model_verdicts(doc: Mapping[str, Any]) -> list[ModelVerdict]:
    """The verdict of every model of an audit document, in the document's order."""
    out = []
    for m, info in (doc.get("models") or {}).items():
        if "findings" in info or "judged" in info or "verdict_reason" in info:
            out.append(_schema3(m, info))
        else:
            out.append(_schema2(m, info))
    return out


def finding_message(doc: Mapping[str, Any], v: ModelVerdict, finding: str) -> str:
    """One sentence on a finding that holds: the verdict for the shortcut, the figure for the others."""
    info = (doc.get("models") or {}).get(v.model) or {}
    if finding == "shortcut":
        return v.verdict or f"{v.model} relies on the background."
    if finding == "background_sensitive":
        eff = (info.get("behaviour") or {}).get("background_effect")
        return (f"{v.model} is background-sensitive: its accuracy varies with backgrounds that favour no class "
                f"(background effect {pct(eff, 1)}).")
    layers = info.get("layers") or {}
    compared = [la for la, r in layers.items() if "background_flag" in r]
    above = [la for la in compared if layers[la].get("background_flag")]
    return (f"{v.model}'s representation carries more background than its reference at {len(above)} of "
            f"{len(compared)} layers ({', '.join(above)}).")
