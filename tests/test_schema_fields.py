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
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

import probekit as pk
from probekit.cli import main
from probekit.datasets._shapes import write_image_folder


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
              "stress": rows(n_bg, 3.0, crossed=True)}
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
    "inputs.teacher": "probekit audit --teacher",
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
