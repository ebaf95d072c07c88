"""Property-based tests (hypothesis): the store round trip and the invariances the metrics promise.

- Store: any row shape, storage dtype, batch split, known or unknown row count and sample fields reads
  back exactly what was written (cast to the storage dtype), through slices, index arrays and chunks.
- background_sensitivity and normalized_mean_shift: invariant to the order of rows (rows moved with
  their groups / pairs) and to a permutation of the features (per-unit figures permute with them).
- linear_cka: invariant to feature permutations, isotropic scaling and orthogonal maps of either side,
  and to a joint reordering of the rows.
- LinearProbe: the fitted probe (and so its accuracy) does not depend on the order of training rows.

Oracles: the written arrays, and numpy closed forms of the metrics on the unpermuted data.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import probekit
from probekit.analyses import LinearProbe, background_sensitivity, linear_cka, normalized_mean_shift

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- store round trip ----------------------------------------------------------------------------------
@st.composite
def store_case(draw):
    n = draw(st.integers(1, 30))
    feature_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    values = draw(hnp.arrays(np.float32, (n, *feature_shape),
                             elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=5)))) if n > 1 else []
    bounds = [0, *[c for c in cuts if 0 < c < n], n]
    known = draw(st.booleans())
    n_factors = draw(st.sampled_from([None, 1, 3]))
    has_label, has_group = draw(st.booleans()), draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n, feature_shape, dtype, values, bounds, known, n_factors, has_label, has_group, seed


@SETTINGS
@given(store_case())
def test_store_round_trip(case):
    n, feature_shape, dtype, values, bounds, known, n_factors, has_label, has_group, seed = case
    rng = np.random.default_rng(seed)
    index = rng.permutation(10 * n)[:n]
    label = rng.integers(0, 5, n)
    group = rng.integers(0, 3, n)
    factors = rng.normal(size=(n, n_factors or 1)).astype(np.float32)
    names = [f"f{j}" for j in range(n_factors)] if n_factors else None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.h5"
        with probekit.StoreWriter(path) as w:
            w.add_split("s", n_rows=n if known else None, has_label=has_label, factor_names=names, has_group=has_group)
            w.add_model("m")
            w.add_layer("m", "s", "layer/with.dots", feature_shape=feature_shape, dtype=dtype)
            for a, b in itertools.pairwise(bounds):
                smp = {"index": index[a:b]}
                if has_label:
                    smp["label"] = label[a:b]
                if names:
                    smp["factors"] = factors[a:b]
                if has_group:
                    smp["group"] = group[a:b]
                w.write_rows("s", a, smp, {"m": {"layer/with.dots": values[a:b]}})
        with np.errstate(over="ignore"):  # float32 beyond float16 range becomes inf, as in the store
            expect = values.astype(dtype)
        with probekit.open_store(path) as s:
            assert s.n_rows("s") == n and s.n_rows("s", "m") == n
            assert s.layers("m", "s") == ["layer/with.dots"]
            acts = s.acts("m", "s", "layer/with.dots")
            assert acts.shape == (n, *feature_shape) and acts.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(acts), expect)
            pick = rng.integers(0, n, size=min(n, 7))
            np.testing.assert_array_equal(acts[pick], expect[pick])
            np.testing.assert_array_equal(acts[1::2], expect[1::2])
            step = int(rng.integers(1, n + 1))
            chunks = list(acts.iter_chunks(rows=step))
            assert [c[0] for c in chunks] == list(range(0, n, step))
            np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), expect)
            np.testing.assert_array_equal(s.sample_field("s", "index"), index)
            assert s.has_field("s", "label") == has_label and s.has_field("s", "group") == has_group
            if has_label:
                np.testing.assert_array_equal(s.sample_field("s", "label"), label)
            if has_group:
                np.testing.assert_array_equal(s.sample_field("s", "group"), group)
            if names:
                assert s.factor_names("s") == names
                np.testing.assert_array_equal(s.sample_field("s", "factors"), factors)


# -- metric invariances ------------------------------------------------------------------------------------
@st.composite
def grouped(draw):
    n_groups = draw(st.integers(2, 6))
    per = draw(st.integers(2, 4))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    g = np.repeat(rng.permutation(100)[:n_groups], per)  # arbitrary group ids
    X = rng.normal(size=(len(g), d)) * rng.uniform(0.1, 10, d) + rng.normal(size=d) * 5
    return X, g, rng


def _bs_closed_form(X, g):
    within = sum(((X[g == k] - X[g == k].mean(0)) ** 2).sum() for k in np.unique(g))
    return within / ((X - X.mean(0)) ** 2).sum()


@SETTINGS
@given(grouped())
def test_background_sensitivity_invariant_to_row_order_and_feature_permutation(case):
    X, g, rng = case
    base = background_sensitivity(X, g, n_boot=20, random_state=0)
    assert base.layer == pytest.approx(_bs_closed_form(X, g), rel=1e-9, abs=1e-12)
    rows, cols = rng.permutation(len(g)), rng.permutation(X.shape[1])
    moved = background_sensitivity(X[rows], g[rows], n_boot=20, random_state=0)
    feats = background_sensitivity(X[:, cols], g, n_boot=20, random_state=0)
    for r in (moved, feats):
        assert r.layer == pytest.approx(base.layer, rel=1e-9, abs=1e-12)
        assert r.n_groups == base.n_groups and r.n_rows == base.n_rows
    np.testing.assert_allclose(moved.per_unit, base.per_unit, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(feats.per_unit, base.per_unit[cols], rtol=1e-9, atol=1e-12)
    # the group bootstrap resamples whole groups, so it does not see the row order either
    np.testing.assert_allclose(moved.layer_ci, base.layer_ci, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(grouped(), st.booleans())
def test_normalized_mean_shift_invariant_to_row_order_and_feature_permutation(case, paired):
    X, _, rng = case
    n = len(X) // 2
    A, B = X[:n], X[n : 2 * n] + rng.normal(size=X.shape[1])
    base = normalized_mean_shift(A, B, paired=paired, n_boot=20, random_state=0)
    oracle = ((B.mean(0) - A.mean(0)) ** 2).sum() / A.var(axis=0).sum()
    assert base.nms == pytest.approx(oracle, rel=1e-9)
    cols = rng.permutation(X.shape[1])
    if paired:  # pairs move together
        p = rng.permutation(n)
        moved = normalized_mean_shift(A[p], B[p], paired=True, n_boot=20, random_state=0)
    else:
        moved = normalized_mean_shift(A[rng.permutation(n)], B[rng.permutation(n)], paired=False, n_boot=20,
                                      random_state=0)
    feats = normalized_mean_shift(A[:, cols], B[:, cols], paired=paired, n_boot=20, random_state=0)
    assert moved.nms == pytest.approx(base.nms, rel=1e-9)
    assert feats.nms == pytest.approx(base.nms, rel=1e-9)
    np.testing.assert_allclose(feats.per_unit_shift2, base.per_unit_shift2[cols], rtol=1e-9, atol=1e-15)


def _cka_oracle(X, Y):
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


@SETTINGS
@given(st.integers(4, 30), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**16),
       st.floats(1e-3, 1e3), st.booleans())
def test_linear_cka_invariances(n, dx, dy, seed, scale, debiased):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dx))
    Y = X @ rng.normal(size=(dx, dy)) + rng.normal(size=(n, dy))
    base = linear_cka(X, Y, debiased=debiased)
    if not debiased:
        assert base == pytest.approx(_cka_oracle(X, Y), rel=1e-9)
    Q, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    rows = rng.permutation(n)
    variants = [
        (X[:, rng.permutation(dx)], Y),
        (X, Y[:, rng.permutation(dy)]),
        (X * scale, Y),
        (X, Y / scale),
        (X @ Q, Y),
        (X[rows], Y[rows]),
    ]
    for Xv, Yv in variants:
        assert linear_cka(Xv, Yv, debiased=debiased) == pytest.approx(base, rel=1e-7, abs=1e-10)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([2, 3]))
def test_probe_does_not_depend_on_training_row_order(seed, k):
    rng = np.random.default_rng(seed)
    n, d = 60, 5
    y = np.arange(n) % k
    X = rng.normal(size=(n, d)) + np.eye(k, d)[y] * 1.5
    Xt = rng.normal(size=(40, d)) + np.eye(k, d)[np.arange(40) % k] * 1.5
    yt = np.arange(40) % k
    p = rng.permutation(n)
    a = LinearProbe(C=1.0, tol=1e-10, max_iter=5000).fit(X, y)
    b = LinearProbe(C=1.0, tol=1e-10, max_iter=5000).fit(X[p], y[p])
    np.testing.assert_allclose(a.decision_function(Xt), b.decision_function(Xt), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(a.predict(Xt), b.predict(Xt))
    assert a.score(Xt, yt) == b.score(Xt, yt)
    # the scored test rows' order does not matter either
    q = rng.permutation(len(yt))
    assert a.score(Xt[q], yt[q]) == a.score(Xt, yt)
