"""DWF initialization: the paper's variance matching with absolute-value truncation (Algorithm 1).

Each factor entry is sign * m with a random sign and m ~ N(0, sigma^2) truncated to [a, b]:
a = eps^(1/D) keeps products away from exact zero, b = upper * r bounds the tails, where
r = target_std^(1/D) is the root-mean-square a factor needs. sigma is solved numerically so that
the truncated distribution's second moment is exactly r^2 (truncation changes it), hence the
product of D independent factors has exactly the target variance. Products of untruncated normal
factors would have kurtosis 3^D, which is why naive per-factor init trains badly.

A finite layer's sample std still scatters around the target (by ~20% for 100 weights at D=4);
with `match_sample_std=True` (default) the factors are rescaled, and kept inside [a, b], until the
std of the collapsed weights equals the target.

`exact_factors(w, D)` is the other init: factors whose product is exactly a given weight.
"""

from __future__ import annotations

import math

import torch

DEFAULT_EPS = 1e-4
DEFAULT_UPPER = 2.0


def default_target_std(weight_shape: tuple[int, ...] | torch.Size) -> float:
    """Std of torch.nn's default Linear/Conv weight init (kaiming_uniform_ with a=sqrt(5)): 1/sqrt(3 fan_in).

    0 for a weight without inputs (fan_in = 0, e.g. nn.Linear(0, n)): it has no entries to draw."""
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(weight_shape, device="meta"))
    return 1.0 / math.sqrt(3.0 * fan_in) if fan_in > 0 else 0.0


def truncation_interval(
    target_std: float, depth: int, eps: float = DEFAULT_EPS, upper: float = DEFAULT_UPPER
) -> tuple[float, float]:
    """The interval [a, b] that every |factor| lies in."""
    if not target_std > 0:
        raise ValueError(f"target_std must be positive; got {target_std}")
    if not 0 < eps < target_std:
        raise ValueError(
            f"eps must be in (0, target_std={target_std:.3g}) so that eps^(1/D) < target_std^(1/D); got {eps}"
        )
    if not upper > 1:
        raise ValueError(f"upper must be > 1 (b = upper * target_std^(1/D)); got {upper}")
    return eps ** (1.0 / depth), upper * target_std ** (1.0 / depth)


def _upper_tail(x: float) -> float:
    """P(Z > x) for a standard normal Z, accurate far into the tail."""
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def truncated_second_moment(sigma: float, a: float, b: float) -> float:
    """E[m^2] for m ~ N(0, sigma^2) restricted to a <= m <= b (0 <= a < b)."""
    alpha, beta = a / sigma, b / sigma
    mass = _upper_tail(alpha) - _upper_tail(beta)
    return sigma * sigma * (1.0 + (alpha * _phi(alpha) - beta * _phi(beta)) / mass)


def solve_sigma(second_moment: float, a: float, b: float) -> float:
    """The sigma whose [a, b]-truncated normal has the given second moment (bisection on log sigma)."""
    lo_m2, hi_m2 = a * a, (a * a + a * b + b * b) / 3.0  # limits for sigma -> 0 and sigma -> inf
    if not lo_m2 < second_moment < hi_m2:
        raise ValueError(f"no truncated normal on [{a:.4g}, {b:.4g}] has second moment {second_moment:.4g}")
    lo, hi = math.log(b) - 12.0, math.log(b) + 12.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        sigma = math.exp(mid)
        # Keep alpha moderate: beyond ~35 the tail masses underflow; such sigmas are too small anyway.
        if a / sigma > 35.0 or truncated_second_moment(sigma, a, b) < second_moment:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def uniform_draws(shape: torch.Size, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers dwf_init_ draws for factors of `shape`: the magnitudes' uniforms (fp64),
    then the signs' (default dtype), on the CPU."""
    return torch.rand(shape, generator=generator, dtype=torch.float64), torch.rand(shape, generator=generator)


@torch.no_grad()
def dwf_init_(
    factors: torch.Tensor,
    target_std: float,
    eps: float = DEFAULT_EPS,
    upper: float = DEFAULT_UPPER,
    match_sample_std: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fills `factors` (shape (D, *S)) in place with DWF init; returns it.

    The product over the D factors has std `target_std` (exactly in expectation; also in the
    sample when `match_sample_std`), and every |factor| lies in `truncation_interval(...)`.
    """
    if factors.dim() < 1 or factors.shape[0] < 1:
        raise ValueError(f"factors must have shape (D, *weight_shape); got {tuple(factors.shape)}")
    if factors.numel() == 0 or factors.is_meta:
        # A zero-size weight (nn.Linear allows zero features), or a meta tensor (no values, as
        # torch.nn.init on meta): nothing to draw.
        return factors
    depth = factors.shape[0]
    a, b = truncation_interval(target_std, depth, eps, upper)
    rms = target_std ** (1.0 / depth)
    sigma = solve_sigma(rms * rms, a, b)
    # Inverse-CDF sampling from the upper tail (v = P(Z > m/sigma)), precise even when a >> sigma.
    v_lo, v_hi = _upper_tail(b / sigma), _upper_tail(a / sigma)
    u, sign_u = uniform_draws(factors.shape, generator)
    magnitude = (-sigma * torch.special.ndtri(v_lo + (v_hi - v_lo) * u)).clamp_(a, b)
    sign = torch.where(sign_u < 0.5, -1.0, 1.0).to(torch.float64)
    values = magnitude * sign
    if match_sample_std and values[0].numel() > 1:
        for _ in range(20):
            std = values.prod(0).std().item()
            if std == 0 or abs(std / target_std - 1.0) < 1e-4:
                break
            magnitude = (magnitude * (target_std / std) ** (1.0 / depth)).clamp_(a, b)
            values = magnitude * sign
    factors.copy_(values)
    return factors


@torch.no_grad()
def exact_factors(weight: torch.Tensor, depth: int) -> torch.Tensor:
    """Balanced exact factors of `weight`, shape (depth, *weight.shape): |f_d| = |w|^(1/D) for all d,
    the sign on the first (exactly-zero weights get all-zero factors)."""
    w = weight.detach().to(torch.float64)
    root = w.abs().pow(1.0 / depth)
    factors = root.unsqueeze(0).repeat(depth, *([1] * w.dim()))
    factors[0] = torch.where(w < 0, -root, root)
    return factors.to(weight.dtype)
