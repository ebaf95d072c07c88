"""probekit.compare: the audit's reliance per checkpoint (1 for a complete shortcut, 0 for an invariant
model), its paired difference's coverage on a generator with a known truth, checkpoint names and globs, and compare_checkpoints / `probekit compare`
end to end on a tiny folder whose checkpoints rely on the background more and more."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from probekit.analyses import background_reliance
from probekit.cli import main
from probekit.compare import compare_checkpoints, compare_rows, expand_checkpoints, step_of
from probekit.errors import DataError


def test_complete_shortcut_reads_one_and_an_invariant_model_zero():
    rng = np.random.default_rng(0)
    G, B = 40, 8
    label = np.repeat(rng.integers(0, 4, G)[:, None], B, axis=1)
    bl = np.tile(rng.integers(0, 4, B), (G, 1))
    own_answer = np.repeat(rng.integers(0, 4, G)[:, None], B, axis=1)  # right or wrong, never the background's
    doc = compare_rows({"invariant": own_answer, "shortcut": bl}, label, bl, n_boot=50)
    assert doc["checkpoints"]["shortcut"]["reliance"]["value"] == pytest.approx(1.0)
    assert doc["checkpoints"]["invariant"]["reliance"]["value"] == pytest.approx(0.0)
    assert doc["ranking"] == ["invariant", "shortcut"]


def test_the_figures_are_the_audits_own():
    """Each checkpoint's reliance is background_reliance's on the same rows, with the same seed."""
    rng = np.random.default_rng(2)
    y, bl, p1, p2 = _simulate(rng, 30, 6, 0.4, 0.1)
    doc = compare_rows({"a": p1, "b": p2}, y, bl, n_boot=80, seed=5)
    r = background_reliance(p1.reshape(-1), np.repeat(np.arange(30), 6), np.tile(np.arange(6), 30),
                            label=y.reshape(-1), background_label=bl.reshape(-1), n_boot=80, random_state=5)
    got = doc["checkpoints"]["a"]
    assert got["reliance"]["value"] == r.reliance and got["reliance"]["ci"] == list(r.reliance_ci)
    assert got["shortcut"] == r.shortcut and got["reliance"]["detectable"] == r.detectable
    assert got["accuracy_other_background"]["value"] == r.accuracy_other


def test_step_of_reads_the_usual_names():
    assert step_of("runs/epoch=3.ckpt") == 3
    assert step_of("model_step_1000.safetensors") == 1000
    assert step_of("resnet18-ep12.pt") == 12
    assert step_of("ckpt-0042.pth") == 42
    assert step_of("final.safetensors") is None


def test_expand_checkpoints_orders_by_step_and_refuses_too_few(tmp_path):
    for name in ("epoch=10.pt", "epoch=2.pt", "epoch=1.pt"):
        (tmp_path / name).write_bytes(b"x")
    files = expand_checkpoints([str(tmp_path / "epoch=*.pt")])
    assert [f.name for f in files] == ["epoch=1.pt", "epoch=2.pt", "epoch=10.pt"]
    with pytest.raises(DataError, match="No checkpoint matches"):
        expand_checkpoints([str(tmp_path / "*.safetensors")])
    with pytest.raises(DataError, match="two or more"):
        expand_checkpoints([str(tmp_path / "epoch=1.pt"), str(tmp_path / "epoch=1.pt")])
    with pytest.raises(DataError, match="does not exist"):
        expand_checkpoints([str(tmp_path / "nope.pt"), str(tmp_path / "epoch=1.pt")])


# -- coverage on a generator with a known truth (benchmarks/calibrate_compare.py, more simulations) ---------


def _simulate(rng, G, B, r1, r2, K=3):
    """Each object has its own answer (its class 90 % of the time); each background a class; a checkpoint
    predicts the background's class with probability r in each cell, else the object's answer. The two share
    the cell's draw (paired, as two checkpoints of one run are). Population reliance: r."""
    y = rng.integers(0, K, G)
    answer = np.where(rng.random(G) < 0.9, y, rng.integers(0, K, G))
    bl = np.tile(rng.integers(0, K, B), (G, 1))
    u = rng.random((G, B))
    return (np.tile(y[:, None], (1, B)), bl, np.where(u < r1, bl, answer[:, None]),
            np.where(u < r2, bl, answer[:, None]))


def test_paired_difference_interval_covers_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(7)
    sims, hits, paired, unpaired = 200, 0, [], []
    for s in range(sims):
        y, bl, p1, p2 = _simulate(rng, 40, 8, 0.5, 0.35)
        doc = compare_rows({"a": p1, "b": p2}, y, bl, n_boot=200, seed=s)
        d = doc["differences"][0]["reliance_difference"]
        hits += d["ci"][0] <= 0.5 - 0.35 <= d["ci"][1]
        paired.append(d["ci"][1] - d["ci"][0])
        ca, cb = (doc["checkpoints"][m]["reliance"]["ci"] for m in ("a", "b"))
        unpaired.append(np.hypot(ca[1] - ca[0], cb[1] - cb[0]))
    assert 0.9 <= hits / sims <= 1.0
    assert np.mean(paired) < 0.8 * np.mean(unpaired)  # pairing removes the shared object and background noise


def test_compare_rows_ranks_and_pairs():
    rng = np.random.default_rng(1)
    y, bl, p_hi, p_lo = _simulate(rng, 40, 8, 0.8, 0.1)
    doc = compare_rows({"early": p_lo, "late": p_hi}, y, bl, n_boot=100)
    assert doc["ranking"] == ["early", "late"]
    d = doc["differences"][0]
    assert d["checkpoint"] == "early" and d["reference"] == "late" and d["excludes_zero"]
    assert d["reliance_difference"]["ci"][1] < 0
    same = compare_rows({"a": p_lo, "b": p_lo.copy()}, y, bl, n_boot=100)
    assert same["differences"][0]["reliance_difference"] == {"value": 0.0, "ci": [0.0, 0.0]}
    with pytest.raises(DataError, match="reference"):
        compare_rows({"a": p_lo, "b": p_hi}, y, bl, reference="c", n_boot=10)


# -- end to end ---------------------------------------------------------------------------------------
CLASSES = ("0_red", "1_green", "2_blue")


def _folder(root, n_per_class=15, size=24, seed=0):
    """Objects of the class's colour at random brightness, on backgrounds tinted by the class."""
    rng = np.random.default_rng(seed)
    eye = np.eye(3)
    for c, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        (root / "masks" / name).mkdir(parents=True)
        for k in range(n_per_class):
            img = 30 + 170 * eye[c] + rng.uniform(0, 40, (size, size, 3))
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[7:17, 7:17] = 255
            img[mask > 0] = 20 + rng.uniform(60, 235) * eye[c]
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / name / f"{k:02d}.png")
            Image.fromarray(mask).save(root / "masks" / name / f"{k:02d}.png")
    return root / "images", root / "masks"


class BlendNet(nn.Module):
    """Scores = (1 - alpha) * the centre's colour + alpha * a corner's: alpha is how much it reads the background."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        centre = x[..., h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2].mean(dim=(2, 3))
        return (1 - self.alpha) * centre + self.alpha * x[..., :3, :3].mean(dim=(2, 3))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    images, masks = _folder(root)
    for epoch, alpha in ((1, 0.0), (2, 0.45), (3, 1.0)):
        save_file({"alpha": torch.tensor(alpha)}, str(root / f"epoch={epoch}.safetensors"))
    return root, images, masks


@pytest.mark.slow
def test_compare_checkpoints_end_to_end(run, browser):
    root, images, masks = run
    res = compare_checkpoints(BlendNet(), [str(root / "epoch=*.safetensors")], images, masks=masks,
                              out=root / "out", n_boot=100, progress=False)
    rows = res.data["checkpoints"]
    assert res.ranking == ["epoch=1", "epoch=2", "epoch=3"]
    assert rows["epoch=1"]["reliance"]["value"] == 0.0 and rows["epoch=3"]["reliance"]["value"] == 1.0
    assert 0 < rows["epoch=2"]["reliance"]["value"] < 1
    assert rows["epoch=3"]["accuracy_other_background"]["value"] == 0.0  # it reads the other class's background
    assert rows["epoch=1"]["shortcut"] is False and rows["epoch=3"]["shortcut"] is True
    assert res.data["has_steps"] and [rows[m]["step"] for m in res.ranking] == [1, 2, 3]
    doc = json.loads((root / "out" / "compare.json").read_text())
    assert doc["ranking"] == res.ranking
    _png, dom, errors = browser(root / "out" / "compare.html")
    assert errors == []
    for alt in ("reliance per checkpoint", "paired differences in reliance", "reliance and accuracy over training steps"):
        assert f'alt="{alt}"' in dom
    assert 'id="gallery"' in dom and dom.count('class="gal-obj"') == 3  # one object per class


def test_compare_cli(run, tmp_path, monkeypatch, capsys):
    root, images, masks = run
    (tmp_path / "blendmod.py").write_text("import torch\nfrom torch import nn\n\n\n" + _source(BlendNet) +
                                          "\n\ndef build():\n    return BlendNet()\n")
    monkeypatch.chdir(tmp_path)
    code = main(["compare", "blendmod:build", "--checkpoints", str(root / "epoch=3.safetensors"),
                 str(root / "epoch=1.safetensors"), "--data", str(images), "--masks", str(masks), "--out-dir",
                 str(tmp_path / "cmp"), "--n-boot", "50", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.index("epoch=1") < out.index("epoch=3")  # lowest reliance first, whatever the order given
    assert (tmp_path / "cmp" / "compare.html").stat().st_size > 10_000
    assert main(["compare", "blendmod:build", "--checkpoints", str(root / "epoch=1.safetensors"), "--data",
                 str(images), "--masks", str(masks)]) == 2  # one checkpoint: a one-line error


def _source(cls) -> str:
    import inspect

    return inspect.getsource(cls)
