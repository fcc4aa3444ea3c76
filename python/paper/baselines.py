"""The paper's pruning baselines, each pruning to exactly a requested compression ratio.

  magnitude  global magnitude pruning of a trained dense model, without fine-tuning
  random     random pruning at initialization, then training with the mask
  snip       SNIP (Lee et al., 2019): |g * w| on one batch at initialization, then training with the mask
  synflow    SynFlow (Tanaka et al., 2020): data-free iterative synaptic-flow pruning at
             initialization (100 rounds, exponential schedule), then training with the mask

Prunable weights are those of the Linear/Conv layers (biases and normalization layers are never
pruned), the same accounting as dwf_kernels.sparsity_report. A compression ratio c keeps exactly
round(total / c) weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dwf_kernels.nn import FACTORIZABLE

PRUNABLE = FACTORIZABLE  # the torch.nn layers dwf_kernels factorizes
METHODS = ("magnitude", "random", "snip", "synflow")


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules() if isinstance(m, PRUNABLE)
    }


def kept_count(model: nn.Module, compression: float) -> int:
    if compression < 1:
        raise ValueError(f"compression must be >= 1; got {compression}")
    total = sum(w.numel() for w in prunable_weights(model).values())
    return max(1, round(total / compression))


def masks_from_scores(scores: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Global top-`keep` over all layers' scores: exactly `keep` ones."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    if keep > flat.numel():
        raise ValueError(f"cannot keep {keep} of {flat.numel()} weights")
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, keep, sorted=False).indices] = True
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[offset : offset + s.numel()].view_as(s)
        offset += s.numel()
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    weights = prunable_weights(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask.to(weights[name].dtype))


def magnitude_masks(model: nn.Module, compression: float) -> dict[str, torch.Tensor]:
    return masks_from_scores(
        {n: w.detach().abs() for n, w in prunable_weights(model).items()}, kept_count(model, compression)
    )


def random_masks(model: nn.Module, compression: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    scores = {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in prunable_weights(model).items()}
    return masks_from_scores(scores, kept_count(model, compression))


def snip_masks(model: nn.Module, compression: float, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Connection sensitivity |dL/dw * w| of the loss on (x, y), at the model's current weights."""
    model = copy.deepcopy(model)
    model.train()
    weights = prunable_weights(model)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(weights.values()))
    scores = {n: (g * w).detach().abs() for (n, w), g in zip(weights.items(), grads, strict=True)}
    return masks_from_scores(scores, kept_count(model, compression))


def synflow_masks(
    model: nn.Module, compression: float, in_shape: tuple[int, ...], rounds: int = 100
) -> dict[str, torch.Tensor]:
    """Iterative synaptic flow: R = sum(f_|theta|(1)), scores |dR/dtheta * theta|, keeping
    compression^(-k/rounds) of the weights after round k (in float64 against overflow)."""
    net = copy.deepcopy(model).double().eval()  # eval: BatchNorm uses its (identity-like) running stats
    with torch.no_grad():
        for p in net.state_dict().values():
            if p.is_floating_point():
                p.abs_()
    weights = prunable_weights(net)
    original = {n: w.detach().clone() for n, w in weights.items()}
    device = next(net.parameters()).device
    ones = torch.ones((1, *in_shape), dtype=torch.float64, device=device)
    total = sum(w.numel() for w in weights.values())
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    for k in range(1, rounds + 1):
        with torch.no_grad():
            for n, w in weights.items():
                w.copy_(original[n] * masks[n])
        net.zero_grad()
        net(ones).sum().backward()
        scores = {n: (w.grad * w).detach().abs() for n, w in weights.items()}
        # The last round keeps exactly kept_count(model, compression).
        keep = max(1, round(total * compression ** (-k / rounds)))
        masks = masks_from_scores(scores, keep)
    return masks
