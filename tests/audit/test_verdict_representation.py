"""The representation's background flag, end to end through the CLI, on planted teacher/student layers.

Teacher ``fg + 0.3 bg``; a student that encodes the foreground more weakly (``0.5 fg + 0.3 bg``, the
same background response) must not be flagged; a student with three times the teacher's background
response (``fg + 0.9 bg``) must. A store written with the StoreWriter, audited by ``probekit analyze``.
"""

import json

import numpy as np
import pytest

from probekit.cli import main
from probekit.store import StoreWriter

G, B, D = 120, 8, 24


def _write(path, students, seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(G), B)
    b = np.tile(np.arange(B), G)
    fg, bg = rng.normal(size=(G, D)), rng.normal(size=(B, D))
    n = G * B
    layers = {"teacher": (1.0, 0.3), **students}
    with StoreWriter(path, mode="overwrite") as w:
        w.add_split("crossed", n_rows=n, has_label=True, fields=["label", "group", "background"])
        for name, _ in layers.items():
            w.add_model(name, role="teacher" if name == "teacher" else "student", source="test")
            w.add_layer(name, "crossed", "rep", feature_shape=(D,), dtype="float32", attrs={"pool": "none"})
        acts = {name: {"rep": (a * fg[g] + c * bg[b] + 0.1 * rng.normal(size=(n, D))).astype(np.float32)}
                for name, (a, c) in layers.items()}
        w.write_rows("crossed", 0, samples={"index": np.arange(n), "label": g % 3, "group": g, "background": b},
                     acts=acts)


@pytest.mark.parametrize("students, flagged", [
    ({"weak_fg": (0.5, 0.3)}, {"weak_fg": False}),
    ({"strong_bg": (1.0, 0.9)}, {"strong_bg": True}),
    ({"weak_fg": (0.5, 0.3), "strong_bg": (1.0, 0.9), "same": (1.0, 0.3)},
     {"weak_fg": False, "strong_bg": True, "same": False}),
])
def test_background_flag_through_the_cli(tmp_path, students, flagged):
    store, out = tmp_path / "s.h5", tmp_path / "a.json"
    _write(store, students)
    rc = main(["analyze", str(store), "-o", str(out), "--n-boot", "200", "--no-progress",
               "--fail-on", "representation"])
    doc = json.loads(out.read_text())
    for name, want in flagged.items():
        layer = doc["models"][name]["layers"]["rep"]
        assert layer["background_flag"] is want, name
        assert ("representation" in doc["models"][name]["findings"]) is want
        # the split records no background classes, so the shortcut finding cannot be judged: null, not false
        assert doc["models"][name]["flagged"] is None and doc["models"][name]["judged"]["representation"]
        ref = layer["background_vs_reference"]
        assert ref["reference"] == "teacher" and ref["kind"] == "absolute"
        assert ref["n_comparisons"] == len(students)  # Bonferroni over every layer x model compared
        # the two-way decomposition reads the weaker foreground as a smaller foreground component
        fgc = layer["crossed"]["foreground"]["value"]
        assert fgc == pytest.approx(doc["models"]["teacher"]["layers"]["rep"]["crossed"]["foreground"]["value"]
                                    * (students[name][0] ** 2), rel=0.3)
    # a finding fails the gate; else the teacher, with no reference of its own, is not judged: exit 3
    assert rc == (1 if any(flagged.values()) else 3)
    assert "background_flag" not in doc["models"]["teacher"]["layers"]["rep"]
    assert not doc["models"]["teacher"]["judged"]["representation"]
