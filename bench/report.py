"""Turns pytest-benchmark JSON from bench/ into markdown tables (and optionally a PNG plot).

    python bench/report.py RESULTS.json [MORE.json ...] [--markdown OUT.md] [--plot OUT.png]

Per case: median and p20/p80 time, GB/s of the bytes the fused algorithm must move, that as a
percentage of the copy bandwidth measured in the same run, and the speedup of every provider
over the eager chain and over torch.compile of it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from collections import defaultdict


def _quantile(data: list[float], q: float) -> float:
    data = sorted(data)
    pos = q * (len(data) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def load(*paths: str) -> tuple[dict, list[dict], float | None]:
    """Rows of one or more runs (e.g. one per mode). Each row keeps the copy bandwidth of its own run
    as copy_gbs; the returned copy bandwidth is the median over the runs that measured one."""
    docs, rows, copies = [], [], []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        docs.append(doc)
        file_rows, copy_gbs = [], None
        for bench in doc["benchmarks"]:
            # GPU rows carry device time per call (CUDA events around back-to-back calls); CPU rows
            # have only pytest-benchmark's host times.
            info = bench["extra_info"]
            data = info.get("device_seconds") or bench["stats"]["data"]
            median = statistics.median(data)
            row = dict(
                info,
                median=median,
                p20=_quantile(data, 0.2),
                p80=_quantile(data, 0.8),
                gbs=info["bytes"] / median / 1e9,
            )
            if info.get("kind") == "copy":
                copy_gbs = row["gbs"]
            file_rows.append(row)
        if copy_gbs is not None:
            copies.append(copy_gbs)
            for row in file_rows:
                row["copy_gbs"] = copy_gbs
        rows += file_rows
    return docs[0], rows, (statistics.median(copies) if copies else None)


_ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
PAGE_FAULT_MB = 32  # glibc serves fresh allocations this large with new mmaps (page faults on first touch)


def fresh_alloc_mb(row: dict) -> float:
    """The largest output one call allocates: w (forward) or the D x N factor gradient (none for the
    fused SGD step, which updates in place)."""
    if row["mode"] == "sgd" and row["provider"] not in ("eager", "compile"):
        return 0.0
    elements = row["n"] * (1 if row["mode"] == "forward" else row["depth"])
    return elements * _ELEMENT_SIZE[row["dtype"]] / 2**20


def kernel_table(rows: list[dict], copy_gbs: float | None) -> str:
    kernels = [r for r in rows if r.get("kind") == "kernel"]
    by_case = defaultdict(dict)
    for r in kernels:
        by_case[(r["dtype"], r["mode"], r["depth"], r["n"])][r["provider"]] = r
    lines = [
        "| dtype | mode | D | N | provider | median ms | p20-p80 ms | GB/s | % copy BW | vs eager | vs compile "
        f"| fresh alloc ≥ {PAGE_FAULT_MB} MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mode_order = {"forward": 0, "backward": 1, "full": 2, "sgd": 3}
    for key in sorted(by_case, key=lambda k: (k[0], mode_order.get(k[1], 9), k[2], k[3])):
        dtype, mode, depth, n = key
        case = by_case[key]
        for provider, r in sorted(case.items(), key=lambda kv: kv[1]["median"]):
            copy = r.get("copy_gbs", copy_gbs)  # the copy bandwidth of the row's own run
            pct = f"{100 * r['gbs'] / copy:.0f}%" if copy else "n/a"
            vs = [f"{case[b]['median'] / r['median']:.2f}x" if b in case else "n/a" for b in ("eager", "compile")]
            faults = "yes" if r.get("device") != "cuda" and fresh_alloc_mb(r) >= PAGE_FAULT_MB else ""
            lines.append(
                f"| {dtype} | {mode} | {depth} | {n} | {provider} | {1e3 * r['median']:.3f} | "
                f"{1e3 * r['p20']:.3f}-{1e3 * r['p80']:.3f} | {r['gbs']:.1f} | {pct} | {vs[0]} | {vs[1]} | {faults} |"
            )
    return "\n".join(lines)


# The GPU goals: D = 4, N >= 2^24, float32 and bfloat16, for the cuda and triton backends.
GOAL_MIN_N = 2**24
GOAL_DEPTH = 4
GOAL_DTYPES = ("float32", "bfloat16")
GOAL_COPY_FRACTION = 0.90  # forward and backward, of the copy bandwidth measured in the same run
GOAL_VS_COMPILE = 1.3  # full (forward + backward + penalty) against torch.compile of the eager chain
# sgd: the fused backward + step against the same backend's backward followed by torch.optim.SGD
# (fused=True on CUDA); traffic (4D+1)N against (7D+1)N elements, a roofline of 1.71x at D = 4.
GOAL_SGD_VS_UNFUSED = 1.5
# Training step with FusedSGD (D = 4, batch 128) over the dense model with torch.optim.SGD.
GOAL_STEP_OVERHEAD = 0.05
GOAL_STEP_MODELS = ("vgg16", "resnet18")


def goal_table(rows: list[dict], copy_gbs: float | None, providers: tuple[str, ...] = ("cuda", "triton")) -> str:
    """Each goal case, its measured figure and whether it meets the goal (no case measured: not shown)."""
    by_case = defaultdict(dict)
    for r in rows:
        if r.get("kind") == "kernel":
            by_case[(r["dtype"], r["mode"], r["depth"], r["n"])][r["provider"]] = r
    lines = ["| goal | dtype | N | provider | measured | met |", "|---|---|---|---|---|---|"]

    def add(goal, dtype, n, provider, measured, met):
        lines.append(f"| {goal} | {dtype} | {n} | {provider} | {measured} | {'yes' if met else 'NO'} |")

    for (dtype, mode, depth, n), case in sorted(by_case.items()):
        if depth != GOAL_DEPTH or n < GOAL_MIN_N or dtype not in GOAL_DTYPES:
            continue
        for provider in providers:
            r = case.get(provider)
            if r is None:
                continue
            copy = r.get("copy_gbs", copy_gbs)
            if mode in ("forward", "backward") and copy:
                fraction = r["gbs"] / copy
                add(
                    f"{mode} ≥ {GOAL_COPY_FRACTION:.0%} of copy BW",
                    dtype,
                    n,
                    provider,
                    f"{fraction:.0%}",
                    fraction >= GOAL_COPY_FRACTION,
                )
            unfused = case.get(f"{provider}-unfused")
            if mode == "sgd" and unfused is not None:
                speedup = unfused["median"] / r["median"]
                add(
                    f"sgd ≥ {GOAL_SGD_VS_UNFUSED}x fused backward + torch.optim.SGD",
                    dtype,
                    n,
                    provider,
                    f"{speedup:.2f}x",
                    speedup >= GOAL_SGD_VS_UNFUSED,
                )
            if mode == "full" and "compile" in case:
                speedup = case["compile"]["median"] / r["median"]
                add(
                    f"full ≥ {GOAL_VS_COMPILE}x torch.compile",
                    dtype,
                    n,
                    provider,
                    f"{speedup:.2f}x",
                    speedup >= GOAL_VS_COMPILE,
                )
        if "cuda" in case and "triton" in case:
            cuda, triton = case["cuda"], case["triton"]
            ratio = cuda["median"] / triton["median"]
            # Slower only where it shows beyond the spread: the two p20-p80 ranges do not overlap.
            tie = ratio > 1.0 and "p20" in cuda and cuda["p20"] <= triton["p80"] and triton["p20"] <= cuda["p80"]
            add(
                f"{mode}: cuda not slower than triton",
                dtype,
                n,
                "cuda",
                f"{ratio:.2f}x triton's time" + (", within the p20-p80 spread" if tie else ""),
                ratio <= 1.0 or tie,
            )
    return "\n".join(lines) if len(lines) > 2 else "No goal case (D=4, N >= 2^24, float32/bfloat16) was measured."


def step_overhead_floor(dense: dict, dwf: dict, copy_gbs: float | None) -> float | None:
    """The least time DWF + FusedSGD must add to the dense step, by the memory roofline: over the
    dense model with torch's fused SGD, each factorized weight costs (D + 1) more elements in the
    forward (D factors read, w written) and (4D + 1) - 5 more in the step (factors and momentum
    buffers read and written, dL/dw read, against the weight, its gradient and its buffer): 5D - 3
    elements (17 at D = 4) of 4 bytes (fp32). The factorized weights: the parameter counts' difference
    over D - 1. Seconds, or None without a copy bandwidth."""
    depth = dwf.get("depth", 0)
    if not copy_gbs or depth < 2 or "weights" not in dense or "weights" not in dwf:
        return None
    factorized = (dwf["weights"] - dense["weights"]) / (depth - 1)
    return (5 * depth - 3) * factorized * 4 / (copy_gbs * 1e9)


def step_goal_table(results: list[dict], copy_gbs: float | None = None) -> str:
    """The training-step goal from bench/train_step.py's results: DWF + FusedSGD over dense, with the
    memory roofline's floor of that overhead (copy_gbs: the copy bandwidth measured on the device)."""
    dense = {r["model"]: r for r in results if r.get("variant") == "dense" and "median_ms" in r}
    lines = [
        "| goal | model | dense ms | DWF + FusedSGD ms | overhead | roofline floor of the overhead | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("variant") != "dwf-fused-sgd" or r["model"] not in dense or "median_ms" not in r:
            continue
        base = dense[r["model"]]
        overhead = r["median_ms"] / base["median_ms"] - 1
        floor = step_overhead_floor(base, r, copy_gbs)
        floor_text = "" if floor is None else f"{1e5 * floor / base['median_ms']:+.1f}% ({1e3 * floor:.2f} ms)"
        judged = r["model"] in GOAL_STEP_MODELS
        met = ("yes" if overhead <= GOAL_STEP_OVERHEAD else "NO") if judged else "reported"
        lines.append(
            f"| step overhead ≤ {GOAL_STEP_OVERHEAD:.0%}{' (CUDA graph)' if r.get('graph') else ''} | {r['model']} | "
            f"{base['median_ms']:.2f} | {r['median_ms']:.2f} | {100 * overhead:+.1f}% | {floor_text} | {met} |"
        )
    return "\n".join(lines) if len(lines) > 2 else "No training-step pair (dense, dwf-fused-sgd) was measured."


def tests_goal_table(paths: list[str]) -> str:
    """The goal that every CUDA and Triton test passes on the device, from pytest's summary lines
    (bench/gpu_check.sh's tests-<family>.summary: the final line, then any FAILED/ERROR lines)."""
    lines = ["| goal | tests | result | met |", "|---|---|---|---|"]
    for path in paths:
        family = os.path.basename(path).removeprefix("tests-").removesuffix(".summary")
        with open(path) as f:
            summary = [line.strip() for line in f if line.strip()]
        result = summary[0] if summary else "no result (the run was cut off)"
        # Green only on pytest's own final line ("N passed[, ...] in 12.3s") without failures or
        # errors: a run cut off before it (a progress count, no duration) is not.
        final = re.search(r"\b\d+ passed\b.* in \d+(\.\d+)?s\b", result)
        green = bool(final) and not any(w in result for w in (" failed", " error"))
        lines.append(f"| every {family} test passes on the device | {family} | {result} | {'yes' if green else 'NO'} |")
    return "\n".join(lines)


def load_step_results(path: str) -> list[dict]:
    """bench/train_step.py output: its --json document, or the JSON lines it appends case by case."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)["results"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def header(doc: dict, rows: list[dict], copy_gbs: float | None) -> str:
    first = next((r for r in rows if "device_name" in r), {})
    machine = doc.get("machine_info", {})
    return "\n".join(
        [
            f"Device: {first.get('device_name', '?')}; torch {first.get('torch', '?')}; "
            f"triton {first.get('triton', '?')}; python {machine.get('python_version', '?')}; "
            f"date {doc.get('datetime', '?')[:10]}.",
            _copy_line(rows, copy_gbs),
            "GB/s counts the bytes the fused algorithm must move: (D+1)N elements forward, (2D+1)N backward, "
            "(3D+2)N full, (4D+1)N sgd (backward + SGD-momentum update; the backends' fused step updates "
            "in place, eager and compile take torch.optim.SGD's step after their backward). Each call "
            "allocates its outputs (w, and the D x N factor gradient); on CPU "
            f"a fresh allocation of {PAGE_FAULT_MB} MB or more is an mmap whose page faults are inside the figure "
            "(last column).",
        ]
    )


def _copy_line(rows: list[dict], copy_gbs: float | None) -> str:
    if not copy_gbs:
        return "No copy baseline in this run."
    copies = sorted(r["gbs"] for r in rows if r.get("kind") == "copy")
    text = f"Copy bandwidth measured in the same run (256 MB preallocated, read + write): {copy_gbs:.1f} GB/s"
    if len(copies) > 1:
        text += (
            f" (median of {len(copies)} runs, {copies[0]:.1f}-{copies[-1]:.1f}; each row's % is of its own run's copy)"
        )
    return text + "."


def plot(rows: list[dict], path: str) -> None:
    """GB/s against N: a panel per (dtype, mode), a colour per provider, a line style per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = [r for r in rows if r.get("kind") == "kernel"]
    dtypes = sorted({r["dtype"] for r in kernels})
    modes = [m for m in ("forward", "backward", "full", "sgd") if any(r["mode"] == m for r in kernels)]
    providers = sorted({r["provider"] for r in kernels})
    depths = sorted({r["depth"] for r in kernels})
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    styles = {d: s for d, s in zip(depths, ["-", "--", "-.", ":", (0, (1, 3))] * 4, strict=False)}
    fig, axes = plt.subplots(len(dtypes), len(modes), figsize=(4.5 * len(modes), 3.2 * len(dtypes)), squeeze=False)
    for row, dtype in enumerate(dtypes):
        for col, mode in enumerate(modes):
            ax = axes[row][col]
            series = defaultdict(list)
            for r in kernels:
                if r["mode"] == mode and r["dtype"] == dtype:
                    series[(r["provider"], r["depth"])].append((r["n"], r["gbs"]))
            for (provider, depth), pts in sorted(series.items()):
                pts.sort()
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    color=colors[provider],
                    linestyle=styles[depth],
                    marker="o",
                    markersize=3,
                )
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode}, {dtype}", fontsize=9)
            ax.set_xlabel("N (weights)", fontsize=8)
            ax.set_ylabel("GB/s", fontsize=8)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[p], label=p) for p in providers]
    handles += [plt.Line2D([], [], color="gray", linestyle=styles[d], label=f"D={d}") for d in depths]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="pytest-benchmark JSON (several runs are merged)")
    parser.add_argument("--markdown", help="also write the report to this file")
    parser.add_argument("--plot", help="write a PNG plot of GB/s against N")
    parser.add_argument("--goals", help="write the GPU goals, measured and met or not, here")
    parser.add_argument(
        "--tests", action="append", help="a pytest summary (tests-<family>.summary) to judge the tests goal by"
    )
    parser.add_argument(
        "--train-step",
        action="append",
        help="bench/train_step.py results to judge the training-step goal by (repeatable: eager, CUDA graph)",
    )
    args = parser.parse_args()
    doc, rows, copy_gbs = load(*args.results)
    text = header(doc, rows, copy_gbs) + "\n\n" + kernel_table(rows, copy_gbs) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot:
        plot(rows, args.plot)
    if args.goals:
        goals = goal_table(rows, copy_gbs)
        if args.train_step:
            for path in args.train_step:
                goals += "\n\n" + step_goal_table(load_step_results(path), copy_gbs)
        if args.tests:
            goals += "\n\n" + tests_goal_table(args.tests)
        print(goals)
        with open(args.goals, "w") as f:
            f.write(header(doc, rows, copy_gbs).split("\n")[0] + "\n\n" + goals + "\n")


if __name__ == "__main__":
    main()
