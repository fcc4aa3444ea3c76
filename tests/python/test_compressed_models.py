"""Compressed files of the paper's models: the sizes a user gets (deterministic, not timings), and
evaluate.py on a saved file."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import torch
from paper.models import build_model

import dwf_kernels
from dwf_kernels.compressed import compressed_bytes, minimum_bytes

ROOT = Path(__file__).resolve().parents[2]


def pruned(model: torch.nn.Module, compression: float) -> torch.nn.Module:
    """Each weight matrix and kernel kept at its 1/compression largest magnitudes."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                w = m.weight
                keep = max(1, round(w.numel() / compression))
                w.copy_(torch.where(w.abs() >= w.abs().reshape(-1).topk(keep).values[-1], w, torch.zeros(())))
    return model


def torch_save_bytes(model: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def test_vgg16_at_compression_100_is_over_30x_smaller():
    torch.manual_seed(0)
    model = pruned(build_model("vgg16", (3, 32, 32), 10), 100)
    size = len(compressed_bytes(model))
    assert torch_save_bytes(model) / size >= 30
    assert size <= 1.25 * minimum_bytes(model)


def test_evaluate_reads_a_saved_model(tmp_path):
    torch.manual_seed(0)
    model = pruned(build_model("lenet300", (1, 28, 28), 10), 300)
    dwf_kernels.save_compressed(model, tmp_path / "model.dwfz")
    run = [sys.executable, str(ROOT / "python" / "evaluate.py"), str(tmp_path / "model.dwfz")]
    done = subprocess.run(
        [*run, "--model", "lenet300", "--dataset", "mnist5k", "--sparse"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and "(sparse where faster)" in done.stdout
    (tmp_path / "bad.dwfz").write_bytes((tmp_path / "model.dwfz").read_bytes()[:-10])
    bad = subprocess.run(
        [*run[:2], str(tmp_path / "bad.dwfz"), "--model", "lenet300", "--dataset", "mnist5k"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("evaluate.py: error:") and "truncated" in bad.stderr
    missing = subprocess.run(run, capture_output=True, text=True)
    assert missing.returncode == 2 and "--model and --dataset are needed" in missing.stderr
