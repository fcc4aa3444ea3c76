// The CPU kernels' entry points, compiled once per instruction set.
//
// dwf_cpu_kernels.cpp is compiled by setup.py into one object per variant: the portable baseline
// (x86-64: SSE2), AVX2 + FMA and AVX-512, each with its own compiler flags and its own
// Kernels<Isa> specialization, as ATen compiles its native/cpu kernels. The host code
// (dwf_cpu.cpp: argument checks, allocation, type dispatch, registration) is compiled with the
// baseline flags only and calls the variant that ATen itself runs (at::get_cpu_capability(), which
// follows ATEN_CPU_CAPABILITY), so one binary runs on any x86-64 CPU and uses its widest SIMD.
//
// Every variant computes bitwise the same results: the products in the same order, the SGD step's
// a*b + c fused in every lane (std::fma in the baseline variant), and sumsq summed over the same
// lanes in the same order whatever the register width.
#pragma once

#include <cstdint>

namespace dwf {
struct SgdOptions;  // torch.optim.SGD's hyper-parameters as the op receives them (dwf_dispatch.h)
}  // namespace dwf

namespace dwf::cpu {

// The variants, in ATen's order (at::native::CPUCapability on x86-64).
enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The accumulation type: fp32 for fp32, bf16 and fp16 elements, fp64 for fp64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;


// The kernels of one variant. T: the factors' element type; O: w's (forward); G: grad_w's.
template <Isa kIsa>
struct Kernels {
  // w[i] = prod_d F[d, i] for the n elements; partials[c] = sum of F^2 over chunk c of
  // num_chunks(n) (when with_sumsq).
  template <typename T, typename O>
  static void forward(const T* F, O* W, int64_t n, int depth, bool with_sumsq, acc_type<T>* partials);
  // GF[d, i] = GW[i] * prod_{k != d} F[k, i] (+ two_s * F[d, i] when has_penalty).
  template <typename T, typename G>
  static void backward(const T* F, const G* GW, T* GF, int64_t n, int depth, bool has_penalty, acc_type<T> two_s);
  // partials[c] = the sum over chunk c of the squares of backward's gradients, which are not stored.
  template <typename T, typename G>
  static void grad_sumsq(const T* F, const G* GW, int64_t n, int depth, bool has_penalty, acc_type<T> two_s,
                         acc_type<T>* partials);
  // backward's gradients applied at once by an SGD step to F and the momentum buffer B, in place.
  template <typename T, typename G>
  static void sgd_step(T* F, T* B, const G* GW, int64_t n, int depth, bool has_penalty, acc_type<T> two_s,
                       const SgdOptions& args);
};

// The unit of parallel work and of the sumsq partial sums (fixed, so results do not depend on the
// thread count).
constexpr int64_t kChunk = 16384;
inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

}  // namespace dwf::cpu
