"""python/train.py on 2 ranks (gloo, CPU): the single-process result with the same global batch,
exact resume, and a rank that dies stopping the other with a clear error, then resumed."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from paper.training import CHECKPOINT

TRAIN_PY = os.path.join(os.path.dirname(__file__), "..", "..", "python", "train.py")
COMMON = ["--depth", "3", "--lam", "2e-3", "--batch-size", "100", "--no-progress"]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args, ranks=2, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", TRAIN_PY, *COMMON, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300, **kwargs)


def single(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN_PY, *COMMON, *args], capture_output=True, text=True, timeout=300)


def state(output_dir) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(output_dir, CHECKPOINT), weights_only=False)["model"]


def history(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "results.json")) as f:
        return json.load(f)["history"]


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    # The 5000 training examples in batches of 100, split 50/50.
    one, two = tmp_path / "one", tmp_path / "two"
    assert single("--epochs", "3", "--output-dir", str(one)).returncode == 0
    run = torchrun("--epochs", "3", "--output-dir", str(two))
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("test accuracy (factorized model)") == 1  # rank 0 alone prints
    assert "cpu x 2 ranks" in run.stdout
    a, b = state(one), state(two)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for h1, h2 in zip(history(one), history(two), strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
        assert abs(h2["test_acc"] - h1["test_acc"]) <= 0.2  # a test example or two on the rounding edge


def test_uneven_last_batch_still_equals_one_process(tmp_path):
    # 5000 = 3 x 1666 + 2 on 3 ranks: batches of 1666 split 555/555/556, the last one of 2 examples
    # 0/1/1 (a rank with none trains on the penalty alone). The scaled loss keeps the batch's mean.
    one, three = tmp_path / "one", tmp_path / "three"
    args = ["--epochs", "1", "--batch-size", "1666"]
    assert single(*args, "--output-dir", str(one)).returncode == 0
    run = torchrun(*args, "--output-dir", str(three), ranks=3)
    assert run.returncode == 0, run.stderr
    a, b = state(one), state(three)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_on_two_ranks_is_exact(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert torchrun("--epochs", "3", "--output-dir", str(whole)).returncode == 0
    assert torchrun("--epochs", "3", "--stop-after", "1", "--output-dir", str(parts)).returncode == 0
    assert len(history(parts)) == 1
    run = torchrun("--epochs", "3", "--resume", "--output-dir", str(parts))
    assert run.returncode == 0, run.stderr
    a, b = state(whole), state(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in history(parts)] == [h["train_loss"] for h in history(whole)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_stops_the_other_and_the_run_resumes(tmp_path):
    """Ranks started by hand (as on two machines): rank 1 is killed after the first checkpoint; rank 0
    stops within --dist-timeout with one clear line, and both ranks started again with --resume
    finish the run."""
    out = tmp_path / "run"
    args = [*COMMON, "--epochs", "40", "--output-dir", str(out), "--dist-timeout", "20"]

    def launch(rank: int, port: int, *more: str) -> subprocess.Popen:
        rank_env = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
        rank_env["MASTER_PORT"] = str(port)
        return subprocess.Popen(
            [sys.executable, TRAIN_PY, *args, *more],
            env=rank_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    port = free_port()
    procs = [launch(rank, port) for rank in range(2)]
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    assert time.monotonic() - killed < 30
    assert procs[0].returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "another rank stopped or did not answer" in lines[0], err
    assert "start the run again with --resume" in lines[0]
    done_before = len(torch.load(out / CHECKPOINT, weights_only=False)["history"])
    assert done_before < 40

    port = free_port()
    procs = [launch(rank, port, "--resume") for rank in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(history(out)) == 40 and json.loads((out / "results.json").read_text())["completed"]


def test_torchrun_max_restarts_resumes_from_the_checkpoint(tmp_path):
    """A worker killed mid-run: torchrun --max-restarts=1 starts both ranks again, which continue from
    the last checkpoint and end as an uninterrupted run."""
    whole, out = tmp_path / "whole", tmp_path / "run"
    args = ["--epochs", "30", "--dist-timeout", "20"]
    assert torchrun(*args, "--output-dir", str(whole)).returncode == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1"]
    launcher = subprocess.Popen(
        [*command, TRAIN_PY, *COMMON, *args, "--output-dir", str(out)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists():
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.communicate()
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[1]), signal.SIGKILL)
    _, err = launcher.communicate(timeout=240)
    assert launcher.returncode == 0, err[-3000:]
    assert "the workers were restarted: resuming from" in err
    a, b = state(whole), state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in history(out)] == [h["train_loss"] for h in history(whole)]
