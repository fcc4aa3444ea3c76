// The CUDA kernels of the fused DWF forward, backward, backward + SGD step and gradient norm
// (docs/design.md, CUDA kernels); the host code that plans and launches them is dwf_cuda_run.cuh.
//
// Grid-stride loops over packs of V elements with 64-bit indices: V = pack_elements<factor>()
// (16 bytes of factors) when fits_packs holds for all the op's operands, i.e. n % V == 0 and every
// base pointer is aligned to its pack (one vector access per operand row per pack), else V = 1
// (plain coalesced accesses), so any view works; dispatch_pack (dwf_dispatch.h) picks the kernel.
// Per element the math is dwf_math.h's, the same templates the CPU kernels run. The backward
// launches one thread per pack (grid_covering); the other kernels as many blocks as the device
// holds at once for that kernel (its occupancy, asked once per kernel and device; grid_for), fewer
// when the work is smaller. sumsq: each block writes one partial to its own slot, then one block
// sums the partials in a fixed order: deterministic, no floating-point atomics (a one-block grid
// writes sumsq directly; without sumsq nothing is reduced).
//
// The kernels and launch helpers are built twice:
//   dwf_cuda.cu      nvcc; launches on the current CUDA stream (CudaLauncher)
//   tests/cuda_emulation/  g++; runs every block's threads as host threads on CPU tensors, so the
//                    CPU test suite executes these kernels (indexing, packs, grid stride, the
//                    partial sums) without a GPU
// A Launcher has a member `device` (an index), multiprocessors() (the SM count),
// blocks_per_multiprocessor(kernel, threads) (the occupancy query) and
// launch(kernel, grid, threads, args...) (kernel<<<grid, threads>>>(args...), checked).
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

// The grid for `kernel` over `packs` packs on the launcher's device: the forward and the gradient
// norm (their sumsq partials are one per block) and the one-layer SGD step.
template <typename Launcher, typename... Params>
int64_t grid_for(const Launcher& launcher, void (*kernel)(Params...), int64_t packs) {
  return grid_for(packs, resident_blocks(launcher, kernel, kThreads));
}

// The backward's grid: one thread per pack, all blocks of the work in one launch (the grid-stride
// loop iterates only past INT32_MAX blocks). Measured on an H200 with the backward's loop standalone
// (bench/cuda_backward_variants.cu, D=4, N=2^26, fp32): over a grid of the resident blocks it moved
// its 9N elements at 93% of the copy bandwidth, over two or four waves of them at 94-95%, over one
// block per 256 packs at 99.5%. The one-layer SGD step (in place, 17N) is not yet measured so.
inline int64_t grid_covering(int64_t packs) {
  return grid_for(packs, int64_t(INT32_MAX));
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

}  // namespace cuda_impl
}  // namespace dwf
