"""Baselines that train dense weights and prune them to a target compression, at every target of a list.

  magnitude     one-shot global magnitude pruning of the trained dense network (Han et al., 2015,
                without their fine-tuning)
  magnitude-ft  the same, then fine-tuning with the mask fixed for `finetune_epochs` at a tenth of the
                learning rate, cosine-annealed (Han et al., 2015, "Learning both weights and
                connections for efficient neural networks", one-shot to each target)
  imp           iterative magnitude pruning with weight rewinding (Frankle et al., 2020, "Linear mode
                connectivity and the lottery ticket hypothesis"; Renda et al., 2020, "Comparing
                rewinding and fine-tuning in neural network pruning"): train, prune the smallest
                surviving weights globally, rewind the survivors to their values after
                `rewind_epoch` epochs, retrain the remaining epochs; one round per target, in
                increasing order, with extra rounds so that no round compresses more than
                `max_step`-fold (the lottery-ticket papers prune 20% per round, which the time budget
                of a CPU sweep does not allow). The learning rate restarts its cosine schedule over
                the remaining epochs (rewinding the schedule to epoch `rewind_epoch` of
                `epochs` differs from that by under 0.1% of the rate for the defaults).
  powerprop     Powerpropagation (Schwarz et al., 2021, "Powerpropagation: a sparsity inducing weight
                reparameterisation"): every prunable weight is w = v * |v|^(alpha - 1), v trained
                (initialized to sign(w0) |w0|^(1/alpha), so that w starts from the usual
                initialization), then w magnitude-pruned to each target without fine-tuning

The dense network is trained once per seed and shared by magnitude, magnitude-ft and imp. Every
stage writes its folder under `output_dir` (a checkpoint after every epoch, then its results), so
an interrupted recipe continues where it stopped. Each target gives one row: the compression and
test accuracy of the pruned model with |w| < `threshold` counted as zero and set to zero (weights
the mask keeps can be that small too), and the epochs trained for it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import baselines
from .experiment import (
    PRACTICAL_THRESHOLD,
    ConfigError,
    TrainingConfig,
    _check_choice,
    _check_int,
    _check_number,
    _seeded_data,
    measure_pruned,
)
from .models import build_model
from .training import CHECKPOINT, LoopConfig, evaluate, fit, write_json

RECIPES = ("magnitude-ft", "imp", "powerprop")  # "magnitude" comes with "magnitude-ft" (no training of its own)
RESULT = "result.json"


@dataclass
class RecipeConfig(TrainingConfig):
    recipe: str = "magnitude-ft"
    targets: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 500.0, 1000.0)
    finetune_epochs: int = 20  # magnitude-ft
    rewind_epoch: int = 1  # imp
    max_step: float = 4.0  # imp
    alpha: float = 3.0  # powerprop
    threshold: float = PRACTICAL_THRESHOLD

    def check(self) -> None:
        _check_choice("recipe", self.recipe, RECIPES)
        super().check()
        if not self.targets:
            raise ConfigError("targets", "must hold at least one compression ratio")
        for target in self.targets:
            _check_number("targets", target, minimum=1.0, inclusive=False)
        _check_int("finetune_epochs", self.finetune_epochs, 1)
        _check_int("rewind_epoch", self.rewind_epoch, 0, self.epochs - 1)
        _check_number("max_step", self.max_step, minimum=1.0, inclusive=False)
        _check_number("alpha", self.alpha, minimum=1.0)
        _check_number("threshold", self.threshold, minimum=0.0)


def imp_schedule(targets, max_step: float) -> list[float]:
    """The compression of every IMP round: the targets in increasing order and, between two of them
    (and before the first), the fewest rounds in equal ratios that keep each round's compression
    within max_step-fold of the round before."""
    rounds, current = [], 1.0
    for target in sorted(set(targets)):
        steps = max(1, math.ceil(math.log(target / current) / math.log(max_step) - 1e-9))
        rounds += [round(current * (target / current) ** (i / steps), 6) for i in range(1, steps)]
        rounds.append(float(target))
        current = target
    return rounds


def run_recipe(cfg: RecipeConfig, output_dir: str) -> list[dict]:
    """Trains cfg's recipe (continuing what output_dir holds) and returns one row per target (and
    per target the one-shot magnitude row too, for magnitude-ft)."""
    cfg.check()
    os.makedirs(output_dir, exist_ok=True)
    if cfg.recipe == "powerprop":
        return _powerprop(cfg, output_dir)
    # The dense run is shared by the recipes with the same training and rewind epoch.
    dense = _dense(cfg, os.path.join(output_dir, f"dense-seed{cfg.seed}-rewind{cfg.rewind_epoch}"))
    if cfg.recipe == "magnitude-ft":
        return _magnitude(cfg, dense, os.path.join(output_dir, f"magnitude-ft-seed{cfg.seed}"))
    return _imp(
        cfg, dense, os.path.join(output_dir, f"imp-seed{cfg.seed}-rewind{cfg.rewind_epoch}-step{cfg.max_step:g}")
    )


# --- stages: each trains into its folder, resumably, and records its result there -------------------


def _done(folder: str) -> dict | None:
    path = os.path.join(folder, RESULT)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _record(folder: str, result: dict) -> dict:
    write_json(os.path.join(folder, RESULT), result)
    return result


def _train(model, data, cfg: TrainingConfig, folder: str, epochs: int, lr: float, masks=None, stop_after=None):
    """fit() into `folder`, resuming its checkpoint; masks (if any) re-applied after every step."""
    os.makedirs(folder, exist_ok=True)
    loop = LoopConfig(
        epochs=epochs,
        lr=lr,
        momentum=cfg.momentum,
        progress=cfg.progress,
        stop_after=stop_after,
        output_dir=folder,
        resume=os.path.exists(os.path.join(folder, CHECKPOINT)),
        identity={"stage": os.path.basename(folder), "epochs": epochs, "lr": lr, **asdict(cfg)},
    )
    groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    after_step = None if masks is None else (lambda m: baselines.apply_masks(m, masks))
    return fit(model, data, groups, loop, after_step=after_step)


def _training_part(cfg: TrainingConfig) -> TrainingConfig:
    """The fields of cfg that decide a dense training run (so recipes sharing it share its folder)."""
    return TrainingConfig(**{k: getattr(cfg, k) for k in TrainingConfig.__dataclass_fields__})


def _epochs_done(folder: str) -> int:
    path = os.path.join(folder, CHECKPOINT)
    if not os.path.exists(path):
        return 0
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"] + 1


def _dense(cfg: RecipeConfig, folder: str) -> dict:
    """The dense network trained for cfg.epochs, and its weights after cfg.rewind_epoch epochs
    (the run stops there for the snapshot and resumes bitwise: the trajectory of an uninterrupted run)."""
    base = _training_part(cfg)
    paths = {"final": os.path.join(folder, "final.pt"), "rewind": os.path.join(folder, "rewind.pt")}
    done = _done(folder)
    if done is None:
        os.makedirs(folder, exist_ok=True)
        _, data = _seeded_data(base)
        model = build_model(cfg.model, data.in_shape, data.num_classes).to(data.device)
        if not os.path.exists(paths["rewind"]):
            done_epochs = _epochs_done(folder)
            if done_epochs > cfg.rewind_epoch:  # killed between the snapshot's epoch and its file
                os.remove(os.path.join(folder, CHECKPOINT))
                done_epochs = 0
            if done_epochs < cfg.rewind_epoch:
                _train(model, data, base, folder, cfg.epochs, cfg.lr, stop_after=cfg.rewind_epoch - done_epochs)
            elif done_epochs:  # the checkpoint is the snapshot's epoch
                state = torch.load(os.path.join(folder, CHECKPOINT), map_location=data.device, weights_only=False)
                model.load_state_dict(state["model"])
            torch.save(model.state_dict(), paths["rewind"])
        outcome = _train(model, data, base, folder, cfg.epochs, cfg.lr)
        torch.save(model.state_dict(), paths["final"])
        done = _record(folder, {"test_acc": evaluate(model, data), "seconds": outcome["train_seconds"]})
    return {**done, **paths}


def _load(cfg: TrainingConfig, path: str):
    _, data = _seeded_data(cfg)
    model = build_model(cfg.model, data.in_shape, data.num_classes).to(data.device)
    model.load_state_dict(torch.load(path, map_location=data.device, weights_only=True))
    return model, data


def _row(cfg: RecipeConfig, method: str, target: float, measured: dict, epochs: int, variant: str = "") -> dict:
    return {"method": method, "variant": variant, "seed": cfg.seed, "target": target, "epochs": epochs, **measured}


def _magnitude(cfg: RecipeConfig, dense: dict, folder: str) -> list[dict]:
    rows = []
    for target in sorted(cfg.targets):
        stage = os.path.join(folder, f"x{target:g}-ft{cfg.finetune_epochs}")
        done = _done(stage)
        if done is None:
            model, data = _load(cfg, dense["final"])
            masks = baselines.magnitude_masks(model, target)
            baselines.apply_masks(model, masks)
            one_shot = measure_pruned(model, data, cfg.threshold)
            _train(model, data, cfg, stage, cfg.finetune_epochs, cfg.lr / 10, masks=masks)
            done = _record(stage, {"one_shot": one_shot, "finetuned": measure_pruned(model, data, cfg.threshold)})
        rows.append(_row(cfg, "magnitude", target, done["one_shot"], cfg.epochs))
        rows.append(_row(cfg, "magnitude-ft", target, done["finetuned"], cfg.epochs + cfg.finetune_epochs))
    return rows


def _imp(cfg: RecipeConfig, dense: dict, folder: str) -> list[dict]:
    rows, previous = [], dense["final"]
    retrain = cfg.epochs - cfg.rewind_epoch
    epochs = cfg.epochs
    for i, compression in enumerate(imp_schedule(cfg.targets, cfg.max_step)):
        stage = os.path.join(folder, f"round{i + 1}-x{compression:g}")
        final = os.path.join(stage, "final.pt")
        epochs += retrain
        done = _done(stage)
        if done is None:
            trained, data = _load(cfg, previous)
            masks = baselines.magnitude_masks(trained, compression)  # pruned weights are 0: they stay pruned
            model, _ = _load(cfg, dense["rewind"])
            baselines.apply_masks(model, masks)
            _train(model, data, cfg, stage, retrain, cfg.lr, masks=masks)
            torch.save(model.state_dict(), final)
            done = _record(stage, measure_pruned(model, data, cfg.threshold))
        if compression in cfg.targets:
            rows.append(_row(cfg, "imp", compression, done, epochs, variant=f"rewound to epoch {cfg.rewind_epoch}"))
        previous = final
    return rows


class PowerProp(nn.Module):
    """The parametrization w = v * |v|^(alpha - 1) (torch.nn.utils.parametrize); right_inverse
    gives the v of a weight, so registering it keeps the weight."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * v.abs().pow(self.alpha - 1)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w.sign() * w.abs().pow(1 / self.alpha)


def powerpropagated(model: nn.Module, alpha: float) -> nn.Module:
    """`model` with every prunable weight reparametrized by PowerProp(alpha), in place."""
    for module in list(model.modules()):
        if isinstance(module, baselines.PRUNABLE):
            parametrize.register_parametrization(module, "weight", PowerProp(alpha))
    return model


def _powerprop(cfg: RecipeConfig, output_dir: str) -> list[dict]:
    stage = os.path.join(output_dir, f"powerprop-alpha{cfg.alpha:g}-seed{cfg.seed}")
    final = os.path.join(stage, "final.pt")
    if _done(stage) is None:
        _, data = _seeded_data(cfg)
        model = powerpropagated(build_model(cfg.model, data.in_shape, data.num_classes), cfg.alpha).to(data.device)
        outcome = _train(model, data, cfg, stage, cfg.epochs, cfg.lr)
        for module in list(model.modules()):
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        torch.save(model.state_dict(), final)
        _record(stage, {"test_acc": evaluate(model, data), "seconds": outcome["train_seconds"]})
    rows = []
    for target in sorted(cfg.targets):
        model, data = _load(cfg, final)
        baselines.apply_masks(model, baselines.magnitude_masks(model, target))
        measured = measure_pruned(model, data, cfg.threshold)
        rows.append(_row(cfg, "powerprop", target, measured, cfg.epochs, f"alpha {cfg.alpha:g}"))
    return rows
