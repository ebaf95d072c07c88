"""The papers' experiments, in quick mode: their mechanisms, checked against planted truths.

No expected number comes from a previous run: the checks are the papers' qualitative claims
(ReLU background growth vs identity, OOD - ID loss gap, direction count equal across widths and on
the known XOR axes, student OOD drop vs teacher), plus independent recomputation of the reported
figures from the written store with numpy.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import probekit
from probekit.datasets._synthetic import make_structured, structured_basis, xor_axes
from probekit.experiments import EXPERIMENTS, get_experiment
from probekit.experiments._digitnets import (
    DigitCNN,
    fit_random_features_student,
    train_student,
    train_teacher,
)
from probekit.experiments.contamination import TwoLayerNet, train_two_layer


def test_registry_lists_the_experiments() -> None:
    assert sorted(EXPERIMENTS) == ["contamination", "distillation", "shortcut", "simplicity"]
    from probekit.experiments import contamination

    assert get_experiment("contamination") is contamination.run
    with pytest.raises(probekit.ProbekitError, match="no experiment 'nope'"):
        get_experiment("nope")


# ----------------------------------------------------------------------------------------------
# contamination


def test_identity_gradient_has_no_background_component_on_balanced_data() -> None:
    """Closed form: for a linear net the first-layer gradient is sum_i c_i y_i x_i, whose background part
    vanishes in expectation; with ReLU the activation asymmetry leaves a background component."""
    data = make_structured(2000, nonlinear=False, seed=0)
    X = torch.tensor(data.X, dtype=torch.float32)
    y = torch.tensor(data.y, dtype=torch.float32)
    B = torch.tensor(data.bg_basis, dtype=torch.float32)
    C = torch.tensor(data.core_basis, dtype=torch.float32)
    out = {}
    for act in ("identity", "relu"):
        torch.manual_seed(0)
        net = TwoLayerNet(256, 256, act, freeze_output=True)
        loss = torch.clamp(1 - y * net(X), min=0).mean()
        loss.backward()
        G = net.fc1.weight.grad
        out[act] = ((G @ B.T).norm(dim=1).mean() / (G @ C.T).norm(dim=1).mean()).item()
    # identity: bg part only from the finite-sample class imbalance of E[x_bg] (~1/sqrt(n) of the core part)
    assert out["identity"] < 0.1
    assert out["relu"] > 3 * out["identity"]


def test_contamination_relu_grows_background_and_identity_does_not(tmp_path) -> None:
    r = get_experiment("contamination")(seeds=[0, 1], out_dir=tmp_path, quick=True, steps=200)
    relu, ident = r["summary"]["relu"], r["summary"]["identity"]
    for rec_r, rec_i in zip(r["per_seed"]["relu"], r["per_seed"]["identity"], strict=True):
        assert rec_r["bg_max_growth"] > 1.2  # background projection above its init level
        assert rec_i["bg_max_growth"] <= 1.0 + 1e-6  # identity: never above init (weight decay shrinks it)
        assert rec_r["bg_max_growth"] > rec_i["bg_max_growth"]
        assert rec_r["final_id_loss"] < 0.05 and rec_i["final_id_loss"] < 0.05  # both fit ID
        assert rec_r["loss_gap"] > 0.3  # OOD loss stays high for ReLU
        assert abs(rec_i["loss_gap"]) < 0.05  # identity: OOD = ID
    assert relu["loss_gap"]["mean"] > ident["loss_gap"]["mean"] + 0.3
    # the JSON and store agree with an independent recomputation P = W V^T from the stored weights
    js = json.loads((tmp_path / "contamination.json").read_text())
    assert js["config"]["seeds"] == [0, 1]
    store = probekit.open_store(tmp_path / "contamination.h5")
    V = structured_basis(seed=1)
    steps = store.steps("relu_seed1")
    last = max(steps)
    W = np.asarray(store.weights("relu_seed1", "fc1", step=last), dtype=np.float64)
    P = W @ V.T
    np.testing.assert_allclose(np.linalg.norm(P[:, 32:], axis=1).mean(), js["per_seed"]["relu"][1]["background"][-1], rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(P[:, :32], axis=1).mean(), js["per_seed"]["relu"][1]["core"][-1], rtol=1e-4)
    assert (tmp_path / "contamination.png").stat().st_size > 0


def test_contamination_is_reproducible_to_the_digit() -> None:
    data = make_structured(200, nonlinear=False, seed=3)
    a = train_two_layer(data, steps=20, log_every=10, seed=3)
    b = train_two_layer(data, steps=20, log_every=10, seed=3)
    assert a["background"] == b["background"] and a["ood_loss"] == b["ood_loss"]


# ----------------------------------------------------------------------------------------------
# simplicity


def test_simplicity_directions_collapse_on_xor_axes_at_every_width(tmp_path) -> None:
    widths = (64, 256, 1024)
    r = get_experiment("simplicity")(seeds=[0], out_dir=tmp_path, widths=widths, epochs=1024)
    counts = [r["summary"][m]["n_directions"]["mean"] for m in widths]
    assert counts == [4, 4, 4]  # the same number at every width: the four XOR cluster axes
    assert r["same_count_across_widths"]
    axes = xor_axes(math.pi / 2)
    for m in widths:
        cent = np.asarray(r["per_seed"][0]["widths"][m]["centers"])
        ang = np.degrees(np.arccos(np.clip(cent @ axes.T, -1, 1)))
        assert ang.min(1).max() < 2.0  # every cluster centre on a planted axis
        assert ang.min(0).max() < 2.0  # every axis has a cluster
        assert r["summary"][m]["align95_mass_deg"]["mean"] < 2.0
    # independent check on the stored final weights: 90% of the squared norm lies within 2 deg of the axes
    store = probekit.open_store(tmp_path / "simplicity.h5")
    W = np.asarray(store.weights("width1024_seed0", "0"), dtype=np.float64)
    u = W / np.linalg.norm(W, axis=1, keepdims=True)
    near = np.degrees(np.arccos(np.clip(u @ axes.T, -1, 1))).min(1) < 2.0
    sq = (W**2).sum(1)
    assert sq[near].sum() / sq.sum() > 0.9


# ----------------------------------------------------------------------------------------------
# distillation


def test_digit_cnn_layers_and_random_features_control_keeps_the_trunk() -> None:
    torch.manual_seed(0)
    t = DigitCNN("classifier")
    s = DigitCNN("representation")
    x = torch.randn(4, 3, 24, 24)
    assert t(x).shape == (4, 10) and s(x).shape == (4, 128) and t.features(x).shape == (4, 128)
    assert (t.features(x) >= 0).all()  # teacher representation is after ReLU
    names = {n for n, _ in s.named_modules()}
    assert {"block1", "block2", "block3", "rep"} <= names
    rf = fit_random_features_student(t, seed=0, epochs=1, init=s)
    for (n, p0), (_, p1) in zip(s.named_parameters(), rf.named_parameters(), strict=True):
        if n.startswith("block"):
            assert torch.equal(p0, p1), n  # trunk frozen at its random init


def test_student_training_leaves_teacher_unchanged() -> None:
    teacher = train_teacher(seed=0, epochs=1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = train_student(teacher, seed=0, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert student.head is None


def test_filter_subspaces_separate_colour_from_digit() -> None:
    from probekit.datasets._bgdigits import BackgroundDigits
    from probekit.experiments.distillation import filter_subspaces

    sub = filter_subspaces(seed=0)
    full = np.concatenate([sub[k] for k in ("chroma_dc", "grey_dc", "grey_edge", "chroma_edge")])
    np.testing.assert_allclose(full @ full.T, np.eye(27), atol=1e-10)  # a complete orthonormal basis
    # grey digit strokes have no chroma component at all (planted: digit added equally to R, G, B)
    a = BackgroundDigits("test_id", seed=0).arrays(range(20))
    dg = torch.from_numpy(np.repeat(a["digit"][:, None], 3, 1))
    patches = torch.nn.functional.unfold(dg, 3).transpose(1, 2).reshape(-1, 27).numpy()
    assert np.abs(patches @ sub["chroma_dc"].T).max() < 1e-5
    assert np.abs(patches @ sub["chroma_edge"].T).max() < 1e-5


@pytest.mark.slow
def test_distillation_student_loses_more_out_of_distribution_than_teacher(tmp_path) -> None:
    # 8 / 20 epochs (quick's 15 / 40 halved: 36 s instead of about 55 s); at seed 0 the claims below hold with
    # room: ID accuracy 0.76 / 0.73, drop 4 vs 30 points, relative MSE 0.05 ID vs 0.17 OOD
    r = get_experiment("distillation")(seeds=[0], out_dir=tmp_path, quick=True, controls=False, teacher_epochs=8,
                                       student_epochs=20)
    t, s = r["per_seed"][0]["models"]["teacher"], r["per_seed"][0]["models"]["student"]
    assert abs(t["id_acc"] - s["id_acc"]) < 0.1  # similar ID accuracy: the student fits the teacher
    assert s["drop"] > t["drop"] + 0.1  # but loses far more OOD
    assert s["rel_mse_ood"] > 2 * s["rel_mse_id"]  # its fit to the teacher degrades under the shift
    assert s["nms"]["rep"] > t["nms"]["rep"]  # the student's representation moves with the background
    # recompute the student's ID/OOD relative MSE from the representations written to the store
    store = probekit.open_store(tmp_path / "distillation.h5")
    for split, key in (("test_id", "rel_mse_id"), ("test_ood", "rel_mse_ood")):
        S = np.asarray(store.acts("student_seed0", split, "rep"), dtype=np.float64)
        T = np.asarray(store.acts("teacher_seed0", split, "rep"), dtype=np.float64)
        np.testing.assert_allclose(((S - T) ** 2).sum() / ((T - T.mean(0)) ** 2).sum(), s[key], rtol=1e-4)
    assert store.role("teacher_seed0") == "teacher" and store.role("student_seed0") == "student"
    assert (tmp_path / "distillation.png").exists()
