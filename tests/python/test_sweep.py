"""The sweep program: a tiny grid writes the CSV, the summary table and the plot."""

import csv
import os
import subprocess
import sys

SWEEP_PY = os.path.join(os.path.dirname(__file__), "..", "..", "python", "sweep.py")


def test_tiny_sweep(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            SWEEP_PY,
            "--depths",
            "1,2",
            "--lambdas",
            "3e-3",
            "--dense-lambdas",
            "1e-4",
            "--ratios",
            "10,30",
            "--methods",
            "random,synflow",
            "--epochs",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    methods = {r["method"] for r in rows}
    assert methods == {"dense", "dwf", "magnitude", "random", "synflow"}
    for r in rows:
        if r["method"] in ("magnitude", "random", "synflow"):
            # pruned to the requested ratio (up to rounding of the kept count)
            assert abs(float(r["compression"]) / float(r["target_compression"]) - 1) < 0.01
    summary = (tmp_path / "summary.md").read_text()
    assert "| DWF D=2 |" in summary and "| random |" in summary and "≥30x" in summary
    assert (tmp_path / "sweep.png").stat().st_size > 1000
