"""Training DWF to a target compression ratio: the lambda that lands it, found by bisection in log lambda.

The compression a DWF run reaches (weights / nonzeros at |w| < 1e-4, the practical threshold) grows
with the penalty strength lambda, but not smoothly: on a small network it can jump several-fold
between neighbouring lambdas. A search therefore works on runs, not on a model of the curve:

1. Runs below the target (compression < R) and above it (> R) bracket it. Without a run above, the
   next lambda is the largest so far times `expand` (10); without one below, the smallest divided by it.
2. With a bracket (the largest lambda below the target and the smallest larger lambda above it; a
   run that breaks monotonicity narrows the bracket from the side it lands on), the next lambda
   splits it in log lambda: where the line through the two runs in log lambda / log compression
   meets the target, kept within the middle 60% of the bracket (a bisection that leans towards the
   target; the plain midpoint when a run pruned every weight).
3. It stops when a run lands within +-tolerance of R (relative), when the bracket cannot be split at
   4 significant digits, or after `max_runs` runs of this search. In the last two cases it reports
   the two bracketing runs: where compression jumps with lambda, +-10% may be out of reach.

Every run has its own folder under the search folder, lam-<lambda>/, holding what train.py writes
(results.json when it finished, checkpoint.pt after every epoch). Running the same search again
continues it: finished runs are read back, an interrupted one resumes from its checkpoint, and the
runs of a search for one target serve every other target (each run lands somewhere on the curve).
A search folder belongs to one configuration (all of DWFConfig's identity but lambda, recorded in
search.json); another configuration is refused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from .experiment import DWFConfig, run_dwf
from .training import TrainingDiverged, recorded_difference, write_json

SEARCH_FILE = "search.json"
RESULTS = "results.json"


class SearchError(ValueError):
    """A search that cannot go on (the message says why and what to do)."""


@dataclass(frozen=True)
class Run:
    """One finished DWF run of a search: its lambda, and its compression and accuracy at the
    practical threshold (the collapsed model's)."""

    lam: float
    compression: float
    test_acc: float
    directory: str

    def error(self, target: float) -> float:
        """Relative distance of the compression from the target (inf for a fully pruned model)."""
        return abs(self.compression / target - 1.0)


@dataclass(frozen=True)
class Outcome:
    """Where a search ended: `landed` is the run within the tolerance (None if none is); `below` and
    `above` the closest runs on either side of the target; `runs` every run of the folder, by lambda."""

    target: float
    tolerance: float
    landed: Run | None
    below: Run | None
    above: Run | None
    runs: tuple[Run, ...]
    reason: str

    @property
    def best(self) -> Run:
        """The landed run, else the bracketing run closer to the target in log compression."""
        if self.landed is not None:
            return self.landed
        candidates = [r for r in (self.below, self.above) if r is not None]
        return min(candidates, key=lambda r: abs(math.log(r.compression / self.target)))

    def describe(self) -> str:
        if self.landed is not None:
            r = self.landed
            return (
                f"lambda {r.lam:.4g} lands {r.compression:.1f}x (target {self.target:g}x +-{self.tolerance:.0%}): "
                f"test accuracy {r.test_acc:.2f}%"
            )
        sides = ", ".join(
            f"{side} lambda {r.lam:.4g}: {r.compression:.1f}x, {r.test_acc:.2f}%"
            for side, r in (("below", self.below), ("above", self.above))
            if r is not None
        )
        return f"no run within +-{self.tolerance:.0%} of {self.target:g}x ({self.reason}); bracketing runs: {sides}"


def round_lambda(lam: float) -> float:
    """Lambda at 4 significant digits: what a run's folder name holds, exactly."""
    return float(f"{lam:.4g}")


def run_directory(folder: str, lam: float) -> str:
    return os.path.join(folder, f"lam-{round_lambda(lam):.4g}")


def _identity(cfg: DWFConfig) -> dict:
    identity = cfg.identity()
    del identity["lam"]
    return identity


def check_folder(folder: str, cfg: DWFConfig) -> None:
    """Claims `folder` for cfg's configuration, or refuses it when it holds another's runs."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SEARCH_FILE)
    identity = _identity(cfg)
    diff = recorded_difference(path, identity, key="identity")
    if diff:
        raise SearchError(
            f"{folder} holds the runs of another configuration (there vs now: {diff}); "
            "use another output folder, or the configuration recorded in its search.json"
        )
    write_json(path, {"identity": identity})


def finished_runs(folder: str) -> list[Run]:
    """The runs of `folder` that finished (results.json with all epochs done), by lambda."""
    runs = []
    if not os.path.isdir(folder):
        return runs
    for name in os.listdir(folder):
        path = os.path.join(folder, name, RESULTS)
        if not (name.startswith("lam-") and os.path.isfile(path)):
            continue
        with open(path) as f:
            results = json.load(f)
        if results.get("completed"):
            runs.append(_run(results, os.path.join(folder, name)))
    return sorted(runs, key=lambda r: r.lam)


def _run(results: dict, directory: str) -> Run:
    practical = results["practical"]
    return Run(results["config"]["lam"], practical["compression"], practical["test_acc"], directory)


def next_lambda(runs: list[Run], target: float, first: float, expand: float = 10.0) -> float | None:
    """The lambda of the next run (rounded to 4 significant digits); None when the bracket cannot be
    split any more. `runs` holds no run within the tolerance."""
    if not runs:
        return round_lambda(first)
    below = [r.lam for r in runs if r.compression < target]
    above = [r.lam for r in runs if r.compression >= target]
    if not above:
        return round_lambda(max(below) * expand)
    if not below:
        return round_lambda(min(above) / expand)
    lo, hi = _bracket(runs, target)
    if hi.lam < lo.lam:  # every run above the target has a smaller lambda than one below: go up
        return round_lambda(lo.lam * expand)
    # The split point: where the line through the bracket's two runs in (log lambda, log compression)
    # meets the target, kept in the middle 60% of the bracket (so the bracket shrinks by 20% at
    # least, as a plain bisection would by 50%); the midpoint when a run pruned every weight (inf).
    t = 0.5
    if 0.0 < lo.compression and math.isfinite(hi.compression):
        t = math.log(target / lo.compression) / math.log(hi.compression / lo.compression)
        t = min(max(t, 0.2), 0.8)
    mid = round_lambda(math.exp(math.log(lo.lam) + t * math.log(hi.lam / lo.lam)))
    return None if mid in (lo.lam, hi.lam) else mid


def _bracket(runs: list[Run], target: float) -> tuple[Run | None, Run | None]:
    below = [r for r in runs if r.compression < target]
    above = [r for r in runs if r.compression >= target]
    lo = max(below, key=lambda r: r.lam, default=None)
    larger = [r for r in above if lo is None or r.lam > lo.lam]
    hi = min(larger or above, key=lambda r: r.lam, default=None)
    return lo, hi


def search(
    cfg: DWFConfig,
    target: float,
    folder: str,
    tolerance: float = 0.1,
    max_runs: int = 8,
    expand: float = 10.0,
    train: Callable[[DWFConfig], dict] = run_dwf,
    on_run: Callable[[Run], None] | None = None,
) -> Outcome:
    """Finds the lambda whose run lands `target`x compression within +-tolerance, training the runs
    into `folder` (cfg.lam is the first guess; cfg.output_dir and cfg.resume are set per run).

    Runs already finished in `folder` count (and are not trained again); `max_runs` bounds the runs
    this call trains. `train` runs one configuration and returns its results (run_dwf's); `on_run`
    is called with each run this call finishes."""
    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 1.0):
        raise SearchError(f"target must be a compression ratio above 1 (weights per nonzero), got {target!r}")
    if not 0.0 < tolerance < 1.0:
        raise SearchError(f"tolerance must be a fraction in (0, 1), got {tolerance!r}")
    if not (isinstance(max_runs, int) and max_runs >= 1):
        raise SearchError(f"max_runs must be an integer >= 1, got {max_runs!r}")
    if not expand > 1.0:
        raise SearchError(f"expand must be above 1, got {expand!r}")
    if not cfg.lam > 0.0:
        raise SearchError(f"the first lambda (lam) must be above 0, got {cfg.lam!r}")
    check_folder(folder, cfg)
    runs = finished_runs(folder)
    trained = 0
    while True:
        landed = [r for r in runs if r.error(target) <= tolerance]
        if landed:
            reason = "landed"
            break
        lam = next_lambda(runs, target, cfg.lam, expand)
        if lam is None:
            reason = "the bracket cannot be split at 4 significant digits of lambda"
            break
        if trained == max_runs:
            reason = f"{max_runs} runs trained"
            break
        directory = run_directory(folder, lam)
        # An interrupted run of this lambda continues from its checkpoint.
        resume = os.path.isfile(os.path.join(directory, "checkpoint.pt"))
        try:
            results = train(replace(cfg, lam=lam, output_dir=directory, resume=resume, stop_after=None))
        except TrainingDiverged as exc:
            raise SearchError(
                f"the run with lambda {lam:.4g} diverged ({exc}): no compression to search on; "
                "a lower learning rate (lr) may train"
            ) from exc
        run = _run(results, directory)
        trained += 1
        runs = sorted([*runs, run], key=lambda r: r.lam)
        if on_run is not None:
            on_run(run)
    below, above = _bracket(runs, target)
    best = min(landed, key=lambda r: r.error(target)) if landed else None
    return Outcome(target, tolerance, best, below, above, tuple(runs), reason)
