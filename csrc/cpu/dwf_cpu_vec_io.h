// How the CPU kernels (dwf_cpu_kernels.cpp) move elements between memory and SIMD registers and
// walk the factor gradients: VecIO (two registers of the arithmetic type, bf16/fp16 converted in
// registers), GradIO (one or two registers per step, as the caller asks) and for_each_gradient
// (the fused backward's pass, whose gradients its callers store, reduce or apply). Included by
// dwf_cpu_kernels.cpp only, once per SIMD variant, after the variant's fmadd and dwf_dispatch.h: its
// definitions have internal linkage in that variant's namespace, as the kernels' own.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "dwf_cpu_kernels.h"

#ifndef DWF_CPU_VARIANT_NS
#error "dwf_cpu_vec_io.h is part of dwf_cpu_kernels.cpp, compiled once per SIMD variant"
#endif

namespace dwf::cpu::DWF_CPU_VARIANT_NS {
namespace {

using at::vec::Vectorized;

// Moves 2 * Vectorized<acc>::size() elements between memory and two SIMD registers, converting
// bf16/fp16 to and from fp32 in registers (round-to-nearest-even, as c10's scalar conversion).
template <typename T>
struct VecIO {
  using acc_t = acc_type<T>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();

  static void load(const T* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<T, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      at::vec::load_to_float(p, a, b);
    }
  }
  static void store(T* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<T, acc_t>) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
};

// for_each_gradient's SIMD step: kRegs registers of acc_t per step, as its caller asks (kWanted)
// for fp32/fp64 factors; always two for bf16/fp16, which convert one register of T to and from two
// of fp32. Which is faster depends on the work per element: the SGD step, at D = 4 with its
// constants and the momentum buffer, fills AVX2's 16 registers with one register's worth of
// elements and spills to the stack with two (1.4x slower with momentum, 2x without); the backward,
// which only stores its gradients, runs faster on two (docs/design.md).
template <typename T, int kWanted>
struct GradIO {
  static_assert(kWanted == 1 || kWanted == 2, "one or two registers per step");
  using acc_t = acc_type<T>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kRegs = std::is_same_v<T, acc_t> ? kWanted : 2;
  static constexpr int64_t kStep = kRegs * Vec::size();
  // One step's factors or gradients at depth policy kD: [register][factor].
  template <int kD>
  using Regs = Vec[kRegs][DepthSlots<kD>::value];

  // kRegs registers from p, of T (the factors and buffers) or of G (grad_w, which for fp32 factors
  // may be bf16/fp16).
  template <typename E>
  static void load(const E* p, Vec* r) {
    if constexpr (kRegs == 2) {
      VecIO<E>::load(p, r[0], r[1]);
    } else if constexpr (std::is_same_v<E, acc_t>) {
      r[0] = Vec::loadu(p);
    } else {
      at::vec::load_to_float(p, r[0]);
    }
  }
  static void store(T* p, const Vec* r) {
    if constexpr (kRegs == 2) {
      VecIO<T>::store(p, r[0], r[1]);
    } else {
      r[0].store(p);
    }
  }
  // Factor d's column of a step's Regs, from or to its kStep elements at p.
  template <int kD>
  static void load_column(const T* p, Regs<kD>& regs, int d) {
    Vec r[kRegs];
    load(p, r);
    for (int k = 0; k < kRegs; ++k) regs[k][d] = r[k];
  }
  template <int kD>
  static void store_column(T* p, const Regs<kD>& regs, int d) {
    Vec r[kRegs];
    for (int k = 0; k < kRegs; ++k) r[k] = regs[k][d];
    store(p, r);
  }
};

// The fused backward's pass over all n elements: loads the D factors and grad_w, forms the D
// factor gradients GW[i] * prod_{k != d} F[k, i] (+ two_s * F[d, i] when has_penalty) in registers,
// and hands them on: on_vec(i, f, g) for the GradIO<T, kWanted>::kStep elements at i, whose factors and
// gradients are f[r][d] and g[r][d] (register r, factor d), on_scalar(i, f, g) for each tail
// element, on_chunk(c) after chunk c's last element. What is done with them is the caller's.
// Registers cover whole groups of kLaneBytes of elements (a multiple of every variant's step), the
// rest of a chunk goes through the scalar tail: so every variant hands the same elements to
// on_scalar, and a reduction over lanes of i % group adds alike in all of them.
constexpr int64_t kLaneBytes = 128;

template <int kD, int kWanted, typename T, typename G, typename OnVec, typename OnScalar, typename OnChunk>
void for_each_gradient(const T* F, const G* GW, int64_t n, int depth, bool has_penalty, acc_type<T> two_s,
                       OnVec&& on_vec, OnScalar&& on_scalar, OnChunk&& on_chunk) {
  using IO = GradIO<T, kWanted>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int kSlots = DepthSlots<kD>::value;
  constexpr int kRegs = IO::kRegs;
  constexpr int64_t kGroup = kLaneBytes / sizeof(acc_t);
  static_assert(kGroup % IO::kStep == 0, "a lane group must tile the SIMD steps");
  const Vec two_s_vec(two_s);

  // The depth (a compile-time constant for kD > 0) and copies of the callers' callbacks (with the
  // values they capture) live in this body. at::parallel_for calls the body through a pointer, so
  // a value it reads through a reference capture is a load from memory, which every SIMD store (may
  // alias anything) forces to repeat: with the depth read that way the per-depth loops stayed loops
  // over arrays spilled to the stack, and the backward and the SGD step ran 1.3-2x slower
  // (docs/design.md). The kernels' other lambdas likewise take the depth inside.
  at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
    const int D = resolve_depth<kD>(depth);
    auto vec_fn = on_vec;
    auto scalar_fn = on_scalar;
    typename IO::template Regs<kD> f, g;  // [register][factor]
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      const int64_t vec_end = begin + (end - begin) / kGroup * kGroup;
      int64_t i = begin;
      for (; i < vec_end; i += IO::kStep) {
        for (int d = 0; d < D; ++d) IO::template load_column<kD>(F + d * n + i, f, d);
        Vec gw[kRegs];
        IO::load(GW + i, gw);
        for (int r = 0; r < kRegs; ++r) {
          factor_grads<kD>(f[r], depth, gw[r], g[r]);
          if (has_penalty) add_penalty_grads<kD>(f[r], depth, two_s_vec, g[r]);
        }
        vec_fn(i, f, g);
      }
      for (; i < end; ++i) {
        acc_t fs[kSlots], gs[kSlots];
        for (int d = 0; d < D; ++d) fs[d] = static_cast<acc_t>(F[d * n + i]);
        factor_grads<kD>(fs, depth, static_cast<acc_t>(GW[i]), gs);
        if (has_penalty) add_penalty_grads<kD>(fs, depth, two_s, gs);
        scalar_fn(i, fs, gs);
      }
      on_chunk(c);
    }
  });
}

constexpr auto kNoChunkWork = [](int64_t) {};

}  // namespace
}  // namespace dwf::cpu::DWF_CPU_VARIANT_NS
