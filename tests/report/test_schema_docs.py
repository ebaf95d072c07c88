"""docs/REPORT_SCHEMA.md's tables and the shipped JSON schema name the same fields (they cannot drift apart)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _table_keys(section: str) -> set[str]:
    """Field names in the first column of the markdown table under ``section`` (``.x`` continues a prefix)."""
    text = (ROOT / "docs" / "REPORT_SCHEMA.md").read_text()
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    keys: set[str] = set()
    for line in text[start:end if end > 0 else None].splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        prefix = ""
        for tok in re.findall(r"`([^`]+)`", first):
            if tok.startswith("."):
                keys.add(prefix + tok[1:])
            else:
                prefix = tok.rsplit(".", 1)[0] + "." if "." in tok else ""
                keys.add(tok)
    return keys


def _schema() -> dict:
    return json.loads((ROOT / "probekit" / "report" / "audit.schema.json").read_text())


def test_model_fields_documented_equal_schema():
    model = _schema()["properties"]["models"]["additionalProperties"]["properties"]
    documented = _table_keys("## `models.<m>`: the verdict")
    top = {k for k in documented if "." not in k}
    behaviour = {k.split(".", 1)[1] for k in documented if k.startswith("behaviour.")}
    schema_top = {k for k in model if k not in ("role", "source", "layers", "directions", "behaviour")}
    assert top == schema_top
    assert behaviour == set(model["behaviour"]["properties"]) - {"split", "n_groups", "n_backgrounds", "pull_raw",
                                                                  "pull_null", "pull_p_value", "follows_background_null",
                                                                  "n_swapped", "variants_split", "accuracy_crossed"}


def test_config_fields_are_the_audit_spec():
    import dataclasses

    from probekit.audit import AuditSpec

    cfg = _schema()["properties"]["config"]
    fields = {f.name for f in dataclasses.fields(AuditSpec)}
    assert set(cfg["required"]) <= fields
    assert set(cfg["properties"]) <= fields
