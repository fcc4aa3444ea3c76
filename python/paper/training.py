"""The training loop of the paper's Algorithm 2, with exact checkpoint/resume.

SGD with momentum and cosine learning-rate annealing; the DWF penalty (lam/D) * sum ||f_d||^2
comes from dwf_kernels.penalty (the fused kernels computed it in the forward) or, equivalently,
from weight decay 2*lam/D on the factors. The same loop trains the pruning baselines, with a hook
that re-applies their masks after every step.

Everything that decides the next step is checkpointed after every epoch: model, optimizer and
scheduler state, the RNG states, and the history; the batch order of each epoch is a function of
(seed, epoch). An interrupted run resumed from its checkpoint ends bitwise equal to an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import dwf_kernels

from .data import Data
from .distributed import SINGLE, Ranks

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoopConfig:
    epochs: int
    lr: float
    momentum: float = 0.9
    progress: bool = True
    stop_after: int | None = None  # stop after this many epochs of this invocation (resume later)
    output_dir: str | None = None
    resume: bool = False
    identity: dict = field(default_factory=dict)  # what a checkpoint must match to be resumed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, ranks: Ranks = SINGLE) -> float:
    """Top-1 test accuracy in percent (the test batches split over the ranks of a data-parallel run)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=data.device)  # correct, total
    for i, (x, y) in enumerate(data.test_batches()):
        if i % ranks.world == ranks.rank:
            counts[0] += (model(x).argmax(1) == y).sum()
            counts[1] += len(y)
    model.train(was_training)
    correct, total = ranks.sum(counts).tolist()
    return 100.0 * correct / max(total, 1)


class TrainingDiverged(RuntimeError):
    """The loss or the parameters became NaN or Inf: the run cannot produce a meaningful model."""


class CheckpointMismatch(ValueError):
    """--resume found a checkpoint of another run."""


class ResumeMissing(FileNotFoundError):
    """--resume found no checkpoint."""


def _save_checkpoint(path: str, payload: dict) -> None:
    """Writes atomically and durably: the data reaches the disk before the rename makes it the
    checkpoint, so neither an interruption nor a power loss leaves a half-written one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path) or ".")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    """Makes a rename in `path` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_finite(model: nn.Module, epoch: int, train_loss: float) -> None:
    if not math.isfinite(train_loss):
        raise TrainingDiverged(
            f"training diverged in epoch {epoch}: the training loss is {train_loss} "
            "(lower the learning rate or the penalty strength)"
        )
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise TrainingDiverged(
            f"training diverged in epoch {epoch}: parameters {', '.join(bad)} hold NaN or Inf "
            "(lower the learning rate or the penalty strength)"
        )


def fit(
    model: nn.Module,
    data: Data,
    param_groups: list[dict],
    cfg: LoopConfig,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    epoch_metrics: Callable[[nn.Module], dict] | None = None,
    ranks: Ranks = SINGLE,
) -> dict:
    """Trains `model` on `data`; returns {"history": [...], "completed": bool, "train_seconds": float}.

    On several ranks (paper.distributed) each trains on its slice of every batch, the model wrapped
    in dwf_kernels.parallel.DistributedDataParallel; rank 0 alone shows progress and checkpoints."""
    # The DWF layers' reducer all-reduces dL/dw, N numbers per weight, not the D factor gradients.
    net = dwf_kernels.parallel.DistributedDataParallel(model) if ranks.world > 1 else model
    # FusedSGD is torch.optim.SGD with the DWF layers' backward fused into the update (same results;
    # plain parameters take torch's own SGD code).
    optimizer = dwf_kernels.optim.FusedSGD(param_groups, lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    history: list[dict] = []
    start_epoch, train_seconds = 0, 0.0
    ckpt_path = os.path.join(cfg.output_dir, CHECKPOINT) if cfg.output_dir else None
    if ckpt_path:
        _remove(ckpt_path + ".tmp")  # left by a run killed while writing (the checkpoint itself is whole)
    if cfg.resume:
        if not ckpt_path or not os.path.exists(ckpt_path):
            raise ResumeMissing(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=data.device, weights_only=False)
        if ckpt["identity"] != cfg.identity:
            diff = {k: (ckpt["identity"].get(k), v) for k, v in cfg.identity.items() if ckpt["identity"].get(k) != v}
            raise CheckpointMismatch(
                f"--resume: the checkpoint in {cfg.output_dir} is of another run (checkpoint vs now: {diff})"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        history, start_epoch, train_seconds = ckpt["history"], ckpt["epoch"] + 1, ckpt["train_seconds"]
    if after_step is not None:
        after_step(model)

    completed = start_epoch >= cfg.epochs
    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        model.train()
        # Running sums stay on the device; reading them back (a host sync) only when shown keeps GPU
        # steps asynchronous.
        loss_sum = torch.zeros((), device=data.device)
        correct = torch.zeros((), dtype=torch.long, device=data.device)
        seen = 0
        bar = _progress(cfg.progress and ranks.main, data.num_train_batches(), f"epoch {epoch + 1}/{cfg.epochs}")
        for step, (x, y) in enumerate(data.train_batches(epoch)):
            if ranks.world > 1:
                # This rank's slice, its summed loss scaled to the whole batch: the ranks' average
                # (what the gradients get) is the batch's mean loss, however the batch splits.
                size, part = len(y), ranks.shard(len(y))
                x, y = x[part], y[part]
                logits = net(x)
                data_loss = nn.functional.cross_entropy(logits, y, reduction="sum") * (ranks.world / size)
            else:
                logits = net(x)
                data_loss = nn.functional.cross_entropy(logits, y)
                size = len(y)
            loss = data_loss + extra_loss(model) if extra_loss is not None else data_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(model)
            loss_sum += loss.detach() * (size / ranks.world)  # summed over the ranks: the batch's mean loss
            correct += (logits.detach().argmax(1) == y).sum()
            seen += size
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    # From this rank's slices (all of each batch in a single-process run).
                    share = seen / ranks.world
                    bar.set_postfix(loss=f"{loss_sum.item() / share:.4f}", acc=f"{100 * correct.item() / share:.2f}")
        scheduler.step()
        train_seconds += time.perf_counter() - started
        if ranks.world > 1:
            loss_sum, correct = ranks.sum(torch.stack([loss_sum.double(), correct.double()])).tolist()
        else:
            loss_sum, correct = loss_sum.item(), correct.item()
        # Before anything is recorded or checkpointed: a diverged epoch never replaces a good one.
        _check_finite(model, epoch + 1, loss_sum / seen)
        record = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "train_acc": 100 * correct / seen,
            "test_acc": evaluate(model, data, ranks),
        }
        if epoch_metrics is not None:
            record.update(epoch_metrics(model))
        history.append(record)
        if bar is not None:
            bar.set_postfix(
                loss=f"{record['train_loss']:.4f}",
                acc=f"{record['train_acc']:.2f}",
                test=f"{record['test_acc']:.2f}",
                **{k: v for k, v in record.items() if k.startswith("sparsity")},
            )
            bar.close()
        if ckpt_path and ranks.main:
            _save_checkpoint(
                ckpt_path,
                {
                    "identity": cfg.identity,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "history": history,
                    "train_seconds": train_seconds,
                },
            )
        completed = epoch + 1 == cfg.epochs
        if cfg.stop_after is not None and epoch + 1 - start_epoch >= cfg.stop_after:
            break
    return {"history": history, "completed": completed, "train_seconds": train_seconds}


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


def sparsity_metrics(thresholds: dict[str, float]) -> Callable[[nn.Module], dict]:
    """Per-epoch metric: sparsity in percent at each named threshold (e.g. {"eps": 1.19e-7})."""

    def metrics(model: nn.Module) -> dict:
        return {
            f"sparsity@{name}": round(100 * dwf_kernels.sparsity_report(model, thr).total.sparsity, 2)
            for name, thr in thresholds.items()
        }

    return metrics


def write_json(path: str, payload: dict) -> None:
    """Writes `payload` whole or not at all (a temporary file renamed over `path`)."""
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def recorded_difference(path: str, identity: dict, key: str | None = None) -> dict:
    """{field: (recorded, now)} for each field where the JSON file at `path` (its `key` entry, if
    given) differs from `identity`; {} when there is no such file. How the programs check that an
    output folder holds the work of the same settings."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        recorded = json.load(f)
    if key is not None:
        recorded = recorded[key]
    return {k: (recorded.get(k), identity.get(k)) for k in recorded | identity if recorded.get(k) != identity.get(k)}
