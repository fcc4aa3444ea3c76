"""Accuracy against compression: DWF over a lambda grid and depths, against the paper's baselines.

    python python/sweep.py --output-dir runs/sweep          # LeNet-300-100 on the embedded digits

D = 1 is the dense network (L2-regularized); its best model is magnitude-pruned (no fine-tuning)
to each requested compression ratio. random / snip / synflow prune a fresh dense model at
initialization to exactly each ratio and train it with the mask. Writes sweep.csv, summary.md and
sweep.png (accuracy vs compression ratio on a log axis) into --output-dir.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper.data import DATASETS  # noqa: E402
from paper.experiment import (  # noqa: E402
    EXACT_THRESHOLD,
    PRACTICAL_THRESHOLD,
    BaselineConfig,
    DWFConfig,
    magnitude_pruned,
    run_pruned_at_init,
    train_dwf,
)
from paper.models import MODELS  # noqa: E402

FIELDS = ["method", "depth", "lam", "threshold", "target_compression", "compression", "test_acc", "seconds"]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    return p.parse_args(argv)


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
    )


def run_sweep(args) -> list[dict]:
    rows: list[dict] = []
    ratios = _floats(args.ratios)
    common = dict(
        model=args.model,
        dataset=args.dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        data_root=args.data_root,
    )
    best_dense = None
    for depth in [int(d) for d in args.depths.split(",") if d]:
        for lam in _floats(args.dense_lambdas if depth == 1 else args.lambdas):
            started = time.perf_counter()
            cfg = DWFConfig(depth=depth, lam=lam, lr=args.dense_lr if depth == 1 else args.lr, progress=False, **common)
            results, model, data = train_dwf(cfg)
            seconds = time.perf_counter() - started
            for name in ("exact", "practical"):
                r = results[name]
                rows.append(
                    dict(
                        method="dense" if depth == 1 else "dwf",
                        depth=depth,
                        lam=lam,
                        threshold=r["threshold"],
                        target_compression="",
                        compression=r["compression"],
                        test_acc=r["test_acc"],
                        seconds=round(seconds, 1),
                    )
                )
            print(
                f"D={depth} lambda={lam:g}: acc {results['exact']['test_acc']:.2f}% at compression "
                f"{results['exact']['compression']:.1f}x (exact) / {results['practical']['compression']:.1f}x "
                f"(|w|<{PRACTICAL_THRESHOLD:g}), {seconds:.0f} s",
                flush=True,
            )
            if depth == 1 and (best_dense is None or results["exact"]["test_acc"] > best_dense[0]):
                best_dense = (results["exact"]["test_acc"], model, data)
    if best_dense is not None:
        for ratio in ratios:
            r = magnitude_pruned(best_dense[1], ratio, best_dense[2])
            rows.append(_pruned_row("magnitude", ratio, r, seconds=0))
            print(f"magnitude pruning to {ratio:g}x: acc {r['test_acc']:.2f}%", flush=True)
    for method in [m for m in args.methods.split(",") if m]:
        for ratio in ratios:
            started = time.perf_counter()
            r = run_pruned_at_init(
                BaselineConfig(
                    method=method, compression=ratio, lr=args.dense_lr, weight_decay=args.dense_weight_decay, **common
                )
            )
            rows.append(_pruned_row(method, ratio, r, seconds=round(time.perf_counter() - started, 1)))
            print(f"{method} at {ratio:g}x: acc {r['test_acc']:.2f}%", flush=True)
    return rows


def summary_table(rows: list[dict], ratios: list[float], threshold: float) -> str:
    """Best test accuracy at each compression ratio: DWF runs reaching at least that ratio (at
    `threshold`), baselines pruned to exactly it."""
    dense = max((r["test_acc"] for r in rows if r["method"] == "dense" and r["threshold"] == threshold), default=None)
    header = "| method | " + " | ".join(f"≥{r:g}x" for r in ratios) + " |"
    lines = [
        f"Test accuracy (%) at compression ratio; zero means |w| < {threshold:g}. Dense (D=1, unpruned): {dense:.2f}%."
        if dense is not None
        else "",
        "",
        header,
        "|---|" + "---|" * len(ratios),
    ]
    series = sorted(
        {(r["method"], r["depth"]) for r in rows if r["method"] != "dense"}, key=lambda k: (k[0] != "dwf", k[0], k[1])
    )
    for method, depth in series:
        cells = []
        for ratio in ratios:
            if method == "dwf":
                accs = [
                    r["test_acc"]
                    for r in rows
                    if r["method"] == "dwf"
                    and r["depth"] == depth
                    and r["threshold"] == threshold
                    and r["compression"] >= ratio
                ]
            else:
                accs = [r["test_acc"] for r in rows if r["method"] == method and r["target_compression"] == ratio]
            cells.append(f"{max(accs):.2f}" if accs else "–")
        name = f"DWF D={depth}" if method == "dwf" else ("magnitude (dense D=1)" if method == "magnitude" else method)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for depth in sorted({r["depth"] for r in rows if r["method"] == "dwf"}):
        pts = sorted(
            (r["compression"], r["test_acc"])
            for r in rows
            if r["method"] == "dwf"
            and r["depth"] == depth
            and r["threshold"] == threshold
            and math.isfinite(r["compression"])
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"DWF D={depth}")
    for method in ("magnitude", "random", "snip", "synflow"):
        pts = sorted((r["target_compression"], r["test_acc"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", linestyle="--", label=method)
    dense = [r["test_acc"] for r in rows if r["method"] == "dense" and r["threshold"] == threshold]
    if dense:
        ax.axhline(max(dense), color="gray", linestyle=":", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel(f"compression ratio (|w| < {threshold:g} is zero)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    rows = run_sweep(args)
    with open(os.path.join(args.output_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    ratios = _floats(args.ratios)
    text = "\n\n".join(summary_table(rows, ratios, thr) for thr in (EXACT_THRESHOLD, PRACTICAL_THRESHOLD))
    text = f"{args.model} on {args.dataset}, {args.epochs} epochs, seed {args.seed}\n\n" + text + "\n"
    with open(os.path.join(args.output_dir, "summary.md"), "w") as f:
        f.write(text)
    plot(rows, os.path.join(args.output_dir, "sweep.png"), PRACTICAL_THRESHOLD)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
