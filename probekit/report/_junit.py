"""JUnit XML of an audit: one test case per model and finding, for CI systems that read test reports.

Layout (the subset of the JUnit format that Jenkins, GitLab, GitHub test-report actions and Azure read)::

    <testsuites name="probekit audit" tests= failures= errors= skipped= time="0">
      <testsuite name="probekit audit" tests= failures= errors= skipped= time="0" timestamp=>
        <testcase classname="probekit.<model>" name="<finding>" time="0">
          <failure message="<verdict sentence>" type="probekit.finding">the verdict</failure>   finding holds
          <error message="not judged: <reason>" type="probekit.not_judged">...</error>        shortcut not judged
          <skipped message="not judged: <reason>"/>                                          other finding not judged
        </testcase>

A finding that holds is a **failure**: its message the verdict sentence for the shortcut, the finding's
own figure for the others; its text the model's verdict. A **shortcut that could
not be judged is an error**, not a skip: CI systems count skips as passing, and a gate must never pass a
model it could not judge. The other findings (``background_sensitive``, ``representation``), when not
judged, are **skipped** with the reason: they are evidence beside the verdict, not the gate.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ._findings import FINDING_TITLES, FINDINGS, finding_message, model_verdicts

__all__ = ["junit_xml", "write_junit"]

_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _clean(text: object) -> str:
    """A string XML 1.0 can hold: control characters (other than tab and line breaks) become "?"."""
    return _INVALID.sub("?", str(text))


def junit_xml(doc: Mapping[str, Any], *, suite: str = "probekit audit") -> str:
    """The JUnit XML text of an audit document (see the module docstring for the layout)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    cases = []
    for v in model_verdicts(doc):
        for f in FINDINGS:
            case = ET.Element("testcase", {"classname": _clean(f"probekit.{v.model}"), "name": f, "time": "0"})
            holds = v.findings.get(f)
            counts["tests"] += 1
            if holds is None:
                reason = (v.reason if f == "shortcut" else None) or v.verdict or "not in this audit document"
                if f == "shortcut":
                    counts["errors"] += 1
                    el = ET.SubElement(case, "error", {"message": _clean(f"not judged: {reason}"),
                                                       "type": "probekit.not_judged"})
                    el.text = _clean(f"{v.model}: the audit could not judge whether it relies on the background, "
                                     f"so this gate cannot pass. {reason}")
                else:
                    counts["skipped"] += 1
                    ET.SubElement(case, "skipped", {"message": _clean(f"not judged: {reason}")})
            elif holds:
                counts["failures"] += 1
                el = ET.SubElement(case, "failure", {"message": _clean(finding_message(doc, v, f)),
                                                     "type": "probekit.finding"})
                el.text = _clean(f"{v.model}: {FINDING_TITLES[f]}.\n{v.verdict}")
            out = ET.SubElement(case, "system-out")
            out.text = _clean(v.verdict)
            cases.append(case)
    attrs = {k: str(n) for k, n in counts.items()}
    root = ET.Element("testsuites", {"name": suite, **attrs, "time": "0"})
    ts = ET.SubElement(root, "testsuite", {"name": suite, **attrs, "time": "0"})
    if doc.get("created"):
        ts.set("timestamp", str(doc["created"]))
    props = ET.SubElement(ts, "properties")
    for k in ("store", "probekit_version", "schema_version"):
        if doc.get(k) is not None:
            ET.SubElement(props, "property", {"name": k, "value": _clean(doc[k])})
    ts.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(doc: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`junit_xml` of ``doc`` to ``path`` (atomically) and return the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(junit_xml(doc), encoding="utf-8")
    tmp.replace(path)
    return path
