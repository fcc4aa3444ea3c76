// CPU kernels for the fused DWF forward, backward and backward + SGD step (docs/design.md), for
// one instruction set: setup.py compiles this file once per variant (dwf_cpu_kernels.h) with
// -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512> -DCPU_CAPABILITY_<...> and that variant's -m flags.
//
// at::parallel_for splits the elements into fixed-size chunks; inside a chunk at::vec SIMD runs
// the shared per-element math (dwf_math.h) on one or two registers' worth of elements per step
// (dwf_cpu_vec_io.h: register loads and stores, the factor gradients' pass), with a scalar tail
// through the same templates. Memory traffic is the whole cost: forward reads D
// factors and writes w, backward reads D factors and grad_w and writes D gradients, once each;
// the SGD step reads D factors, grad_w and D momentum buffers and writes factors and buffers.
//
// Everything here that is not a Kernels<kIsa> entry point has internal linkage or lives in this
// variant's namespaces (at::vec::CPU_CAPABILITY, dwf::DWF_CPU_VARIANT_NS), so no function
// compiled for AVX-512 can stand in at link time for one the baseline variant calls. (Inline
// functions of torch's and the standard library's headers are the exception; setup.py links the
// baseline objects first, whose copies the linker keeps.)
#if defined(CPU_CAPABILITY_AVX512)
#define DWF_CPU_VARIANT_NS avx512
#define DWF_CPU_ISA kAvx512
#elif defined(CPU_CAPABILITY_AVX2)
#define DWF_CPU_VARIANT_NS avx2
#define DWF_CPU_ISA kAvx2
#elif defined(CPU_CAPABILITY_DEFAULT)
#define DWF_CPU_VARIANT_NS baseline
#define DWF_CPU_ISA kDefault
#else
#error "dwf_cpu_kernels.cpp is compiled by setup.py once per CPU_CAPABILITY (DEFAULT, AVX2, AVX512)"
#endif

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "dwf_cpu_kernels.h"

namespace dwf {
inline namespace DWF_CPU_VARIANT_NS {
#if defined(CPU_CAPABILITY_DEFAULT)
// at::vec's portable fmadd is a * b + c with two roundings, where the AVX2/AVX-512 variants use one
// FMA instruction. So that every variant's SGD step rounds alike (and like the CUDA kernels),
// the baseline one fuses each lane: std::fma, which glibc serves with the FMA instruction when the
// CPU has one. Declared before dwf_math.h, so its sgd_update finds it.
// Non-templates: preferred to at::vec's fmadd template, found by argument-dependent lookup.
template <typename A>
at::vec::Vectorized<A> fma_lanes(const at::vec::Vectorized<A>& a, const at::vec::Vectorized<A>& b,
                                 const at::vec::Vectorized<A>& c) {
  using Vec = at::vec::Vectorized<A>;
  __at_align__ A la[Vec::size()], lb[Vec::size()], lc[Vec::size()];
  a.store(la);
  b.store(lb);
  c.store(lc);
  for (int64_t k = 0; k < Vec::size(); ++k) la[k] = std::fma(la[k], lb[k], lc[k]);
  return Vec::loadu(la);
}
inline at::vec::Vectorized<float> fmadd(const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b,
                                        const at::vec::Vectorized<float>& c) {
  return fma_lanes(a, b, c);
}
inline at::vec::Vectorized<double> fmadd(const at::vec::Vectorized<double>& a, const at::vec::Vectorized<double>& b,
                                         const at::vec::Vectorized<double>& c) {
  return fma_lanes(a, b, c);
}
#endif
}  // namespace DWF_CPU_VARIANT_NS
}  // namespace dwf

#include "../dwf_dispatch.h"
#include "dwf_cpu_vec_io.h"

// This variant's kernels: internal linkage, and named by the variant (for profilers and for the
// test that only the AVX2/AVX-512 variants' functions hold AVX instructions).
namespace dwf::cpu::DWF_CPU_VARIANT_NS {
namespace {

using at::vec::Vectorized;

// Squares are summed per block of kSumBlock elements, then blocks into the chunk total: long
// running sums in one register lane would lose low bits on every add.
constexpr int64_t kSumBlock = 512;

// w[i] = prod_d F[d, i]; partials[c] = sum of F^2 over chunk c (when with_sumsq).
//
// The sum of squares is formed over kLanes = 128 bytes of accumulators whatever the register
// width: element i of a chunk adds into lane i % kLanes (blocks of kSumBlock, then the chunk
// total), the lanes are reduced as sum_k (lane[k] + lane[k + kLanes / 2]), and elements past the
// last whole kLanes group add in order afterwards. AVX-512 holds the lanes in two registers, AVX2
// and the baseline in four: every variant adds the same numbers in the same order.
template <int kD, typename T, typename O>
void forward_kernel(const T* F, O* W, int64_t n, int depth, bool with_sumsq, acc_type<T>* partials) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int kSlots = DepthSlots<kD>::value;
  constexpr int64_t kLanes = 128 / sizeof(acc_t);
  constexpr int kPairs = kLanes / IO::kStep;  // register pairs per group of kLanes elements
  static_assert(kLanes % IO::kStep == 0 && kSumBlock % kLanes == 0, "lanes must tile the SIMD steps");

  at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
    const int D = resolve_depth<kD>(depth);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      Vec sq[2 * kPairs];
      for (Vec& v : sq) v = Vec(acc_t(0));
      Vec fa[kSlots], fb[kSlots];
      int64_t i = begin;
      while (i + kLanes <= end) {
        Vec blk[2 * kPairs];
        for (Vec& v : blk) v = Vec(acc_t(0));
        const int64_t block_end = std::min(end, i + kSumBlock);
        for (; i + kLanes <= block_end; i += kLanes) {
          for (int p = 0; p < kPairs; ++p) {
            const int64_t j = i + p * IO::kStep;
            for (int d = 0; d < D; ++d) IO::load(F + d * n + j, fa[d], fb[d]);
            VecIO<O>::store(W + j, product<kD>(fa, depth), product<kD>(fb, depth));
            if (with_sumsq) {
              blk[2 * p] = accumulate_squares<kD>(fa, depth, blk[2 * p]);
              blk[2 * p + 1] = accumulate_squares<kD>(fb, depth, blk[2 * p + 1]);
            }
          }
        }
        for (int r = 0; r < 2 * kPairs; ++r) sq[r] = sq[r] + blk[r];
      }
      acc_t sq_tail = 0;
      for (; i < end; ++i) {
        acc_t f[kSlots];
        for (int d = 0; d < D; ++d) f[d] = static_cast<acc_t>(F[d * n + i]);
        W[i] = static_cast<O>(product<kD>(f, depth));
        if (with_sumsq) sq_tail = accumulate_squares<kD>(f, depth, sq_tail);
      }
      if (with_sumsq) {
        __at_align__ acc_t lanes[kLanes];
        for (int r = 0; r < 2 * kPairs; ++r) sq[r].store(lanes + r * Vec::size());
        acc_t total = 0;
        for (int64_t k = 0; k < kLanes / 2; ++k) total += lanes[k] + lanes[k + kLanes / 2];
        partials[c] = total + sq_tail;
      }
    }
  });
}

// partials[c] = the sum of squares of the factor gradients of chunk c, read-only: nothing is stored
// but the partials. Element i adds its D squares (in order of d) into lane i % kGroup of its
// chunk's block sums, which add into the chunk's lane totals every kSumBlock elements (as the
// forward's sumsq); the lanes reduce as sum_k (lane[k] + lane[k + kGroup / 2]), then the tail
// elements add in order. Every variant adds the same numbers in the same order.
template <int kD, typename T, typename G>
void grad_sumsq_kernel(const T* F, const G* GW, int64_t n, int depth, bool has_penalty, acc_type<T> two_s,
                       acc_type<T>* partials) {
  using IO = GradIO<T, 2>;
  using Regs = typename IO::template Regs<kD>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kGroup = kLaneBytes / sizeof(acc_t);
  static_assert(kSumBlock % kGroup == 0, "blocks must hold whole lane groups");
  const int64_t chunks = num_chunks(n);
  // Per chunk: kGroup block lanes, then kGroup total lanes.
  std::vector<acc_t> lanes(chunks * 2 * kGroup, acc_t(0)), tails(chunks, acc_t(0));
  auto flush_block = [&](acc_t* block) {
    for (int64_t k = 0; k < kGroup; ++k) {
      block[kGroup + k] += block[k];
      block[k] = 0;
    }
  };
  for_each_gradient<kD, 2>(
      F, GW, n, depth, has_penalty, two_s,
      [&](int64_t i, const Regs&, const Regs& g) {
        const int D = resolve_depth<kD>(depth);
        const int64_t offset = (i - i / kChunk * kChunk);
        acc_t* block = lanes.data() + (i / kChunk) * 2 * kGroup;
        acc_t* lane = block + offset % kGroup;
        for (int r = 0; r < IO::kRegs; ++r) {
          Vec sum = Vec::loadu(lane + r * Vec::size());
          for (int d = 0; d < D; ++d) sum = sum + g[r][d] * g[r][d];
          sum.store(lane + r * Vec::size());
        }
        if ((offset + IO::kStep) % kSumBlock == 0) flush_block(block);
      },
      [&](int64_t i, const acc_t*, const acc_t* g) {
        const int D = resolve_depth<kD>(depth);
        acc_t& tail = tails[i / kChunk];
        for (int d = 0; d < D; ++d) tail = tail + g[d] * g[d];
      },
      [&](int64_t c) {
        acc_t* block = lanes.data() + c * 2 * kGroup;
        flush_block(block);
        const acc_t* total_lanes = block + kGroup;
        acc_t total = 0;
        for (int64_t k = 0; k < kGroup / 2; ++k) total += total_lanes[k] + total_lanes[k + kGroup / 2];
        partials[c] = total + tails[c];
      });
}

// GF[d, i] = the gradients of for_each_gradient, written out.
template <int kD, typename T, typename G>
void backward_kernel(const T* F, const G* GW, T* GF, int64_t n, int depth, bool has_penalty, acc_type<T> two_s) {
  using IO = GradIO<T, 2>;
  using Regs = typename IO::template Regs<kD>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  for_each_gradient<kD, 2>(
      F, GW, n, depth, has_penalty, two_s,
      [&](int64_t i, const Regs&, const Regs& g) {
        const int D = resolve_depth<kD>(depth);
        for (int d = 0; d < D; ++d) IO::template store_column<kD>(GF + d * n + i, g, d);
      },
      [&](int64_t i, const acc_t*, const acc_t* g) {
        const int D = resolve_depth<kD>(depth);
        for (int d = 0; d < D; ++d) GF[d * n + i] = static_cast<T>(g[d]);
      },
      kNoChunkWork);
}

// The fused backward + SGD step: the gradients of for_each_gradient, applied at once by
// sgd_update to the factors and momentum buffer, in place. Reads D factors, grad_w and D buffers;
// writes D factors and D buffers; no gradient is stored.
template <int kD, typename T, typename G>
void sgd_step_kernel(T* F, T* B, const G* GW, int64_t n, int depth, bool has_penalty, acc_type<T> two_s,
                     const SgdStep<acc_type<T>>& step) {
  using IO = GradIO<T, 1>;
  using Regs = typename IO::template Regs<kD>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const SgdStep<Vec> vstep{Vec(step.neg_lr),       Vec(step.momentum), Vec(step.one_minus_dampening),
                           Vec(step.weight_decay), Vec(step.minus_one), step.has_momentum,
                           step.has_weight_decay,  step.nesterov,       step.maximize,
                           step.init_buffer};
  const bool read_buffer = step.has_momentum && !step.init_buffer;
  for_each_gradient<kD, 1>(
      F, GW, n, depth, has_penalty, two_s,
      // By value: for_each_gradient keeps its copy of this callback, and so the step's constants, local.
      [=](int64_t i, Regs& f, const Regs& g) {
        const int D = resolve_depth<kD>(depth);
        for (int d = 0; d < D; ++d) {
          Vec b[IO::kRegs];
          if (read_buffer) IO::load(B + d * n + i, b);
          for (int r = 0; r < IO::kRegs; ++r) sgd_update(vstep, g[r][d], f[r][d], b[r]);
          IO::template store_column<kD>(F + d * n + i, f, d);
          if (step.has_momentum) IO::store(B + d * n + i, b);
        }
      },
      [&](int64_t i, acc_t* f, const acc_t* g) {
        const int D = resolve_depth<kD>(depth);
        for (int d = 0; d < D; ++d) {
          acc_t b = read_buffer ? static_cast<acc_t>(B[d * n + i]) : acc_t(0);
          sgd_update(step, g[d], f[d], b);
          F[d * n + i] = static_cast<T>(f[d]);
          if (step.has_momentum) B[d * n + i] = static_cast<T>(b);
        }
      },
      kNoChunkWork);
}

}  // namespace
}  // namespace dwf::cpu::DWF_CPU_VARIANT_NS

namespace dwf::cpu {
using namespace DWF_CPU_VARIANT_NS;

template <>
template <typename T, typename O>
void Kernels<Isa::DWF_CPU_ISA>::forward(const T* F, O* W, int64_t n, int depth, bool with_sumsq,
                                        acc_type<T>* partials) {
  dispatch_depth(depth, [&](auto kd) { forward_kernel<decltype(kd)::value, T, O>(F, W, n, depth, with_sumsq, partials); });
}

template <>
template <typename T, typename G>
void Kernels<Isa::DWF_CPU_ISA>::backward(const T* F, const G* GW, T* GF, int64_t n, int depth, bool has_penalty,
                                         acc_type<T> two_s) {
  dispatch_depth(depth,
                 [&](auto kd) { backward_kernel<decltype(kd)::value, T, G>(F, GW, GF, n, depth, has_penalty, two_s); });
}

template <>
template <typename T, typename G>
void Kernels<Isa::DWF_CPU_ISA>::grad_sumsq(const T* F, const G* GW, int64_t n, int depth, bool has_penalty,
                                           acc_type<T> two_s, acc_type<T>* partials) {
  dispatch_depth(depth, [&](auto kd) {
    grad_sumsq_kernel<decltype(kd)::value, T, G>(F, GW, n, depth, has_penalty, two_s, partials);
  });
}

template <>
template <typename T, typename G>
void Kernels<Isa::DWF_CPU_ISA>::sgd_step(T* F, T* B, const G* GW, int64_t n, int depth, bool has_penalty,
                                         acc_type<T> two_s, const SgdOptions& args) {
  const SgdStep<acc_type<T>> step = make_sgd_step<acc_type<T>>(args);
  dispatch_depth(depth, [&](auto kd) {
    sgd_step_kernel<decltype(kd)::value, T, G>(F, B, GW, n, depth, has_penalty, two_s, step);
  });
}

// The element type pairs dispatch_io_types (dwf_dispatch.h) supports.
#define DWF_INSTANTIATE(T, IO)                                                                                     \
  template void Kernels<Isa::DWF_CPU_ISA>::forward<T, IO>(const T*, IO*, int64_t, int, bool, acc_type<T>*);      \
  template void Kernels<Isa::DWF_CPU_ISA>::backward<T, IO>(const T*, const IO*, T*, int64_t, int, bool,          \
                                                           acc_type<T>);                                         \
  template void Kernels<Isa::DWF_CPU_ISA>::sgd_step<T, IO>(T*, T*, const IO*, int64_t, int, bool, acc_type<T>,   \
                                                           const SgdOptions&);                                   \
  template void Kernels<Isa::DWF_CPU_ISA>::grad_sumsq<T, IO>(const T*, const IO*, int64_t, int, bool, acc_type<T>, \
                                                             acc_type<T>*);
DWF_INSTANTIATE(float, float)
DWF_INSTANTIATE(float, c10::BFloat16)
DWF_INSTANTIATE(float, c10::Half)
DWF_INSTANTIATE(double, double)
DWF_INSTANTIATE(c10::BFloat16, c10::BFloat16)
DWF_INSTANTIATE(c10::Half, c10::Half)
#undef DWF_INSTANTIATE

}  // namespace dwf::cpu
