"""The sweep's results: its CSV (typed rows, appended run by run and flushed to disk), the summary
table and the accuracy-against-compression plot. python/sweep.py runs the sweep."""

from __future__ import annotations

import csv
import math
import os

FIELDS = [
    "method",
    "depth",
    "lam",
    "threshold",
    "target_compression",
    "compression",
    "test_acc",
    "seconds",
    "status",  # "ok", or "diverged" (NaN/Inf loss or weights: no accuracy, no compression)
]


def row_key(row: dict) -> tuple:
    if row["method"] in ("dense", "dwf"):
        return (row["method"], int(row["depth"]), float(row["lam"]))
    return (row["method"], float(row["target_compression"]))


def _number(text: str):
    return float(text) if text not in ("", None) else ""


def read_rows(path: str) -> list[dict]:
    """The rows of a sweep CSV, typed (files written before the status column count as "ok")."""
    with open(path, newline="") as f:
        return [
            dict(
                method=r["method"],
                depth=int(r["depth"]),
                lam=_number(r["lam"]),
                threshold=_number(r["threshold"]),
                target_compression=_number(r["target_compression"]),
                compression=_number(r["compression"]),
                test_acc=_number(r["test_acc"]),
                seconds=_number(r["seconds"]),
                status=r.get("status") or "ok",
            )
            for r in csv.DictReader(f)
        ]


class RowWriter:
    """Appends each finished run's rows to the CSV at once, flushed to disk: a killed sweep keeps
    every run it finished."""

    def __init__(self, path: str, rows: list[dict]) -> None:
        self.path = path
        header_ok = False
        if os.path.exists(path):
            with open(path, newline="") as f:
                header_ok = next(csv.reader(f), None) == FIELDS
        if not header_ok:  # a new file, or one from before the status column: rewrite it whole
            tmp = path + ".tmp"
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerows(rows)
            f.flush()
            os.fsync(f.fileno())


def summary_table(rows: list[dict], ratios: list[float], threshold: float) -> str:
    """Best test accuracy at each compression ratio: DWF runs reaching at least that ratio (at
    `threshold`), baselines pruned to exactly it."""
    series = sorted(
        {(r["method"], r["depth"]) for r in rows if r["method"] != "dense"}, key=lambda k: (k[0] != "dwf", k[0], k[1])
    )
    rows = [r for r in rows if r["status"] == "ok"]  # a diverged run reaches no ratio
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

    rows = [r for r in rows if r["status"] == "ok"]
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
