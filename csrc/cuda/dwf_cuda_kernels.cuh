// The CUDA kernels of the fused DWF forward, backward, backward + SGD step and gradient norm, and the host code
// that plans and launches them (docs/design.md, CUDA kernels).
//
// Grid-stride loops over packs of V elements with 64-bit indices: V = pack_elements<factor>()
// (16 bytes of factors) when fits_packs holds for all the op's operands, i.e. n % V == 0 and every
// base pointer is aligned to its pack (one vector access per operand row per pack), else V = 1
// (plain coalesced accesses), so any view works; dispatch_pack (dwf_dispatch.h) picks the kernel.
// Per element the math is dwf_math.h's, the same templates the CPU kernels run. The grid is as
// many blocks as the device holds at once for that kernel (its occupancy, asked once per kernel
// and device), fewer when the work is smaller. sumsq: each block writes one partial to its own
// slot, then one block sums the partials in a fixed order: deterministic, no floating-point atomics
// (a one-block grid writes sumsq directly; without sumsq nothing is reduced).
//
// The host functions run_forward / run_backward / run_sgd_step / run_grad_sumsq take a Launcher, so the same code
// serves two builds:
//   dwf_cuda.cu      nvcc; launches on the current CUDA stream (CudaLauncher)
//   tests/cuda_emulation/  g++; runs every block's threads as host threads on CPU tensors, so the
//                    CPU test suite executes these kernels (indexing, packs, grid stride, the
//                    partial sums) without a GPU
// A Launcher has a member `device` (an index), multiprocessors() (the SM count),
// blocks_per_multiprocessor(kernel, threads) (the occupancy query) and
// launch(kernel, grid, threads, args...) (kernel<<<grid, threads>>>(args...), checked).
// The ops' arguments are validated (dwf_dispatch.h) before run_* is called.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../dwf_dispatch.h"

namespace dwf {
namespace cuda_impl {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 1024;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// V elements moved as one aligned access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Every global access of the kernels: the pack of V elements at base + p * V. A GPU faults on a
// misaligned vector access; the host emulation (tests/cuda_emulation) defines DWF_CHECK_ALIGNED to
// report one, where the CPU would silently tolerate it.
#ifndef DWF_CHECK_ALIGNED
#define DWF_CHECK_ALIGNED(address, bytes)
#endif

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* base, int64_t p) {
  const Pack<T, V>* at = reinterpret_cast<const Pack<T, V>*>(base) + p;
  DWF_CHECK_ALIGNED(at, sizeof(Pack<T, V>));
  return *at;
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t p, const Pack<T, V>& value) {
  Pack<T, V>* at = reinterpret_cast<Pack<T, V>*>(base) + p;
  DWF_CHECK_ALIGNED(at, sizeof(Pack<T, V>));
  *at = value;
}

// How many blocks of `kernel`, launched with `threads` threads, the launcher's device runs at once:
// its occupancy (resident blocks per multiprocessor, limited by the kernel's registers) times the
// multiprocessor count. Asked of the device once per kernel, block size and device, then cached,
// so a grid is a function of (kernel, device, work) and sumsq's partials keep a fixed layout.
template <typename Launcher, typename... Params>
int64_t resident_blocks(const Launcher& launcher, void (*kernel)(Params...), int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int64_t> cache;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), threads, int(launcher.device));
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find(key);
  if (found == cache.end()) {
    const int64_t blocks =
        int64_t(std::max(1, launcher.blocks_per_multiprocessor(kernel, threads))) * launcher.multiprocessors();
    found = cache.emplace(key, blocks).first;
  }
  return found->second;
}

// The grid for `packs` work items, one per thread: enough blocks to cover them, at most `resident`.
inline int64_t grid_for(int64_t packs, int64_t resident) {
  const int64_t needed = (packs + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, resident));
}

// The grid for `kernel` over `packs` packs on the launcher's device.
template <typename Launcher, typename... Params>
int64_t grid_for(const Launcher& launcher, void (*kernel)(Params...), int64_t packs) {
  return grid_for(packs, resident_blocks(launcher, kernel, kThreads));
}

// Deterministic block sum: fixed shuffle tree within warps, then the warp sums in order.
template <typename A>
__device__ A block_sum(A value) {
  __shared__ A warp_sums[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  A total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) total += warp_sums[w];
  }
  return total;  // valid in thread 0
}

// w = prod_d F[d] over n elements. With sumsq, block b writes its sum of squares to partials[b]
// (when the grid is one block, `partials` is sumsq itself); without, block 0 writes sumsq = 0
// through `partials`.
template <int kD, typename T, typename O, int V>
__global__ void __launch_bounds__(kThreads)
    dwf_forward_kernel(const T* __restrict__ F, O* __restrict__ W, acc_type_t<T>* __restrict__ partials,
                       int64_t n, int depth, bool with_sumsq) {
  using acc_t = acc_type_t<T>;
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  const int64_t packs = n / V;
  acc_t sq = 0;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    Pack<T, V> f[kSlots];
#pragma unroll
    for (int d = 0; d < kSlots; ++d) {
      if (d < D) f[d] = load_pack<V>(F + d * n, p);  // all loads issued first
    }
    Pack<O, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t column[kSlots];
#pragma unroll
      for (int d = 0; d < kSlots; ++d) {
        if (d < D) column[d] = static_cast<acc_t>(f[d].v[j]);
      }
      out.v[j] = static_cast<O>(product<kD>(column, depth));
      if (with_sumsq) sq = accumulate_squares<kD>(column, depth, sq);
    }
    store_pack<V>(W, p, out);
  }
  if (with_sumsq) {
    const acc_t total = block_sum(sq);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
  } else if (blockIdx.x == 0 && threadIdx.x == 0) {
    partials[0] = 0;
  }
}

// sumsq = sum(partials[0..m)) in a fixed order (0 when m == 0).
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) sum_partials_kernel(const A* __restrict__ partials, int64_t m,
                                                                      A* __restrict__ out) {
  A value = 0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) value += partials[i];
  const A total = block_sum(value);
  if (threadIdx.x == 0) *out = total;
}

// Per element j of one pack: the factors column[d] and their gradients grad[d] (dwf_backward's
// math, in registers), handed to on(j, column, grad). Shared by the backward and the SGD step.
template <int kD, typename T, typename G, int V, typename On>
__device__ __forceinline__ void for_each_gradient(const Pack<T, V>* f, const Pack<G, V>& g, int depth,
                                                  bool has_penalty, acc_type_t<T> two_s, On&& on) {
  using acc_t = acc_type_t<T>;
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc_t column[kSlots], grad[kSlots];
#pragma unroll
    for (int d = 0; d < kSlots; ++d) {
      if (d < D) column[d] = static_cast<acc_t>(f[d].v[j]);
    }
    factor_grads<kD>(column, depth, static_cast<acc_t>(g.v[j]), grad);
    if (has_penalty) add_penalty_grads<kD>(column, depth, two_s, grad);
    on(j, column, grad);
  }
}

template <int kD, typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads)
    dwf_backward_kernel(const T* __restrict__ F, const G* __restrict__ GW, T* __restrict__ GF,
                        const acc_type_t<T>* __restrict__ grad_sumsq, int64_t n, int depth) {
  using acc_t = acc_type_t<T>;
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  const bool has_penalty = grad_sumsq != nullptr;
  const acc_t two_s = has_penalty ? acc_t(2) * *grad_sumsq : acc_t(0);
  const int64_t packs = n / V;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    Pack<T, V> f[kSlots];
#pragma unroll
    for (int d = 0; d < kSlots; ++d) {
      if (d < D) f[d] = load_pack<V>(F + d * n, p);
    }
    const Pack<G, V> g = load_pack<V>(GW, p);
    Pack<T, V> out[kSlots];
    for_each_gradient<kD>(f, g, depth, has_penalty, two_s, [&](int j, const acc_t*, const acc_t* grad) {
#pragma unroll
      for (int d = 0; d < kSlots; ++d) {
        if (d < D) out[d].v[j] = static_cast<T>(grad[d]);
      }
    });
#pragma unroll
    for (int d = 0; d < kSlots; ++d) {
      if (d < D) store_pack<V>(GF + d * n, p, out[d]);
    }
  }
}

// The squared norm of dwf_backward_kernel's gradients, read-only: each block writes the sum of its
// elements' squares to partials[blockIdx.x] (the result itself when the grid is one block).
template <int kD, typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads)
    dwf_grad_sumsq_kernel(const T* __restrict__ F, const G* __restrict__ GW,
                          const acc_type_t<T>* __restrict__ grad_sumsq, acc_type_t<T>* __restrict__ partials,
                          int64_t n, int depth) {
  using acc_t = acc_type_t<T>;
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  const bool has_penalty = grad_sumsq != nullptr;
  const acc_t two_s = has_penalty ? acc_t(2) * *grad_sumsq : acc_t(0);
  const int64_t packs = n / V;
  acc_t sq = 0;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    Pack<T, V> f[kSlots];
#pragma unroll
    for (int d = 0; d < kSlots; ++d) {
      if (d < D) f[d] = load_pack<V>(F + d * n, p);
    }
    const Pack<G, V> g = load_pack<V>(GW, p);
    for_each_gradient<kD>(f, g, depth, has_penalty, two_s,
                          [&](int, const acc_t*, const acc_t* grad) { sq = accumulate_squares<kD>(grad, depth, sq); });
  }
  const acc_t total = block_sum(sq);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// The fused backward + SGD step for pack p of one layer: the factor gradients of
// dwf_backward_kernel, formed per element in registers and applied at once by sgd_update to the
// factors and momentum buffer, in place. Shared by the per-layer and the multi-layer kernels
// (dwf_cuda_multi_step.cuh).
template <int kD, typename T, typename G, int V>
__device__ __forceinline__ void sgd_step_pack(T* __restrict__ F, T* __restrict__ B, const G* __restrict__ GW,
                                              int64_t n, int64_t p, int depth, bool has_penalty,
                                              acc_type_t<T> two_s, const SgdStep<acc_type_t<T>>& step) {
  using acc_t = acc_type_t<T>;
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  const bool read_buffer = step.has_momentum && !step.init_buffer;
  Pack<T, V> f[kSlots], b[kSlots];
#pragma unroll
  for (int d = 0; d < kSlots; ++d) {
    if (d < D) f[d] = load_pack<V>(F + d * n, p);
  }
  const Pack<G, V> g = load_pack<V>(GW, p);
#pragma unroll
  for (int d = 0; d < kSlots; ++d) {
    if (d < D && read_buffer) b[d] = load_pack<V>(B + d * n, p);
  }
  for_each_gradient<kD>(f, g, depth, has_penalty, two_s, [&](int j, acc_t* column, const acc_t* grad) {
#pragma unroll
    for (int d = 0; d < kSlots; ++d) {
      if (d < D) {
        acc_t buf = read_buffer ? static_cast<acc_t>(b[d].v[j]) : acc_t(0);
        sgd_update(step, grad[d], column[d], buf);
        f[d].v[j] = static_cast<T>(column[d]);
        b[d].v[j] = static_cast<T>(buf);
      }
    }
  });
#pragma unroll
  for (int d = 0; d < kSlots; ++d) {
    if (d < D) {
      store_pack<V>(F + d * n, p, f[d]);
      if (step.has_momentum) store_pack<V>(B + d * n, p, b[d]);
    }
  }
}

template <int kD, typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads)
    dwf_sgd_step_kernel(T* __restrict__ F, T* __restrict__ B, const G* __restrict__ GW,
                        const acc_type_t<T>* __restrict__ grad_sumsq, int64_t n, int depth,
                        SgdStep<acc_type_t<T>> step) {
  using acc_t = acc_type_t<T>;
  const bool has_penalty = grad_sumsq != nullptr;
  const acc_t two_s = has_penalty ? acc_t(2) * *grad_sumsq : acc_t(0);
  const int64_t packs = n / V;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    sgd_step_pack<kD, T, G, V>(F, B, GW, n, p, depth, has_penalty, two_s, step);
  }
}

// Calls f(kD, kV), std::integral_constant each: the depth policy of dispatch_depth and the pack
// width of dispatch_pack for factors of type T (pack_elements<T>() when `vector`, else 1).
template <typename T, typename F>
void dispatch_depth_and_pack(int64_t depth, bool vector, F&& f) {
  dispatch_depth(depth, [&](auto kd) { dispatch_pack<T>(vector, [&](auto kv) { f(kd, kv); }); });
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& factors_arg, at::ScalarType out, bool with_sumsq,
                                               const Launcher& launcher) {
  const at::Tensor factors = factors_arg.contiguous();  // non-contiguous input: copied once
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;
  at::Tensor w = at::empty(factors.sizes().slice(1), factors.options().dtype(out));
  at::Tensor sumsq = at::empty({}, factors.options().dtype(sumsq_dtype(factors.scalar_type())));

  dispatch_io(factors.scalar_type(), out, [&](auto types) {
    using T = typename decltype(types)::factor;
    using O = typename decltype(types)::io;
    using acc_t = acc_type_t<T>;
    const T* F = factors.const_data_ptr<T>();
    O* W = w.mutable_data_ptr<O>();
    acc_t* S = sumsq.mutable_data_ptr<acc_t>();
    if (n == 0) {  // sumsq = the empty sum
      const acc_t* none = nullptr;
      launcher.launch(sum_partials_kernel<acc_t>, 1, kReduceThreads, none, int64_t(0), S);
      return;
    }
    dispatch_depth_and_pack<T>(depth, fits_packs<T>(n, F, W), [&](auto kd, auto kv) {
      constexpr int kV = decltype(kv)::value;
      const auto kernel = dwf_forward_kernel<decltype(kd)::value, T, O, kV>;
      const int64_t grid = grid_for(launcher, kernel, n / kV);
      if (with_sumsq && grid > 1) {
        at::Tensor partials = at::empty({grid}, sumsq.options());
        acc_t* P = partials.mutable_data_ptr<acc_t>();
        launcher.launch(kernel, grid, kThreads, F, W, P, n, int(depth), true);
        launcher.launch(sum_partials_kernel<acc_t>, 1, kReduceThreads, static_cast<const acc_t*>(P), grid, S);
      } else {  // one partial is the sum; or no sumsq: block 0 zeroes it
        launcher.launch(kernel, grid, kThreads, F, W, S, n, int(depth), with_sumsq);
      }
    });
  });
  return {w, sumsq};
}

// The penalty scale s stays on the device (no host sync), as a 0-d tensor in the accumulation dtype.
inline at::Tensor penalty_scale(const at::Tensor& factors, const std::optional<at::Tensor>& grad_sumsq) {
  return grad_sumsq.has_value() ? grad_sumsq->reshape({}).to(sumsq_dtype(factors.scalar_type())).contiguous()
                                : at::Tensor();
}

template <typename Launcher>
at::Tensor run_backward(const at::Tensor& factors_arg, const at::Tensor& grad_w_arg,
                        const std::optional<at::Tensor>& grad_sumsq, const Launcher& launcher) {
  const at::Tensor factors = factors_arg.contiguous();
  const at::Tensor grad_w = grad_w_arg.contiguous();
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;
  at::Tensor grad_factors = at::empty(factors.sizes(), factors.options());
  const at::Tensor s = penalty_scale(factors, grad_sumsq);
  if (n == 0) return grad_factors;

  dispatch_io(factors.scalar_type(), grad_w.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::factor;
    using G = typename decltype(types)::io;
    using acc_t = acc_type_t<T>;
    const T* F = factors.const_data_ptr<T>();
    const G* GW = grad_w.const_data_ptr<G>();
    T* GF = grad_factors.mutable_data_ptr<T>();
    const acc_t* S = s.defined() ? s.const_data_ptr<acc_t>() : nullptr;
    dispatch_depth_and_pack<T>(depth, fits_packs<T>(n, F, GW, GF), [&](auto kd, auto kv) {
      constexpr int kV = decltype(kv)::value;
      const auto kernel = dwf_backward_kernel<decltype(kd)::value, T, G, kV>;
      launcher.launch(kernel, grid_for(launcher, kernel, n / kV), kThreads, F, GW, GF, S, n, int(depth));
    });
  });
  return grad_factors;
}

// The squared norm of run_backward's result, without storing it: one partial per block, summed in
// a fixed order (as the forward's sumsq).
template <typename Launcher>
at::Tensor run_grad_sumsq(const at::Tensor& factors_arg, const at::Tensor& grad_w_arg,
                          const std::optional<at::Tensor>& grad_sumsq, const Launcher& launcher) {
  const at::Tensor factors = factors_arg.contiguous();
  const at::Tensor grad_w = grad_w_arg.contiguous();
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;
  at::Tensor result = at::empty({}, factors.options().dtype(sumsq_dtype(factors.scalar_type())));
  const at::Tensor s = penalty_scale(factors, grad_sumsq);

  dispatch_io(factors.scalar_type(), grad_w.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::factor;
    using G = typename decltype(types)::io;
    using acc_t = acc_type_t<T>;
    acc_t* R = result.mutable_data_ptr<acc_t>();
    if (n == 0) {  // the empty sum
      const acc_t* none = nullptr;
      launcher.launch(sum_partials_kernel<acc_t>, 1, kReduceThreads, none, int64_t(0), R);
      return;
    }
    const T* F = factors.const_data_ptr<T>();
    const G* GW = grad_w.const_data_ptr<G>();
    const acc_t* S = s.defined() ? s.const_data_ptr<acc_t>() : nullptr;
    dispatch_depth_and_pack<T>(depth, fits_packs<T>(n, F, GW), [&](auto kd, auto kv) {
      constexpr int kV = decltype(kv)::value;
      const auto kernel = dwf_grad_sumsq_kernel<decltype(kd)::value, T, G, kV>;
      const int64_t grid = grid_for(launcher, kernel, n / kV);
      if (grid > 1) {
        at::Tensor partials = at::empty({grid}, result.options());
        acc_t* P = partials.mutable_data_ptr<acc_t>();
        launcher.launch(kernel, grid, kThreads, F, GW, S, P, n, int(depth));
        launcher.launch(sum_partials_kernel<acc_t>, 1, kReduceThreads, static_cast<const acc_t*>(P), grid, R);
      } else {
        launcher.launch(kernel, grid, kThreads, F, GW, S, R, n, int(depth));
      }
    });
  });
  return result;
}

template <typename Launcher>
void run_sgd_step(const at::Tensor& factors, const std::optional<at::Tensor>& momentum_buffer,
                  const at::Tensor& grad_w_arg, const std::optional<at::Tensor>& grad_sumsq,
                  const SgdOptions& options, const Launcher& launcher) {
  const at::Tensor grad_w = grad_w_arg.contiguous();
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;
  const at::Tensor s = penalty_scale(factors, grad_sumsq);
  if (n == 0) return;

  dispatch_io(factors.scalar_type(), grad_w.scalar_type(), [&](auto types) {
    using T = typename decltype(types)::factor;
    using G = typename decltype(types)::io;
    using acc_t = acc_type_t<T>;
    T* F = factors.mutable_data_ptr<T>();
    T* B = options.momentum != 0 ? momentum_buffer->mutable_data_ptr<T>() : nullptr;
    const G* GW = grad_w.const_data_ptr<G>();
    const acc_t* S = s.defined() ? s.const_data_ptr<acc_t>() : nullptr;
    const SgdStep<acc_t> step = make_sgd_step<acc_t>(options);
    dispatch_depth_and_pack<T>(depth, fits_packs<T>(n, F, GW, B), [&](auto kd, auto kv) {
      constexpr int kV = decltype(kv)::value;
      const auto kernel = dwf_sgd_step_kernel<decltype(kd)::value, T, G, kV>;
      launcher.launch(kernel, grid_for(launcher, kernel, n / kV), kThreads, F, B, GW, S, n, int(depth), step);
    });
  });
}

}  // namespace cuda_impl
}  // namespace dwf
