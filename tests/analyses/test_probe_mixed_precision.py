"""The torch probe's bfloat16 stage: the result meets the stopping test on the exact objective.

The stage is opt-in (``precision="bf16"``) and then runs on CPUs with bfloat16 instructions for
problems of n * d * K >= 2e7; here it is forced on (any CPU runs bfloat16 GEMMs, only slower) for
small problems. The default (``precision="float32"``) never runs it. The oracle is the gradient
of scikit-learn's objective written out in float64 numpy, and scikit-learn's own fit.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from probekit.analyses import LinearProbe, _logistic
from probekit.testing import ArrayActivations, probe_objective_gradient


def _data():
    X, y = load_digits(return_X_y=True)
    yield "digits", X[:1200], y[:1200], X[1200:], y[1200:]
    for seed, k in enumerate((2, 4)):
        Xs, ys = make_classification(n_samples=3000, n_features=48, n_informative=12, n_classes=k,
                                     n_clusters_per_class=1, flip_y=0.05, random_state=seed)
        yield f"synthetic{k}", Xs[:2000], ys[:2000], Xs[2000:], ys[2000:]


DATA = list(_data())


@pytest.fixture
def bf16_stage(monkeypatch):
    """Force the bfloat16 stage on and count its evaluations."""
    calls = []
    monkeypatch.setattr(_logistic, "MIXED_MIN_WORK", 0)
    monkeypatch.setattr(_logistic, "bf16_matmul_fast", lambda torch, dev: True)
    real = _logistic.Bf16Evaluator.__call__

    def counted(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(_logistic.Bf16Evaluator, "__call__", counted)
    return calls


@pytest.mark.parametrize("tol", [1e-4, 1e-6])
@pytest.mark.parametrize("C", [0.05, 1.0])
@pytest.mark.parametrize("data", DATA, ids=[d[0] for d in DATA])
def test_bf16_stage_meets_the_exact_stopping_test(bf16_stage, data, C, tol):
    _, Xtr, ytr, Xte, yte = data
    probe = LinearProbe(C=C, backend="torch", tol=tol, max_iter=2000, precision="bf16").fit(Xtr, ytr)
    assert len(bf16_stage) > 1, "the bfloat16 stage did not run"
    g = probe_objective_gradient(probe, Xtr, ytr)
    # the float32 stage's test is max |g| <= tol on float32 sums; float64 differs by ~1e-7 of |g|
    assert np.abs(g).max() <= tol * 1.01 + 1e-8
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, tol=1e-8)).fit(Xtr, ytr)
    assert abs(probe.score(Xte, yte) - ref.score(Xte, yte)) <= 0.005 + 1e-12
    assert np.abs(probe.predict_proba(Xte) - ref.predict_proba(Xte)).mean() < 0.01


def test_float32_stage_finishes_what_the_bf16_stage_left(bf16_stage, monkeypatch):
    """A bfloat16 stage stopped early (tol 0.05) still ends at the exact tol: the float32 stage runs on."""
    _, Xtr, ytr, _, _ = DATA[0]
    stopped = LinearProbe(C=1.0, backend="torch", tol=0.05).fit(Xtr, ytr)
    assert np.abs(probe_objective_gradient(stopped, Xtr, ytr)).max() > 1e-4  # 0.05 is far from converged
    monkeypatch.setattr(_logistic, "BF16_MIN_TOL", 0.05)
    n_bf16 = len(bf16_stage)
    probe = LinearProbe(C=1.0, backend="torch", tol=1e-4, precision="bf16").fit(Xtr, ytr)
    assert len(bf16_stage) > n_bf16
    assert np.abs(probe_objective_gradient(probe, Xtr, ytr)).max() <= 1e-4 * 1.01


def test_max_iter_counts_both_stages(bf16_stage):
    _, Xtr, ytr, _, _ = DATA[0]
    with pytest.warns(ConvergenceWarning, match="max_iter=7"):
        probe = LinearProbe(C=1.0, backend="torch", tol=1e-10, max_iter=7, precision="bf16").fit(Xtr, ytr)
    assert len(bf16_stage) > 1
    assert probe.n_iter_ <= 7


def test_default_precision_never_runs_the_bf16_stage(bf16_stage):
    """Even where the stage would pay (forced here), the default fit is float32 throughout and gives
    the same predictions as an explicit precision="float32" fit; precision="bf16" does run it."""
    _, Xtr, ytr, Xte, _ = DATA[1]
    default = LinearProbe(C=1.0, backend="torch").fit(Xtr, ytr)
    assert bf16_stage == []
    f32 = LinearProbe(C=1.0, backend="torch", precision="float32").fit(Xtr, ytr)
    assert bf16_stage == []
    np.testing.assert_array_equal(default.decision_function(Xte), f32.decision_function(Xte))
    LinearProbe(C=1.0, backend="torch", precision="bf16").fit(Xtr, ytr)
    assert len(bf16_stage) > 1


def test_stage_is_skipped_below_the_work_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(_logistic, "bf16_matmul_fast", lambda torch, dev: True)
    monkeypatch.setattr(_logistic.Bf16Evaluator, "__init__", lambda *a: calls.append(1))
    _, Xtr, ytr, _, _ = DATA[0]  # 1200 x 64 x 10 < 2e7
    LinearProbe(C=1.0, backend="torch", precision="bf16").fit(Xtr, ytr)
    assert calls == []


@pytest.mark.parametrize("data", DATA, ids=[d[0] for d in DATA])
def test_tight_tol_is_met_in_float32_then_float64(data):
    """tol=1e-6 without the bfloat16 stage: float32 line searches stalled near max|g| = 3e-5 (digits
    2.5e-5, synthetic4 3.7e-5) while the fit reported nothing; the float64 stage reaches the tol."""
    _, Xtr, ytr, _, _ = data
    probe = LinearProbe(C=1.0, backend="torch", tol=1e-6, max_iter=2000).fit(Xtr, ytr)
    assert probe.n_iter_ < 2000
    assert np.abs(probe_objective_gradient(probe, Xtr, ytr)).max() <= 1e-6 * 1.01


@pytest.mark.parametrize("data", DATA, ids=[d[0] for d in DATA])
def test_tight_tol_is_met_when_streamed(data):
    """The streamed fit (store larger than max_memory) has the same float64 stage: tol=1e-6 is met
    (digits ended at 2.6e-5 before it, synthetic4 at 8.6e-6)."""
    _, Xtr, ytr, _, _ = data
    probe = LinearProbe(C=1.0, backend="torch", tol=1e-6, max_iter=2000, max_memory=1000,
                        chunk_rows=400).fit(ArrayActivations(Xtr, default_rows=50), ytr)
    assert probe.n_iter_ < 2000
    assert np.abs(probe_objective_gradient(probe, Xtr, ytr)).max() <= 1e-6 * 1.01


def test_softmax_loss_keeps_float32_precision():
    """Each row's loss is formed before a float64 sum: the mean loss of float32 logits (scale 30,
    loss ~46) is within 1e-8 (relative) of the same in float64; summing log-sum-exp and the label
    logits separately in float32 erred by 7.5e-8, a float32 total by its rounding (8e-8)."""
    import torch

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16000, 10)) * 30
    y = rng.integers(0, 10, 16000)
    got, _ = _logistic.loss_P(torch, torch.from_numpy(logits.astype(np.float32)),
                                 torch.from_numpy(y), 10, 16000)
    # float32 logits themselves are rounded (~1e-6 relative of 30); compare with the loss of those
    l32 = logits.astype(np.float32).astype(np.float64)
    lse32 = np.log(np.exp(l32 - l32.max(1, keepdims=True)).sum(1)) + l32.max(1)
    exact32 = float(np.mean(lse32 - l32[np.arange(16000), y]))
    assert abs(got - exact32) < 1e-8 * abs(exact32)


def test_lbfgs_reports_the_final_gradient():
    """When lbfgs reports max|gradient| at its final point, it equals the objective's gradient there."""
    import torch

    _, Xtr, ytr, _, _ = DATA[0]
    Z = (Xtr - Xtr.mean(0)) / np.where(Xtr.std(0) > 0, Xtr.std(0), 1.0)
    classes, idx = np.unique(ytr, return_inverse=True)
    n, K = Z.shape[0], classes.size
    Zt = torch.from_numpy(Z.astype(np.float32))
    Yt = torch.nn.functional.one_hot(torch.from_numpy(idx), K).float()
    W, b = torch.zeros(K, Z.shape[1]), torch.zeros(K)
    lam = 1.0 / n
    _, gmax = _logistic.lbfgs(torch, W, b, lambda: _logistic.loss_grad(torch, Zt, Yt, W, b, K, n), lam,
                              max_iter=200, tol=1e-4)
    assert gmax is not None  # digits: the last line search accepts its last trial
    Wn, bn = W.double().numpy(), b.double().numpy()
    lg = Z @ Wn.T + bn
    e = np.exp(lg - lg.max(1, keepdims=True))
    P = e / e.sum(1, keepdims=True) - np.eye(K)[idx]
    oracle = max(np.abs(P.T @ Z / n + lam * Wn).max(), np.abs(P.sum(0) / n).max())
    assert gmax == pytest.approx(oracle, rel=1e-3, abs=1e-7)
