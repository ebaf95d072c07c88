"""``probekit audit`` opens its store at most 3 times, and assembles its document once (issue 21).

Oracles: opens of ``acts.h5`` counted by wrapping ``h5py.File`` (a path given: an open); the document
checked against the shipped JSON schema and its entries the store does not hold compared with what the
audit was given; a rerun on the same inputs gives the same figures.
"""

import collections
import json
import os
from pathlib import Path

import h5py
import jsonschema
import pytest
import torch

from probekit.datasets._shapes import write_image_folder
from probekit.model_audit import audit_model
from probekit.store import open_store

MODEL = "probekit.experiments.shortcut:ShapesCNN"
FAST = {"n_boot": 40, "n_perm": 20, "progress": False, "workers": 0, "n_inits": 1}
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_audit_opens_its_store_three_times_and_writes_its_document_once(tmp_path, monkeypatch):
    images, masks = write_image_folder(tmp_path / "f", split="test", background="class", n=12)
    torch.manual_seed(5)
    from probekit.experiments.shortcut import ShapesCNN

    torch.save(ShapesCNN().state_dict(), tmp_path / "m.pt")
    opens: collections.Counter = collections.Counter()
    real = h5py.File.__init__

    def init(self, name, *a, **kw):
        if isinstance(name, (str, bytes, os.PathLike)):
            opens[Path(os.fsdecode(name)).name] += 1
        real(self, name, *a, **kw)

    monkeypatch.setattr(h5py.File, "__init__", init)
    out = tmp_path / "o"
    first = audit_model(MODEL, images, masks=masks, weights=tmp_path / "m.pt", out=out, **FAST).data
    # one writer session for every split, then one read-only view (two handles: its counters, its reads)
    assert opens["acts.h5"] == 3
    schema = json.loads((ROOT / "probekit" / "report" / "audit.schema.json").read_text())
    jsonschema.validate(first, schema)
    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk == first  # the JSON is the document audit() returned: nothing added after it
    assert list(first)[-4:] == ["preprocessing", "cost", "inputs", "accuracy_check"]  # exact masks: no mask check
    opens.clear()
    with open_store(out / "acts.h5") as s:  # the preprocessing each net's rows were made with
        assert first["preprocessing"] == json.loads(s.model_attrs("model")["preprocessing"])
    assert first["cost"]["forward_passes_done"] == first["cost"]["forward_passes_total"]
    opens.clear()
    again = audit_model(MODEL, images, masks=masks, weights=tmp_path / "m.pt", out=out, **FAST).data
    # continuing adds two read-only opens before the file is opened for writing: the inputs' fingerprint
    # compared, and the writer's check that the file is a store it may resume
    assert opens["acts.h5"] == 5
    for doc in (first, again):
        for k in ("created", "cost"):
            doc.pop(k)
    assert again == first
