"""Each pruning baseline prunes to exactly the requested compression ratio."""

import pytest
import torch
from paper import baselines
from paper.models import build_model
from torch import nn


def _nonzeros(model):
    return sum(int((w != 0).sum()) for w in baselines.prunable_weights(model).values())


def _total(model):
    return sum(w.numel() for w in baselines.prunable_weights(model).values())


def _small_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))


@pytest.mark.parametrize(
    "make",
    [lambda: build_model("lenet300", (1, 28, 28), 10), lambda: build_model("lenet5", (1, 28, 28), 10), _small_cnn],
    ids=["lenet300", "lenet5", "cnn-bn"],
)
@pytest.mark.parametrize("method", baselines.METHODS)
@pytest.mark.parametrize("ratio", [10, 100, 333])
def test_prunes_to_exactly_the_ratio(make, method, ratio):
    torch.manual_seed(0)
    model = make()
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    if method == "magnitude":
        masks = baselines.magnitude_masks(model, ratio)
    elif method == "random":
        masks = baselines.random_masks(model, ratio, torch.Generator().manual_seed(0))
    elif method == "snip":
        masks = baselines.snip_masks(model, ratio, x, y)
    else:
        masks = baselines.synflow_masks(model, ratio, (1, 28, 28), rounds=20)
    assert sum(int(m.sum()) for m in masks.values()) == round(_total(model) / ratio)
    baselines.apply_masks(model, masks)
    assert _nonzeros(model) == round(_total(model) / ratio)


def test_magnitude_keeps_the_largest():
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -3.0, 2.0, -0.5]]))
    baselines.apply_masks(model, baselines.magnitude_masks(model, 2))
    assert model[0].weight.tolist() == [[0.0, -3.0, 2.0, 0.0]]


def test_snip_scores_are_gradient_times_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    loss = nn.functional.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, [model[1].weight])
    scores = (g * model[1].weight).abs().flatten()
    masks = baselines.snip_masks(model, 3, x, y)
    kept = masks["1.weight"].flatten()
    assert set(torch.nonzero(kept).flatten().tolist()) == set(torch.topk(scores, 6).indices.tolist())


def test_bad_ratio():
    with pytest.raises(ValueError, match="compression must be >= 1"):
        baselines.kept_count(nn.Linear(3, 3), 0.5)
