"""End-to-end extraction into a store: teacher + student, weights, writer thread, interruptions."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import probekit
from probekit.errors import DataError, LayerNotFoundError, StoreExistsError
from probekit.extraction import extract, extract_pair

N = 23  # not a multiple of the batch sizes used: the last batch is short


def small_cnn(seed: int, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 3),
    )


class Items(Dataset):
    """Dict items with label, factors and group; raises ``exc`` when item ``fail_at`` is read."""

    factor_names = ("bg_hue", "bg_texture")

    def __init__(self, n: int = N, fail_at: int | None = None, exc: type[BaseException] = RuntimeError) -> None:
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.fail_at, self.exc = fail_at, exc

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.fail_at is not None and i == self.fail_at:
            raise self.exc(f"planted failure at item {i}")
        return {"x": self.x[i], "label": i % 3, "factors": np.array([i / 10, -i], dtype=np.float32),
                "group": i // 4}


def store_datasets(path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every dataset of a file with its attributes (attrs compared as strings)."""
    out: dict[str, tuple[np.ndarray, dict]] = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()], {k: str(v) for k, v in obj.attrs.items()})
            else:
                out[name + "/"] = (np.zeros(0), {k: str(v) for k, v in obj.attrs.items()})
        f.visititems(visit)
    return out


def assert_same_store(a, b) -> None:
    da, db = store_datasets(a), store_datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        np.testing.assert_array_equal(da[name][0], db[name][0], err_msg=name)
        assert da[name][1] == db[name][1], name


LAYERS = ["0", "2", "6"]


def test_single_model_values_samples_and_attrs(tmp_path):
    model, data = small_cnn(0), Items()
    out = extract(model, data, layers=LAYERS, out=tmp_path / "s.h5", pool="avg", batch_size=5,
                  source="test:small_cnn", progress=False)
    with torch.no_grad():
        x = data.x
        a0 = model[0](x)
        a2 = model[2](model[1](a0.clone()))
        logits = model(x)
    with probekit.open_store(out) as s:
        np.testing.assert_array_equal(s.sample_field("data", "index"), np.arange(N))
        np.testing.assert_array_equal(s.sample_field("data", "label"), np.arange(N) % 3)
        np.testing.assert_array_equal(s.sample_field("data", "group"), np.arange(N) // 4)
        np.testing.assert_allclose(s.sample_field("data", "factors"),
                                   np.stack([np.arange(N) / 10, -np.arange(N)], 1).astype(np.float32))
        assert s.factor_names("data") == ["bg_hue", "bg_texture"]
        # layer 0 is followed by an in-place ReLU: the stored value is the pre-ReLU mean
        np.testing.assert_allclose(np.asarray(s.acts("model", "data", "0")), a0.mean((2, 3)).numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(s.acts("model", "data", "2")), a2.mean((2, 3)).numpy(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(s.acts("model", "data", "6")), logits.numpy(), atol=1e-6)
        attrs = s.acts("model", "data", "2").attrs
        assert attrs["pool"] == "avg" and attrs["module_type"] == "Conv2d"
        assert list(attrs["raw_shape"]) == [8, 4, 4]
        m = s.model_attrs("model")
        assert m["source"] == "test:small_cnn" and m["role"] == "model"
        assert m["param_count"] == sum(p.numel() for p in model.parameters())
        assert len(m["weights_sha256"]) == 64
        # weight rows of the selected Conv / Linear layers, as the modules hold them
        assert sorted(s.weight_layers("model")) == ["0", "2", "6"]
        for layer in LAYERS:
            w = dict(model.named_modules())[layer].weight.detach().numpy()
            np.testing.assert_array_equal(s.weights("model", layer), w.reshape(w.shape[0], -1))


def test_teacher_and_student_share_sample_rows(tmp_path):
    teacher, student = small_cnn(1, width=8), small_cnn(2, width=4)
    data = Items()
    out = extract_pair(teacher, student, data, layers={"teacher": ["2", "6"], "student": ["6"]},
                       out=tmp_path / "ts.h5", batch_size=6, progress=False, weights_layers=["6"])
    with torch.no_grad():
        t_logits, s_logits = teacher(data.x).numpy(), student(data.x).numpy()
    with probekit.open_store(out) as s:
        assert sorted(s.models) == ["student", "teacher"]
        assert s.role("teacher") == "teacher" and s.role("student") == "student"
        assert s.n_rows("data", "teacher") == s.n_rows("data", "student") == N
        assert s.layers("teacher", "data") == ["2", "6"] and s.layers("student", "data") == ["6"]
        np.testing.assert_allclose(np.asarray(s.acts("teacher", "data", "6")), t_logits, atol=1e-6)
        np.testing.assert_allclose(np.asarray(s.acts("student", "data", "6")), s_logits, atol=1e-6)
        assert s.acts("teacher", "data", "2").shape == (N, 16)
        np.testing.assert_array_equal(s.weights("teacher", "6"), teacher[6].weight.detach().numpy())
        np.testing.assert_array_equal(s.weights("student", "6"), student[6].weight.detach().numpy())
        assert s.weight_layers("teacher") == ["6"]


def test_dict_of_models_equals_pair(tmp_path):
    teacher, student = small_cnn(1), small_cnn(2)
    a = extract_pair(teacher, student, Items(), layers=LAYERS, out=tmp_path / "a.h5", batch_size=4, progress=False)
    b = extract({"teacher": teacher, "student": student}, Items(), layers=LAYERS, out=tmp_path / "b.h5",
                batch_size=4, progress=False)
    with probekit.open_store(a) as sa, probekit.open_store(b) as sb:
        for m in ("teacher", "student"):
            assert sa.role(m) == sb.role(m) == m
            for layer in LAYERS:
                np.testing.assert_array_equal(np.asarray(sa.acts(m, "data", layer)), np.asarray(sb.acts(m, "data", layer)))


@pytest.mark.parametrize("pool", ["avg", "none"])
def test_writer_thread_path_equals_synchronous_path(tmp_path, pool):
    model = small_cnn(3)
    a = extract(model, Items(), layers=LAYERS, out=tmp_path / "sync.h5", batch_size=4, pool=pool,
                writer_thread=False, progress=False)
    b = extract(model, Items(), layers=LAYERS, out=tmp_path / "thread.h5", batch_size=4, pool=pool,
                writer_thread=True, progress=False)
    da, db = store_datasets(a), store_datasets(b)
    assert sorted(da) == sorted(db)
    for name in da:
        np.testing.assert_array_equal(da[name][0], db[name][0], err_msg=name)


def test_float16_storage_is_the_rounded_float32(tmp_path):
    model = small_cnn(4)
    a = extract(model, Items(), layers=LAYERS, out=tmp_path / "f32.h5", progress=False)
    b = extract(model, Items(), layers=LAYERS, out=tmp_path / "f16.h5", dtype="float16", progress=False)
    with probekit.open_store(a) as sa, probekit.open_store(b) as sb:
        for layer in LAYERS:
            half = np.asarray(sb.acts("model", "data", layer))
            assert half.dtype == np.float16
            np.testing.assert_array_equal(half, np.asarray(sa.acts("model", "data", layer)).astype(np.float16))


def test_bad_layer_fails_before_the_output_is_created(tmp_path):
    out = tmp_path / "never.h5"
    with pytest.raises(LayerNotFoundError, match="Run `probekit layers MODEL`"):
        extract(small_cnn(0), Items(), layers=["0", "conv9"], out=out, progress=False)
    assert not out.exists()


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    out = extract(small_cnn(0), Items(), layers=["6"], out=tmp_path / "e.h5", progress=False)
    before = store_datasets(out)
    with pytest.raises(StoreExistsError):
        extract(small_cnn(0), Items(), layers=["6"], out=out, progress=False)
    assert_same_store_dicts(before, store_datasets(out))
    # resuming a finished store changes nothing
    extract(small_cnn(0), Items(), layers=["6"], out=out, mode="resume", progress=False)
    assert_same_store_dicts(before, store_datasets(out))
    # other weights under the same name are refused
    with pytest.raises(DataError, match="other weights"):
        extract(small_cnn(9), Items(), layers=["6"], out=out, mode="resume", progress=False)


def assert_same_store_dicts(da, db) -> None:
    assert sorted(da) == sorted(db)
    for name in da:
        np.testing.assert_array_equal(da[name][0], db[name][0], err_msg=name)


@pytest.mark.parametrize("exc, writer_thread", [(RuntimeError, False), (KeyboardInterrupt, False),
                                                (KeyboardInterrupt, True), (RuntimeError, True)])
def test_interrupted_run_keeps_committed_rows_and_resumes_to_the_full_result(tmp_path, exc, writer_thread):
    model = small_cnn(6)
    full = extract(model, Items(), layers=LAYERS, out=tmp_path / "full.h5", batch_size=4, progress=False)
    part = tmp_path / "part.h5"
    with pytest.raises(exc, match="planted failure at item 13"):
        extract(model, Items(fail_at=13, exc=exc), layers=LAYERS, out=part, batch_size=4, progress=False,
                writer_thread=writer_thread)
    # the file was closed (h5py can open it for writing) and holds exactly the batches before item 13
    with h5py.File(part, "r+"):
        pass
    with probekit.open_store(part) as s:
        assert s.n_rows("data") == 12 and s.n_rows("data", "model") == 12
        with probekit.open_store(full) as f:
            for layer in LAYERS:
                np.testing.assert_array_equal(np.asarray(s.acts("model", "data", layer)),
                                              np.asarray(f.acts("model", "data", layer))[:12])
    extract(model, Items(), layers=LAYERS, out=part, batch_size=4, progress=False, mode="resume")
    assert_same_store_dicts_except_created(full, part)


def assert_same_store_dicts_except_created(a, b) -> None:
    assert_same_store(a, b)


def test_resume_with_other_data_is_refused(tmp_path):
    model = small_cnn(0)
    out = tmp_path / "r.h5"
    with pytest.raises(RuntimeError):
        extract(model, Items(fail_at=9), layers=["6"], out=out, batch_size=4, progress=False)
    with pytest.raises(DataError, match="holds 23 samples but this data has 30"):
        extract(model, Items(n=30), layers=["6"], out=out, mode="resume", progress=False)
    with pytest.raises(DataError, match="was stored with pool 'avg', but this run asks for 'max'"):
        extract(model, Items(), layers=["6"], out=out, mode="resume", pool="max", progress=False)
    with pytest.raises(DataError, match="Resume with the same --pool and --dtype"):
        extract(model, Items(), layers=["6"], out=out, mode="resume", dtype="float16", progress=False)


def test_second_split_and_added_model_in_one_store(tmp_path):
    out = tmp_path / "multi.h5"
    extract(small_cnn(0), Items(), layers=["6"], out=out, split="train", name="teacher", role="teacher",
            progress=False)
    extract(small_cnn(0), Items(n=7), layers=["6"], out=out, split="test_ood", name="teacher", role="teacher",
            mode="resume", progress=False)
    extract(small_cnn(1), Items(), layers=["2"], out=out, split="train", name="student", role="student",
            mode="resume", progress=False)
    with probekit.open_store(out) as s:
        assert sorted(s.splits) == ["test_ood", "train"]
        assert s.n_rows("test_ood", "teacher") == 7 and s.n_rows("train", "student") == N
        assert s.acts("student", "train", "2").shape == (N, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("writer_thread", [True, False])
def test_cuda_pinned_path_equals_cpu(tmp_path, writer_thread):
    """Pooling on the device, non-blocking copies into pinned buffers, writer thread: same values."""
    model = small_cnn(7)
    cpu = extract(model, Items(), layers=LAYERS, out=tmp_path / "cpu.h5", batch_size=4, progress=False)
    gpu = extract(model, Items(), layers=LAYERS, out=tmp_path / "gpu.h5", batch_size=4, progress=False,
                  device="cuda", writer_thread=writer_thread)
    with probekit.open_store(cpu) as a, probekit.open_store(gpu) as b:
        np.testing.assert_array_equal(a.sample_field("data", "index"), b.sample_field("data", "index"))
        for layer in LAYERS:
            np.testing.assert_allclose(np.asarray(b.acts("model", "data", layer)),
                                       np.asarray(a.acts("model", "data", layer)), rtol=1e-3, atol=1e-4)
