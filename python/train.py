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

Writes results.json, checkpoint.pt (every epoch) and model.dwfz (the model collapsed at |w| < 1e-4,
its nonzeros only: dwf_kernels.load_compressed) into --output-dir; --resume continues an
interrupted run exactly. A bad argument exits with status 2, a run that cannot be done (missing
dataset, training diverged to NaN/Inf, --resume without a matching checkpoint) with status 1;
either way with one line on stderr.
"""

from __future__ import annotations

import os
import sys

# `paper` is found beside this file: Python puts a script's directory first on sys.path.
from paper import distributed
from paper.cli import ArgumentParser
from paper.data import DATASETS, DatasetMissingError
from paper.distributed import RankFailure
from paper.experiment import ConfigError, DWFConfig, run_dwf, summary
from paper.models import MODELS
from paper.training import CHECKPOINT, CheckpointMismatch, ResumeMissing, TrainingDiverged

import dwf_kernels


def parse_args(argv: list[str] | None = None) -> DWFConfig:
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
    p.add_argument("--output-dir", default="runs/train", help="results.json and checkpoint.pt go here")
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
    a = p.parse_args(argv)
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
    if not cfg.resume and distributed.restarted() and os.path.exists(os.path.join(a.output_dir, CHECKPOINT)):
        # torchrun restarted the workers after a failure (--max-restarts): continue, do not start over.
        cfg.resume = True
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: the workers were restarted: resuming from {a.output_dir}/{CHECKPOINT}", file=sys.stderr)
    try:
        cfg.check()
    except ConfigError as exc:
        p.error(f"--{exc.field.replace('_', '-')} {exc.expectation}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        results = run_dwf(cfg)
    except (DatasetMissingError, TrainingDiverged, CheckpointMismatch, ResumeMissing, RankFailure) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    if results["ranks"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(summary(results))
        print(f"\nresults: {os.path.join(cfg.output_dir, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
