"""Compressed files of sparse weights: bitwise round trips, sizes near the minimum, and every kind
of bad file refused with CompressedFileError (never loaded wrong)."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import dwf_kernels
from dwf_kernels import CompressedFileError, compressed, load_compressed, load_compressed_into, save_compressed
from dwf_kernels.compressed import minimum_bytes

pytest.importorskip("safetensors")


def assert_bitwise(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        if tensor.numel():
            assert torch.equal(compressed._bits(got.reshape(-1)), compressed._bits(tensor.contiguous().reshape(-1))), (
                name
            )


def sparse_tensor(shape, density: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < density, t, torch.zeros(())).to(dtype)


def lenet300(nonzeros: int, seed: int = 0) -> nn.Module:
    """LeNet-300-100 with `nonzeros` of its 266,200 weights left, as a collapsed model is."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    weights = [model[i].weight for i in (0, 2, 4)]
    keep = torch.zeros(sum(w.numel() for w in weights), dtype=torch.bool)
    keep[torch.randperm(keep.numel())[:nonzeros]] = True
    with torch.no_grad():
        for w, mask in zip(weights, keep.split([w.numel() for w in weights]), strict=True):
            w.copy_(torch.where(mask.reshape(w.shape), w, torch.zeros(())))
    return model


@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 6), (1000, 1), (1000, 999), (266_200, 358), (2**20 + 3, 5000)])
def test_elias_fano_round_trip(n, k):
    rng = np.random.default_rng(n + k)
    positions = np.sort(rng.choice(n, size=k, replace=False))
    code = compressed._elias_fano_encode(positions, n)
    assert code.size == math.ceil((k * compressed._low_bits(n, k) + k + (n >> compressed._low_bits(n, k)) + 1) / 8)
    np.testing.assert_array_equal(compressed._elias_fano_decode(code, k, n), positions)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.complex64],
)
def test_every_dtype_round_trips_bitwise(tmp_path, dtype):
    state = {
        "sparse": sparse_tensor((64, 50), 0.02, dtype, seed=1),
        "dense": sparse_tensor((10, 3), 0.9, dtype, seed=2),
        "zeros": torch.zeros(4, 5, dtype=dtype),
        "empty": torch.zeros(0, 3, dtype=dtype),
        "scalar": torch.ones((), dtype=dtype),
    }
    save_compressed(state, tmp_path / "f")
    assert_bitwise(load_compressed(tmp_path / "f"), state)


def test_special_values_survive_bitwise(tmp_path):
    t = torch.zeros(10_000)
    t[[3, 70, 500, 9999]] = torch.tensor([float("inf"), -float("inf"), float("nan"), -1e-45])
    t[[11, 12, 4000]] = -0.0  # negative zeros: equal to 0, but not the same bits
    payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    t[600] = payload
    save_compressed({"t": t}, tmp_path / "f")
    assert_bitwise(load_compressed(tmp_path / "f"), {"t": t})
    assert (tmp_path / "f").stat().st_size < 400  # still stored sparse


def test_each_tensor_takes_the_smaller_encoding(tmp_path):
    state = {"sparse": sparse_tensor((300, 784), 0.002), "dense": torch.randn(300, 784)}
    save_compressed(state, tmp_path / "f")
    from safetensors import safe_open

    with safe_open(tmp_path / "f", "pt") as f:
        stored = set(f.keys())
    assert "dense" in stored and "sparse" not in stored and ":positions" in stored


def test_main_job_sized_model_is_over_100x_smaller_and_near_the_minimum(tmp_path):
    model = lenet300(nonzeros=398)
    size = save_compressed(model, tmp_path / "f")
    assert size == (tmp_path / "f").stat().st_size
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    assert dense.tell() / size >= 100
    assert size <= 1.25 * minimum_bytes(model)
    plain = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    load_compressed_into(plain, tmp_path / "f")
    x = torch.randn(16, 784)
    assert torch.equal(plain(x), model(x))


def test_collapsed_dwf_model_loads_into_a_plain_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    dwf = dwf_kernels.factorize(model, depth=3)
    with pytest.raises(ValueError, match="collapse it first"):
        save_compressed(dwf, tmp_path / "f")
    collapsed = dwf_kernels.collapse(dwf, threshold=0.05)
    save_compressed(collapsed, tmp_path / "f")
    fresh = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    load_compressed_into(fresh, tmp_path / "f")
    assert_bitwise(fresh.state_dict(), collapsed.state_dict())


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path):
    shared = sparse_tensor((500, 200), 0.01)
    state = {"a": shared, "b": shared, "c": shared.clone()}
    save_compressed(state, tmp_path / "f")
    save_compressed({"a": shared, "c": shared.clone()}, tmp_path / "g")
    assert (tmp_path / "f").stat().st_size < (tmp_path / "g").stat().st_size + 64
    loaded = load_compressed(tmp_path / "f")
    assert_bitwise(loaded, state)
    assert loaded["a"] is loaded["b"] and loaded["c"] is not loaded["a"]


@pytest.fixture
def saved(tmp_path):
    model = lenet300(nonzeros=120)
    path = tmp_path / "model.dwfz"
    save_compressed(model, path)
    return model, path


def test_truncated_files_are_refused(saved, tmp_path):
    model, path = saved
    blob = path.read_bytes()
    for length in sorted({0, 4, 8, 9, 100, len(blob) // 2, len(blob) - 100, len(blob) - 1}):
        (tmp_path / "cut").write_bytes(blob[:length])
        with pytest.raises(CompressedFileError):
            load_compressed(tmp_path / "cut")


def test_flipped_bits_are_refused_or_harmless(saved, tmp_path):
    """Any single flipped bit is refused, unless it only touched header whitespace (then the
    contents are intact and load equal)."""
    model, path = saved
    blob = bytearray(path.read_bytes())
    expected = model.state_dict()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    rng = random.Random(0)
    positions = [(i, rng.randrange(8)) for i in range(8, header_end)]
    positions += [(rng.randrange(header_end, len(blob)), rng.randrange(8)) for _ in range(300)]
    refused = 0
    for byte, bit in positions:
        damaged = bytearray(blob)
        damaged[byte] ^= 1 << bit
        (tmp_path / "bad").write_bytes(damaged)
        try:
            loaded = load_compressed(tmp_path / "bad")
        except CompressedFileError:
            refused += 1
            continue
        assert chr(blob[byte]).isspace(), f"bit {bit} of byte {byte} flipped and the file loaded"
        assert_bitwise(loaded, expected)
    assert refused >= len(positions) - 16


def test_wrong_architecture_and_dtype_are_refused(saved):
    model, path = saved
    wider = nn.Sequential(nn.Linear(784, 301), nn.ReLU(), nn.Linear(301, 100), nn.ReLU(), nn.Linear(100, 10))
    with pytest.raises(CompressedFileError, match=r"0.bias is \(300,\) torch.float32 in the file, \(301,\)"):
        load_compressed_into(wider, path)
    other = nn.Sequential(nn.Linear(784, 300), nn.Linear(300, 10))
    with pytest.raises(CompressedFileError, match="missing.*unexpected"):
        load_compressed_into(other, path)
    half = lenet300(nonzeros=120).half()
    with pytest.raises(CompressedFileError, match="torch.float16 in the model"):
        load_compressed_into(half, path)


def test_a_plain_safetensors_file_is_not_taken_for_one(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain"))
    with pytest.raises(CompressedFileError, match="not a dwf_kernels compressed file"):
        load_compressed(tmp_path / "plain")


def test_bad_arguments_are_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="nn.Module or a mapping"):
        save_compressed([torch.zeros(3)], tmp_path / "f")
    with pytest.raises(TypeError, match=r"state_dict\['x'\] must be a tensor"):
        save_compressed({"x": 3}, tmp_path / "f")
    with pytest.raises(ValueError, match="must not start with ':'|do not start with ':'"):
        save_compressed({":values:float32": torch.zeros(3)}, tmp_path / "f")
    with pytest.raises(ValueError, match="dense strided"):
        save_compressed({"s": torch.zeros(3, 3).to_sparse()}, tmp_path / "f")
    assert not list(tmp_path.iterdir())
