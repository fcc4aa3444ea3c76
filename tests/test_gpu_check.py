"""bench/gpu_check.sh, the one-call GPU check, runs end to end without a GPU (--dry-run).

The script only ever runs for real on a lent GPU machine, so this keeps it from rotting: every
stage runs (the CUDA ones reduced to what a CPU can do, with a note), the output folder holds the
archive and the summaries and nothing more, and the archive holds every stage's log and results.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["preflight", "extension", "bench", "variants", "tests", "step", "launch", "fusedsgd", "ncu", "more"]

pytest.importorskip("pytest_benchmark")


@pytest.mark.skipif(sys.platform != "linux", reason="a bash script for the Linux GPU machines")
def test_dry_run_produces_the_archive_and_summaries(tmp_path):
    out = tmp_path / "out"
    # Not this test run's settings: TRITON_INTERPRET, nor pytest-xdist's worker variables (the
    # script must shed those itself, or pytest-benchmark disables every benchmark).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTEST_XDIST_WORKER="gw0", PYTEST_XDIST_WORKER_COUNT="2")
    # A generous budget: the dry run takes about a minute on an idle 2-core machine; under a loaded
    # test run the stages must still all run, not be skipped for time.
    env.update(PYTHON=sys.executable, GPU_CHECK_BUDGET="300")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for stage in STAGES:
        assert f"| {stage} | ok |" in summary, summary
    files = sorted(os.listdir(out))
    assert len(files) <= 8, files  # what one device call brings back
    assert {
        "gpu-check.tgz",
        "summary.md",
        "env.txt",
        "gpu-kernels.md",
        "gpu-goals.md",
        "gpu-train-step.md",
        "kernel-resources.txt",
    } <= set(files), (files, summary)
    assert "dry run" in summary
    with tarfile.open(out / "gpu-check.tgz") as archive:
        names = {os.path.basename(n) for n in archive.getnames()}
    expected = {"stages.tsv", "env.txt", "bench.log", "tests.log", "gpu-train-step.jsonl", "launch.json"}
    assert expected | {"layer-host-time.md"} <= names, names
    assert "DWF's extra per layer" in summary and "| whole |" in summary, summary  # the host time per layer
    assert any(n.startswith("gpu-kernels-") and n.endswith(".json") for n in names), names
    kernels = (out / "gpu-kernels.md").read_text()
    for mode in ("forward", "backward", "full", "sgd"):
        assert f"| {mode} | 4 | 4096 | cpu |" in kernels, kernels
    assert "cpu-unfused" in kernels
