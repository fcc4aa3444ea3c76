"""DWF against the pruning baselines at the same compression, over seeds.

    python python/compare.py --output-dir runs/compare      # LeNet-300-100 on the embedded digits

Every method is brought to each target compression ratio (--targets; |w| < 1e-4 counts as zero and
is set to zero before testing, for every method):

  DWF (--depths)   the lambda landing the target within --tolerance, found by a search on the first
                   seed (python/train.py --target-compression), then trained with the other seeds;
                   where compression jumps past the tolerance, the closer of the two bracketing runs
  magnitude        one-shot global magnitude pruning of the dense network, and with fine-tuning
  IMP              iterative magnitude pruning with weight rewinding
  Powerprop        w = v|v|^(alpha-1) for each --alphas, then magnitude-pruned
  random/SNIP/SynFlow  pruned at initialization, then trained with the mask

(paper/recipes.py and paper/baselines.py give each recipe and its source.) Writes runs.csv (every
method, seed and target), summary.md (the table: mean test accuracy, min-max over the seeds and the
mean compression reached; the lambdas found; per target, the best DWF depth against the best
baseline, a win or a loss only beyond 2 points) and compare.png (accuracy with min-max error bars).

Work is split into units run by --workers processes (one torch thread each by default). Running
the same command again continues: finished units are read back, interrupted ones resume from their
checkpoints. The folder belongs to one set of training settings (compare.json); more seeds, targets,
depths or methods can be added later.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import time

from paper import compare
from paper.cli import ArgumentParser
from paper.data import DATASETS, DatasetMissingError, load_data
from paper.models import MODELS
from paper.target import SearchError
from paper.training import recorded_difference, write_json


def _list(p, flag: str, text: str, convert, ok, expectation: str) -> tuple:
    values = []
    for item in text.split(","):
        try:
            value = convert(item.strip())
        except ValueError:
            p.error(f"{flag}: {item.strip()!r} is not a valid value")
        if not ok(value):
            p.error(f"{flag}: {expectation}; got {item.strip()}")
        values.append(value)
    if len(set(values)) != len(values):
        p.error(f"{flag}: a value is repeated")
    return tuple(values)


def parse_args(argv=None) -> tuple[compare.CompareConfig, str, int]:
    d = compare.CompareConfig()
    p = ArgumentParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--targets", default="10,30,100,300,500,1000", help="compression ratios")
    p.add_argument("--depths", default="2,3,4", help="DWF depths D")
    p.add_argument("--seeds", default="0,1,2", help="seeds; the lambda search runs on the first")
    p.add_argument("--methods", default=",".join(compare.METHODS))
    p.add_argument("--alphas", default="2,3,4", help="Powerprop exponents")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of every training run")
    p.add_argument("--lr", type=float, default=d.lr, help="DWF learning rate")
    p.add_argument("--dense-lr", type=float, default=d.dense_lr, help="the baselines' learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="the baselines' weight decay")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--first-lambda", type=float, default=d.first_lambda, help="where the DWF searches start")
    p.add_argument("--tolerance", type=float, default=d.tolerance, help="relative landing tolerance of DWF")
    p.add_argument("--search-runs", type=int, default=d.search_runs, help="most runs of a search per target")
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--rewind-epoch", type=int, default=d.rewind_epoch, help="IMP rewinds to the weights after it")
    p.add_argument("--imp-max-step", type=float, default=d.imp_max_step, help="IMP: most compression per round")
    p.add_argument("--device", default=d.device)
    p.add_argument("--data-root", default=d.data_root)
    p.add_argument("--workers", type=int, default=2, help="processes running units at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--output-dir", default="runs/compare")
    a = p.parse_args(argv)
    cfg = compare.CompareConfig(
        model=a.model,
        dataset=a.dataset,
        targets=_list(p, "--targets", a.targets, float, lambda x: 1 < x < math.inf, "ratios above 1"),
        depths=_list(p, "--depths", a.depths, int, lambda x: 2 <= x <= 16, "integers in [2, 16]"),
        seeds=_list(p, "--seeds", a.seeds, int, lambda x: x >= 0, "integers >= 0"),
        methods=_list(p, "--methods", a.methods, str, lambda x: x in compare.METHODS, f"among {compare.METHODS}"),
        alphas=_list(p, "--alphas", a.alphas, float, lambda x: 1 <= x < math.inf, "exponents >= 1"),
        epochs=a.epochs,
        lr=a.lr,
        dense_lr=a.dense_lr,
        weight_decay=a.weight_decay,
        batch_size=a.batch_size,
        first_lambda=a.first_lambda,
        tolerance=a.tolerance,
        search_runs=a.search_runs,
        finetune_epochs=a.finetune_epochs,
        rewind_epoch=a.rewind_epoch,
        imp_max_step=a.imp_max_step,
        device=a.device,
        data_root=a.data_root,
        threads=a.threads,
    )
    dense = {"magnitude-ft", "imp"} & set(cfg.methods)
    for flag, value, ok, expectation in (
        ("--epochs", a.epochs, a.epochs >= 1, "at least 1"),
        ("--lr", a.lr, 0 < a.lr < math.inf, "above 0"),
        ("--dense-lr", a.dense_lr, 0 < a.dense_lr < math.inf, "above 0"),
        ("--weight-decay", a.weight_decay, 0 <= a.weight_decay < math.inf, "at least 0"),
        ("--batch-size", a.batch_size, a.batch_size >= 1, "at least 1"),
        ("--first-lambda", a.first_lambda, 0 < a.first_lambda < math.inf, "above 0"),
        ("--tolerance", a.tolerance, 0 < a.tolerance < 1, "a fraction in (0, 1)"),
        ("--search-runs", a.search_runs, a.search_runs >= 1, "at least 1"),
        ("--finetune-epochs", a.finetune_epochs, a.finetune_epochs >= 1, "at least 1"),
        # The dense run of magnitude-ft and imp keeps its weights after --rewind-epoch epochs.
        ("--rewind-epoch", a.rewind_epoch, 0 <= a.rewind_epoch < max(a.epochs, 1) or not dense, "in [0, --epochs)"),
        ("--imp-max-step", a.imp_max_step, 1 < a.imp_max_step < math.inf, "above 1"),
        ("--workers", a.workers, a.workers >= 1, "at least 1"),
        ("--threads", a.threads, a.threads >= 1, "at least 1"),
    ):
        if not ok:
            p.error(f"{flag} must be {expectation}; got {value}")
    if a.device != "cpu":
        from paper.experiment import ConfigError, resolve_device

        try:
            resolve_device(a.device)
        except ConfigError as exc:
            p.error(f"--device {exc.expectation}")
    return cfg, a.output_dir, a.workers


FIELDS = ["method", "variant", "seed", "target", "lam", "compression", "test_acc", "epochs"]


def _claim(cfg: compare.CompareConfig, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "compare.json")
    identity = cfg.identity()
    diff = recorded_difference(path, identity)
    if diff:
        raise SearchError(
            f"{out} holds a comparison with other settings (there vs now: {diff}); use another --output-dir"
        )
    write_json(path, identity)


def write_results(cfg: compare.CompareConfig, results: dict, out: str, seconds: float | None) -> str:
    rows = compare.rows(cfg, results)
    with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["method"], r["variant"], r["target"], r["seed"])):
            writer.writerow({k: r.get(k, "") for k in FIELDS})
    diverged = sorted(name for name, r in results.items() if "diverged" in r)
    text = "\n".join(
        [
            f"{cfg.model} on {cfg.dataset}, {cfg.epochs} epochs per training run, seeds {list(cfg.seeds)}",
            "",
            "Test accuracy (%): mean (min–max over the seeds) @ mean compression reached; |w| < 1e-4 is zero.",
            "",
            compare.table(cfg, rows),
            "",
            "Lambda found per target and depth on the first seed (compression of that run; 'bracket': no run",
            "within the tolerance, the closer bracketing run):",
            "",
            compare.lambda_table(cfg, results),
            "",
            "Best DWF depth against the best baseline, per target (a win or a loss only beyond 2 points):",
            "",
            *[f"- {v}" for v in compare.verdicts(cfg, rows)],
            *([f"\nDiverged (no result): {', '.join(diverged)}"] if diverged else []),
            *([f"\nWall time of this invocation: {seconds / 60:.1f} min"] if seconds else []),
        ]
    )
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    if rows:
        compare.plot(cfg, rows, os.path.join(out, "compare.png"))
    return text


def main(argv=None) -> int:
    cfg, out, workers = parse_args(argv)
    started = time.perf_counter()
    try:
        load_data(cfg.dataset, batch_size=cfg.batch_size, seed=0, data_root=cfg.data_root)  # missing? say so now
        _claim(cfg, out)
        before = compare.finished(out)
        results = compare.run_all(cfg, out, workers, log=lambda line: print(line, flush=True))
    except (DatasetMissingError, SearchError) as exc:
        print(f"compare.py: error: {exc}", file=sys.stderr)
        return 1
    ran = any(name not in before for name in results)
    print("\n" + write_results(cfg, results, out, time.perf_counter() - started if ran else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
