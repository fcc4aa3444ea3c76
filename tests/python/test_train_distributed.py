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
# A generous --dist-timeout: under load (tests side by side) a rank may start well after the other.
COMMON = ["--depth", "3", "--lam", "2e-3", "--batch-size", "100", "--no-progress", "--dist-timeout", "120"]


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args, ranks=2, **kwargs) -> subprocess.CompletedProcess:
    # --standalone: a free port of its own (tests may run side by side).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += [TRAIN_PY, *COMMON, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env(), timeout=300, **kwargs)


def single(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN_PY, *COMMON, *args], capture_output=True, text=True, timeout=300)


def state(output_dir) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(output_dir, CHECKPOINT), weights_only=False)["model"]


def history(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "results.json")) as f:
        return json.load(f)["history"]


def test_what_counts_as_another_rank_failing():
    from paper.distributed import is_collective_failure

    assert is_collective_failure(torch.distributed.DistBackendError("NCCL watchdog timeout"))
    assert is_collective_failure(RuntimeError("Application timeout caused pair closure"))
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:545] Connection reset by peer"))
    try:
        torch.zeros(2) + torch.zeros(3)
    except RuntimeError as error:  # a bug of the training code stays itself
        assert not is_collective_failure(error)


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


def launch_by_hand(rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """A rank started without torchrun (as on two machines), with the environment torchrun would set."""
    rank_env = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    rank_env["MASTER_PORT"] = str(port)
    return subprocess.Popen(
        [sys.executable, TRAIN_PY, *args], env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_checkpoint(out, procs) -> None:
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists():
        assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
        time.sleep(0.1)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_rank_that_hangs_stops_the_other_after_the_timeout(tmp_path):
    out = tmp_path / "run"
    args = [*COMMON[:-2], "--dist-timeout", "15", "--epochs", "400", "--output-dir", str(out)]
    port = free_port()
    procs = [launch_by_hand(rank, port, args) for rank in range(2)]
    try:
        wait_for_checkpoint(out, procs)
        procs[1].send_signal(signal.SIGSTOP)  # alive, silent
        stopped = time.monotonic()
        _, err = procs[0].communicate(timeout=90)
        assert 10 < time.monotonic() - stopped < 60
        assert procs[0].returncode == 1
        line = one_error_line(err)
        assert "another rank stopped or did not answer within 15 s" in line and "--resume" in line
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_a_dead_rank_stops_the_other_and_the_run_resumes(tmp_path):
    """Ranks started by hand (as on two machines): rank 1 is killed after the first checkpoint; rank 0
    stops at once (its connection to rank 1 breaks; a rank that hangs instead would be waited for
    --dist-timeout seconds) with one clear line, and both ranks started again with --resume finish
    the run."""
    out = tmp_path / "run"
    args = [*COMMON, "--epochs", "40", "--output-dir", str(out)]
    port = free_port()
    procs = [launch_by_hand(rank, port, args) for rank in range(2)]
    wait_for_checkpoint(out, procs)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    assert time.monotonic() - killed < 30
    assert procs[0].returncode == 1
    line = one_error_line(err)
    assert "another rank stopped or did not answer" in line and "start the run again with --resume" in line
    done_before = len(torch.load(out / CHECKPOINT, weights_only=False)["history"])
    assert done_before < 40

    port = free_port()
    procs = [launch_by_hand(rank, port, [*args, "--resume"]) for rank in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(history(out)) == 40 and json.loads((out / "results.json").read_text())["completed"]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_workers_that_torchrun_restarts_resume_and_finish(tmp_path):
    """torchrun --max-restarts: a worker killed after the first checkpoint; torchrun restarts both,
    which join a process group again (torchrun's shared store still holds the killed attempt's
    addresses under the same keys) and resume from the checkpoint to the end of the run."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    command += [TRAIN_PY, *COMMON, "--epochs", "40", "--output-dir", str(out)]
    agent = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(out, [agent])
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        _, err = agent.communicate(timeout=240)
    finally:
        agent.kill()
    assert agent.returncode == 0, err[-3000:]
    assert "the workers were restarted: resuming from" in err
    assert len(history(out)) == 40 and json.loads((out / "results.json").read_text())["completed"]
