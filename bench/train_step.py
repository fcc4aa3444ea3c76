"""End-to-end training-step timings: dense vs DWF with the reference backend vs DWF fused.

    python bench/train_step.py --json bench/results/cpu-train-step.json --markdown bench/results/cpu-train-step.md

One step = forward + backward + SGD-with-momentum update at batch 128, for LeNet-300-100 and
LeNet-5 (MNIST shapes), VGG-16 and ResNet-18 (CIFAR shapes). DWF adds its penalty (from the fused
forward, or from the reference's autograd); dense uses weight decay. Variants: dense; DWF on the
reference backend; DWF fused (fused op, torch.optim.SGD); DWF fused + dwf_kernels.optim.FusedSGD
(the backward fused into the update). On a GPU the dense and torch.optim.SGD variants use
torch.optim.SGD(fused=True), its fastest form, and each step is timed on the device between CUDA
events (steps run back to back, one synchronization at the end); on CPU each step is timed on the
host. Each (model, variant) runs in a fresh process so its peak memory is its own: CUDA
max_memory_allocated on a GPU, the process's peak RSS on CPU. Reports median and p20/p80 step time
and the DWF overhead over dense. With --jsonl every case's result (or error) is appended to that
file as it finishes, and a failing case does not stop the others. With --clip MAX_NORM every
variant clips by the global gradient norm (torch.nn.utils.clip_grad_norm_) before its step, which
FusedSGD answers from dL/dw without forming the factor gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from providers import versions  # beside this file, first on a script's sys.path

# The paper's models (python/paper), for the per-case processes, which get it on PYTHONPATH.
PYTHON_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")

MODELS = {
    "lenet300": ((1, 28, 28), 10),
    "lenet5": ((1, 28, 28), 10),
    "vgg16": ((3, 32, 32), 10),
    "resnet18": ((3, 32, 32), 10),
}
VARIANTS = ("dense", "dwf-reference", "dwf-fused", "dwf-fused-sgd")


def _quantile(data, q):
    data = sorted(data)
    pos = q * (len(data) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def run_case(
    model_name: str,
    variant: str,
    depth: int,
    batch: int,
    rounds: int,
    warmup: int,
    device: str,
    clip: float | None,
    graph: bool = False,
) -> dict:
    import torch
    from paper.models import build_model

    import dwf_kernels

    torch.manual_seed(0)
    in_shape, classes = MODELS[model_name]
    model = build_model(model_name, in_shape, classes)
    if variant != "dense":
        dwf_kernels.factorize(model, depth)
    model.to(device).train()
    lam = 1e-4
    # dwf-fused-sgd: the fused layers plus FusedSGD, whose step runs the DWF backward fused with the update.
    options = {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4 if variant == "dense" else 0.0}
    if variant == "dwf-fused-sgd":
        optimizer = dwf_kernels.optim.FusedSGD(model.parameters(), **options)
    else:
        optimizer = torch.optim.SGD(model.parameters(), **options, fused=True if device.startswith("cuda") else None)
    x = torch.randn(batch, *in_shape, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    backend = "reference" if variant == "dwf-reference" else None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(zero_grad=True):
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if variant != "dense":
            loss = loss + dwf_kernels.penalty(model, lam)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    with dwf_kernels.use_backend(backend):
        if graph:
            # The whole step (forward, backward, optimizer step) as one CUDA graph, replayed: device
            # time without the host's per-kernel launch cost (torch's whole-network capture pattern).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(warmup, 3)):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            optimizer.zero_grad(set_to_none=True)
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                step(zero_grad=False)
            step = captured.replay  # noqa: F811
            for _ in range(warmup):
                step()
        else:
            for _ in range(warmup):
                step()
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        if device.startswith("cuda"):
            event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
            events = [(event(), event()) for _ in range(rounds)]
            for start, end in events:
                start.record()
                step()
                end.record()
            sync()
            times = [start.elapsed_time(end) / 1e3 for start, end in events]
        else:
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak_mb, peak_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        peak_mb, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
    return {
        "model": model_name,
        "variant": variant,
        "depth": depth,
        "batch": batch,
        "device": device,
        "backend": "reference" if backend else dwf_kernels.available_backends(device)[0] if variant != "dense" else "",
        "median_ms": 1e3 * statistics.median(times),
        "p20_ms": 1e3 * _quantile(times, 0.2),
        "p80_ms": 1e3 * _quantile(times, 0.8),
        "rounds": rounds,
        "peak_mb": peak_mb,
        "peak_kind": peak_kind,
        "weights": sum(p.numel() for p in model.parameters()),
        "clip": clip,
        "graph": graph,
    }


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "Training step (forward + backward + "
        + (f"clip_grad_norm_({meta['clip']:g}) + " if meta.get("clip") is not None else "")
        + f"SGD momentum){', replayed as one CUDA graph' if meta.get('graph') else ''}, batch {meta['batch']}, "
        f"D={meta['depth']}; "
        f"device {meta['device_name']}; torch {meta['torch']}; triton {meta['triton']}; {meta['date']}. "
        f"Peak memory: {results[0]['peak_kind']} of a fresh process per row.",
        "",
        "| model | variant | median ms | p20-p80 ms | overhead vs dense | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    dense = {r["model"]: r["median_ms"] for r in results if r["variant"] == "dense"}
    for r in results:
        overhead = (
            f"{100 * (r['median_ms'] / dense[r['model']] - 1):+.0f}%"
            if r["model"] in dense and r["variant"] != "dense"
            else ""
        )
        name = r["variant"] + (f" ({r['backend']})" if r["variant"].startswith("dwf-fused") else "")
        lines.append(
            f"| {r['model']} | {name} | {r['median_ms']:.2f} | {r['p20_ms']:.2f}-{r['p80_ms']:.2f} | "
            f"{overhead} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=0, help="timed steps (default: 50 for LeNets, 10 for CNNs on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--clip", type=float, default=None, metavar="MAX_NORM", help="clip_grad_norm_ before each step")
    p.add_argument("--graph", action="store_true", help="CUDA only: time replays of the whole step as one CUDA graph")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--jsonl", help="append each case's result (or error) here as it finishes")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--case", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.graph and not device.startswith("cuda"):
        p.error(f"--graph needs a CUDA device; the device is {device}")
    if args.case:
        model, variant = args.case
        rounds = args.rounds or (50 if model.startswith("lenet") or device.startswith("cuda") else 10)
        result = run_case(model, variant, args.depth, args.batch, rounds, args.warmup, device, args.clip, args.graph)
        print(json.dumps(result))
        return 0
    results, failed = [], []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--case",
                model,
                variant,
                "--depth",
                str(args.depth),
                "--batch",
                str(args.batch),
                "--rounds",
                str(args.rounds),
                "--warmup",
                str(args.warmup),
                "--device",
                device,
                *(["--clip", str(args.clip)] if args.clip is not None else []),
                *(["--graph"] if args.graph else []),
            ]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PYTHON_DIR, os.environ.get("PYTHONPATH")])))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                print(f"{model:>9} {variant:>14}: FAILED: {error}", flush=True)
                failed.append({"model": model, "variant": variant, "error": error})
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(failed[-1]) + "\n")
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
            print(
                f"{model:>9} {variant:>14}: {r['median_ms']:.2f} ms (p20 {r['p20_ms']:.2f}, p80 {r['p80_ms']:.2f}), "
                f"peak {r['peak_mb']:.0f} MB",
                flush=True,
            )
    meta = {
        "device": device,
        "device_name": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu {platform.machine()}, {torch.get_num_threads()} threads",
        **versions(),
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.batch,
        "depth": args.depth,
        "clip": args.clip,
        "graph": args.graph,
    }
    text = markdown(results, meta) if results else "No case finished.\n"
    for case in failed:
        text += f"\n{case['model']} {case['variant']}: FAILED: {case['error']}\n"
    print("\n" + text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "failed": failed}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
