"""Evaluate a compressed model file (dwf_kernels.save_compressed) on a dataset, dense or sparse.

    python python/evaluate.py runs/train/model.dwfz              # model and dataset from results.json beside it
    python python/evaluate.py model.dwfz --model lenet300 --dataset mnist5k --sparse

Loads the file into the plain torch.nn model of the architecture (names, shapes and dtypes checked),
prints the test accuracy, and with --sparse converts the Linear and Conv layers that are measured
faster sparse (dwf_kernels.sparsify at the evaluation batch size), prints each layer's decision and the
accuracy again. Exit status 1 with one line on stderr for a missing, corrupt or mismatched file.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from paper.cli import ArgumentParser  # paper/ is beside this script, first on its sys.path
from paper.data import DATASETS, DatasetMissingError, load_data
from paper.models import MODELS, build_model
from paper.training import evaluate

import dwf_kernels
from dwf_kernels.sparse import sparsify


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    p.add_argument("file", help="a compressed model file (train.py writes model.dwfz)")
    p.add_argument("--model", choices=MODELS, default=None, help="default: from results.json beside the file")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: from results.json beside the file")
    p.add_argument("--data-root", default="data")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--sparse", action="store_true", help="also run it with sparse Linear/Conv layers where faster")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"--batch-size must be a positive int; got {a.batch_size}")
    model_name, dataset = a.model, a.dataset
    if not os.path.isfile(a.file):
        print(f"evaluate.py: error: no such file: {a.file}", file=sys.stderr)
        return 1
    beside = os.path.join(os.path.dirname(os.path.abspath(a.file)), "results.json")
    if (model_name is None or dataset is None) and os.path.exists(beside):
        with open(beside) as f:
            config = json.load(f)["config"]
        model_name, dataset = model_name or config["model"], dataset or config["dataset"]
    if model_name is None or dataset is None:
        p.error("--model and --dataset are needed (no results.json beside the file)")
    try:
        data = load_data(dataset, batch_size=a.batch_size, seed=0, data_root=a.data_root, augment=False)
        model = build_model(model_name, data.in_shape, data.num_classes)
        dwf_kernels.load_compressed_into(model, a.file)
    except (OSError, DatasetMissingError, dwf_kernels.CompressedFileError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 1
    model.eval()
    with torch.no_grad():
        print(f"{model_name} on {dataset} from {a.file}: test accuracy {evaluate(model, data):.2f}% (dense)")
        if a.sparse:
            x, _ = next(iter(data.test_batches()))
            decisions: list = []
            sparsify(model, x, report=decisions)
            for d in decisions:
                timed = (
                    ""
                    if d.speedup is None
                    else f", dense {1e6 * d.dense_seconds:.1f} us, sparse {1e6 * d.sparse_seconds:.1f} us"
                )
                why = "" if d.replaced else f" ({d.reason})"
                chosen = "sparse" if d.replaced else "dense"
                print(f"  {d.name} ({d.kind}): {d.nnz} of {d.numel} weights{timed} -> {chosen}{why}")
            print(f"test accuracy {evaluate(model, data):.2f}% (sparse where faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
