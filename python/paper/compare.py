"""Every method at the same compression, over seeds: the work of python/compare.py, in units.

A unit is one resumable piece of work with one result file, units/<name>.json:

  search-D<d>              DWF with D factors, seed 0: the lambda of every target (paper.target; one
                           folder of runs per depth, shared by all its targets)
  dwf-D<d>-lam<l>-seed<s>  DWF at a lambda found, another seed (the lambda is found once per target
                           and depth, on seed 0, then shared by the seeds)
  recipe-<r>-seed<s>       magnitude (+ fine-tuning), IMP with rewinding, Powerpropagation
                           (paper.recipes), every target from one dense run
  pai-<m>-x<R>-seed<s>     random / SNIP / SynFlow pruning at initialization to R, trained with the mask

Units run in worker processes; a finished unit is never run again, and an interrupted one continues
from the checkpoints in its folders. Every result is measured at one threshold, |w| < 1e-4 set to zero.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import torch

from . import recipes, target
from .experiment import PRACTICAL_THRESHOLD, BaselineConfig, DWFConfig, run_dwf, run_pruned_at_init
from .training import TrainingDiverged, write_json

DWF_METHODS = ("dwf",)
RECIPE_METHODS = ("magnitude-ft", "imp", "powerprop")
PAI_METHODS = ("random", "snip", "synflow")
METHODS = DWF_METHODS + RECIPE_METHODS + PAI_METHODS
WIN_MARGIN = 2.0  # accuracy points: a difference below it is within the noise of 1000 test digits


@dataclass
class CompareConfig:
    model: str = "lenet300"
    dataset: str = "mnist5k"
    targets: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 500.0, 1000.0)
    depths: tuple[int, ...] = (2, 3, 4)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    alphas: tuple[float, ...] = (2.0, 3.0, 4.0)
    epochs: int = 100
    lr: float = 0.15  # DWF
    dense_lr: float = 0.05  # the baselines
    weight_decay: float = 1e-4  # the baselines
    batch_size: int = 128
    first_lambda: float = 3e-3
    tolerance: float = 0.1
    search_runs: int = 12
    finetune_epochs: int = 20
    rewind_epoch: int = 1
    imp_max_step: float = 4.0
    device: str = "cpu"
    data_root: str = "data"
    threads: int = 1  # torch threads per worker

    def identity(self) -> dict:
        """What the results of one output folder share (the settings that change a run)."""
        keep = asdict(self)
        for k in ("methods", "seeds", "targets", "depths", "alphas", "device", "data_root", "threads"):
            del keep[k]
        return keep


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str  # "search", "dwf", "recipe", "pai"
    args: tuple


def _common(cfg: CompareConfig, seed: int) -> dict:
    """What every training run of the comparison shares, DWF or baseline."""
    return dict(
        model=cfg.model,
        dataset=cfg.dataset,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=seed,
        device=cfg.device,
        data_root=cfg.data_root,
    )


def _dwf_config(cfg: CompareConfig, depth: int, lam: float, seed: int) -> DWFConfig:
    return DWFConfig(depth=depth, lam=lam, lr=cfg.lr, progress=False, **_common(cfg, seed))


def _training(cfg: CompareConfig, seed: int) -> dict:
    return dict(lr=cfg.dense_lr, weight_decay=cfg.weight_decay, **_common(cfg, seed))


def first_units(cfg: CompareConfig) -> list[Unit]:
    """The units that need no other's result, the long DWF searches first."""
    units = []
    if "dwf" in cfg.methods:
        units += [Unit(f"search-D{d}", "search", (d,)) for d in cfg.depths]
    for seed in cfg.seeds:
        for recipe in ("magnitude-ft", "imp"):
            if recipe in cfg.methods:
                units.append(Unit(f"recipe-{recipe}-seed{seed}", "recipe", (recipe, seed, None)))
        if "powerprop" in cfg.methods:
            units += [Unit(f"recipe-powerprop-a{a:g}-seed{seed}", "recipe", ("powerprop", seed, a)) for a in cfg.alphas]
    for method in PAI_METHODS:
        if method in cfg.methods:
            units += [
                Unit(f"pai-{method}-x{t:g}-seed{s}", "pai", (method, t, s)) for t in cfg.targets for s in cfg.seeds
            ]
    return units


def seed_units(cfg: CompareConfig, search_result: dict) -> list[Unit]:
    """The other seeds' DWF runs at the lambdas a search found (one run per distinct lambda)."""
    depth = search_result["depth"]
    lambdas = sorted({t["lam"] for t in search_result["targets"]})
    return [
        Unit(f"dwf-D{depth}-lam{lam:.4g}-seed{s}", "dwf", (depth, lam, s)) for lam in lambdas for s in cfg.seeds[1:]
    ]


def run_unit(cfg: CompareConfig, unit: Unit, out: str) -> dict:
    """Runs `unit` (in a worker process) and writes units/<name>.json; returns its result."""
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    if unit.kind == "search":
        result = _search(cfg, unit.args[0], out)
    elif unit.kind == "dwf":
        depth, lam, seed = unit.args
        run_cfg = _dwf_config(cfg, depth, lam, seed)
        run_cfg.output_dir = os.path.join(out, f"dwf-D{depth}", f"seed{seed}", f"lam-{lam:.4g}")
        run_cfg.resume = os.path.exists(os.path.join(run_cfg.output_dir, "checkpoint.pt"))
        try:
            practical = run_dwf(run_cfg)["practical"]
            result = {"compression": practical["compression"], "test_acc": practical["test_acc"]}
        except TrainingDiverged as exc:
            result = {"diverged": str(exc)}
        result |= {"depth": depth, "lam": lam, "seed": seed}
    elif unit.kind == "recipe":
        recipe, seed, alpha = unit.args
        rc = recipes.RecipeConfig(
            recipe=recipe,
            targets=tuple(cfg.targets),
            finetune_epochs=cfg.finetune_epochs,
            rewind_epoch=cfg.rewind_epoch,
            max_step=cfg.imp_max_step,
            alpha=alpha if alpha is not None else 3.0,
            **_training(cfg, seed),
        )
        try:
            result = {"rows": recipes.run_recipe(rc, os.path.join(out, "recipes"))}
        except TrainingDiverged as exc:
            result = {"diverged": str(exc)}
    else:
        method, ratio, seed = unit.args
        try:
            r = run_pruned_at_init(BaselineConfig(method=method, compression=ratio, **_training(cfg, seed)))
            result = {"rows": [{"method": method, "variant": "", "seed": seed, "target": ratio, **r["practical"]}]}
            result["rows"][0]["epochs"] = cfg.epochs
        except TrainingDiverged as exc:
            result = {"diverged": str(exc)}
    result["unit"] = unit.name
    result["seconds"] = round(time.perf_counter() - started, 1)  # of this invocation's part of the unit
    os.makedirs(os.path.join(out, "units"), exist_ok=True)
    write_json(os.path.join(out, "units", unit.name + ".json"), result)
    return result


def _search(cfg: CompareConfig, depth: int, out: str) -> dict:
    folder = os.path.join(out, f"dwf-D{depth}", "seed0")
    found = []
    for t in sorted(cfg.targets):
        outcome = target.search(
            _dwf_config(cfg, depth, cfg.first_lambda, cfg.seeds[0]), t, folder, cfg.tolerance, cfg.search_runs
        )
        best = outcome.best
        found.append(
            {
                "target": t,
                "lam": best.lam,
                "compression": best.compression,
                "test_acc": best.test_acc,
                "landed": outcome.landed is not None,
                "below": None if outcome.below is None else [outcome.below.lam, outcome.below.compression],
                "above": None if outcome.above is None else [outcome.above.lam, outcome.above.compression],
                "reason": outcome.reason,
            }
        )
    return {"depth": depth, "targets": found, "runs": len(target.finished_runs(folder))}


def finished(out: str) -> dict[str, dict]:
    folder = os.path.join(out, "units")
    if not os.path.isdir(folder):
        return {}
    results = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                results[name[: -len(".json")]] = json.load(f)
    return results


def run_all(cfg: CompareConfig, out: str, workers: int, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Runs every unit not finished in `out` on `workers` processes; returns all units' results."""
    done = finished(out)
    pending = [u for u in first_units(cfg) if u.name not in done]
    for result in list(done.values()):
        if "targets" in result:
            pending += [u for u in seed_units(cfg, result) if u.name not in done]
    if not pending:
        return done
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        running = {pool.submit(run_unit, cfg, u, out): u for u in pending}
        while running:
            complete, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in complete:
                unit = running.pop(future)
                result = future.result()  # an unexpected error stops the run (finished units stay)
                done[unit.name] = result
                log(describe(unit.name, result))
                if unit.kind == "search":
                    for u in seed_units(cfg, result):
                        if u.name not in done and u not in running.values():
                            running[pool.submit(run_unit, cfg, u, out)] = u
    return done


def describe(name: str, result: dict) -> str:
    if "diverged" in result:
        return f"{name}: diverged ({result['diverged']})"
    if "targets" in result:
        return f"{name}: " + ", ".join(
            f"{t['target']:g}x: lambda {t['lam']:.4g} ({t['compression']:.0f}x{'' if t['landed'] else ', bracket'})"
            for t in result["targets"]
        )
    if "rows" in result:
        return f"{name}: " + ", ".join(f"{r['method']} {r['target']:g}x {r['test_acc']:.1f}%" for r in result["rows"])
    return f"{name}: {result['compression']:.0f}x, {result['test_acc']:.1f}%"


def rows(cfg: CompareConfig, results: dict[str, dict]) -> list[dict]:
    """One row per (method, variant, seed, target), every one measured at |w| < 1e-4."""
    out = []
    for name, result in results.items():
        if name.startswith("search-"):
            for t in result["targets"]:
                out.append(_dwf_row(result["depth"], cfg.seeds[0], t["target"], t, cfg.epochs))
        elif name.startswith("dwf-") and "diverged" not in result:
            depth, seed = result["depth"], result["seed"]
            search = results.get(f"search-D{depth}", {"targets": []})
            for t in search["targets"]:
                if t["lam"] == result["lam"]:
                    out.append(_dwf_row(depth, seed, t["target"], result, cfg.epochs))
        elif "rows" in result:
            out += result["rows"]
    return [r for r in out if r["target"] in cfg.targets]


def _dwf_row(depth: int, seed: int, t: float, run: dict, epochs: int) -> dict:
    return {
        "method": "dwf",
        "variant": f"D={depth}",
        "seed": seed,
        "target": t,
        "lam": run["lam"],
        "compression": run["compression"],
        "test_acc": run["test_acc"],
        "epochs": epochs,
    }


def cells(table_rows: list[dict]) -> dict[tuple[str, str], dict[float, dict]]:
    """(method, variant) -> target -> mean, min, max test accuracy and mean compression over seeds."""
    groups: dict = {}
    for r in table_rows:
        groups.setdefault((r["method"], r["variant"]), {}).setdefault(r["target"], []).append(r)
    return {
        series: {
            t: {
                "mean": statistics.fmean(r["test_acc"] for r in rs),
                "min": min(r["test_acc"] for r in rs),
                "max": max(r["test_acc"] for r in rs),
                "compression": statistics.fmean(r["compression"] for r in rs if math.isfinite(r["compression"]))
                if any(math.isfinite(r["compression"]) for r in rs)
                else math.inf,
                "seeds": len(rs),
            }
            for t, rs in by_target.items()
        }
        for series, by_target in groups.items()
    }


def _label(method: str, variant: str) -> str:
    names = {"dwf": "DWF", "magnitude": "magnitude (one-shot)", "magnitude-ft": "magnitude + fine-tuning"}
    names |= {"imp": "IMP", "powerprop": "Powerprop", "snip": "SNIP", "synflow": "SynFlow"}
    return f"{names.get(method, method)} ({variant})" if variant else names.get(method, method)


ORDER = ("dwf", "magnitude", "magnitude-ft", "imp", "powerprop", "random", "snip", "synflow")


def table(cfg: CompareConfig, table_rows: list[dict]) -> str:
    """The matched-compression table: mean test accuracy (min-max over seeds) and mean compression."""
    c = cells(table_rows)
    series = sorted(c, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1]))
    lines = ["| method | " + " | ".join(f"{t:g}x" for t in cfg.targets) + " |", "|---|" + "---|" * len(cfg.targets)]
    for key in series:
        row = []
        for t in cfg.targets:
            x = c[key].get(t)
            row.append(
                "–" if x is None else f"{x['mean']:.1f} ({x['min']:.1f}–{x['max']:.1f}) @{x['compression']:.0f}x"
            )
        lines.append(f"| {_label(*key)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdicts(cfg: CompareConfig, table_rows: list[dict]) -> list[str]:
    """Per target: the best DWF depth against the best baseline, a win or loss only beyond WIN_MARGIN."""
    c = cells(table_rows)
    out = []
    for t in cfg.targets:
        dwf = [(x[t]["mean"], k) for k, x in c.items() if k[0] == "dwf" and t in x]
        base = [(x[t]["mean"], k) for k, x in c.items() if k[0] != "dwf" and t in x]
        if not dwf or not base:
            continue
        (a, ka), (b, kb) = max(dwf), max(base)
        diff = a - b
        verdict = "DWF wins" if diff > WIN_MARGIN else ("DWF loses" if diff < -WIN_MARGIN else "within 2 points")
        ca, cb = c[ka][t]["compression"], c[kb][t]["compression"]
        out.append(
            f"{t:g}x: {_label(*ka)} {a:.1f}% @{ca:.0f}x vs {_label(*kb)} {b:.1f}% @{cb:.0f}x ({diff:+.1f}): {verdict}"
            + (
                f" (DWF's seeds compress {ca / t:.2f}x the target on average)"
                if abs(ca / t - 1) > cfg.tolerance
                else ""
            )
        )
    return out


def lambda_table(cfg: CompareConfig, results: dict[str, dict]) -> str:
    lines = ["| D | " + " | ".join(f"{t:g}x" for t in cfg.targets) + " |", "|---|" + "---|" * len(cfg.targets)]
    for d in cfg.depths:
        search = results.get(f"search-D{d}")
        if search is None:
            continue
        found = {t["target"]: t for t in search["targets"]}
        row = []
        for t in cfg.targets:
            x = found.get(t)
            row.append(
                "–" if x is None else f"{x['lam']:.4g} ({x['compression']:.0f}x)" + ("" if x["landed"] else " bracket")
            )
        lines.append(f"| {d} | " + " | ".join(row) + f" |  ({search['runs']} runs)")
    return "\n".join(lines)


def plot(cfg: CompareConfig, table_rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = cells(table_rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    # Up to 20 distinct colours (tab20's strong shades first), markers by family.
    colours = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]
    markers = {"dwf": "o", "magnitude": "v", "magnitude-ft": "^", "imp": "s", "powerprop": "D"}
    keys = sorted(c, key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1]))
    for i, key in enumerate(keys):
        ts = sorted(c[key])
        means = [c[key][t]["mean"] for t in ts]
        err = [
            [m - c[key][t]["min"] for t, m in zip(ts, means, strict=True)],
            [c[key][t]["max"] - m for t, m in zip(ts, means, strict=True)],
        ]
        style = "-" if key[0] == "dwf" else "--"
        ax.errorbar(
            ts,
            means,
            yerr=err,
            marker=markers.get(key[0], "x"),
            color=colours[i % len(colours)],
            linestyle=style,
            capsize=3,
            label=_label(*key),
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"target compression ratio (|w| < {PRACTICAL_THRESHOLD:g} is zero)")
    ax.set_ylabel("test accuracy (%), mean and min-max over seeds")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
