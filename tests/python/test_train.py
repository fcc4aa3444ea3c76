"""The DWF training program: learns with real sparsity, resumes exactly, and runs as a command."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from paper import training
from paper.experiment import DWFConfig, run_dwf, train_dwf
from paper.training import CHECKPOINT, TrainingDiverged

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
    assert bad.returncode == 1 and bad.stderr.startswith("train.py: error: dataset 'cifar10' not found")
    assert len(bad.stderr.splitlines()) == 1 and "cifar-10-batches-py" in bad.stderr  # one line, no traceback


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        (["--epochs", "0"], "--epochs must be >= 1; got 0"),
        (["--epochs", "-3"], "--epochs must be >= 1; got -3"),
        (["--depth", "0"], r"--depth must be in \[1, 16\]; got 0"),
        (["--lam", "nan"], "--lam must be a finite number; got nan"),
        (["--lam", "-1"], "--lam must be >= 0; got -1"),
        (["--lr", "0"], "--lr must be > 0; got 0"),
        (["--device", "gpu"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"),
        (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
        (["--dist-timeout", "0"], "--dist-timeout must be > 0; got 0"),
        (["--dist-timeout", "inf"], "--dist-timeout must be a finite number; got inf"),
    ],
)
def test_train_py_refuses_bad_arguments_in_one_line(args, message, capsys, tmp_path):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("train.py: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_global_batch_smaller_than_the_ranks_is_refused(capsys, monkeypatch, tmp_path):
    import train

    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun sets it for 4 ranks
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--batch-size", "3", "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size must be at least the number of ranks (4): it is the global batch" in err
    monkeypatch.setenv("RANK", "2")  # the other ranks exit alike, silently: rank 0 says it once
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--batch-size", "3", "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_train_py_refuses_cuda_without_cuda(capsys, monkeypatch):
    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--device", "cuda", "--no-progress"])
    assert exit_info.value.code == 2
    assert "--device 'cuda' needs CUDA, which is not available here" in capsys.readouterr().err


def test_diverged_training_fails_clearly(tmp_path, capsys):
    """A NaN loss is a failed run (non-zero exit, one line), never a model with 'compression inf'."""
    import train

    out = tmp_path / "run"
    assert train.main(["--lr", "1e4", "--epochs", "2", "--output-dir", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "training diverged in epoch 1" in err, err
    assert not (out / CHECKPOINT).exists() and not (out / "results.json").exists()
    with pytest.raises(TrainingDiverged, match="training loss is nan"):
        run_dwf(DWFConfig(lr=1e4, epochs=1, progress=False))


def test_resume_errors_are_one_line(tmp_path, capsys):
    import train

    assert train.main(["--resume", "--output-dir", str(tmp_path / "none"), "--epochs", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--resume: no checkpoint at" in err


def test_checkpoint_is_synced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", a)), real_replace(a, b)))
    path = str(tmp_path / CHECKPOINT)
    training._save_checkpoint(path, {"x": torch.ones(3)})
    tmp = path + ".tmp"
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))
    assert torch.load(path)["x"].sum() == 3 and not os.path.exists(tmp)


def test_no_stale_temporary_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / CHECKPOINT)
    training._save_checkpoint(path, {"epoch": 1})

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        training._save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert not os.path.exists(path + ".tmp") and torch.load(path)["epoch"] == 1  # the old one intact
    with open(path + ".tmp", "wb") as f:  # left by a run killed mid-write (SIGKILL runs no cleanup)
        f.write(b"partial")
    run_dwf(DWFConfig(depth=2, epochs=1, progress=False, output_dir=str(tmp_path)))
    assert not os.path.exists(path + ".tmp") and torch.load(path, weights_only=False)["epoch"] == 0
