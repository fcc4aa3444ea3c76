"""The CUDA kernels, executed without a GPU.

tests/cuda_emulation/ compiles csrc/cuda/dwf_cuda_kernels.cuh, dwf_cuda_run.cuh and dwf_cuda_multi_step.cuh
(the kernels and the host code that picks the pack width and grid and launches them, unchanged) with g++
against a host emulation of CUDA's threads, barriers and warp shuffles. These tests run that build on CPU tensors:

- w, the factor gradients and the SGD step equal the CPU backend's exactly: both evaluate
  dwf_math.h's per-element templates in the same order with the same roundings (the SGD step's
  a*b + c fused, in every CPU SIMD variant too), so any difference is a fault of the CUDA kernels'
  indexing, packing, tails or grid-stride loops;
- sumsq, and the gradient norm, match the reference to summation rounding and are bitwise
  deterministic;
- the final partial-sum reduction equals, bit for bit, a numpy replay of its fixed order;
- a misaligned vector access, which faults on a GPU, fails the launch (x86 would tolerate it);
- the launches themselves (recorded by the emulation: grid, block size, widest memory access):
  the vector path whenever n % (16 / element size) == 0, grids sized from the occupancy query
  (asked once per kernel and device) but the backward's one thread per pack, and no reduction
  launch the forward does not need.

`multiprocessors` sizes the grid as on a GPU with that many SMs (all kernels but the backward); the
emulated occupancy is BLOCKS_PER_SM blocks of 256 threads per SM, so with 1, inputs past 768 packs
take several grid-stride iterations there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SUMSQ_RTOL, make_factors

from dwf_kernels.backends import reference

ROOT = Path(__file__).resolve().parents[1]
CPU_OPS = torch.ops.dwf_kernels
BLOCKS_PER_SM = 3  # the emulated occupancy (emulated_ops.cpp)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    from torch.utils.cpp_extension import load

    build = tmp_path_factory.mktemp("cuda_emulation")
    load(
        name="dwf_cuda_emulated",
        sources=[str(ROOT / "tests" / "cuda_emulation" / "emulated_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        # As the CUDA build: optimized, and no contraction into FMAs (nvcc --fmad=false).
        extra_cflags=["-O2", "-ffp-contract=off"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.dwf_cuda_emulated


def _require_cpu_backend():
    from dwf_kernels import _extension

    if "cpu" not in _extension.KERNEL_DEVICES:
        pytest.fail("the C++ CPU backend is missing: build with `pip install --no-build-isolation -e .`")


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


# Compile-time depths 1..8; padded slots: 9 and 12 (12 slots), 13 and 16 (16 slots).
DEPTHS = [1, 2, 3, 4, 5, 8, 9, 12, 13, 16]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# 7: scalar path (n % V != 0), one block. 4096: packs in every dtype, 2-3 blocks. 12296 = 8 * 1537:
# packs in every dtype, and with multiprocessors=1 (3 blocks) several grid-stride iterations (of the
# forward and the SGD step; the backward covers its work). 12301: scalar path with grid stride.
SIZES = [7, 4096, 12296, 12301]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", DEPTHS)
def test_forward_and_backward_equal_the_cpu_kernels(emulated, depth, dtype, n):
    _require_cpu_backend()
    factors = make_factors(depth, (n,), dtype, "cpu", seed=depth * 100 + n)
    w, sumsq = emulated.forward(factors, None, True, 1)
    w_cpu, _ = CPU_OPS.dwf_forward(factors, None, True)
    assert_identical(w, w_cpu, "w")
    _, sumsq_ref = reference.dwf_forward_reference(factors.double(), torch.float64, True)
    torch.testing.assert_close(sumsq.double(), sumsq_ref, rtol=SUMSQ_RTOL[dtype], atol=0)
    assert sumsq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    grad_w = make_factors(1, (n,), dtype, "cpu", seed=7)[0]
    s = torch.tensor(0.375, dtype=torch.float32)
    for grad_sumsq in (s, None):
        grad = emulated.backward(factors, grad_w, grad_sumsq, 1)
        assert_identical(grad, CPU_OPS.dwf_backward(factors, grad_w, grad_sumsq), f"grad (penalty {grad_sumsq})")


@pytest.mark.parametrize("multiprocessors", [1, 3, 64])
def test_grid_sizes_change_nothing_but_sumsq_rounding(emulated, multiprocessors):
    factors = make_factors(4, (3, 4099), torch.float32, "cpu", seed=1)  # 12297: scalar path
    w, sumsq = emulated.forward(factors, None, True, multiprocessors)
    w1, sumsq1 = emulated.forward(factors, None, True, 1)
    assert_identical(w, w1, "w")
    torch.testing.assert_close(sumsq, sumsq1, rtol=1e-6, atol=0)
    again = emulated.forward(factors, None, True, multiprocessors)[1]
    assert torch.equal(sumsq, again), "sumsq must be bitwise deterministic for a fixed grid"


@pytest.mark.parametrize("multiprocessors", [1, 3, 64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", [1, 4, 9])
def test_grad_sumsq_matches_the_reference_and_is_deterministic(emulated, depth, dtype, n, multiprocessors):
    """The gradient norm's kernel: one partial per block (one block writes the result itself), the
    partials summed in a fixed order; equal to the reference to summation rounding."""
    factors = make_factors(depth, (n,), dtype, "cpu", seed=n + depth)
    grad_w = make_factors(1, (n,), dtype, "cpu", seed=8)[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for grad_sumsq in (torch.tensor(0.375, dtype=acc), None):
        result = emulated.grad_sumsq(factors, grad_w, grad_sumsq, multiprocessors)
        expected = reference.dwf_grad_sumsq_reference(factors, grad_w, grad_sumsq)
        assert result.dtype == expected.dtype == acc and result.shape == ()
        torch.testing.assert_close(result, expected, rtol=SUMSQ_RTOL[dtype], atol=0)
        assert torch.equal(emulated.grad_sumsq(factors, grad_w, grad_sumsq, multiprocessors), result)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [4096, 4099])
def test_fp32_factors_write_narrow_w_and_read_narrow_grad_w(emulated, out_dtype, n):
    _require_cpu_backend()
    factors = make_factors(4, (n,), torch.float32, "cpu", seed=2)
    w, sumsq = emulated.forward(factors, out_dtype, True, 1)
    w_cpu, sumsq_cpu = CPU_OPS.dwf_forward(factors, out_dtype, True)
    assert_identical(w, w_cpu, "narrow w")
    torch.testing.assert_close(sumsq, sumsq_cpu, rtol=1e-5, atol=0)
    grad_w = make_factors(1, (n,), out_dtype, "cpu", seed=3)[0]
    s = torch.tensor(0.5)
    assert_identical(emulated.backward(factors, grad_w, s, 1), CPU_OPS.dwf_backward(factors, grad_w, s), "grad")


def _offset_view(shape: tuple[int, ...], dtype: torch.dtype, offset: int, seed: int) -> torch.Tensor:
    """A contiguous tensor starting `offset` elements into its storage (off 16-byte alignment if > 0)."""
    numel = 1
    for size in shape:
        numel *= size
    return make_factors(1, (numel + offset,), dtype, "cpu", seed=seed)[0][offset:].view(shape)


@pytest.mark.parametrize("factors_offset,grad_offset,buffer_offset", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 2, 2)])
def test_unaligned_operands_take_the_scalar_path(emulated, factors_offset, grad_offset, buffer_offset):
    """Any operand off 16-byte alignment (factors, grad_w, or the momentum buffer) must select the
    scalar path: on a GPU a misaligned vector access faults."""
    _require_cpu_backend()
    factors = _offset_view((4, 4096), torch.float32, factors_offset, seed=4)
    grad_w = _offset_view((4096,), torch.float32, grad_offset, seed=5)
    w, _ = emulated.forward(factors, None, True, 1)
    assert_identical(w, CPU_OPS.dwf_forward(factors, None, True)[0], "w")
    s = torch.tensor(0.25)
    assert_identical(emulated.backward(factors, grad_w, s, 1), CPU_OPS.dwf_backward(factors, grad_w, s), "grad")
    mine, theirs = factors.clone(), factors.clone()  # clones are aligned: the buffer carries the offset
    buf_mine = _offset_view((4, 4096), torch.float32, buffer_offset, seed=6)
    buf_theirs = buf_mine.clone()
    args = (grad_w, s, 0.05, 0.9, 0.0, 1e-3, True, False, False)
    emulated.sgd_step(mine, buf_mine, *args, 1)
    CPU_OPS.dwf_sgd_step(theirs, buf_theirs, *args)
    assert_identical(mine, theirs, "factors after a step")
    assert_identical(buf_mine, buf_theirs, "momentum buffer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zeros_inf_nan_like_the_cpu_kernels(emulated, dtype):
    _require_cpu_backend()
    factors = make_factors(3, (4096,), dtype, "cpu", seed=6)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
    for d in range(3):
        factors[d, d * 97 : d * 97 + 5 * 50 : 50] = specials
    w, sumsq = emulated.forward(factors, None, True, 1)
    w_cpu, sumsq_cpu = CPU_OPS.dwf_forward(factors, None, True)
    assert_identical(w, w_cpu, "w")
    assert_identical(sumsq, sumsq_cpu, "sumsq (inf or nan)")
    grad_w = make_factors(1, (4096,), dtype, "cpu", seed=8)[0]
    grad_w[100:105] = specials
    s = torch.tensor(0.5)
    assert_identical(emulated.backward(factors, grad_w, s, 1), CPU_OPS.dwf_backward(factors, grad_w, s), "grad")


SGD_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False, maximize=True),
    dict(momentum=0.8, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
    dict(momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False, maximize=True),
]


@pytest.mark.parametrize("n", [4096, 12301])
@pytest.mark.parametrize(
    "dtype,grad_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("depth", [1, 4, 9])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_step_equals_the_cpu_kernel(emulated, options, depth, dtype, grad_dtype, n):
    """Two steps (the first initializes the momentum buffer), with and without the penalty."""
    _require_cpu_backend()
    factors = make_factors(depth, (n,), dtype, "cpu", seed=9)
    grad_w = make_factors(1, (n,), grad_dtype, "cpu", seed=10)[0]
    has_momentum = options["momentum"] != 0
    for grad_sumsq in (torch.tensor(0.125), None):
        mine, theirs = factors.clone(), factors.clone()
        buf_mine = torch.zeros_like(factors) if has_momentum else None
        buf_theirs = torch.zeros_like(factors) if has_momentum else None
        for init_buffer in (True, False):
            args = (grad_w, grad_sumsq, 0.05, options["momentum"], options["dampening"], options["weight_decay"])
            flags = (options["nesterov"], options["maximize"], init_buffer)
            emulated.sgd_step(mine, buf_mine, *args, *flags, 1)
            CPU_OPS.dwf_sgd_step(theirs, buf_theirs, *args, *flags)
            assert_identical(mine, theirs, f"factors after a step (init_buffer={init_buffer})")
            if has_momentum:
                assert_identical(buf_mine, buf_theirs, "momentum buffer")


# Layers for the multi-layer step: 50 small ones (more than the 48 of one launch's table), one of
# 300 chunks of 1024 elements (more than one launch's 256 blocks: it goes on in the next launch) and
# an empty one. Odd sizes take the element-wise path (1024 elements per chunk), multiples of 16
# the vector one.
MULTI_LAYERS = {"element-wise": [7 + 2 * i for i in range(50)] + [300 * 1024 - 1, 0], "vector": [64] * 50 + [4096]}


@pytest.mark.parametrize("path", list(MULTI_LAYERS))
@pytest.mark.parametrize("options", SGD_OPTIONS[1:3], ids=["momentum", "dampening-wd-maximize"])
def test_multi_layer_step_equals_the_cpu_kernel_per_layer(emulated, options, path):
    """dwf_sgd_step_multi's CUDA kernel: every layer as the CPU kernel steps it alone, bitwise, in
    few launches (layers and chunks of a launch as the table allows)."""
    _require_cpu_backend()
    sizes = MULTI_LAYERS[path]
    factors = [make_factors(3, (n,), torch.float32, "cpu", seed=i) for i, n in enumerate(sizes)]
    grad_w = [make_factors(1, (n,), torch.float32, "cpu", seed=100 + i)[0] for i, n in enumerate(sizes)]
    grad_sumsq = [torch.tensor(0.125) if i % 3 else None for i in range(len(sizes))]
    mine, theirs = [f.clone() for f in factors], [f.clone() for f in factors]
    buf_mine, buf_theirs = [torch.zeros_like(f) for f in factors], [torch.zeros_like(f) for f in factors]
    hyper = (0.05, options["momentum"], options["dampening"], options["weight_decay"], options["nesterov"])
    _launches(emulated)
    for init_buffer in (True, False):
        emulated.sgd_step_multi(mine, buf_mine, grad_w, grad_sumsq, *hyper, options["maximize"], init_buffer, 1)
        for i in range(len(sizes)):
            CPU_OPS.dwf_sgd_step(
                theirs[i], buf_theirs[i], grad_w[i], grad_sumsq[i], *hyper, options["maximize"], init_buffer
            )
    for i in range(len(sizes)):
        assert_identical(mine[i], theirs[i], f"layer {i} (n={sizes[i]})")
        assert_identical(buf_mine[i], buf_theirs[i], f"buffer {i}")
    launches = _launches(emulated)
    per_step = 3 if path == "element-wise" else 2  # (48 + 2 layers; 300 chunks past 256 blocks) vs (48 + 3 layers)
    assert len(launches) == 2 * per_step, launches
    assert all(threads == 256 for _, threads, _ in launches)
    if path == "vector":
        assert all(widest == 16 for _, _, widest in launches)


def _replay_block_sum(values: np.ndarray) -> np.floating:
    """sum_partials_kernel's order: thread t adds partials t, t+1024, ... in turn; each warp sums its 32
    lanes by the shuffle-down tree (offsets 16, 8, 4, 2, 1); thread 0 adds the 32 warp sums in order."""
    dtype = values.dtype.type
    lanes = np.zeros(1024, dtype=values.dtype)
    for start in range(0, len(values), 1024):
        chunk = values[start : start + 1024]
        lanes[: len(chunk)] = lanes[: len(chunk)] + chunk
    warps = lanes.reshape(32, 32).copy()
    for offset in (16, 8, 4, 2, 1):
        warps[:, : 32 - offset] = warps[:, : 32 - offset] + warps[:, offset:]
    total = dtype(0)
    for w in range(32):
        total = dtype(total + warps[w, 0])
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("m", [0, 1, 31, 1024, 1025, 5000])
def test_partial_sums_reduce_in_their_fixed_order(emulated, dtype, m):
    gen = torch.Generator().manual_seed(m)
    partials = (torch.rand(m, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    out = emulated.sum_partials(partials)
    expected = _replay_block_sum(partials.numpy())
    assert out.item() == expected  # bit for bit: the order is fixed
    torch.testing.assert_close(out.double(), partials.double().sum(), rtol=SUMSQ_RTOL[dtype], atol=1e-12)


def test_emulation_builds_the_cuda_sources_unchanged():
    """The emulated ops include the very headers dwf_cuda.cu launches from (no copy to drift)."""
    cu = (ROOT / "csrc" / "cuda" / "dwf_cuda.cu").read_text()
    emu = (ROOT / "tests" / "cuda_emulation" / "emulated_ops.cpp").read_text()
    for header in ("dwf_cuda_run.cuh", "dwf_cuda_multi_step.cuh"):
        assert f'#include "{header}"' in cu and f'#include "cuda/{header}"' in emu, header
    run = (ROOT / "csrc" / "cuda" / "dwf_cuda_run.cuh").read_text()
    assert '#include "dwf_cuda_kernels.cuh"' in run  # the kernels come with the host code that launches them
    assert "__global__" not in cu, "kernels belong in the headers, where the emulation runs them"


def _launches(emulated) -> list[tuple[int, int, int]]:
    """The emulated launches since the last call: (grid, threads, widest access in bytes) each."""
    flat = emulated.launches()
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


# (factor dtype, dtype of w / grad_w, n, elements per 16 bytes): n is a multiple of 16 / element
# size but not of 16, so every factor row is 16-byte aligned and only the vector path's own
# condition admits it.
VECTOR_CASES = [
    (torch.float32, torch.float32, 1000, 4),
    (torch.float32, torch.bfloat16, 1000, 4),
    (torch.float64, torch.float64, 1002, 2),
    (torch.bfloat16, torch.bfloat16, 1000, 8),
    (torch.float16, torch.float16, 4104, 8),
]


@pytest.mark.parametrize("dtype,io_dtype,n,per_pack", VECTOR_CASES, ids=str)
def test_rows_aligned_to_16_bytes_take_the_vector_path(emulated, dtype, io_dtype, n, per_pack):
    """Forward, backward and SGD step read and write 16-byte packs, and still equal the CPU kernels."""
    _require_cpu_backend()
    assert n % per_pack == 0 and n % 16 != 0
    factors = make_factors(3, (n,), dtype, "cpu", seed=n)
    grad_w = make_factors(1, (n,), io_dtype, "cpu", seed=n + 1)[0]
    s = torch.tensor(0.25)
    _launches(emulated)
    w, _ = emulated.forward(factors, io_dtype, False, 1)
    grad = emulated.backward(factors, grad_w, s, 1)
    mine, buf_mine = factors.clone(), torch.zeros_like(factors)
    theirs, buf_theirs = factors.clone(), torch.zeros_like(factors)
    for init_buffer in (True, False):
        args = (grad_w, s, 0.05, 0.9, 0.0, 1e-3, False, False, init_buffer)
        emulated.sgd_step(mine, buf_mine, *args, 1)
        CPU_OPS.dwf_sgd_step(theirs, buf_theirs, *args)
    assert [widest for _, _, widest in _launches(emulated)] == [16] * 4, "forward, backward, two steps"
    assert_identical(w, CPU_OPS.dwf_forward(factors, io_dtype, False)[0], "w")
    assert_identical(grad, CPU_OPS.dwf_backward(factors, grad_w, s), "grad")
    assert_identical(mine, theirs, "factors after two steps")
    assert_identical(buf_mine, buf_theirs, "momentum buffer")

    # One element more: rows d > 0 are misaligned, so every kernel takes the element-wise path.
    factors = make_factors(3, (n + 1,), dtype, "cpu", seed=n)
    grad_w = make_factors(1, (n + 1,), io_dtype, "cpu", seed=n + 1)[0]
    w, _ = emulated.forward(factors, io_dtype, False, 1)
    grad = emulated.backward(factors, grad_w, s, 1)
    widest = [widest for _, _, widest in _launches(emulated)]
    assert widest == [dtype.itemsize] * 2
    assert_identical(w, CPU_OPS.dwf_forward(factors, io_dtype, False)[0], "w (element-wise)")
    assert_identical(grad, CPU_OPS.dwf_backward(factors, grad_w, s), "grad (element-wise)")


@pytest.mark.parametrize("op", ["forward", "grad_sumsq", "backward", "sgd_step"])
def test_grid_is_the_resident_blocks_capped_by_the_work_but_the_backwards(emulated, op):
    """The forward, the gradient norm and the SGD step: grid = min(ceil(packs / 256), occupancy x
    SMs), here the emulated 3 per SM. The backward: ceil(packs / 256), one thread per pack,
    whatever the SMs."""
    multiprocessors = 2
    resident = op != "backward"

    def grid(n: int) -> int:
        factors = make_factors(2, (n,), torch.float32, "cpu", seed=n)
        grad_w = torch.ones(n)
        _launches(emulated)
        if op == "forward":
            emulated.forward(factors, None, False, multiprocessors)
        elif op == "grad_sumsq":
            emulated.grad_sumsq(factors, grad_w, None, multiprocessors)
        elif op == "backward":
            emulated.backward(factors, grad_w, None, multiprocessors)
        else:
            emulated.sgd_step(factors, None, grad_w, None, 0.1, 0.0, 0.0, 0.0, False, False, False, multiprocessors)
        launches = _launches(emulated)
        # One launch, but the gradient norm's partials of a grid of several blocks: a second sums them.
        assert len(launches) == (2 if op == "grad_sumsq" and launches[0][0] > 1 else 1), launches
        assert launches[0][1] == 256
        return launches[0][0]

    assert grid(4 * 256 * 2) == 2  # 512 packs of 4 floats: two blocks cover them
    assert grid(4 * 256 * 6) == 6  # exactly the resident blocks
    assert grid(4 * 256 * 7) == (BLOCKS_PER_SM * multiprocessors if resident else 7)  # 6 resident
    assert grid(4 * 256 * 100) == (BLOCKS_PER_SM * multiprocessors if resident else 100)
    # The scalar path: 2049 packs of one element.
    assert grid(4 * 256 * 2 + 1) == (BLOCKS_PER_SM * multiprocessors if resident else 9)
    assert grid(5) == 1


def test_occupancy_is_asked_once_per_kernel_and_device(emulated):
    factors = make_factors(4, (4096,), torch.float32, "cpu", seed=3)
    grad_w = torch.ones(4096)
    device = 41  # an emulated device (SM count) no other test uses
    start = emulated.occupancy_queries()
    emulated.forward(factors, None, True, device)
    assert emulated.occupancy_queries() == start + 1
    for _ in range(3):
        emulated.forward(factors, None, True, device)
        emulated.forward(factors, None, False, device)  # the same kernel
    assert emulated.occupancy_queries() == start + 1
    emulated.backward(factors, grad_w, None, device)  # covers its work: asks nothing
    assert emulated.occupancy_queries() == start + 1
    for _ in range(2):
        emulated.sgd_step(factors.clone(), None, grad_w, None, 0.1, 0.0, 0.0, 0.0, False, False, False, device)
    assert emulated.occupancy_queries() == start + 2
    emulated.forward(factors, None, True, device + 1)
    assert emulated.occupancy_queries() == start + 3
    emulated.forward(factors[:, :4095], None, True, device)  # the element-wise kernel
    assert emulated.occupancy_queries() == start + 4


def test_forward_launches_a_reduction_only_for_several_partials(emulated):
    _require_cpu_backend()
    factors = make_factors(4, (12296,), torch.float32, "cpu", seed=5)
    _, sumsq_ref = reference.dwf_forward_reference(factors.double(), torch.float64, True)
    _launches(emulated)

    w, sumsq = emulated.forward(factors, None, False, 1)
    assert _launches(emulated) == [(BLOCKS_PER_SM, 256, 16)], "without sumsq: the product kernel alone"
    assert sumsq.item() == 0.0
    assert_identical(w, CPU_OPS.dwf_forward(factors, None, False)[0], "w")

    sumsq = emulated.forward(factors, None, True, 1)[1]
    assert _launches(emulated) == [(BLOCKS_PER_SM, 256, 16), (1, 1024, 0)], "partials, then their sum"
    torch.testing.assert_close(sumsq.double(), sumsq_ref, rtol=SUMSQ_RTOL[torch.float32], atol=0)

    small = factors[:, :1000].contiguous()  # 250 packs: one block, whose partial is the sum
    sumsq = emulated.forward(small, None, True, 1)[1]
    assert _launches(emulated) == [(1, 256, 16)]
    _, small_ref = reference.dwf_forward_reference(small.double(), torch.float64, True)
    torch.testing.assert_close(sumsq.double(), small_ref, rtol=SUMSQ_RTOL[torch.float32], atol=0)
    assert torch.equal(sumsq, emulated.forward(small, None, True, 3)[1])
    _launches(emulated)

    for with_sumsq in (False, True):  # no elements: sumsq is the empty sum
        empty = torch.empty(4, 0, 3)
        w, sumsq = emulated.forward(empty, None, with_sumsq, 1)
        assert w.shape == (0, 3) and sumsq.item() == 0.0
        assert _launches(emulated) == [(1, 1024, 0)]
