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


def _rows(section: str) -> dict[str, str]:
    """First-column key -> the words inside backticks in the rest of its row (``a``, ``{a, b}`` both count)."""
    text = (ROOT / "docs" / "REPORT_SCHEMA.md").read_text()
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    out: dict[str, str] = {}
    for line in text[start:end if end > 0 else None].splitlines():
        if not line.startswith("| `"):
            continue
        cells = line.split("|")
        for key in re.findall(r"`([^`]+)`", cells[1]):
            out[key] = " ".join(re.findall(r"\w+", " ".join(re.findall(r"`([^`]+)`", "|".join(cells[2:])))))
    return out


def _props(node: dict, *path: str) -> set[str]:
    defs = _schema()["$defs"]
    for p in path:
        node = node["additionalProperties"] if p == "*" else node["properties"][p]
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[1]]
    return set(node.get("properties", {}))


def test_top_level_fields_documented_equal_schema():
    assert set(_table_keys("## Top level")) == set(_schema()["properties"])


def test_every_layer_field_is_named_in_its_row():
    rows = _rows("## `models.<m>.layers.<layer>`")
    layer = _schema()["$defs"]["layer"]
    assert set(rows) == set(layer["properties"])
    for key in rows:
        named = set(rows[key].split())
        nested = _props(layer, key, "*") | _props(layer, key, "*", "factors", "*") if key == "decodability" else set()
        missing = (_props(layer, key) | nested) - named
        assert not missing, f"layers.<l>.{key}: {sorted(missing)} not named in docs/REPORT_SCHEMA.md"


def test_every_field_of_the_image_audits_records_is_named_in_its_row():
    """``probekit audit``'s records (and the demo's attribution): each field in the top-level table's row."""
    rows, top = _rows("## Top level"), _schema()
    fields = {"preprocessing": _props(top, "preprocessing"), "inputs": _props(top, "inputs"),
              "cost": _props(top, "cost") | _props(top, "cost", "objects"),
              "accuracy_check": _props(top, "accuracy_check", "*"),
              "mask_sensitivity": _props(top, "mask_sensitivity") | _props(top, "mask_sensitivity", "models", "*")
              | _props(top, "mask_sensitivity", "models", "*", "eroded"),
              "attribution": _props(top, "attribution", "*"), "headline": _props(top, "headline"),
              "skipped": _props(top, "skipped") | set(top["properties"]["skipped"]["items"]["properties"])}
    for key, want in fields.items():
        missing = want - set(rows[key].split())
        assert not missing, f"{key}: {sorted(missing)} not named in docs/REPORT_SCHEMA.md"
