"""The dense-training baselines (paper/recipes.py): magnitude pruning with fine-tuning, iterative
magnitude pruning with weight rewinding, Powerpropagation."""

import math
import os

import pytest
import torch
from paper import baselines, recipes
from paper.experiment import ConfigError, TrainingConfig, _seeded_data
from paper.models import build_model
from paper.recipes import PowerProp, RecipeConfig, imp_schedule, powerpropagated, run_recipe
from paper.training import LoopConfig, fit


def test_imp_schedule_reaches_every_target_in_the_fewest_bounded_rounds():
    rounds = imp_schedule((1000, 10, 30, 100, 300, 500), 4.0)
    assert rounds == pytest.approx([10**0.5, 10, 30, 100, 300, 500, 1000])
    three = imp_schedule((10, 100), 3.0)
    assert three == pytest.approx([10 ** (1 / 3), 10 ** (2 / 3), 10, 10 ** (4 / 3), 10 ** (5 / 3), 100])
    for schedule, step in ((rounds, 4.0), (three, 3.0)):
        ratios = [b / a for a, b in zip([1.0, *schedule[:-1]], schedule, strict=True)]
        assert all(1 < r <= step * (1 + 1e-6) for r in ratios)


def test_powerprop_is_w_equals_v_abs_v_to_the_alpha_minus_one():
    torch.manual_seed(0)
    w = torch.randn(50, dtype=torch.float64)
    for alpha in (1.0, 2.0, 3.0, 4.5):
        p = PowerProp(alpha)
        v = p.right_inverse(w)
        torch.testing.assert_close(p(v), w)
        torch.testing.assert_close(v, w.sign() * w.abs() ** (1 / alpha))
        # dw/dv = alpha |v|^(alpha - 1): small weights learn slowly (Powerprop's rich-get-richer).
        v = v.clone().requires_grad_()
        (g,) = torch.autograd.grad(p(v).sum(), v)
        torch.testing.assert_close(g, alpha * v.detach().abs() ** (alpha - 1))


def test_a_powerpropagated_model_computes_the_same_function_at_init():
    model = build_model("lenet300", (1, 28, 28), 10)
    x = torch.randn(4, 1, 28, 28)
    expected = model(x)
    powerpropagated(model, 3.0)
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith("parametrizations.weight.original") for n in names) == 3
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def _cfg(tmp_path, **overrides):
    return RecipeConfig(**{"epochs": 3, "finetune_epochs": 2, "targets": (10.0, 100.0), **overrides})


def test_the_dense_run_is_one_uninterrupted_run_with_its_rewind_snapshot(tmp_path):
    rows = run_recipe(_cfg(tmp_path), str(tmp_path))
    folder = tmp_path / "dense-seed0-rewind1"
    final = torch.load(folder / "final.pt", weights_only=True)
    rewind = torch.load(folder / "rewind.pt", weights_only=True)
    # The same training in one go (and stopped after epoch 1 for the snapshot).
    base = TrainingConfig(epochs=3)
    for stop_after, expected in ((None, final), (1, rewind)):
        _, data = _seeded_data(base)
        model = build_model("lenet300", data.in_shape, data.num_classes)
        loop = LoopConfig(epochs=3, lr=base.lr, momentum=base.momentum, progress=False, stop_after=stop_after)
        fit(model, data, [{"params": list(model.parameters()), "weight_decay": base.weight_decay}], loop)
        state = model.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in state)
    # One-shot magnitude pruning and its fine-tuned version at exactly each target.
    assert [(r["method"], r["target"]) for r in rows] == [
        ("magnitude", 10.0),
        ("magnitude-ft", 10.0),
        ("magnitude", 100.0),
        ("magnitude-ft", 100.0),
    ]
    for r in rows:
        assert r["target"] <= r["compression"] <= 1.02 * r["target"]
        assert r["epochs"] == (5 if r["method"] == "magnitude-ft" else 3)
    assert rows[3]["test_acc"] > rows[2]["test_acc"]  # fine-tuning helps at 100x


def test_imp_prunes_only_survivors_and_rewinds_them(tmp_path, monkeypatch):
    starts, real_train = {}, recipes._train

    def train(model, data, cfg, folder, *args, **kwargs):
        starts[os.path.basename(folder)] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_train(model, data, cfg, folder, *args, **kwargs)

    monkeypatch.setattr(recipes, "_train", train)
    rows = run_recipe(_cfg(tmp_path, recipe="imp"), str(tmp_path))
    assert [(r["method"], r["target"], r["variant"]) for r in rows] == [
        ("imp", 10.0, "rewound to epoch 1"),
        ("imp", 100.0, "rewound to epoch 1"),
    ]
    assert [r["epochs"] for r in rows] == [3 + 2 * 2, 3 + 4 * 2]  # rounds 3.16x, 10x | 31.6x, 100x
    folder = tmp_path / "imp-seed0-rewind1-step4"
    stages = sorted(os.listdir(folder), key=lambda n: int(n.split("-")[0][5:]))
    assert stages == ["round1-x3.16228", "round2-x10", "round3-x31.6228", "round4-x100"]
    kept = None
    for stage in stages:
        state = torch.load(folder / stage / "final.pt", weights_only=True)
        nonzero = {k: v != 0 for k, v in state.items() if k.endswith("weight")}
        if kept is not None:  # a weight pruned in one round stays pruned
            assert all(not (nonzero[k] & ~kept[k]).any() for k in nonzero)
        kept = nonzero
    # Every round starts from the rewind snapshot (weights after epoch 1), masked by the round's
    # pruning of the previous round's trained weights.
    rewind = torch.load(tmp_path / "dense-seed0-rewind1" / "rewind.pt", weights_only=True)
    previous = torch.load(tmp_path / "dense-seed0-rewind1" / "final.pt", weights_only=True)
    for stage in stages:
        start = starts[stage]
        for k, v in start.items():
            if k.endswith("weight"):
                kept = v != 0
                assert torch.equal(v[kept], rewind[k][kept]) and (previous[k][kept] != 0).all()
            else:
                assert torch.equal(v, rewind[k])
        previous = torch.load(folder / stage / "final.pt", weights_only=True)
    for r in rows:
        assert r["target"] <= r["compression"] <= 1.02 * r["target"]


def test_powerprop_recipe_prunes_its_trained_weights(tmp_path):
    rows = run_recipe(_cfg(tmp_path, recipe="powerprop", alpha=2.0), str(tmp_path))
    assert [(r["method"], r["variant"], r["target"]) for r in rows] == [
        ("powerprop", "alpha 2", 10.0),
        ("powerprop", "alpha 2", 100.0),
    ]
    assert all(r["target"] <= r["compression"] and r["epochs"] == 3 for r in rows)
    final = torch.load(tmp_path / "powerprop-alpha2-seed0" / "final.pt", weights_only=True)
    assert not any("parametrizations" in k for k in final)  # plain weights w, not v


def test_a_finished_recipe_is_read_back_not_trained_again(tmp_path, monkeypatch):
    first = run_recipe(_cfg(tmp_path, targets=(10.0,)), str(tmp_path))

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(recipes, "fit", refuse)
    assert run_recipe(_cfg(tmp_path, targets=(10.0,)), str(tmp_path)) == first


def test_an_interrupted_dense_run_continues_to_the_same_weights(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run_recipe(_cfg(tmp_path, targets=(10.0,)), str(whole))
    parts = tmp_path / "parts"
    real_fit, calls = recipes.fit, []

    def killed_after_the_snapshot(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the run after the rewind snapshot: killed
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(recipes, "fit", killed_after_the_snapshot)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_cfg(tmp_path, targets=(10.0,)), str(parts))
    monkeypatch.setattr(recipes, "fit", real_fit)
    run_recipe(_cfg(tmp_path, targets=(10.0,)), str(parts))
    for name in ("final.pt", "rewind.pt"):
        a = torch.load(whole / "dense-seed0-rewind1" / name, weights_only=True)
        b = torch.load(parts / "dense-seed0-rewind1" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"recipe": "lottery"}, "recipe"),
        ({"targets": ()}, "targets"),
        ({"targets": (0.5,)}, "targets"),
        ({"targets": (math.inf,)}, "targets"),
        ({"rewind_epoch": 3}, "rewind_epoch"),
        ({"max_step": 1.0}, "max_step"),
        ({"alpha": 0.5}, "alpha"),
        ({"finetune_epochs": 0}, "finetune_epochs"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_bad_configurations_are_refused_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=f"^{field} "):
        run_recipe(_cfg(tmp_path, **overrides), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_masks_keep_exactly_the_requested_count():
    model = build_model("lenet300", (1, 28, 28), 10)
    for target in (10.0, 300.0):
        masks = baselines.magnitude_masks(model, target)
        assert sum(int(m.sum()) for m in masks.values()) == baselines.kept_count(model, target)
