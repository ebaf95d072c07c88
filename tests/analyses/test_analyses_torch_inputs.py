"""Every analysis accepts torch tensors (also with requires_grad, also bfloat16) wherever it takes arrays."""

import numpy as np
import pytest
import torch

from probekit import analyses as A

rng = np.random.default_rng(0)
G, B, D = 40, 4, 8
g, b = np.repeat(np.arange(G), B), np.tile(np.arange(B), G)
X = rng.normal(size=(G * B, D)).astype(np.float32) + np.repeat(rng.normal(size=(G, D)), B, axis=0)
F = rng.normal(size=(G * B, 2))
y = g % 3


def _t(a, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.float().requires_grad_(True) if grad else t


@pytest.mark.parametrize("grad", [False, True])
def test_same_results_from_tensors_and_arrays(grad):
    T = _t(X, grad)
    cases = [
        (lambda x, f, yy, gg, bb: A.BackgroundCorrelation(n_permutations=20, random_state=0).fit(x, f, yy).pearson_,),
        (lambda x, f, yy, gg, bb: A.background_sensitivity(x, gg, n_boot=5).layer,),
        (lambda x, f, yy, gg, bb: A.normalized_mean_shift(x[:80], x[80:], n_boot=5).nms,),
        (lambda x, f, yy, gg, bb: A.crossed_decomposition(x, gg, bb, n_boot=5).background,),
        (lambda x, f, yy, gg, bb: A.LinearProbe(C=1.0).fit(x, yy).predict(x),),
        (lambda x, f, yy, gg, bb: A.linear_cka(x, x[:, ::-1] if isinstance(x, np.ndarray) else x.flip(1)),),
        (lambda x, f, yy, gg, bb: A.background_behaviour(yy, gg, bb, n_boot=5, n_perm=5).flip_rate,),
    ]
    for (fn,) in cases:
        want = fn(X, F, y, g, b)
        got = fn(T, _t(F), _t(y), _t(g), _t(b))
        np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-5,
                                   atol=1e-6)


def test_bfloat16_tensor_is_read_as_float32():
    T = torch.from_numpy(X).to(torch.bfloat16)
    r = A.background_sensitivity(T, g, n_boot=5)
    want = A.background_sensitivity(T.float().numpy(), g, n_boot=5)
    assert r.layer == pytest.approx(want.layer)
