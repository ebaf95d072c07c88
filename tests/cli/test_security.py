"""Security: nothing untrusted is unpickled by default; hostile names cannot inject into the HTML report;
``module:callable`` runs only what the user names.

The report oracle: the same store written with benign names gives a report with the same set of HTML
tags and attribute names; the hostile one may differ only in text. Unpickling is caught by a planted
``__reduce__`` that would create a marker file.
"""

from __future__ import annotations

import ast
import json
import pickle
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import probekit
from probekit.cli import main
from probekit.errors import DataError, ModelLoadError

ROOT = Path(__file__).resolve().parents[2]

HOSTILE = {
    "model_a": "<img src=x onerror=alert(1)>",
    "model_b": "{{7*7}}",
    "layer_a": "</script><script>alert(1)</script>",
    "layer_b": "$x$ <b onmouseover=alert(2)>",
    "factors": ["{{7*7}}", "$x$", "<svg onload=alert(3)>"],
    "train": "<svg onload=alert(4)>",
    "test_id": "{{7*7}}",
    "test_ood": "$\\x$ ${7*7}",
    "crossed": "\"'><iframe src=javascript:alert(5)>",
    "source": "<script>alert(6)</script>",
}
BENIGN = {"model_a": "alpha", "model_b": "beta", "layer_a": "conv", "layer_b": "fc",
          "factors": ["hue", "bright", "freq"], "train": "train", "test_id": "test_id", "test_ood": "test_ood",
          "crossed": "crossed", "source": "planted"}


def write_store(path: Path, names: dict) -> Path:
    """Two models (teacher, student), two layers, four splits with labels, factors and a grouped split."""
    rng = np.random.default_rng(0)
    n_fg, d = 30, 8
    code, mix = rng.normal(size=(n_fg, d)), rng.normal(size=(3, d))
    splits = {}
    for key, per, scale in (("train", 3, 1.0), ("test_id", 1, 1.0), ("test_ood", 1, 3.0), ("crossed", 4, 3.0)):
        g = np.repeat(np.arange(n_fg), per)
        splits[names[key]] = (g, rng.uniform(-1, 1, size=(len(g), 3)) * scale, key == "crossed")
    with probekit.StoreWriter(path) as w:
        for split, (g, _, grouped) in splits.items():
            w.add_split(split, n_rows=len(g), has_label=True, factor_names=names["factors"], has_group=grouped)
        for model, role, p in ((names["model_a"], "teacher", 0.1), (names["model_b"], "student", 0.8)):
            w.add_model(model, role=role, source=names["source"])
            for split, (g, fac, grouped) in splits.items():
                samples = {"index": np.arange(len(g)), "label": g % 3, "factors": fac}
                if grouped:
                    samples["group"] = g
                acts = {}
                for j, layer in enumerate((names["layer_a"], names["layer_b"])):
                    w.add_layer(model, split, layer, feature_shape=(d,), attrs={"pool": "avg"})
                    acts[layer] = (code[g] + (p + j * 0.1) * fac @ mix).astype(np.float32)
                w.write_rows(split, 0, samples, {model: acts})
    return path


class Collect(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.attr_values: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            self.attrs.add(k)
            self.attr_values.append(v or "")

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)


def report(tmp_path: Path, names: dict, tag: str) -> tuple[Collect, str]:
    store = write_store(tmp_path / f"{tag}.h5", names)
    out = tmp_path / f"{tag}.html"
    rc = main(["report", str(store), "-o", str(out), "--train", names["train"], "--test-id", names["test_id"],
               "--test-ood", names["test_ood"], "--crossed", names["crossed"], "--n-boot", "20", "--n-perm", "20",
               "--no-progress"])
    assert rc == 0
    html = out.read_text()
    parser = Collect()
    parser.feed(html)
    return parser, html


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("reports")
    return report(d, BENIGN, "benign"), report(d, HOSTILE, "hostile")


def test_hostile_names_add_no_element_or_attribute_to_the_report(reports):
    (benign, _), (hostile, html) = reports
    assert hostile.tags == benign.tags
    assert hostile.attrs == benign.attrs
    assert not any(a.startswith("on") for a in hostile.attrs)
    assert {"script", "iframe", "svg", "img"}.isdisjoint(hostile.tags - benign.tags)
    assert "script" not in hostile.tags
    for raw in ("<img src=x", "<script>", "</script>", "<svg onload", "<iframe", "<b onmouseover"):
        assert raw not in html
    assert not any(v.lower().lstrip().startswith("javascript:") for v in hostile.attr_values)


def test_hostile_names_are_shown_as_text_and_templates_not_evaluated(reports):
    _, (hostile, _) = reports
    text = "".join(hostile.text)
    # the names the report shows arrive as literal text (escaped in the HTML, unescaped by the parser)
    for name in (HOSTILE["model_a"], HOSTILE["model_b"], HOSTILE["layer_a"]):
        assert name in text
    assert "{{7*7}}" in text  # jinja2 does not evaluate data: no template injection


def test_hostile_names_survive_into_audit_json(tmp_path):
    store = write_store(tmp_path / "h.h5", HOSTILE)
    out = tmp_path / "a.json"
    assert main(["analyze", str(store), "--json", str(out), "--train", HOSTILE["train"], "--test-id",
                 HOSTILE["test_id"], "--test-ood", HOSTILE["test_ood"], "--crossed", HOSTILE["crossed"],
                 "--n-boot", "20", "--n-perm", "20", "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    models = {r["model"] for r in doc["headline"]["rows"]}
    assert models == {HOSTILE["model_a"], HOSTILE["model_b"]}
    with probekit.open_store(store) as s:
        assert s.factor_names(HOSTILE["train"]) == HOSTILE["factors"]
        assert set(s.layers(HOSTILE["model_a"])) == {HOSTILE["layer_a"], HOSTILE["layer_b"]}


# -- no unpickling by default ------------------------------------------------------------------------------
class Evil:
    """Unpickling this runs ``open(marker, 'w')``: the marker file proves code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_checkpoint_is_not_unpickled(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Evil(str(marker))}, evil)
    assert not marker.exists()
    from probekit.models import load_state_dict

    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_state_dict(evil)
    assert not marker.exists()
    plain = tmp_path / "evil.bin"  # a bare pickle, not a torch zip
    plain.write_bytes(pickle.dumps(Evil(str(marker))))
    with pytest.raises(ModelLoadError):
        load_state_dict(plain)
    assert not marker.exists()
    assert main(["layers", "torchvision:resnet18", "--weights", str(evil), "--input-shape", "3,32,32"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_npz_with_a_pickled_object_array_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.zeros((2, 3), np.float32), y=np.array([Evil(str(marker)), 1], dtype=object))
    from probekit.datasets import load_data

    with pytest.raises(DataError, match="object arrays"):
        load_data(str(path))
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, base, name


def test_every_deserialising_call_in_the_package_is_safe_by_default():
    """An AST scan of probekit/, extractors/, analyses/: every pickle / torch.load / np.load / eval / exec."""
    found = []
    for pkg in ("probekit", "extractors", "analyses"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node, base, name in _calls(tree):
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if base in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve") or name == "Unpickler":
                    found.append(where)
                    pytest.fail(f"{where}: {base}.{name} deserialises arbitrary objects")
                if name in ("eval", "exec") and isinstance(node.func, ast.Name):
                    pytest.fail(f"{where}: {name}() on strings")
                if base == "torch" and name == "load":
                    found.append(where)
                    # weights_only must be given and be True unless the caller asked for pickle
                    assert "weights_only" in kw, where
                    assert ast.unparse(kw["weights_only"]) in ("True", "not allow_pickle"), where
                if base == "np" and name == "load":
                    found.append(where)
                    assert "allow_pickle" not in kw or ast.unparse(kw["allow_pickle"]) == "False", where
    assert found  # the scan saw the loaders it is meant to check
    import inspect

    from probekit.models import load_model, load_state_dict

    assert inspect.signature(load_state_dict).parameters["allow_pickle"].default is False
    assert inspect.signature(load_model).parameters["allow_pickle"].default is False


# -- module:callable runs only what is named -----------------------------------------------------------------
SIDE = textwrap.dedent(
    '''
    import os
    from torch import nn

    MARK = os.environ["PK_SEC_MARK"]


    def model():
        return nn.Sequential(nn.Linear(4, 2))


    def other():
        open(MARK + ".other", "w").close()
        return nn.Sequential(nn.Linear(4, 2))


    def data():
        import torch
        return [(torch.zeros(4), 0) for _ in range(4)]
    '''
)


def test_module_callable_runs_only_the_named_callable(tmp_path, monkeypatch):
    (tmp_path / "sec_side_helper.py").write_text(SIDE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PK_SEC_MARK", str(tmp_path / "mark"))
    from probekit.datasets import load_data
    from probekit.models import load_model

    assert isinstance(load_model("sec_side_helper:model").module, torch.nn.Module)
    assert len(load_data("sec_side_helper:data")) == 4
    assert not (tmp_path / "mark.other").exists()
    load_model("sec_side_helper:other")
    assert (tmp_path / "mark.other").exists()  # naming it is what runs it
    sys.modules.pop("sec_side_helper", None)


def test_stored_source_strings_are_never_imported(tmp_path, monkeypatch):
    """A store's model 'source' may read 'pkg:callable'; reading, auditing and reporting never import it."""
    (tmp_path / "sec_trap_helper.py").write_text("open(__file__ + '.imported', 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = dict(BENIGN, source="sec_trap_helper:anything")
    store = write_store(tmp_path / "s.h5", names)
    assert main(["info", str(store)]) == 0
    assert main(["report", str(store), "-o", str(tmp_path / "r.html"), "--n-boot", "10", "--n-perm", "10",
                 "--no-progress"]) == 0
    assert "sec_trap_helper" not in sys.modules
    assert not Path(str(tmp_path / "sec_trap_helper.py") + ".imported").exists()
