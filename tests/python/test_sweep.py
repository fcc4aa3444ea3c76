"""The sweep program: a tiny grid writes the CSV, the summary table and the plot."""

import csv
import os
import re
import subprocess
import sys

import pytest

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


TINY = ["--depths", "1,2", "--lambdas", "3e-3", "--dense-lambdas", "1e-4", "--ratios", "10", "--epochs", "1"]


def _run_sweep(tmp_path, *args):
    return subprocess.run(
        [sys.executable, SWEEP_PY, *args, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "random,nonsense"], "--methods: must be among random, snip, synflow; got nonsense"),
        (["--ratios", "10,x"], "--ratios: 'x' is not a valid value"),
        (["--ratios", "0.5"], "--ratios: must be finite and >= 1; got 0.5"),
        (["--lambdas", "nan"], "--lambdas: must be finite numbers >= 0; got nan"),
        (["--depths", "0"], r"--depths: must be integers in \[1, 16\]; got 0"),
        (["--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["--dense-lr", "0"], "--dense-lr must be > 0; got 0"),
    ],
)
def test_bad_arguments_are_refused_before_any_training(tmp_path, args, message):
    proc = _run_sweep(tmp_path, *TINY, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and re.search(message, proc.stderr), proc.stderr
    assert proc.stdout == "" and not (tmp_path / "sweep.csv").exists()  # nothing trained


def test_rows_are_written_as_runs_finish_and_resume_skips_them(tmp_path, monkeypatch, capsys):
    """Kill the sweep in its last run: the CSV holds every finished run; --resume runs only the
    rest and ends with the rows of an uninterrupted sweep."""
    import sweep

    args = [*TINY, "--methods", "random,synflow"]
    assert sweep.main([*args, "--output-dir", str(tmp_path / "whole")]) == 0
    whole = list(csv.DictReader(open(tmp_path / "whole" / "sweep.csv")))

    real_run_pruned, trained = sweep.run_pruned_at_init, []

    def killed_at_synflow(cfg):
        if cfg.method == "synflow":
            raise KeyboardInterrupt
        return real_run_pruned(cfg)

    parts = tmp_path / "parts"
    monkeypatch.setattr(sweep, "run_pruned_at_init", killed_at_synflow)
    with pytest.raises(KeyboardInterrupt):
        sweep.main([*args, "--output-dir", str(parts)])
    finished = list(csv.DictReader(open(parts / "sweep.csv")))
    assert {r["method"] for r in finished} == {"dense", "dwf", "magnitude", "random"}

    real_train = sweep.train_dwf
    monkeypatch.setattr(sweep, "run_pruned_at_init", lambda cfg: trained.append(cfg.method) or real_run_pruned(cfg))
    monkeypatch.setattr(sweep, "train_dwf", lambda cfg: trained.append(cfg.depth) or real_train(cfg))
    assert sweep.main([*args, "--output-dir", str(parts), "--resume"]) == 0
    assert trained == ["synflow"]  # only the unfinished run
    resumed = list(csv.DictReader(open(parts / "sweep.csv")))

    def comparable(rows):
        return sorted(tuple(v for k, v in r.items() if k != "seconds") for r in rows)

    assert comparable(resumed) == comparable(whole)
    capsys.readouterr()
    assert sweep.main([*args, "--output-dir", str(parts)]) == 1  # no silent overwrite without --resume
    assert "pass --resume" in capsys.readouterr().err
    assert sweep.main([*args, "--epochs", "2", "--output-dir", str(parts), "--resume"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_diverged_runs_reach_no_compression_ratio(tmp_path):
    """DWF runs at a learning rate that makes the loss NaN are recorded as diverged, not as
    infinitely compressed networks that would win every column of the table."""
    import sweep

    assert sweep.main([*TINY, "--lr", "1e4", "--methods", "", "--output-dir", str(tmp_path)]) == 0
    rows = sweep.read_rows(str(tmp_path / "sweep.csv"))
    dwf = [r for r in rows if r["method"] == "dwf"]
    assert dwf and all(r["status"] == "diverged" and r["compression"] == "" for r in dwf)
    assert all(r["status"] == "ok" for r in rows if r["method"] in ("dense", "magnitude"))
    summary = (tmp_path / "summary.md").read_text()
    assert "| DWF D=2 | – |" in summary
    diverged = dict(method="dwf", depth=2, lam=1.0, threshold=1e-4, target_compression="")
    diverged.update(compression=float("inf"), test_acc=10.0, seconds=1.0, status="diverged")
    table = sweep.summary_table([*rows, diverged], [10.0], 1e-4)
    assert "| DWF D=2 | – |" in table
