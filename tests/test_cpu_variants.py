"""The CPU kernels' SIMD variants (csrc/cpu/dwf_cpu_kernels.h): one binary, picked at run time.

- each variant this CPU runs (ATEN_CPU_CAPABILITY=default / avx2 / avx512, in fresh processes) is
  the one in use there and gives bitwise the same forward (w and sumsq), backward, SGD step and
  gradient norm (NaNs: in the same places);
- only the AVX2 and AVX-512 variants' own functions hold AVX instructions, so the baseline
  variant and all the code around it run on any x86-64 CPU.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dwf_kernels import _build_info, _extension

ROOT = Path(__file__).resolve().parents[1]
# ATen's capability names, narrowest first; they name the variants too.
CAPABILITIES = ["default", "avx2", "avx512"]

pytestmark = pytest.mark.skipif(
    not _build_info.EXTENSION_BUILT or platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the SIMD variants are built on x86-64 only, and only with the compiled extension",
)

# Run in a process per capability: every op on every element type pair, depths with compile-time
# and padded slots, sizes past several chunks with tails, zeros, infinities and NaNs among the
# factors; results saved for the parent to compare.
CHILD = r"""
import sys
import torch
import dwf_kernels
from dwf_kernels import _extension

wanted, out = sys.argv[1], sys.argv[2]
assert _extension.CPU_VARIANT == wanted, (_extension.CPU_VARIANT, wanted)
assert torch.backends.cpu.get_cpu_capability() == wanted.upper(), torch.backends.cpu.get_cpu_capability()
ops = torch.ops.dwf_kernels
gen = torch.Generator().manual_seed(0)
results = {"variant": _extension.CPU_VARIANT}
pairs = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
         (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]
for dtype, io in pairs:
    for depth in (1, 3, 4, 9, 16):
        for n in (45, 2 * 16384 + 77):
            key = f"{dtype}-{io}-D{depth}-n{n}"
            sign = torch.where(torch.rand(depth, n, generator=gen) < 0.5, -1.0, 1.0)
            factors = ((0.5 + torch.rand(depth, n, generator=gen, dtype=torch.float64)) * sign).to(dtype)
            factors[0, 3:7] = torch.tensor([0.0, -0.0, float("inf"), float("nan")]).to(dtype)
            grad_w = torch.randn(n, generator=gen, dtype=torch.float64).to(io)
            s = torch.tensor(0.375)
            results[key + "-forward"] = ops.dwf_forward(factors, io, True)
            results[key + "-backward"] = ops.dwf_backward(factors, grad_w, s)
            results[key + "-backward-nopenalty"] = ops.dwf_backward(factors, grad_w, None)
            finite = torch.nan_to_num(factors, nan=0.25, posinf=1.25)
            results[key + "-grad-sumsq"] = (
                ops.dwf_grad_sumsq(finite, grad_w, s),
                ops.dwf_grad_sumsq(factors, grad_w, None),
            )
            for name, (lr, momentum, dampening, wd, nesterov, maximize) in {
                "plain": (0.1, 0.0, 0.0, 0.0, False, False),
                "nesterov-wd": (0.05, 0.9, 0.0, 1e-3, True, False),
                "dampening-maximize": (0.2, 0.5, 0.3, 0.0, False, True),
            }.items():
                f = factors.clone()
                buf = torch.empty_like(f) if momentum else None
                for step in range(2):
                    ops.dwf_sgd_step(f, buf, grad_w, s, lr, momentum, dampening, wd, nesterov, maximize, step == 0)
                results[f"{key}-sgd-{name}"] = (f, buf)
torch.save(results, out)
"""


def _run_child(capability: str, out: Path) -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", CHILD, capability, str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{proc.stderr[-3000:]}"
    return torch.load(out)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except inside NaNs: at::vec's fp32 -> bf16/fp16 conversions encode a NaN
    differently per instruction set (as torch's own kernels do), a NaN stays a NaN."""
    integer = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return torch.equal(a.contiguous().view(integer)[~nan], b.contiguous().view(integer)[~nan])


def _flatten(value) -> list:
    return [v for item in value for v in _flatten(item)] if isinstance(value, tuple) else [value]


def test_the_running_variant_follows_atens_capability():
    """Without ATEN_CPU_CAPABILITY: the widest built variant the CPU runs, as ATen's own choice."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    built = [c for c in CAPABILITIES if c in _build_info.CPU_VARIANTS]
    expected = [c for c in built if CAPABILITIES.index(c) <= CAPABILITIES.index(capability)][-1]
    assert _extension.CPU_VARIANT == expected


def test_every_variant_gives_bitwise_the_same_results(tmp_path):
    best = torch.backends.cpu.get_cpu_capability().lower()
    runnable = [c for c in CAPABILITIES[: CAPABILITIES.index(best) + 1] if c in _build_info.CPU_VARIANTS]
    if len(runnable) < 2:
        pytest.skip(f"this CPU runs only the {runnable} variant of the ones built")
    results = {c: _run_child(c, tmp_path / f"{c}.pt") for c in runnable}
    baseline = results[runnable[0]]
    for capability in runnable[1:]:
        other = results[capability]
        assert other.keys() == baseline.keys()
        for key, value in baseline.items():
            if key == "variant":
                continue
            for a, b in zip(_flatten(value), _flatten(other[key]), strict=True):
                assert (a is None) == (b is None), key
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape, key
                    assert _same_bits(a, b), f"{key}: {runnable[0]} and {capability} differ"


AVX_MARKERS = (
    "dwf::cpu::Kernels<(dwf::cpu::Isa)1>",
    "dwf::cpu::Kernels<(dwf::cpu::Isa)2>",
    "::avx2::",
    "::avx512::",
    "at::vec::AVX2::",
    "at::vec::AVX512::",
)


def test_only_the_avx_variants_hold_avx_instructions():
    """Every function of _C that uses an AVX instruction (VEX/EVEX-encoded: mnemonics v*) belongs to
    the AVX2 or AVX-512 variant. A baseline function, or an inline one from torch's headers that
    the linker took from a variant's object, would crash a CPU without AVX."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump (binutils, which the build itself needs) is missing")
    library = sys.modules["dwf_kernels._C"].__file__
    listing = subprocess.run(
        [objdump, "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout
    function, offenders, variant_avx = None, set(), 0
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 2 or not fields[1].startswith("v"):
            continue
        if any(marker in function for marker in AVX_MARKERS):
            variant_avx += 1
        else:
            offenders.add(function)
    assert variant_avx > 0, "no AVX variant's code found: is the disassembly parsed right?"
    assert not offenders, "AVX instructions outside the AVX variants:\n" + "\n".join(sorted(offenders)[:20])
