"""Interleaved A/B timing of providers on one case: the fairest ratio on a noisy machine.

    python bench/ab.py --providers cpu,compile --mode full --depth 4 --n 1572864 --rounds 200
    python bench/ab.py --providers cpu,cpu-unfused,compile --mode sgd

pytest-benchmark times cases one after another, so drift of the machine's state between two
cases (other load, page-cache and allocator state) lands in their ratio. Here the providers
alternate call by call in one process; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from providers import MODES, make_case  # beside this file, first on a script's sys.path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", default="cpu,compile")
    p.add_argument("--mode", default="full", choices=MODES)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n", type=int, default=3 * 2**19)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    factors = (0.5 + torch.rand(args.depth, args.n, device=device)).to(getattr(torch, args.dtype))
    cases = {name: make_case(name, args.mode, factors) for name in args.providers.split(",")}
    for fn in cases.values():
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    slowest = max(medians.values())
    for name, ms in medians.items():
        print(f"{name:>10}: {ms:.3f} ms median of {args.rounds} interleaved rounds; {slowest / ms:.2f}x vs slowest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
