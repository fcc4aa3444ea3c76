"""Train a network by Deep Weight Factorization (the paper's Algorithm 2), collapse it, report.

    python python/train.py                         # LeNet-300-100, D=4, on the embedded MNIST digits
    python python/train.py --model vgg16 --dataset cifar10 --data-root data --download --depth 3 --lam 1e-4
    torchrun --nproc_per_node=2 python/train.py    # data parallel: 2 ranks share each batch of --batch-size

Under torchrun every rank trains on its slice of each (global) batch and the gradients are averaged
(dwf_kernels.parallel.DistributedDataParallel: the DWF layers all-reduce dL/dw only); the result
equals a single-process run with the same --batch-size, to rounding. Rank 0 alone prints and writes
the files (--output-dir must be one folder all ranks can read for --resume: on several machines, a
shared file system). A rank that stops makes the others stop within --dist-timeout seconds; running
the command again with --resume continues from the last checkpoint, as do workers that torchrun
restarts (--max-restarts).

    python python/train.py --target-compression 300   # finds the lambda that compresses 300x (+-10%)

With --target-compression R, train.py searches lambda (starting from --lam) by bisection in log
lambda until a run lands R-fold compression at |w| < 1e-4 within --target-tolerance, each run in its
own folder --output-dir/lam-<lambda>/ (default --output-dir: runs/search); it prints every run, the
lambda found and that run's summary. The same command again continues a search (finished runs are
read back, an interrupted one resumes), and runs are shared between targets in one folder. Where
compression jumps past the tolerance between neighbouring lambdas, it reports the two bracketing
runs. Searches run single-process.

Writes results.json, checkpoint.pt (every epoch) and model.dwfz (the model collapsed at |w| < 1e-4,
its nonzeros only: dwf_kernels.load_compressed) into --output-dir; --resume continues an
interrupted run exactly. A bad argument exits with status 2, a run that cannot be done (missing
dataset, training diverged to NaN/Inf, --resume without a matching checkpoint) with status 1;
either way with one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys

# `paper` is found beside this file: Python puts a script's directory first on sys.path.
from paper import distributed
from paper.cli import ArgumentParser
from paper.data import DATASETS, DatasetMissingError
from paper.distributed import RankFailure
from paper.experiment import ConfigError, DWFConfig, run_dwf, summary
from paper.models import MODELS
from paper.target import SearchError, search
from paper.training import CHECKPOINT, CheckpointMismatch, ResumeMissing, TrainingDiverged

import dwf_kernels


def parse_args(argv: list[str] | None = None) -> tuple[DWFConfig, tuple[float, float, int] | None]:
    """The run's configuration, and (target, tolerance, runs) of --target-compression or None."""
    d = DWFConfig()
    p = ArgumentParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--depth", type=int, default=d.depth, help="factors per weight D (1 = dense with L2)")
    p.add_argument("--lam", type=float, default=d.lam, help="penalty strength lambda")
    p.add_argument("--lr", type=float, default=d.lr, help="initial learning rate (cosine-annealed)")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--penalty-mode",
        choices=("penalty", "weight_decay"),
        default=d.penalty_mode,
        help="the penalty through dwf_kernels.penalty, or as weight decay 2*lam/D on the factors",
    )
    p.add_argument("--backend", choices=dwf_kernels.BACKENDS, default=None, help="default: fastest available")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--data-root", default=d.data_root)
    p.add_argument("--download", action="store_true", help="download torchvision datasets into --data-root")
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument(
        "--output-dir",
        default=None,
        help="results.json and checkpoint.pt go here (default runs/train; with --target-compression "
        "runs/search, one folder per lambda)",
    )
    p.add_argument("--resume", action="store_true", help="continue from --output-dir/checkpoint.pt")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs of this invocation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=d.dist_timeout,
        help="data-parallel runs: seconds a rank waits for the others before it stops with an error "
        "(raise it where a checkpoint takes longer to write)",
    )
    p.add_argument(
        "--target-compression",
        type=float,
        default=None,
        metavar="R",
        help="search lambda (from --lam) until a run compresses R-fold at |w| < 1e-4",
    )
    p.add_argument(
        "--target-tolerance", type=float, default=0.1, help="relative tolerance of the landing (default 0.1)"
    )
    p.add_argument("--search-runs", type=int, default=8, help="at most this many runs of the search per invocation")
    a = p.parse_args(argv)
    if a.output_dir is None:
        a.output_dir = "runs/search" if a.target_compression is not None else "runs/train"
    cfg = DWFConfig(
        model=a.model,
        dataset=a.dataset,
        depth=a.depth,
        lam=a.lam,
        lr=a.lr,
        momentum=a.momentum,
        epochs=a.epochs,
        batch_size=a.batch_size,
        penalty_mode=a.penalty_mode,
        backend=a.backend,
        seed=a.seed,
        device=a.device,
        data_root=a.data_root,
        download=a.download,
        num_workers=a.num_workers,
        output_dir=a.output_dir,
        resume=a.resume,
        stop_after=a.stop_after,
        progress=not a.no_progress,
        dist_timeout=a.dist_timeout,
    )
    if (
        not cfg.resume
        and a.target_compression is None
        and distributed.restarted()
        and os.path.exists(os.path.join(a.output_dir, CHECKPOINT))
    ):
        # torchrun restarted the workers after a failure (--max-restarts): continue, do not start over.
        cfg.resume = True
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: the workers were restarted: resuming from {a.output_dir}/{CHECKPOINT}", file=sys.stderr)
    try:
        cfg.check()
    except ConfigError as exc:
        p.error(f"--{exc.field.replace('_', '-')} {exc.expectation}")
    return cfg, (None if a.target_compression is None else _search_spec(p, a))


def _search_spec(p: ArgumentParser, a) -> tuple[float, float, int]:
    if not 1.0 < a.target_compression < float("inf"):
        p.error(f"--target-compression must be a ratio above 1 (weights per nonzero), got {a.target_compression:g}")
    if not 0.0 < a.target_tolerance < 1.0:
        p.error(f"--target-tolerance must be a fraction in (0, 1), got {a.target_tolerance:g}")
    if a.search_runs < 1:
        p.error(f"--search-runs must be at least 1, got {a.search_runs}")
    if not a.lam > 0.0:
        p.error(f"--lam (the search's first lambda) must be above 0, got {a.lam:g}")
    for flag, given in (("--resume", a.resume), ("--stop-after", a.stop_after is not None)):
        if given:
            p.error(f"{flag} does not apply to --target-compression: the same command again continues a search")
    if distributed.launched_world() > 1:
        p.error("--target-compression runs single-process: start it without torchrun")
    return a.target_compression, a.target_tolerance, a.search_runs


def run_search(cfg: DWFConfig, target: float, tolerance: float, max_runs: int) -> int:
    def report(run):
        print(f"search: lambda {run.lam:.4g}: {run.compression:.1f}x, test accuracy {run.test_acc:.2f}%", flush=True)

    outcome = search(cfg, target, cfg.output_dir, tolerance, max_runs, on_run=report)
    print(f"search for {target:g}x over {len(outcome.runs)} runs in {cfg.output_dir}: {outcome.describe()}")
    best = outcome.best
    with open(os.path.join(best.directory, "results.json")) as f:
        results = json.load(f)
    print(f"\n{summary(results)}\n\nresults: {os.path.join(best.directory, 'results.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg, target = parse_args(argv)
    try:
        if target is not None:
            return run_search(cfg, *target)
        results = run_dwf(cfg)
    except (DatasetMissingError, TrainingDiverged, CheckpointMismatch, ResumeMissing, RankFailure, SearchError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    if results["ranks"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(summary(results))
        print(f"\nresults: {os.path.join(cfg.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
