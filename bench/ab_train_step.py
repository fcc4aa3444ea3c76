"""Interleaved A/B timing of the FusedSGD training step between two source trees of dwf_kernels.

    git worktree add /tmp/base <commit>   # and copy dwf_kernels/_C*.so and _build_info.py into it
    python bench/ab_train_step.py --trees /tmp/base,. --models lenet300,lenet5 --rounds 400

Two versions of the package cannot share one process (both register the same torch ops), so each
tree runs in its own worker process; the workers take turns step by step (one waits while the
other runs), so both see the same machine state, and each times its own steps. One step is
bench/train_step.py's: forward + backward + FusedSGD step (momentum 0.9) at batch 128, D=4, DWF
penalty. Prints per tree the median and p20/p80 step time, the ratio to the first tree, and the
worker's peak RSS after the same number of steps. The process CPU time of each step is printed too:
on a loaded machine it is steadier than wall time (run with OMP_NUM_THREADS=1 to compare it
fairly).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODELS = {"lenet300": ((1, 28, 28), 10), "lenet5": ((1, 28, 28), 10), "vgg16": ((3, 32, 32), 10)}


def worker(model_name: str, depth: int, batch: int, zero_grad: str) -> None:
    """Reads a step count per line from stdin; answers with the seconds of each step as JSON."""
    import torch
    from paper.models import build_model

    import dwf_kernels

    torch.manual_seed(0)
    in_shape, classes = MODELS[model_name]
    model = dwf_kernels.factorize(build_model(model_name, in_shape, classes), depth).train()
    optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *in_shape)
    y = torch.randint(0, classes, (batch,))

    def step():
        if zero_grad == "model":
            model.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=zero_grad != "keep")
        loss = torch.nn.functional.cross_entropy(model(x), y) + dwf_kernels.penalty(model, 1e-4)
        loss.backward()
        optimizer.step()

    print(json.dumps({"package": dwf_kernels.__file__}), flush=True)
    for line in sys.stdin:
        times, cpu_times = [], []
        for _ in range(int(line)):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"times": times, "cpu_times": cpu_times, "peak_mb": peak_mb}), flush=True)


def _quantile(data: list[float], q: float) -> float:
    data = sorted(data)
    pos = q * (len(data) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trees", default="", help="comma-separated source trees; the first is the baseline")
    p.add_argument("--models", default="lenet300,lenet5")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=400, help="timed steps per tree, taken in turns")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--zero-grad", default="none", choices=("none", "keep", "model"))
    p.add_argument("--worker", nargs=1, metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.depth, args.batch, args.zero_grad)
        return 0
    if not args.trees:
        p.error("--trees is required")
    trees = [os.path.abspath(t) for t in args.trees.split(",")]
    for model in args.models.split(","):
        procs = []
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.path.join(tree, "python")]))
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, "--depth", str(args.depth)]
            cmd += ["--batch", str(args.batch), "--zero-grad", args.zero_grad]
            procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        packages = [json.loads(proc.stdout.readline())["package"] for proc in procs]

        def run(proc, steps):
            proc.stdin.write(f"{steps}\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        for proc in procs:
            run(proc, args.warmup)
        times: list[list[float]] = [[] for _ in procs]
        cpu_times: list[list[float]] = [[] for _ in procs]
        peaks = [0.0 for _ in procs]
        for _ in range(args.rounds):
            for i, proc in enumerate(procs):
                out = run(proc, 1)
                times[i] += out["times"]
                cpu_times[i] += out["cpu_times"]
                peaks[i] = out["peak_mb"]
        for proc in procs:
            proc.stdin.close()
            proc.wait()
        base, cpu_base = statistics.median(times[0]), statistics.median(cpu_times[0])
        for tree, package, t, c, peak in zip(trees, packages, times, cpu_times, peaks, strict=True):
            med, cpu_med = statistics.median(t), statistics.median(c)
            print(
                f"{model:>9} {tree}: {1e3 * med:.3f} ms median (p20 {1e3 * _quantile(t, 0.2):.3f}, "
                f"p80 {1e3 * _quantile(t, 0.8):.3f}) of {len(t)} interleaved steps, {med / base:.3f}x the "
                f"first; CPU time {1e3 * cpu_med:.3f} ms median, {cpu_med / cpu_base:.3f}x the first; "
                f"peak RSS {peak:.0f} MB [{os.path.dirname(package)}]",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
