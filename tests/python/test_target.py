"""Training to a target compression: the lambda search (paper/target.py) and train.py --target-compression."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from paper import target
from paper.experiment import DWFConfig
from paper.target import SearchError, search
from paper.training import TrainingDiverged

TRAIN_PY = os.path.join(os.path.dirname(__file__), "..", "..", "python", "train.py")


class Curve:
    """Stands in for run_dwf: a run's compression is curve(lambda); it writes results.json as
    run_dwf does and records what it was asked to train."""

    def __init__(self, curve, stop_at=None, diverge_at=None):
        self.curve, self.stop_at, self.diverge_at = curve, stop_at, diverge_at
        self.trained: list[DWFConfig] = []

    def __call__(self, cfg: DWFConfig) -> dict:
        if self.stop_at is not None and len(self.trained) == self.stop_at:
            raise KeyboardInterrupt  # the search is killed while this run trains
        if self.diverge_at is not None and cfg.lam >= self.diverge_at:
            raise TrainingDiverged("the loss became nan in epoch 3")
        self.trained.append(cfg)
        compression = self.curve(cfg.lam)
        results = {
            "config": {"lam": cfg.lam},
            "completed": True,
            "practical": {"compression": compression, "test_acc": 90.0 - math.log10(min(compression, 1e6))},
        }
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
            json.dump(results, f)
        return results


def smooth(lam):  # compression grows as lambda^2: 1x at 1e-3, 100x at 1e-2
    return max(1.0, (lam / 1e-3) ** 2)


def _cfg(**overrides):
    return DWFConfig(**{"lam": 3e-3, "epochs": 5, "progress": False, **overrides})


def test_lands_the_target_within_the_tolerance(tmp_path):
    train = Curve(smooth)
    outcome = search(_cfg(), 300.0, str(tmp_path), train=train)
    assert outcome.landed is not None and abs(outcome.landed.compression / 300.0 - 1) <= 0.1
    assert outcome.best is outcome.landed and outcome.reason == "landed"
    # The first run is the first guess, then it brackets (x10) and splits the bracket.
    assert [c.lam for c in train.trained][:2] == [3e-3, 3e-2]
    assert len(train.trained) <= 5
    for cfg in train.trained:  # each run in its own folder, trained from scratch, to the end
        assert cfg.output_dir == os.path.join(str(tmp_path), f"lam-{cfg.lam:.4g}")
        assert not cfg.resume and cfg.stop_after is None and cfg.epochs == 5
        assert target.round_lambda(cfg.lam) == cfg.lam
    assert [r.lam for r in outcome.runs] == sorted(c.lam for c in train.trained)
    assert "lands" in outcome.describe() and "300x" in outcome.describe()


def test_goes_down_when_the_first_guess_is_above_the_target(tmp_path):
    train = Curve(smooth)
    outcome = search(_cfg(lam=0.5), 30.0, str(tmp_path), train=train)
    assert [c.lam for c in train.trained][:2] == [0.5, 0.05]
    assert outcome.landed is not None and abs(outcome.landed.compression / 30.0 - 1) <= 0.1


def test_a_jump_past_the_tolerance_reports_the_bracketing_runs(tmp_path):
    train = Curve(lambda lam: 5.0 if lam < 0.0123 else 900.0)
    outcome = search(_cfg(), 100.0, str(tmp_path), train=train, max_runs=40)
    assert outcome.landed is None and "cannot be split" in outcome.reason
    assert outcome.below.compression == 5.0 and outcome.above.compression == 900.0
    # Adjacent at 4 significant digits, either side of the jump.
    assert outcome.below.lam < 0.0123 <= outcome.above.lam and outcome.above.lam - outcome.below.lam <= 1.001e-5
    assert outcome.best is outcome.above  # 900x is closer to 100x than 5x in log ratio
    assert "no run within" in outcome.describe() and "bracketing runs" in outcome.describe()


def test_stops_after_max_runs(tmp_path):
    train = Curve(lambda lam: 5.0 if lam < 0.0123 else 900.0)
    outcome = search(_cfg(), 100.0, str(tmp_path), train=train, max_runs=3)
    assert len(train.trained) == 3 and outcome.reason == "3 runs trained" and outcome.landed is None
    assert outcome.below is not None and outcome.above is not None


def test_a_killed_search_continues_where_it_stopped(tmp_path):
    whole = Curve(smooth)
    expected = search(_cfg(), 300.0, str(tmp_path / "whole"), train=whole)
    killed = Curve(smooth, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        search(_cfg(), 300.0, str(tmp_path / "parts"), train=killed)
    again = Curve(smooth)
    outcome = search(_cfg(), 300.0, str(tmp_path / "parts"), train=again)
    # The two finished runs are read back, not trained again; the lambdas are those of one search.
    assert [c.lam for c in killed.trained + again.trained] == [c.lam for c in whole.trained]
    assert outcome.landed.lam == expected.landed.lam


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    directory = tmp_path / "lam-0.003"
    directory.mkdir()
    (directory / "checkpoint.pt").write_bytes(b"")  # an unfinished run of the first lambda
    train = Curve(smooth)
    search(_cfg(), 300.0, str(tmp_path), train=train)
    assert train.trained[0].lam == 3e-3 and train.trained[0].resume
    assert not any(c.resume for c in train.trained[1:])


def test_runs_are_shared_between_targets(tmp_path):
    train = Curve(smooth)
    first = search(_cfg(), 300.0, str(tmp_path), train=train)
    trained = len(train.trained)
    # A target that one of the runs already lands needs no new run.
    landed = next(r for r in first.runs if r is not first.landed)
    again = search(_cfg(), landed.compression, str(tmp_path), train=train)
    assert len(train.trained) == trained and again.landed == landed
    # Another target starts from the runs there: its bracket is already known.
    search(_cfg(), 30.0, str(tmp_path), train=train)
    assert len(train.trained) - trained <= 3


def test_a_run_against_the_trend_is_passed_over(tmp_path):
    # Noisy compression: the run at 0.01 lands above the target, the one at 0.015 below it.
    def noisy(lam):
        return 500.0 if math.isclose(lam, 0.01) else smooth(lam)

    train = Curve(noisy)
    for lam in (0.01, 0.015):  # the runs already in the folder
        train(_cfg(lam=lam, output_dir=target.run_directory(str(tmp_path), lam)))
    outcome = search(_cfg(lam=0.01), 300.0, str(tmp_path), train=train)
    # No run above the target has a larger lambda than the largest below (0.015): it goes up from
    # there, then splits [0.015, 0.15], where smooth() crosses 300x (at 0.0173).
    assert train.trained[2].lam == 0.15
    assert outcome.landed is not None and 0.015 < outcome.landed.lam < 0.15


def test_a_fully_pruned_run_is_above_every_target(tmp_path):
    train = Curve(lambda lam: math.inf if lam >= 0.03 else smooth(lam))
    outcome = search(_cfg(), 300.0, str(tmp_path), train=train)
    # 0.003 (9x) and 0.03 (inf) bracket 300x: the midpoint in log lambda comes next.
    assert train.trained[2].lam == target.round_lambda(math.sqrt(3e-3 * 3e-2))
    assert outcome.landed is not None


def test_refuses_a_folder_of_another_configuration(tmp_path):
    search(_cfg(), 300.0, str(tmp_path), train=Curve(smooth))
    with pytest.raises(SearchError, match=r"another configuration .*'depth': \(4, 3\)"):
        search(_cfg(depth=3), 300.0, str(tmp_path), train=Curve(smooth))
    search(_cfg(lam=1e-2), 100.0, str(tmp_path), train=Curve(smooth))  # lambda is the searched value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": 1.0}, "target must be a compression ratio above 1"),
        ({"target": math.nan}, "target must be"),
        ({"tolerance": 0.0}, r"tolerance must be a fraction in \(0, 1\)"),
        ({"max_runs": 0}, "max_runs must be an integer >= 1"),
        ({"expand": 1.0}, "expand must be above 1"),
        ({"cfg": _cfg(lam=0.0)}, "the first lambda"),
    ],
)
def test_bad_arguments_are_refused_before_any_run(tmp_path, kwargs, message):
    args = {"cfg": _cfg(), "target": 100.0, "folder": str(tmp_path / "s"), "train": Curve(smooth), **kwargs}
    with pytest.raises(SearchError, match=message):
        search(**args)
    assert not (tmp_path / "s").exists() and not args["train"].trained


def test_a_diverged_run_stops_the_search_naming_its_lambda(tmp_path):
    with pytest.raises(SearchError, match=r"lambda 0.03 diverged .*the loss became nan.*lower learning rate"):
        search(_cfg(), 300.0, str(tmp_path), train=Curve(smooth, diverge_at=0.01))


def _train_py(*args, cwd):
    return subprocess.run(
        [sys.executable, TRAIN_PY, *args], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


def test_train_py_searches_and_continues(tmp_path):
    """Real runs (3 epochs each): the command prints every run and the lambda found; the same
    command again reads the runs back and trains none."""
    args = ["--target-compression", "20", "--epochs", "3", "--search-runs", "3", "--no-progress"]
    first = _train_py(*args, "--output-dir", "s", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = [line for line in first.stdout.splitlines() if line.startswith("search: lambda")]
    assert 1 <= len(runs) <= 3 and runs[0].startswith("search: lambda 0.003:")
    assert f"search for 20x over {len(runs)} runs in s: " in first.stdout
    assert "lenet300 on mnist5k, D=4" in first.stdout and "results: s/lam-" in first.stdout
    folders = sorted(p.name for p in (tmp_path / "s").iterdir() if p.name.startswith("lam-"))
    assert len(folders) == len(runs)
    assert all((tmp_path / "s" / f / "results.json").is_file() for f in folders)
    again = _train_py(*args, "--output-dir", "s", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    if "lands" in first.stdout:
        assert "search: lambda" not in again.stdout
    assert again.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-compression", "1"], "--target-compression must be a ratio above 1"),
        (["--target-compression", "nan"], "--target-compression must be"),
        (["--target-compression", "50", "--target-tolerance", "1.5"], r"--target-tolerance must be a fraction"),
        (["--target-compression", "50", "--search-runs", "0"], "--search-runs must be at least 1"),
        (["--target-compression", "50", "--lam", "0"], r"--lam \(the search's first lambda\) must be above 0"),
        (["--target-compression", "50", "--resume"], "--resume does not apply to --target-compression"),
        (["--target-compression", "50", "--stop-after", "1"], "--stop-after does not apply"),
    ],
)
def test_train_py_refuses_bad_search_arguments(tmp_path, args, message):
    result = _train_py(*args, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "runs").exists()


def test_train_py_refuses_a_folder_of_another_configuration(tmp_path):
    args = ["--target-compression", "20", "--epochs", "1", "--search-runs", "1", "--no-progress", "--output-dir", "s"]
    assert _train_py(*args, cwd=tmp_path).returncode == 0
    result = _train_py(*args, "--depth", "2", cwd=tmp_path)
    assert result.returncode == 1 and "another configuration" in result.stderr
    assert result.stderr.startswith("train.py: error: s holds the runs of another configuration")
