"""A catalogue of malformed inputs: each gets one clear line, exit code 2, and leaves files untouched.

CLI cases run ``probekit.cli.main([...])`` and check: exit code 2; stderr is exactly ONE line starting
with ``probekit: error:`` that holds the case's key phrase (what went wrong, and the fix where there is
one); every file of the working folder keeps its bytes and mtime, and no file appears. API cases check
the exception type and phrase. The expected phrases are written from the input (the name we broke),
not copied from a run.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import probekit
from probekit.analyses import (
    BackgroundCorrelation,
    LinearProbe,
    background_sensitivity,
    linear_cka,
    normalized_mean_shift,
)
from probekit.cli import main
from probekit.errors import DataError, LayerNotFoundError, ProbekitError, StoreExistsError, StoreFormatError

HELPER = textwrap.dedent(
    '''
    from collections import OrderedDict

    import numpy as np
    import torch
    from torch import nn


    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))


    def named():
        return nn.Sequential(OrderedDict(layer1=nn.Conv2d(3, 4, 3), layer2=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1)))


    def linear5():
        return nn.Linear(5, 2)


    def notmodule():
        return 42


    NOT_CALLABLE = 3


    def ragged():
        """Items of two shapes: item 2 is larger."""
        return [(torch.zeros(3, 8, 8) if i == 2 else torch.zeros(3, 6, 6), 0) for i in range(6)]


    def float_labels():
        return [(torch.zeros(3, 6, 6), 0.5) for _ in range(6)]
    '''
)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a helper module, data files, a valid store and broken files of every kind."""
    d = tmp_path_factory.mktemp("bad")
    (d / "bad_inputs_helper.py").write_text(HELPER)
    sys.path.insert(0, str(d))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3, 6, 6)).astype(np.float32)
    y = np.arange(6) % 2
    fac = rng.normal(size=(6, 1)).astype(np.float32)
    _npz(d / "ok.npz", x=x, y=y, factors=fac, factor_names=np.array(["bg"]))
    _npz(d / "seven.npz", x=np.concatenate([x, x[:1]]), y=np.arange(7) % 2, factors=np.concatenate([fac, fac[:1]]),
         factor_names=np.array(["bg"]))
    np.savez(d / "object.npz", x=x, y=np.array([{"a": 1}] * 6, dtype=object))
    _npz(d / "mismatch.npz", x=x, y=y[:5])
    _npz(d / "nox.npz", inputs=x)
    _npz(d / "floaty.npz", x=x, y=np.linspace(0, 1, 6))
    _npz(d / "empty.npz", x=x[:0])
    _npz(d / "flat.npz", x=rng.normal(size=(6, 5)).astype(np.float32))
    _npz(d / "fac1d.npz", x=x, factors=fac[:, 0])
    _npz(d / "twonames.npz", x=x, factors=fac, factor_names=np.array(["bg", "hue"]))
    (d / "text.h5").write_text("this is not HDF5\n")
    with h5py.File(d / "foreign.h5", "w") as f:
        f.attrs["creator"] = "someone else"
    torch.save(torch.nn.Linear(5, 2), d / "pickled.pt")  # a whole module: only unpickling can read it
    torch.save(torch.nn.Linear(5, 2).state_dict(), d / "other_arch.pt")
    other_values = __import__("bad_inputs_helper").model().state_dict()
    other_values["0.bias"] += 1.0
    torch.save(other_values, d / "same_arch_other_values.pt")
    (d / "corrupt.safetensors").write_bytes(b"\x00\x01garbage")
    (d / "garbage.pt").write_bytes(rng.bytes(300))
    (d / "notjson.json").write_text("{not json")
    (d / "other.json").write_text(json.dumps({"hello": 1}))
    assert main(["extract", "bad_inputs_helper:model", "--data", str(d / "ok.npz"), "--layers", "0,4",
                 "-o", str(d / "ok.h5"), "--batch-size", "4", "--no-progress"]) == 0
    raw = (d / "ok.h5").read_bytes()
    (d / "truncated.h5").write_bytes(raw[: len(raw) // 3])
    for name, version in (("v99.h5", 99), ("v0.h5", 0)):
        shutil.copy(d / "ok.h5", d / name)
        with h5py.File(d / name, "r+") as f:
            f.attrs["format_version"] = version
    yield d
    sys.path.remove(str(d))
    sys.modules.pop("bad_inputs_helper", None)


def snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir()) if p.is_file()}


E = ["extract", "bad_inputs_helper:model", "--batch-size", "4", "--no-progress"]

# (id, argv with {d} for the work folder, phrases that the one line must hold)
CLI_CASES = [
    ("info-not-hdf5", ["info", "{d}/text.h5"], ["is not a readable HDF5 file", "re-run the extraction"]),
    ("info-truncated", ["info", "{d}/truncated.h5"], ["is not a readable HDF5 file", "truncated"]),
    ("info-foreign-hdf5", ["info", "{d}/foreign.h5"], ["is an HDF5 file but not a probekit store"]),
    ("info-newer-format", ["info", "{d}/v99.h5"], ["store format version 99", "Upgrade probekit"]),
    ("info-invalid-format", ["info", "{d}/v0.h5"], ["invalid store format version 0"]),
    ("info-missing", ["info", "{d}/nosuch.h5"], ["does not exist"]),
    ("analyze-missing-model", ["analyze", "{d}/ok.h5", "--models", "nosuch", "--no-progress"],
     ["has no model 'nosuch'", "['model']"]),
    ("analyze-missing-layer", ["analyze", "{d}/ok.h5", "--layers", "nosuch", "--no-progress"],
     ["has no layers ['nosuch']", "'0'"]),
    ("analyze-unknown-factor", ["analyze", "{d}/ok.h5", "--factors", "nosuch", "--no-progress"],
     ["Unknown factor names ['nosuch']", "['bg']"]),
    ("analyze-bad-label", ["analyze", "{d}/ok.h5", "--label", "y", "--no-progress"], ["--label must be"]),
    ("analyze-unknown-metric", ["analyze", "{d}/ok.h5", "--fail-above", "bogus=1"], ["unknown metric 'bogus'"]),
    ("analyze-threshold-nan", ["analyze", "{d}/ok.h5", "--fail-above", "sensitivity=abc"], ["'abc' is not a number"]),
    ("analyze-not-a-store", ["analyze", "{d}/text.h5", "--no-progress"], ["is not a readable HDF5 file"]),
    ("report-missing-dir", ["report", "{d}/ok.h5", "-o", "{d}/no/such/dir/r.html"], ["does not exist"]),
    ("report-audit-not-json", ["report", "{d}/ok.h5", "-o", "{d}/r.html", "--audit", "{d}/notjson.json"],
     ["Cannot read the audit JSON"]),
    ("report-audit-foreign-json", ["report", "{d}/ok.h5", "-o", "{d}/r.html", "--audit", "{d}/other.json"],
     ["is not a probekit audit result"]),
    ("model-unknown-prefix", ["extract", "foo", "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5"],
     ["Cannot interpret the model 'foo'", "timm:NAME"]),
    ("model-unknown-timm", ["extract", "timm:resnet_18", "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5"],
     ["timm has no model 'resnet_18'", "resnet18"]),
    ("model-unknown-torchvision", ["extract", "torchvision:resnet_18", "--data", "{d}/ok.npz", "--layers", "0",
                                   "-o", "{d}/o.h5"], ["torchvision has no model 'resnet_18'", "resnet18"]),
    ("model-module-missing", ["layers", "nosuch_module_xyz:model"], ["Cannot import the module 'nosuch_module_xyz'"]),
    ("model-attr-missing", ["layers", "bad_inputs_helper:nothere"], ["has no attribute 'nothere'"]),
    ("model-not-callable", ["layers", "bad_inputs_helper:NOT_CALLABLE"], ["names a int, not a"]),
    ("model-not-module", ["layers", "bad_inputs_helper:notmodule"], ["returned a int, not a torch nn.Module"]),
    ("weights-other-arch", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5",
                            "--weights", "{d}/other_arch.pt"],
     ["missing keys [0.weight, 0.bias, 4.weight, 4.bias]", "unexpected keys [weight, bias]", "another architecture"]),
    ("weights-pickle-only", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5",
                             "--weights", "{d}/pickled.pt"], ["does not unpickle by default", "--allow-pickle"]),
    ("weights-missing", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5", "--weights", "{d}/no.pt"],
     ["does not exist"]),
    ("weights-corrupt-safetensors", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5",
                                     "--weights", "{d}/corrupt.safetensors"], ["as safetensors"]),
    ("weights-garbage", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5", "--weights", "{d}/garbage.pt"],
     ["Cannot read the checkpoint", "not a torch checkpoint or it is damaged"]),
    ("layers-glob-matches-nothing", ["extract", "bad_inputs_helper:named", "--data", "{d}/ok.npz", "--layers", "layr*",
                                     "-o", "{d}/o.h5"], ["matches 'layr*'", "layer1", "probekit layers"]),
    ("layers-name-missing", [*E, "--data", "{d}/ok.npz", "--layers", "0,nosuch", "-o", "{d}/o.h5"],
     ["'nosuch'", "probekit layers"]),
    ("out-missing-dir", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/no/such/o.h5"],
     ["the directory", "does not exist"]),
    ("out-exists", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/ok.h5"],
     ["already exists", "--resume", "--overwrite"]),
    ("npz-object-arrays", [*E, "--data", "{d}/object.npz", "--layers", "0", "-o", "{d}/o.h5"],
     ["object arrays", "never unpickles"]),
    ("npz-mismatched-lengths", [*E, "--data", "{d}/mismatch.npz", "--layers", "0", "-o", "{d}/o.h5"],
     ["'y' has 5 rows but x has 6"]),
    ("npz-no-x", [*E, "--data", "{d}/nox.npz", "--layers", "0", "-o", "{d}/o.h5"], ["has no array 'x'", "inputs"]),
    ("npz-float-labels", [*E, "--data", "{d}/floaty.npz", "--layers", "0", "-o", "{d}/o.h5"], ["integer class ids"]),
    ("npz-empty", [*E, "--data", "{d}/empty.npz", "--layers", "0", "-o", "{d}/o.h5"], ["is empty"]),
    ("npz-missing", [*E, "--data", "{d}/nosuch.npz", "--layers", "0", "-o", "{d}/o.h5"], ["does not exist"]),
    ("npz-factors-1d", [*E, "--data", "{d}/fac1d.npz", "--layers", "0", "-o", "{d}/o.h5"], ["'factors' must be 2-D"]),
    ("npz-factor-names-count", [*E, "--data", "{d}/twonames.npz", "--layers", "0", "-o", "{d}/o.h5"],
     ["1 factors per item but 2 factor names"]),
    ("data-unknown", [*E, "--data", "nosuchthing", "--layers", "0", "-o", "{d}/o.h5"],
     ["Cannot interpret the data 'nosuchthing'"]),
    ("data-wrong-image-shape", [*E, "--data", "{d}/flat.npz", "--layers", "0", "-o", "{d}/o.h5"],
     ["raised on the first batch", "(5,) per sample"]),
    ("data-ragged-shapes", [*E, "--data", "bad_inputs_helper:ragged", "--layers", "0", "-o", "{d}/o.h5"],
     ["item 2 has input shape (3, 8, 8) but item 0 has (3, 6, 6)"]),
    ("data-float-labels", [*E, "--data", "bad_inputs_helper:float_labels", "--layers", "0", "-o", "{d}/o.h5"],
     ["labels must be integer class ids"]),
    ("resume-other-row-count", [*E, "--data", "{d}/seven.npz", "--layers", "0,4", "-o", "{d}/ok.h5", "--resume"],
     ["holds 6 samples but this data has 7"]),
    ("resume-other-pool", [*E, "--data", "{d}/ok.npz", "--layers", "0,4", "-o", "{d}/ok.h5", "--resume",
                           "--pool", "max"], ["was stored with pool 'avg'", "'max'"]),
    ("resume-other-weights", [*E, "--data", "{d}/ok.npz", "--layers", "0,4", "-o", "{d}/ok.h5", "--resume",
                              "--weights", "{d}/same_arch_other_values.pt"], ["extracted from other weights", "--name"]),
    ("batch-size-zero", [*E[:2], "--batch-size", "0", "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5"],
     ["--batch-size must be", ">= 1", "Got 0"]),  # the flag, not the Python parameter batch_size
    ("split-repeated", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5", "--split", "a", "--split", "b"],
     ["--split can be repeated only with a built-in dataset"]),
    ("input-shape-garbage", ["layers", "bad_inputs_helper:model", "--input-shape", "3,x,y"],
     ["expected sizes like 3,224,224", "probekit layers --help"]),
    ("input-shape-wrong", ["layers", "bad_inputs_helper:linear5", "--input-shape", "3,6,6"],
     ["failed on a dummy input of shape (3, 6, 6)", "--input-shape"]),
    ("unknown-verb", ["bogusverb"], ["invalid choice: 'bogusverb'"]),
    ("missing-required", ["extract", "bad_inputs_helper:model", "-o", "{d}/o.h5"],
     ["the following arguments are required: --data, --layers"]),
    ("pool-unknown", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5", "--pool", "median"],
     ["'median' is not a pool; use one of avg, max"]),
    ("resume-and-overwrite", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5", "--resume",
                              "--overwrite"], ["not allowed with argument"]),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("device-cuda-absent", [*E, "--data", "{d}/ok.npz", "--layers", "0", "-o", "{d}/o.h5",
                                             "--device", "cuda"], ["CUDA is not available", "device='cpu'"]))


@pytest.mark.parametrize(("argv", "phrases"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_line_exit_2_files_untouched(work, capsys, argv, phrases):
    before = snapshot(work)
    capsys.readouterr()
    rc = main([a.replace("{d}", str(work)) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("probekit: error: ")
    for phrase in phrases:
        assert phrase.replace("{d}", str(work)) in lines[0], lines[0]
    assert snapshot(work) == before  # same files, same bytes, same mtimes; nothing new


def test_catalogue_has_at_least_30_cli_cases():
    assert len(CLI_CASES) >= 30 and len({c[0] for c in CLI_CASES}) == len(CLI_CASES)


# -- API cases -------------------------------------------------------------------------------------------
def _grouped(rng, n_groups=5, per=4, d=6):
    g = np.repeat(np.arange(n_groups), per)
    return rng.normal(size=(len(g), d)), g


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_activations_from_a_store_raise_data_error(tmp_path, bad):
    rng = np.random.default_rng(0)
    X, g = _grouped(rng)
    X[7, 2] = bad
    with probekit.StoreWriter(tmp_path / "nan.h5") as w:
        w.add_split("s", n_rows=len(g), has_label=True, has_group=True)
        w.add_model("m")
        w.add_layer("m", "s", "l", feature_shape=(X.shape[1],))
        w.write_rows("s", 0, {"index": np.arange(len(g)), "label": g % 2, "group": g},
                     {"m": {"l": X.astype(np.float32)}})
    with probekit.open_store(tmp_path / "nan.h5") as s:
        acts = s.acts("m", "s", "l")
        for call in (lambda: background_sensitivity(acts, g, n_boot=5),
                     lambda: linear_cka(acts, X[:, ::-1].copy() * 0 + 1.0 + np.arange(20)[:, None]),
                     lambda: LinearProbe().fit(acts, g % 2),
                     lambda: normalized_mean_shift(acts[:10], acts[10:], n_boot=5),
                     lambda: BackgroundCorrelation(n_permutations=5).fit(acts, rng.normal(size=(20, 1)))):
            with pytest.raises(DataError, match="row 7"):
                call()


def test_constant_features_are_reported_not_averaged(tmp_path):
    rng = np.random.default_rng(1)
    X, g = _grouped(rng)
    const = np.ones_like(X)
    with pytest.raises(DataError, match="constant"):
        linear_cka(const, X)
    with pytest.raises(DataError, match="zero variance"):
        normalized_mean_shift(const[:10], const[10:], n_boot=5)
    # a constant unit next to live ones is counted as dead and left out of the layer figure
    with_dead = np.concatenate([X, np.full((len(g), 1), 3.0)], axis=1)
    r_dead, r_live = background_sensitivity(with_dead, g, n_boot=5), background_sensitivity(X, g, n_boot=5)
    assert r_dead.n_dead_units == 1 and r_live.n_dead_units == 0
    within = sum(((X[g == k] - X[g == k].mean(0)) ** 2).sum() for k in range(5))
    assert r_dead.layer == pytest.approx(within / ((X - X.mean(0)) ** 2).sum(), rel=1e-9)
    assert r_dead.layer == pytest.approx(r_live.layer, rel=1e-12)


def test_all_constant_layer_background_sensitivity_raises():
    g = np.repeat(np.arange(5), 4)
    with pytest.raises(DataError, match="every one of the 3 units is constant"):
        background_sensitivity(np.ones((20, 3)), g, n_boot=5)


def test_one_class_labels_and_single_group():
    rng = np.random.default_rng(2)
    X, _ = _grouped(rng)
    with pytest.raises(DataError, match="only 1 class"):
        LinearProbe().fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(DataError, match="single value"):
        background_sensitivity(X, np.zeros(len(X), dtype=int))


def test_unknown_factor_names_in_an_analysis():
    rng = np.random.default_rng(3)
    X, _ = _grouped(rng)
    with pytest.raises(DataError, match=r"Unknown factor name\(s\) \['hue'\]; the factors are \['bg', 'bright'\]"):
        BackgroundCorrelation(n_permutations=5).fit(X, rng.normal(size=(len(X), 2)), factor_names=["bg", "bright"],
                                                   use=["hue"])


def test_row_counts_that_disagree_between_arrays():
    rng = np.random.default_rng(4)
    X, g = _grouped(rng)
    with pytest.raises(DataError, match=r"X has 20 rows but Y has 19"):
        linear_cka(X, X[:19])
    with pytest.raises(DataError, match="group has 19 rows but X has 20"):
        background_sensitivity(X, g[:19])
    with pytest.raises(DataError, match="0 sample"):
        background_sensitivity(X[:0], g[:0])


def test_store_counters_that_disagree_never_expose_unwritten_rows(tmp_path):
    """A store edited by hand: the model's counter beyond the split's, and beyond the dataset's rows."""
    path = tmp_path / "edited.h5"
    X = np.arange(24, dtype=np.float32).reshape(8, 3) + 1
    with probekit.StoreWriter(path) as w:
        w.add_split("s", n_rows=8, has_label=False)
        w.add_model("m")
        w.add_layer("m", "s", "l", feature_shape=(3,))
        w.write_rows("s", 0, {"index": np.arange(6)}, {"m": {"l": X[:6]}})
    with h5py.File(path, "r+") as f:
        f["models/m/acts/s"].attrs["rows_committed"] = 8  # claims two rows the split never committed
    with probekit.open_store(path) as s:
        assert s.n_rows("s", "m") == 6
        np.testing.assert_array_equal(np.asarray(s.acts("m", "s", "l")), X[:6])
    with h5py.File(path, "r+") as f:
        f["samples/s"].attrs["rows_committed"] = 50  # beyond every dataset
        f["models/m/acts/s"].attrs["rows_committed"] = 50
    with probekit.open_store(path) as s:
        acts = s.acts("m", "s", "l")
        assert acts.shape == (8, 3)  # never past what the dataset holds
        assert len(s.sample_field("s", "index")) == 8


def test_store_writer_refuses_bad_names_shapes_and_batches(tmp_path):
    path = tmp_path / "w.h5"
    with probekit.StoreWriter(path) as w:
        for bad in ("", "a/b", " padded", ".."):
            with pytest.raises(DataError, match=r"cannot be used|leading or trailing"):
                w.add_split(bad, n_rows=4, has_label=False)
        w.add_split("s", n_rows=4, has_label=True)
        w.add_model("m")
        with pytest.raises(DataError, match="'role' parameter"):
            w.add_model("m2", role="boss")
        w.add_layer("m", "s", "l", feature_shape=(3,))
        with pytest.raises(DataError, match="field 'label' of a batch for split 's' has 3 rows, the index has 4"):
            w.write_rows("s", 0, {"index": np.arange(4), "label": np.arange(3)}, {"m": {"l": np.zeros((4, 3))}})
        with pytest.raises(DataError, match="lacks the field 'label'"):
            w.write_rows("s", 0, {"index": np.arange(4)}, {"m": {"l": np.zeros((4, 3))}})
        with pytest.raises(ProbekitError, match="rows must be written in order"):
            w.write_rows("s", 2, {"index": np.arange(2), "label": np.arange(2)}, {"m": {"l": np.zeros((2, 3))}})
        with pytest.raises(DataError, match="dtype"):
            w.add_layer("m", "s", "l2", feature_shape=(3,), dtype="int8")
    with probekit.StoreWriter(path, mode="resume") as w:
        with pytest.raises(DataError, match=r"stored with features \(3,\) float32, but this run gives \(4,\)"):
            w.add_layer("m", "s", "l", feature_shape=(4,))


def test_store_exists_and_foreign_files_are_left_byte_identical(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("precious, not a store")
    mtime, data = path.stat().st_mtime_ns, path.read_bytes()
    with pytest.raises(StoreExistsError, match="--resume"):
        probekit.StoreWriter(path)
    with pytest.raises(StoreFormatError, match="not a readable HDF5 file"):
        probekit.StoreWriter(path, mode="resume")
    with pytest.raises(StoreFormatError):
        probekit.open_store(path)
    assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime


def test_missing_split_layer_model_in_a_store(work):
    with probekit.open_store(work / "ok.h5") as s:
        with pytest.raises(DataError, match="has no split 'train'"):
            s.sample_field("train", "label")
        with pytest.raises(DataError, match="has no model 'teacher'"):
            s.acts("teacher", "data", "0")
        with pytest.raises(LayerNotFoundError, match=r"has no layer 'fc'.*'0', '4'"):
            s.acts("model", "data", "fc")
        with pytest.raises(DataError, match="has no activations on split 'test'"):
            s.acts("model", "test", "0")
        with pytest.raises(DataError, match="has no 'group'"):
            s.sample_field("data", "group")


def test_dataset_items_of_unsupported_kinds():
    from probekit.datasets import as_samples

    with pytest.raises(DataError, match="without the key 'x'"):
        as_samples([{"image": torch.zeros(3)}])
    with pytest.raises(DataError, match="length 4"):
        as_samples([(torch.zeros(3), 0, np.zeros(1), 9)])
    with pytest.raises(DataError, match="is empty"):
        as_samples([])
    with pytest.raises(DataError, match="no length"):
        as_samples(iter([torch.zeros(3)]))
    ds = as_samples([(torch.zeros(3), 0), (torch.zeros(3),)])
    with pytest.raises(DataError, match="lacks a 'label' but item 0 does"):
        ds[1]
