"""The matched-compression comparison (python/compare.py, paper/compare.py)."""

import csv
import os
import subprocess
import sys

import pytest
from paper import compare
from paper.compare import CompareConfig

COMPARE_PY = os.path.join(os.path.dirname(__file__), "..", "..", "python", "compare.py")


def _compare_py(*args, cwd):
    return subprocess.run(
        [sys.executable, COMPARE_PY, *args], capture_output=True, text=True, cwd=cwd, timeout=900, check=False
    )


def _search(depth, found):
    return {"depth": depth, "runs": len(found), "targets": found}


def _found(target, lam, compression, acc, landed=True):
    return {"target": target, "lam": lam, "compression": compression, "test_acc": acc, "landed": landed}


def test_rows_pair_each_seed_run_with_the_targets_of_its_lambda():
    cfg = CompareConfig(targets=(10.0, 30.0, 100.0), depths=(4,), seeds=(0, 1))
    results = {
        # One run (lambda 2e-3) lands both 10x and 30x within the tolerance; 100x another lambda.
        "search-D4": _search(
            4, [_found(10.0, 2e-3, 31.0, 91.0), _found(30.0, 2e-3, 31.0, 91.0), _found(100.0, 3e-3, 105.0, 90.0)]
        ),
        "dwf-D4-lam0.002-seed1": {"depth": 4, "lam": 2e-3, "seed": 1, "compression": 29.0, "test_acc": 90.0},
        "dwf-D4-lam0.003-seed1": {"depth": 4, "lam": 3e-3, "seed": 1, "diverged": "nan"},
        "recipe-imp-seed0": {
            "rows": [
                {
                    "method": "imp",
                    "variant": "v",
                    "seed": 0,
                    "target": 10.0,
                    "compression": 10.0,
                    "test_acc": 92.0,
                    "epochs": 1,
                }
            ]
        },
    }
    rows = compare.rows(cfg, results)
    dwf = sorted((r["seed"], r["target"], r["test_acc"]) for r in rows if r["method"] == "dwf")
    assert dwf == [(0, 10.0, 91.0), (0, 30.0, 91.0), (0, 100.0, 90.0), (1, 10.0, 90.0), (1, 30.0, 90.0)]
    cells = compare.cells(rows)
    assert cells[("dwf", "D=4")][10.0] == {"mean": 90.5, "min": 90.0, "max": 91.0, "compression": 30.0, "seeds": 2}
    assert cells[("dwf", "D=4")][100.0]["seeds"] == 1  # the diverged seed gives no row
    table = compare.table(cfg, rows)
    assert "| DWF (D=4) | 90.5 (90.0–91.0) @30x | 90.5 (90.0–91.0) @30x | 90.0 (90.0–90.0) @105x |" in table
    assert "| IMP (v) | 92.0 (92.0–92.0) @10x | – | – |" in table
    assert "| 4 | 0.002 (31x) | 0.002 (31x) | 0.003 (105x) |  (3 runs)" in compare.lambda_table(cfg, results)


@pytest.mark.parametrize(
    ("dwf", "baseline", "verdict"),
    [(93.0, 90.5, "DWF wins"), (91.5, 90.0, "within 2 points"), (88.0, 90.5, "DWF loses")],
)
def test_a_win_or_loss_needs_more_than_two_points(dwf, baseline, verdict):
    cfg = CompareConfig(targets=(100.0,))
    rows = [
        {"method": "dwf", "variant": "D=3", "seed": 0, "target": 100.0, "compression": 100.0, "test_acc": dwf},
        {"method": "dwf", "variant": "D=2", "seed": 0, "target": 100.0, "compression": 100.0, "test_acc": dwf - 5},
        {"method": "snip", "variant": "", "seed": 0, "target": 100.0, "compression": 100.0, "test_acc": baseline},
        {"method": "random", "variant": "", "seed": 0, "target": 100.0, "compression": 100.0, "test_acc": 10.0},
    ]
    (line,) = compare.verdicts(cfg, rows)
    assert line.startswith(f"100x: DWF (D=3) {dwf:.1f}% @100x vs SNIP {baseline:.1f}% @100x ") and line.endswith(
        verdict
    )
    rows[0]["compression"] = 70.0  # off the target by more than the tolerance: said so
    (line,) = compare.verdicts(cfg, rows)
    assert line.endswith(f"{verdict} (DWF's seeds compress 0.70x the target on average)")


def test_compare_py_runs_every_method_and_continues(tmp_path):
    """Tiny settings (2 epochs), every kind of unit on 2 workers; the same command again runs nothing."""
    args = ["--epochs", "2", "--targets", "10", "--depths", "2", "--seeds", "0,1", "--alphas", "2"]
    args += ["--search-runs", "2", "--finetune-epochs", "1", "--methods", "dwf,magnitude-ft,imp,powerprop,snip"]
    args += ["--output-dir", "c"]
    first = _compare_py(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    units = [
        line.split(":")[0]
        for line in first.stdout.splitlines()
        if line.startswith(("search-", "dwf-", "recipe-", "pai-"))
    ]
    assert {u.split("-seed")[0].rsplit("-lam", 1)[0] for u in units} == {
        "search-D2",
        "dwf-D2",
        "recipe-magnitude-ft",
        "recipe-imp",
        "recipe-powerprop-a2",
        "pai-snip-x10",
    }
    out = tmp_path / "c"
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    series = sorted({(r["method"], r["variant"]) for r in rows})
    assert series == [
        ("dwf", "D=2"),
        ("imp", "rewound to epoch 1"),
        ("magnitude", ""),
        ("magnitude-ft", ""),
        ("powerprop", "alpha 2"),
        ("snip", ""),
    ]
    for method, _ in series:
        seeds = sorted(r["seed"] for r in rows if r["method"] == method)
        assert seeds == ["0", "1"], method
    for r in rows:
        if r["method"] != "dwf":  # the baselines are pruned to exactly the target (|w| < 1e-4 aside)
            assert 10.0 <= float(r["compression"]) <= 10.5
    summary = (out / "summary.md").read_text()
    assert "| SNIP | " in summary and "| 2 | " in summary and "- 10x: DWF (D=2) " in summary
    assert (out / "compare.png").stat().st_size > 10_000
    again = _compare_py(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert not [line for line in again.stdout.splitlines() if line.startswith(("search-", "dwf-", "recipe-", "pai-"))]
    # The same summary, without the first invocation's wall time (the second one ran no unit).
    assert "Wall time" in summary and "Wall time" not in (out / "summary.md").read_text()
    assert (out / "summary.md").read_text().rstrip() == summary.split("Wall time")[0].rstrip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "10,1"], "--targets: ratios above 1; got 1"),
        (["--targets", "10,x"], "--targets: 'x' is not a valid value"),
        (["--depths", "1"], r"--depths: integers in \[2, 16\]; got 1"),
        (["--methods", "dwf,lottery"], "--methods: among"),
        (["--seeds", "0,0"], "--seeds: a value is repeated"),
        (["--rewind-epoch", "5", "--epochs", "5"], r"--rewind-epoch must be in \[0, --epochs\); got 5"),
        (["--tolerance", "0"], r"--tolerance must be a fraction in \(0, 1\)"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, message):
    import re

    result = _compare_py(*args, "--output-dir", "c", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "c").exists()


def test_a_folder_of_other_settings_is_refused(tmp_path):
    args = ["--epochs", "1", "--targets", "10", "--methods", "snip", "--seeds", "0", "--output-dir", "c"]
    assert _compare_py(*args, cwd=tmp_path).returncode == 0
    result = _compare_py(*args[:1], "2", *args[2:], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("compare.py: error: c holds a comparison with other settings")
    assert "'epochs': (1, 2)" in result.stderr
