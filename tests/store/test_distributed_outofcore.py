"""Analyses on a store larger than their memory budget.

An 8 MiB layer (8192 rows x 256 float32) is analysed through the store's lazy ``Activations`` with a
256 KiB budget (``max_memory`` and ``chunk_rows``), and the results are compared with the same
analyses on the array in memory and with independent oracles (scikit-learn, numpy closed forms).
Two checks show that nothing is loaded whole: every read from the store is at most 256 KiB, and the
peak of numpy allocations during a streamed analysis stays far below the data's size.

Related tests of the streaming code paths on small in-memory stand-ins: tests/analyses/test_analyses_probes.py
(test_streamed_probe_matches_in_memory), tests/analyses/test_analyses_similarity.py
(test_cka_equals_numpy_streamed), tests/analyses/test_analyses_background.py
(test_pearson_spearman_equal_scipy_whatever_the_chunk).
"""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import probekit
from probekit.analyses import BackgroundCorrelation, LinearProbe, linear_cka
from probekit.store import StoreWriter

N, D, DY = 8192, 256, 64
BUDGET = 256 << 10  # bytes
CHUNK = 128  # rows: 128 x 256 x float64 = 256 KiB, the largest chunk any analysis converts to


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D)).astype(np.float32)
    w = rng.normal(size=D)
    y = (X @ w + rng.normal(scale=4.0, size=N) > 0).astype(np.int64)
    factors = np.stack([X[:, 0] * 0.5 + rng.normal(size=N), rng.normal(size=N)], 1).astype(np.float32)
    Y = (X[:, :DY] @ rng.normal(size=(DY, DY)) + rng.normal(size=(N, DY))).astype(np.float32)
    path = tmp_path_factory.mktemp("ooc") / "big.h5"
    with StoreWriter(path) as wr:
        wr.add_split("train", n_rows=N, has_label=True, factor_names=["bg", "noise"])
        wr.add_model("m")
        wr.add_layer("m", "train", "a", feature_shape=(D,))
        wr.add_layer("m", "train", "b", feature_shape=(DY,))
        for s in range(0, N, 1024):
            e = s + 1024
            wr.write_rows("train", s, {"index": np.arange(s, e), "label": y[s:e], "factors": factors[s:e]},
                          {"m": {"a": X[s:e], "b": Y[s:e]}})
    assert X.nbytes == 8 << 20
    return path, X, Y, y, factors


@pytest.fixture
def read_spy(monkeypatch):
    """Sizes (bytes) of every array read from an HDF5 dataset while active."""
    sizes: list[int] = []
    real = h5py.Dataset.__getitem__

    def spy(self, key):
        out = real(self, key)
        if isinstance(out, np.ndarray):
            sizes.append(out.nbytes)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    return sizes


def _peak(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("chunk_rows", [CHUNK, None])
def test_linear_probe_torch_out_of_core_equals_in_memory(store, read_spy, chunk_rows):
    path, X, _, y, _ = store
    with probekit.open_store(path) as s:
        acts = s.acts("m", "train", "a")
        streamed = LinearProbe(C=0.1, backend="torch", max_memory=BUDGET, chunk_rows=chunk_rows).fit(acts, y)
        # never more than one budget-sized chunk read at a time, also when the chunk size is left to
        # the probe (it then reads a quarter of the budget per chunk)
        assert max(read_spy) <= BUDGET
        p_streamed = streamed.predict_proba(acts)
    in_memory = LinearProbe(C=0.1, backend="torch").fit(X, y)
    oracle = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(X, y)
    # Streamed and in-memory torch fits run the same L-BFGS on the same float32 objective; only the
    # order of the chunk sums differs (measured max difference 5e-7 in probability).
    assert np.abs(p_streamed - in_memory.predict_proba(X)).max() < 1e-4
    # scikit-learn minimises the same L2-regularised log-loss in float64 with its own L-BFGS stopping
    # rule (tol 1e-4): probabilities agree to a few 1e-3 (measured 3.1e-3)
    assert np.abs(p_streamed - oracle.predict_proba(X)).max() < 5e-3
    assert abs(streamed.score(X, y) - oracle.score(X, y)) <= 2 / N  # at most 2 borderline rows differ


def test_background_correlation_out_of_core_equals_in_memory(store, read_spy):
    path, X, _, y, F = store
    with probekit.open_store(path) as s:
        acts = s.acts("m", "train", "a")
        est = BackgroundCorrelation(n_permutations=20, max_memory=BUDGET, chunk_rows=CHUNK, random_state=0)
        streamed, peak = _peak(lambda: est.fit(acts, F, y, factor_names=["bg", "noise"]))
        assert max(read_spy) <= BUDGET
    # peak numpy memory of the streamed fit (measured 3.8 MiB): chunks of the layer, per-unit statistics,
    # and the permuted factors (rows x permutations x factors, 2.6 MiB, in memory by design: they do not
    # grow with the layer's width). A whole-layer load would need 8 MiB as float32, 16 MiB as float64
    # (measured 134 MiB with max_memory=None).
    assert peak < X.nbytes
    ref = BackgroundCorrelation(n_permutations=20, random_state=0).fit(X, F, y, factor_names=["bg", "noise"])
    # float32 data: float32 products per chunk, float64 totals, in another chunk order. Equal to float32
    # rounding (measured max 1.0e-7 on r of order 0.01-0.5), far below the null's spread (1/sqrt(N) = 0.01)
    np.testing.assert_allclose(streamed.pearson_, ref.pearson_, atol=1e-6)
    np.testing.assert_allclose(streamed.null_abs_r_, ref.null_abs_r_, atol=1e-6)
    np.testing.assert_allclose(streamed.factor_r2_, ref.factor_r2_, atol=1e-6)
    np.testing.assert_array_equal(streamed.significant_, ref.significant_)
    # independent oracle: numpy's Pearson correlation of each unit with each factor
    Xc, Fc = X - X.mean(0), F - F.mean(0)
    r = (Xc.T.astype(np.float64) @ Fc) / np.outer(np.linalg.norm(Xc, axis=0), np.linalg.norm(Fc, axis=0))
    np.testing.assert_allclose(streamed.pearson_, r, atol=1e-5)  # numpy's oracle is float32 here
    # Spearman needs whole columns: exact in memory, a seeded subsample that fits the budget otherwise
    assert ref.result_.spearman_exact is True and streamed.result_.spearman_exact is False


def test_linear_cka_out_of_core_equals_numpy(store, read_spy):
    path, X, Y, _, _ = store
    with probekit.open_store(path) as s:
        a, b = s.acts("m", "train", "a"), s.acts("m", "train", "b")
        got, peak = _peak(lambda: linear_cka(a, b, chunk_rows=CHUNK))
        assert max(read_spy) <= BUDGET
    # measured 2.0 MiB: D x DY, D x D, DY x DY float64 sums (~0.7 MiB) plus two chunks; 51 MiB with the
    # default 64 MiB chunks, which read the whole layer
    assert peak < 4 << 20
    Xc = X.astype(np.float64) - X.mean(0)
    Yc = Y.astype(np.float64) - Y.mean(0)
    want = np.linalg.norm(Xc.T @ Yc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    # float32 store data is multiplied in float32 per chunk (totals float64): measured 5.6e-10 off
    assert got == pytest.approx(want, abs=1e-7)
