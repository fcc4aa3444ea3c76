"""The DWF training program: learns with real sparsity, resumes exactly, and runs as a command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from paper.experiment import DWFConfig, run_dwf, train_dwf
from paper.training import CHECKPOINT

TRAIN_PY = os.path.join(os.path.dirname(__file__), "..", "..", "python", "train.py")


def test_short_run_learns_a_sparse_network(tmp_path):
    results = run_dwf(DWFConfig(depth=4, lam=3e-3, epochs=60, progress=False, output_dir=str(tmp_path)))
    assert results["completed"] and len(results["history"]) == 60
    assert results["practical"]["test_acc"] >= 85.0
    assert results["practical"]["compression"] >= 50.0  # >= 98% of the weights below 1e-4
    assert results["exact"]["compression"] > 1.0  # and some exactly zero in float32
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["practical"]["compression"] == pytest.approx(results["practical"]["compression"])
    assert "sparsity@1e-4" in saved["history"][-1]


def _final_state(output_dir):
    return torch.load(os.path.join(output_dir, CHECKPOINT), weights_only=False)["model"]


def test_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    common = dict(depth=3, lam=2e-3, epochs=4, progress=False)
    whole = run_dwf(DWFConfig(output_dir=str(tmp_path / "whole"), **common))
    part = run_dwf(DWFConfig(output_dir=str(tmp_path / "parts"), stop_after=2, **common))
    assert not part["completed"] and len(part["history"]) == 2
    resumed = run_dwf(DWFConfig(output_dir=str(tmp_path / "parts"), resume=True, **common))
    assert resumed["completed"]
    a, b = _final_state(tmp_path / "whole"), _final_state(tmp_path / "parts")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in whole["history"]]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    run_dwf(DWFConfig(depth=2, epochs=1, progress=False, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"checkpoint .* is of another run.*'depth': \(2, 3\)"):
        run_dwf(DWFConfig(depth=3, epochs=1, progress=False, output_dir=str(tmp_path), resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_dwf(DWFConfig(epochs=1, progress=False, output_dir=str(tmp_path / "empty"), resume=True))


def test_weight_decay_mode_trains_the_same_objective():
    results, model, _ = train_dwf(DWFConfig(depth=2, lam=3e-3, epochs=2, penalty_mode="weight_decay", progress=False))
    penalty_results = run_dwf(DWFConfig(depth=2, lam=3e-3, epochs=2, progress=False))
    assert results["test_acc_dwf"] == pytest.approx(penalty_results["test_acc_dwf"], abs=2.0)
    with pytest.raises(ValueError, match="penalty_mode must be"):
        run_dwf(DWFConfig(penalty_mode="l1", epochs=1, progress=False))


def test_train_py_command(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, TRAIN_PY, "--epochs", "2", "--depth", "3", "--output-dir", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout and "compression ratio" in proc.stdout and "total" in proc.stdout
    assert (out / "results.json").exists() and (out / CHECKPOINT).exists()
    bad = subprocess.run(
        [
            sys.executable,
            TRAIN_PY,
            "--dataset",
            "cifar10",
            "--data-root",
            str(tmp_path / "none"),
            "--epochs",
            "1",
            "--output-dir",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "cifar-10-batches-py" in bad.stderr
