"""Accuracy against compression: DWF over a lambda grid and depths, against the paper's baselines.

    python python/sweep.py --output-dir runs/sweep          # LeNet-300-100 on the embedded digits

D = 1 is the dense network (L2-regularized); its best model is magnitude-pruned (no fine-tuning)
to each requested compression ratio. random / snip / synflow prune a fresh dense model at
initialization to exactly each ratio and train it with the mask. Writes sweep.csv, summary.md and
sweep.png (accuracy vs compression ratio on a log axis) into --output-dir.

Every argument is checked before the first run. Each run's rows are appended to sweep.csv as soon
as it finishes (flushed to disk), so an interrupted sweep continues with --resume, which skips the
runs already in the CSV. A run whose loss or weights become NaN/Inf is recorded as "diverged" and
counts for no compression ratio.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch

# `paper` is found beside this file: Python puts a script's directory first on sys.path.
from paper.cli import ArgumentParser
from paper.data import DATASETS, DatasetMissingError, load_data
from paper.experiment import (
    EXACT_THRESHOLD,
    PRACTICAL_THRESHOLD,
    PRUNING_METHODS,
    BaselineConfig,
    ConfigError,
    DWFConfig,
    magnitude_pruned,
    resolve_device,
    run_pruned_at_init,
    train_dwf,
)
from paper.models import MODELS, build_model
from paper.sweep_results import FIELDS, RowWriter, plot, read_rows, row_key, summary_table  # noqa: F401
from paper.training import TrainingDiverged, recorded_difference, write_json

CSV_NAME, CONFIG_NAME, BEST_DENSE_NAME = "sweep.csv", "sweep.json", "best-dense.pt"
# What every run of one sweep must share for --resume to mix old and new rows.
IDENTITY = ("model", "dataset", "epochs", "lr", "dense_lr", "dense_weight_decay", "batch_size", "seed")


class SweepError(Exception):
    """The output directory does not fit the requested sweep (the message says why and what to do)."""


def _list(parser, flag: str, text: str, convert, check) -> list:
    values = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            value = convert(item)
        except ValueError:
            parser.error(f"{flag}: {item.strip()!r} is not a valid value")
        problem = check(value)
        if problem:
            parser.error(f"{flag}: {problem}; got {item.strip()}")
        values.append(value)
    return values


def parse_args(argv=None):
    p = ArgumentParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="lenet300")
    p.add_argument("--dataset", choices=DATASETS, default="mnist5k")
    p.add_argument("--depths", default="1,2,3,4", help="D values; 1 = dense (magnitude-pruned afterwards)")
    p.add_argument("--lambdas", default="5e-4,1e-3,2e-3,3e-3,5e-3,7e-3,1e-2", help="lambda grid for D >= 2")
    p.add_argument("--dense-lambdas", default="1e-4,5e-4", help="L2 strengths for D = 1")
    p.add_argument("--ratios", default="10,30,100,300,500", help="compression ratios for the baselines and the table")
    p.add_argument("--methods", default="random,snip,synflow", help="pruning-at-init baselines to run")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.15, help="initial learning rate of the DWF runs")
    p.add_argument("--dense-lr", type=float, default=0.05, help="initial learning rate of dense and masked runs")
    p.add_argument("--dense-weight-decay", type=float, default=1e-4, help="weight decay of the masked baselines")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default="data")
    p.add_argument("--output-dir", default="runs/sweep")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --output-dir: skip finished runs")
    args = p.parse_args(argv)

    def nonnegative(x):
        return None if math.isfinite(x) and x >= 0 else "must be finite numbers >= 0"

    args.depth_list = _list(
        p, "--depths", args.depths, int, lambda d: None if 1 <= d <= 16 else "must be integers in [1, 16]"
    )
    args.lambda_list = _list(p, "--lambdas", args.lambdas, float, nonnegative)
    args.dense_lambda_list = _list(p, "--dense-lambdas", args.dense_lambdas, float, nonnegative)
    args.ratio_list = _list(
        p, "--ratios", args.ratios, float, lambda r: None if math.isfinite(r) and r >= 1 else "must be finite and >= 1"
    )
    args.method_list = _list(
        p,
        "--methods",
        args.methods,
        str.strip,
        lambda m: None if m in PRUNING_METHODS else f"must be among {', '.join(PRUNING_METHODS)}",
    )
    if not args.depth_list and not args.method_list:
        p.error("--depths and --methods are both empty: nothing to run")
    if 1 in args.depth_list and not args.dense_lambda_list:
        p.error("--dense-lambdas is empty but --depths has 1")
    if any(d > 1 for d in args.depth_list) and not args.lambda_list:
        p.error("--lambdas is empty but --depths has D > 1")
    flags = {"lr": "--lr", "batch_size": "--batch-size", "epochs": "--epochs", "device": "--device"}
    try:
        for run in plan(args):
            if run.config is not None:
                run.config.check()
    except ConfigError as exc:
        if run.method == "dense" and exc.field == "lr":
            flags["lr"] = "--dense-lr"
        if run.method in PRUNING_METHODS:
            flags.update(lr="--dense-lr", weight_decay="--dense-weight-decay")
        p.error(f"{flags.get(exc.field, exc.field)} {exc.expectation}")
    return args


@dataclass
class Run:
    method: str  # "dense" (D = 1), "dwf", "magnitude" or a pruning-at-init method
    key: tuple
    config: DWFConfig | BaselineConfig | None  # None for magnitude pruning (no training)


def _common(args) -> dict:
    return dict(
        model=args.model,
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        data_root=args.data_root,
    )


def plan(args) -> list[Run]:
    """Every run of the sweep, in order: DWF / dense over the lambda grids, magnitude pruning of the
    best dense model, then the pruning-at-init baselines."""
    runs = []
    for depth in args.depth_list:
        method = "dense" if depth == 1 else "dwf"
        for lam in args.dense_lambda_list if depth == 1 else args.lambda_list:
            cfg = DWFConfig(
                depth=depth, lam=lam, lr=args.dense_lr if depth == 1 else args.lr, progress=False, **_common(args)
            )
            runs.append(Run(method, (method, depth, lam), cfg))
    if 1 in args.depth_list:
        runs += [Run("magnitude", ("magnitude", ratio), None) for ratio in args.ratio_list]
    for method in args.method_list:
        for ratio in args.ratio_list:
            cfg = BaselineConfig(
                method=method,
                compression=ratio,
                lr=args.dense_lr,
                weight_decay=args.dense_weight_decay,
                **_common(args),
            )
            runs.append(Run(method, (method, ratio), cfg))
    return runs


def _pruned_row(method: str, ratio: float, result: dict, seconds: float) -> dict:
    return dict(
        method=method,
        depth=1,
        lam="",
        threshold=EXACT_THRESHOLD,
        target_compression=ratio,
        compression=result["compression"],
        test_acc=result["test_acc"],
        seconds=seconds,
        status="ok",
    )


def _diverged_rows(run: Run, seconds: float) -> list[dict]:
    depth = run.config.depth if run.method in ("dense", "dwf") else 1
    lam = run.config.lam if run.method in ("dense", "dwf") else ""
    ratio = run.key[1] if run.method in PRUNING_METHODS else ""
    thresholds = (EXACT_THRESHOLD, PRACTICAL_THRESHOLD) if run.method in ("dense", "dwf") else (EXACT_THRESHOLD,)
    return [
        dict(
            method=run.method,
            depth=depth,
            lam=lam,
            threshold=thr,
            target_compression=ratio,
            compression="",
            test_acc="",
            seconds=seconds,
            status="diverged",
        )
        for thr in thresholds
    ]


def _save_best_dense(path: str, model: torch.nn.Module, lam: float, test_acc: float) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save({"lam": lam, "test_acc": test_acc, "model": model.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_best_dense(args, path: str):
    """The best dense model of this sweep (saved when its run finished) and the data it is tested on."""
    if not os.path.exists(path):
        raise SweepError(
            f"magnitude pruning needs the best dense model, {path}, which is missing: delete the dense rows "
            f"from {CSV_NAME} so that --resume retrains them"
        )
    device = resolve_device(args.device)
    data = load_data(args.dataset, batch_size=args.batch_size, seed=args.seed, device=device, data_root=args.data_root)
    model = build_model(args.model, data.in_shape, data.num_classes).to(device)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True)["model"])
    return model, data


def _check_output_dir(args) -> list[dict]:
    """Prepares --output-dir; returns the rows already there (with --resume)."""
    os.makedirs(args.output_dir, exist_ok=True)
    csv_path = os.path.join(args.output_dir, CSV_NAME)
    config_path = os.path.join(args.output_dir, CONFIG_NAME)
    identity = {k: getattr(args, k) for k in IDENTITY}
    if not args.resume:
        if os.path.exists(csv_path):
            raise SweepError(f"{csv_path} exists: pass --resume to continue that sweep, or choose another --output-dir")
        if os.path.exists(os.path.join(args.output_dir, BEST_DENSE_NAME)):
            os.remove(os.path.join(args.output_dir, BEST_DENSE_NAME))  # of another sweep
    else:
        diff = recorded_difference(config_path, identity)
        if diff:
            raise SweepError(
                f"--resume: the sweep in {args.output_dir} was run with other settings (then vs now: {diff})"
            )
    write_json(config_path, identity)
    return read_rows(csv_path) if args.resume and os.path.exists(csv_path) else []


def run_sweep(args) -> list[dict]:
    """Runs every planned run not yet in the CSV, appending each one's rows as it finishes;
    returns all rows (earlier ones included)."""
    rows = _check_output_dir(args)
    writer = RowWriter(os.path.join(args.output_dir, CSV_NAME), rows)
    done = {row_key(r) for r in rows}
    best_path = os.path.join(args.output_dir, BEST_DENSE_NAME)
    best_dense_acc = max(
        (
            r["test_acc"]
            for r in rows
            if r["method"] == "dense" and r["status"] == "ok" and r["threshold"] == EXACT_THRESHOLD
        ),
        default=None,
    )
    best_dense = None  # (model, data) of this invocation's best dense run, if it is the best overall
    for run in plan(args):
        if run.key in done:
            continue
        started = time.perf_counter()
        if run.method in ("dense", "dwf"):
            try:
                results, model, data = train_dwf(run.config)
            except TrainingDiverged as exc:
                new = _diverged_rows(run, round(time.perf_counter() - started, 1))
                print(f"D={run.config.depth} lambda={run.config.lam:g}: {exc}", flush=True)
            else:
                seconds = round(time.perf_counter() - started, 1)
                new = [
                    dict(
                        method=run.method,
                        depth=run.config.depth,
                        lam=run.config.lam,
                        threshold=results[name]["threshold"],
                        target_compression="",
                        compression=results[name]["compression"],
                        test_acc=results[name]["test_acc"],
                        seconds=seconds,
                        status="ok",
                    )
                    for name in ("exact", "practical")
                ]
                acc = results["exact"]["test_acc"]
                if run.method == "dense" and (best_dense_acc is None or acc > best_dense_acc):
                    _save_best_dense(best_path, model, run.config.lam, acc)
                    best_dense_acc, best_dense = acc, (model, data)
                print(
                    f"D={run.config.depth} lambda={run.config.lam:g}: acc {acc:.2f}% at compression "
                    f"{results['exact']['compression']:.1f}x (exact) / {results['practical']['compression']:.1f}x "
                    f"(|w|<{PRACTICAL_THRESHOLD:g}), {seconds:.0f} s",
                    flush=True,
                )
        elif run.method == "magnitude":
            if best_dense_acc is None:
                print(f"magnitude pruning to {run.key[1]:g}x: skipped, every dense run diverged", flush=True)
                continue
            if best_dense is None:
                best_dense = _load_best_dense(args, best_path)
            r = magnitude_pruned(best_dense[0], run.key[1], best_dense[1])
            new = [_pruned_row("magnitude", run.key[1], r, seconds=0)]
            print(f"magnitude pruning to {run.key[1]:g}x: acc {r['test_acc']:.2f}%", flush=True)
        else:
            try:
                r = run_pruned_at_init(run.config)
            except TrainingDiverged as exc:
                new = _diverged_rows(run, round(time.perf_counter() - started, 1))
                print(f"{run.method} at {run.key[1]:g}x: {exc}", flush=True)
            else:
                new = [_pruned_row(run.method, run.key[1], r, seconds=round(time.perf_counter() - started, 1))]
                print(f"{run.method} at {run.key[1]:g}x: acc {r['test_acc']:.2f}%", flush=True)
        writer.write(new)
        rows += new
        done.add(run.key)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # The data once before any training: a missing dataset is reported now, not after hours.
        load_data(args.dataset, batch_size=args.batch_size, seed=args.seed, data_root=args.data_root)
        rows = run_sweep(args)
    except (DatasetMissingError, SweepError) as exc:
        print(f"sweep.py: error: {exc}", file=sys.stderr)
        return 1
    ratios = args.ratio_list
    text = "\n\n".join(summary_table(rows, ratios, thr) for thr in (EXACT_THRESHOLD, PRACTICAL_THRESHOLD))
    text = f"{args.model} on {args.dataset}, {args.epochs} epochs, seed {args.seed}\n\n" + text + "\n"
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.output_dir, "sweep.png"), PRACTICAL_THRESHOLD)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
