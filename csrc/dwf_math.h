// Per-element Deep Weight Factorization math, shared by every compiled backend.
//
// The CPU kernels instantiate these templates with at::vec::Vectorized<float/double> (one SIMD
// register of elements) and with plain scalars for tails; the CUDA kernels instantiate them with
// float/double per element. So the CPU test suite exercises exactly the arithmetic the GPU runs.
//
// T needs only `*` and `+`. The template argument kD is the depth policy of an instantiation:
//   kD > 0: the depth is kD, fixed at compile time;
//   kD < 0: the depth is the runtime `depth`, 1 <= depth <= -kD (padded slots).
// Either way every loop runs over DepthSlots<kD>::value compile-time slots, fully unrolled, and a
// slot d >= depth is skipped by a guard (constant-true when kD > 0). So arrays are only ever indexed
// by compile-time constants: on a GPU they stay in registers (a loop bounded by the runtime depth
// would index them dynamically and put them in a local-memory stack). The guarded slots do exactly
// the arithmetic, in exactly the order, of a loop over d < depth: the results do not depend on kD.
#pragma once

#if defined(__CUDACC__)
#define DWF_HD __host__ __device__ __forceinline__
#define DWF_UNROLL _Pragma("unroll")
#else
#define DWF_HD inline
#define DWF_UNROLL _Pragma("GCC unroll 16")
#endif

#include <cmath>

namespace dwf {
// The CPU kernels are compiled once per instruction set (cpu/dwf_cpu_kernels.h); each such build
// defines DWF_CPU_VARIANT_NS, and these templates then live in that inline namespace, so the
// copies one variant emits (scalar tails) are never merged at link time with another's, compiled
// for other instructions.
#if defined(DWF_CPU_VARIANT_NS)
inline namespace DWF_CPU_VARIANT_NS {
#endif

constexpr int kMaxDepth = 16;

template <int kD>
struct DepthSlots {
  static_assert(kD != 0 && kD >= -kMaxDepth && kD <= kMaxDepth, "depth policy out of range");
  static constexpr int value = kD > 0 ? kD : -kD;
};

template <int kD>
DWF_HD int resolve_depth(int depth) {
  return kD > 0 ? kD : depth;
}

// w = f[0] * f[1] * ... * f[D-1], multiplied left to right (the order the reference uses).
template <int kD, typename T>
DWF_HD T product(const T* f, int depth) {
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  T p = f[0];
  DWF_UNROLL
  for (int d = 1; d < kSlots; ++d) {
    if (d < D) p = p * f[d];
  }
  return p;
}

// acc + sum_d f[d]^2.
template <int kD, typename T>
DWF_HD T accumulate_squares(const T* f, int depth, T acc) {
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  DWF_UNROLL
  for (int d = 0; d < kSlots; ++d) {
    if (d < D) acc = acc + f[d] * f[d];
  }
  return acc;
}

// grad[d] = g * prod_{k != d} f[k], for all d at once.
//
// Prefix products are kept in registers and the suffix product carries g, so this costs
// 3(D-1) multiplies and never divides: DWF drives factors to exactly zero, and w / f[d] would
// turn those into NaN. The association matches autograd of the left-to-right product chain:
// grad[d] = prefix[d] * (g * f[D-1] * ... * f[d+1]), so results equal the reference bitwise
// (and Inf/NaN/zero propagate the same way).
template <int kD, typename T>
DWF_HD void factor_grads(const T* f, int depth, T g, T* grad) {
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  T prefix[kSlots];  // prefix[d] = f[0] * ... * f[d-1] for d >= 1 (prefix[0] is unused)
  DWF_UNROLL
  for (int d = 1; d < kSlots; ++d) {
    if (d < D) prefix[d] = d == 1 ? f[0] : prefix[d - 1] * f[d - 1];
  }
  T suffix = g;
  DWF_UNROLL
  for (int d = kSlots - 1; d >= 1; --d) {
    if (d < D) {
      grad[d] = prefix[d] * suffix;
      suffix = suffix * f[d];
    }
  }
  grad[0] = suffix;
}

// grad[d] += 2 s f[d]: the gradient of s * sum(f^2), the factor L2 penalty.
template <int kD, typename T>
DWF_HD void add_penalty_grads(const T* f, int depth, T two_s, T* grad) {
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  DWF_UNROLL
  for (int d = 0; d < kSlots; ++d) {
    if (d < D) grad[d] = grad[d] + two_s * f[d];
  }
}

// a * b + c with one rounding. Scalars here; the CPU kernels' SIMD registers find at::vec::fmadd
// by argument-dependent lookup (one FMA instruction on AVX2/AVX-512), or, in the portable
// variant, the per-lane fmadd that cpu/dwf_cpu_kernels.cpp declares before including this file.
DWF_HD float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
DWF_HD double fmadd(double a, double b, double c) { return fma(a, b, c); }

// The hyper-parameters of one SGD step, as values of the arithmetic type V (a scalar, or a SIMD
// register with the value in every lane).
template <typename V>
struct SgdStep {
  V neg_lr;               // -lr
  V momentum;
  V one_minus_dampening;  // 1 - dampening
  V weight_decay;
  V minus_one;
  bool has_momentum;
  bool has_weight_decay;
  bool nesterov;
  bool maximize;
  bool init_buffer;  // first step: the momentum buffer starts as the gradient (it is not read)
};

// One torch.optim.SGD step of one parameter element p (and its momentum buffer) from gradient g,
// in torch's order and with its roundings: torch's `a.add(b, alpha=x)` is fmadd(b, x, a) and
// `buf.mul_(momentum)` rounds before the add. So fp32/fp64 results equal torch.optim.SGD's.
template <typename V>
DWF_HD void sgd_update(const SgdStep<V>& s, V g, V& p, V& buf) {
  if (s.maximize) g = g * s.minus_one;
  if (s.has_weight_decay) g = fmadd(p, s.weight_decay, g);
  if (s.has_momentum) {
    buf = s.init_buffer ? g : fmadd(g, s.one_minus_dampening, buf * s.momentum);
    g = s.nesterov ? fmadd(buf, s.momentum, g) : buf;
  }
  p = fmadd(g, s.neg_lr, p);
}

#if defined(DWF_CPU_VARIANT_NS)
}  // inline namespace DWF_CPU_VARIANT_NS
#endif
}  // namespace dwf
