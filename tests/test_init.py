"""DWF initialization: variance matched exactly for the truncated distribution, factors inside the interval."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dwf_kernels import init as dwf_init


@pytest.mark.parametrize("depth", [2, 3, 4, 6])
@pytest.mark.parametrize("numel", [100, 10_000, 1_000_000])
def test_collapsed_std_matches_target_and_factors_stay_in_interval(depth, numel):
    shape = (numel // 100, 100)
    target = dwf_init.default_target_std(shape)
    factors = dwf_init.dwf_init_(torch.empty(depth, *shape), target, generator=torch.Generator().manual_seed(depth))
    std = factors.prod(0).std().item()
    assert abs(std / target - 1) < 0.03, (std, target)
    a, b = dwf_init.truncation_interval(target, depth)
    magnitude = factors.abs().double()
    assert magnitude.min().item() >= a * (1 - 1e-6) and magnitude.max().item() <= b * (1 + 1e-6)


@pytest.mark.parametrize("depth", [2, 3, 4, 6])
def test_population_variance_is_exact_without_sample_correction(depth):
    """The solved sigma alone gives the target variance: the truncation is accounted for."""
    target = 0.02
    factors = dwf_init.dwf_init_(
        torch.empty(depth, 2_000_000, dtype=torch.float64),
        target,
        match_sample_std=False,
        generator=torch.Generator().manual_seed(10 + depth),
    )
    # Second moment of the product (zero mean by symmetric signs); its sampling error here is < 1%.
    second_moment = factors.prod(0).square().mean().item()
    assert abs(math.sqrt(second_moment) / target - 1) < 0.01
    # Each factor has the same second moment r^2 = target^(2/D).
    torch.testing.assert_close(
        factors.square().mean(1), torch.full((depth,), target ** (2 / depth), dtype=torch.float64), rtol=0.01, atol=0
    )


def test_truncated_second_moment_against_monte_carlo():
    a, b, sigma = 0.2, 1.1, 0.5
    z = torch.randn(4_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).abs() * sigma
    kept = z[(z >= a) & (z <= b)]
    assert dwf_init.truncated_second_moment(sigma, a, b) == pytest.approx(kept.square().mean().item(), rel=2e-3)
    assert dwf_init.truncated_second_moment(dwf_init.solve_sigma(0.3, a, b), a, b) == pytest.approx(0.3, rel=1e-9)


def test_untruncated_product_would_be_heavy_tailed():
    """Why truncation: the init's product has far lower kurtosis than a product of plain normals (3^D)."""
    depth, n = 4, 1_000_000
    gen = torch.Generator().manual_seed(1)
    ours = dwf_init.dwf_init_(torch.empty(depth, n, dtype=torch.float64), 0.02, generator=gen).prod(0)
    plain = torch.randn(depth, n, dtype=torch.float64, generator=gen).prod(0)

    def kurtosis(x):
        return (x.pow(4).mean() / x.square().mean().square()).item()

    assert kurtosis(plain) > 40  # 3^4 = 81 in expectation
    # Each truncated factor has kurtosis below 2 (near-uniform magnitudes), so the product's is below 2^D.
    assert kurtosis(ours) < 2**depth


def test_default_target_std_is_torch_default_init_std():
    layer = nn.Linear(2000, 400)
    assert layer.weight.std().item() == pytest.approx(dwf_init.default_target_std(layer.weight.shape), rel=0.01)
    conv = nn.Conv2d(64, 128, 3)
    assert conv.weight.std().item() == pytest.approx(dwf_init.default_target_std(conv.weight.shape), rel=0.01)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"eps must be in \(0, target_std"):
        dwf_init.dwf_init_(torch.empty(2, 10), target_std=1e-5)
    with pytest.raises(ValueError, match="target_std must be positive"):
        dwf_init.dwf_init_(torch.empty(2, 10), target_std=0.0)
    with pytest.raises(ValueError, match="upper must be > 1"):
        dwf_init.dwf_init_(torch.empty(2, 10), target_std=0.1, upper=0.5)
    with pytest.raises(ValueError, match=r"factors must have shape \(D, \*weight_shape\)"):
        dwf_init.dwf_init_(torch.empty(()), target_std=0.1)
