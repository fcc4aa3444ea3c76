"""The benchmark providers compute what they claim, and the report's arithmetic is right."""

import json

import providers
import pytest
import report
import torch

import dwf_kernels


def test_traffic_bytes_is_the_roofline_of_design_md():
    assert providers.traffic_bytes("forward", 4, 1000, 4) == 5 * 1000 * 4
    assert providers.traffic_bytes("backward", 4, 1000, 4) == 9 * 1000 * 4
    assert providers.traffic_bytes("full", 8, 10, 2) == 26 * 10 * 2
    assert providers.traffic_bytes("sgd", 4, 1000, 4) == 17 * 1000 * 4


@pytest.mark.parametrize("provider", ["cpu", "cpu-unfused", "reference", "eager", "compile"])
def test_providers_take_the_same_sgd_step(provider):
    """Two momentum steps from the same factors and gradients land on the same factors."""
    if provider.startswith("cpu") and "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")
    torch.manual_seed(0)
    factors = 0.5 + torch.rand(3, 257)
    results = {}
    for name in (provider, "reference"):
        torch.manual_seed(1)
        step = providers.make_case(name, "sgd", factors)
        step()
        step()
        results[name] = step.factors
    torch.manual_seed(1)
    grad_w = torch.randn(257)
    grad = grad_w * factors.prod(0) / factors + 2 * (1e-3 / 3) * factors
    torch.testing.assert_close(results["reference"], factors - 1e-6 * (grad + (0.9 * grad + grad)))
    torch.testing.assert_close(results[provider], results["reference"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("provider", ["cpu", "reference", "eager", "compile"])
def test_providers_compute_the_same_step(provider):
    if provider == "cpu" and "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")
    torch.manual_seed(0)
    factors = 0.5 + torch.rand(3, 257)
    torch.manual_seed(1)
    full = providers.make_case(provider, "full", factors)()
    torch.manual_seed(1)
    backward = providers.make_case(provider, "backward", factors)()
    w, sumsq = providers.make_case(provider, "forward", factors)()
    torch.testing.assert_close(w, factors.prod(0))
    torch.testing.assert_close(sumsq, factors.square().sum())
    torch.manual_seed(1)
    grad_w = torch.randn(257)
    expected = grad_w * factors.prod(0) / factors + 2 * (1e-3 / 3) * factors
    torch.testing.assert_close(full[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(backward[0] if isinstance(backward, tuple) else backward, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("provider", ["cpu", "reference"])
def test_backend_backward_case_runs_the_fused_backward(provider):
    """Not dwf_product_backward's differentiable path (taken when the factors require grad), which
    runs torch ops: the benchmark would time those instead of the backend's kernel."""
    if provider == "cpu" and "cpu" not in dwf_kernels.available_backends("cpu"):
        pytest.skip("C++ extension not loaded")
    out = providers.make_case(provider, "backward", 0.5 + torch.rand(4, 1000))()
    assert out.grad_fn is None and not out.requires_grad


def _bench(extra, data):
    return {"extra_info": extra, "stats": {"data": data}}


def test_report_tables_from_benchmark_json(tmp_path):
    doc = {
        "datetime": "2026-11-25T10:00:00",
        "machine_info": {"python_version": "3.11.7"},
        "benchmarks": [
            _bench(
                {"kind": "copy", "bytes": 2_000_000_000, "device_name": "cpu", "torch": "t", "triton": "x"},
                [0.1, 0.1, 0.1],
            ),  # 20 GB/s
            _bench(
                {
                    "kind": "kernel",
                    "provider": "cpu",
                    "mode": "full",
                    "depth": 4,
                    "n": 4_000_000,
                    "dtype": "float32",
                    "bytes": 1_000_000_000,
                },
                [0.1, 0.1, 0.1],
            ),  # 10 GB/s
            _bench(
                {
                    "kind": "kernel",
                    "provider": "compile",
                    "mode": "full",
                    "depth": 4,
                    "n": 4_000_000,
                    "dtype": "float32",
                    "bytes": 1_000_000_000,
                },
                [0.3, 0.2, 0.4],
            ),
            _bench(
                {
                    "kind": "kernel",
                    "provider": "eager",
                    "mode": "full",
                    "depth": 4,
                    "n": 4_000_000,
                    "dtype": "float32",
                    "bytes": 1_000_000_000,
                },
                [1.0, 1.0, 1.0],
            ),
        ],
    }
    path = tmp_path / "b.json"
    path.write_text(json.dumps(doc))
    _, rows, copy_gbs = report.load(str(path))
    assert copy_gbs == pytest.approx(20.0)
    table = report.kernel_table(rows, copy_gbs)
    cpu_row = next(line for line in table.splitlines() if "| cpu |" in line)
    assert "| 100.000 |" in cpu_row and "| 10.0 | 50% |" in cpu_row and "10.00x" in cpu_row and "3.00x" in cpu_row
    assert cpu_row.endswith("| yes |")  # the 40 MB fresh allocation is flagged
    assert report._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)


def test_report_merges_runs_each_row_against_its_own_copy(tmp_path):
    """Per-mode runs (what gpu_check writes) merge into one table; % copy BW uses the row's own run."""
    paths = []
    for i, (copy_seconds, mode) in enumerate(((0.1, "forward"), (0.2, "backward"))):  # 20 and 10 GB/s
        copy = {"kind": "copy", "bytes": 2_000_000_000, "device_name": "cuda", "torch": "t", "triton": "x"}
        kernel = {"kind": "kernel", "provider": "cuda", "mode": mode, "depth": 4, "n": 1 << 24}
        kernel.update(dtype="float32", bytes=1_000_000_000, device="cuda")
        doc = {"datetime": "2026-11-25", "benchmarks": [_bench(copy, [copy_seconds]), _bench(kernel, [0.1])]}
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(doc))
    doc, rows, copy_gbs = report.load(*map(str, paths))
    assert copy_gbs == pytest.approx(15.0)  # median of 20 and 10
    table = report.kernel_table(rows, copy_gbs)
    forward = next(line for line in table.splitlines() if "| forward |" in line)
    backward = next(line for line in table.splitlines() if "| backward |" in line)
    assert "| 10.0 | 50% |" in forward and "| 10.0 | 100% |" in backward
    assert "median of 2 runs, 10.0-20.0" in report.header(doc, rows, copy_gbs)


def test_goal_table_judges_the_gpu_goals():
    def row(provider, mode, seconds, depth=4, n=1 << 24, dtype="float32"):
        traffic = 1e9  # bytes: 1 ms is 1000 GB/s
        info = {"kind": "kernel", "provider": provider, "mode": mode, "depth": depth, "n": n, "dtype": dtype}
        return dict(info, bytes=traffic, median=seconds, gbs=traffic / seconds / 1e9, copy_gbs=1000.0)

    rows = [
        row("cuda", "forward", 1.05e-3),  # 952 GB/s: 95% of copy
        row("triton", "forward", 1.25e-3),  # 800 GB/s: 80%
        row("compile", "full", 3.0e-3),
        row("cuda", "full", 2.0e-3),  # 1.5x compile
        row("triton", "full", 2.5e-3),  # 1.2x compile
        row("cuda", "forward", 9e-3, depth=2),  # not a goal case (D=2)
        row("cuda", "forward", 9e-3, n=1 << 20),  # not a goal case (N < 2^24)
    ]
    lines = report.goal_table(rows, 1000.0).splitlines()[2:]
    assert len(lines) == 6
    assert "| forward ≥ 90% of copy BW | float32 | 16777216 | cuda | 95% | yes |" in lines
    assert "| forward ≥ 90% of copy BW | float32 | 16777216 | triton | 80% | NO |" in lines
    assert "| full ≥ 1.3x torch.compile | float32 | 16777216 | cuda | 1.50x | yes |" in lines
    assert "| full ≥ 1.3x torch.compile | float32 | 16777216 | triton | 1.20x | NO |" in lines
    assert "| forward: cuda not slower than triton | float32 | 16777216 | cuda | 0.84x triton's time | yes |" in lines
    assert "| full: cuda not slower than triton | float32 | 16777216 | cuda | 0.80x triton's time | yes |" in lines
    assert report.goal_table(rows[5:], 1000.0).startswith("No goal case")


def test_goal_table_calls_a_difference_inside_the_spread_a_tie():
    def row(provider, median, p20, p80):
        info = {"kind": "kernel", "provider": provider, "mode": "backward", "depth": 4, "n": 1 << 26}
        return dict(info, dtype="float32", bytes=1e9, median=median, p20=p20, p80=p80, gbs=1.0 / median)

    def judged(cuda, triton):
        (line,) = [x for x in report.goal_table([cuda, triton], None).splitlines() if "not slower" in x]
        return line

    overlapping = judged(row("cuda", 1.03, 1.02, 1.05), row("triton", 1.00, 0.98, 1.04))
    assert overlapping.endswith("| cuda | 1.03x triton's time, within the p20-p80 spread | yes |"), overlapping
    apart = judged(row("cuda", 1.06, 1.05, 1.07), row("triton", 1.00, 0.99, 1.01))
    assert apart.endswith("| cuda | 1.06x triton's time | NO |"), apart


def test_step_goal_table_gives_the_roofline_floor_of_the_overhead():
    # 10M weights factorized at D=4 (30M more parameters), fp32: 17 x 10M x 4 bytes = 0.68 GB, at
    # 1000 GB/s 0.68 ms: +6.8% of a 10 ms dense step.
    results = [
        {"model": "vgg16", "variant": "dense", "median_ms": 10.0, "weights": 10_000_100, "depth": 4},
        {"model": "vgg16", "variant": "dwf-fused-sgd", "median_ms": 10.4, "weights": 40_000_100, "depth": 4},
    ]
    lines = report.step_goal_table(results, 1000.0).splitlines()
    assert lines[2] == "| step overhead ≤ 5% | vgg16 | 10.00 | 10.40 | +4.0% | +6.8% (0.68 ms) | yes |", lines
    results[1]["graph"] = True
    assert "(CUDA graph)" in report.step_goal_table(results, None)


def test_ab_prints_interleaved_medians_and_ratios(capsys):
    import ab

    assert ab.main(["--providers", "reference,eager", "--n", "4099", "--rounds", "3", "--depth", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0].strip() for line in lines] == ["reference", "eager"]
    assert all("median of 3 interleaved rounds" in line for line in lines)
    assert any(line.endswith("1.00x vs slowest") for line in lines)


def test_tests_goal_table_reads_pytest_summaries(tmp_path):
    green, red, cut = tmp_path / "tests-cuda.summary", tmp_path / "tests-triton.summary", tmp_path / "tests-x.summary"
    green.write_text("950 passed, 2720 deselected, 17 warnings in 67.58s\n")
    red.write_text("1 failed, 963 passed in 127.00s\nFAILED tests/test_gpu.py::test_x[cuda-triton]\n")
    cut.write_text("")
    # A run stopped by a time limit: a count of progress marks, not pytest's final line.
    stopped = tmp_path / "tests-y.summary"
    stopped.write_text("cut off by the call's 175 s limit after 964 tests (964 passed)\n")
    lines = report.tests_goal_table([str(green), str(red), str(cut), str(stopped)]).splitlines()[2:]
    assert lines[0] == (
        "| every cuda test passes on the device | cuda | 950 passed, 2720 deselected, 17 warnings in 67.58s | yes |"
    )
    assert lines[1].startswith("| every triton test passes on the device | triton | 1 failed"), lines[1]
    assert lines[1].endswith("| NO |"), lines[1]
    assert lines[2].endswith("| no result (the run was cut off) | NO |")
    assert lines[3].startswith("| every y test passes on the device | y | cut off by"), lines[3]
    assert lines[3].endswith("| NO |"), lines[3]
