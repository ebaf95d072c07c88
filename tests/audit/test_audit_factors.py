"""Per-image background factors feed decodability and correlation on a split of original images.

A split of original images records group = background = the image (as ``probekit audit`` writes them);
it is not crossed, so its factors vary row by row and the background analyses must run on it (they were
skipped as if it repeated a few backgrounds).
"""

from __future__ import annotations

import numpy as np

import probekit as pk
from probekit.store import StoreWriter


def test_factors_of_original_images_are_analysed(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 200, 16
    f = rng.random((n, 2)).astype(np.float32)
    x = (np.outer(f[:, 0], rng.normal(size=d)) * 3 + rng.normal(size=(n, d))).astype(np.float32)
    with StoreWriter(tmp_path / "s.h5", mode="overwrite") as w:
        w.add_split("test", n_rows=n, has_label=True, factor_names=["brightness", "hue"],
                    fields=["label", "group", "background"])
        w.add_model("m", role="model", source="planted")
        w.add_layer("m", "test", "rep", feature_shape=(d,), dtype="float32", attrs={"pool": "none"})
        w.write_rows("test", 0, samples={"index": np.arange(n), "label": np.arange(n) % 2, "factors": f,
                                         "group": np.arange(n), "background": np.arange(n)},
                     acts={"m": {"rep": x}})
    doc = pk.audit(tmp_path / "s.h5", train="", test_id="test", test_ood="", n_boot=50, n_perm=20,
                   progress=False).data
    layer = doc["models"]["m"]["layers"]["rep"]
    assert layer["decodability"]["test"]["factors"]["brightness"]["excess"]["value"] > 0.5  # planted
    assert abs(layer["decodability"]["test"]["factors"]["hue"]["excess"]["value"]) < 0.15  # not planted
    assert layer["correlation"]["split"] == "test"
