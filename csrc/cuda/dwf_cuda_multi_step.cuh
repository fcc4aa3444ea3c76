// The multi-layer fused SGD step (dwf_sgd_step_multi) on CUDA: one launch steps many layers, with
// the arithmetic of the per-layer kernel (sgd_step_pack, dwf_cuda_kernels.cuh). Built by
// dwf_cuda.cu and by the host emulation (tests/cuda_emulation/), as the per-layer kernels are.
#pragma once

#include <vector>

#include "dwf_cuda_run.cuh"

namespace dwf {
namespace cuda_impl {

// The multi-layer step's launch table, passed by value as a kernel argument (no device memory:
// nothing to allocate, copy or keep per step, and a CUDA graph captures it with the launch). Block
// b steps chunk block_chunk[b] (kMultiChunkPacks packs) of layer block_layer[b].
constexpr int kMultiLayers = 48;
constexpr int kMultiBlocks = 256;
constexpr int64_t kMultiChunkPacks = int64_t(kThreads) * 4;

template <typename T, typename G>
struct MultiStepTable {
  T* factors[kMultiLayers];
  T* buffers[kMultiLayers];
  const G* grad_w[kMultiLayers];
  const acc_type_t<T>* grad_sumsq[kMultiLayers];  // nullptr: no penalty term
  int64_t n[kMultiLayers];
  int16_t block_layer[kMultiBlocks];
  int32_t block_chunk[kMultiBlocks];
};

template <int kD, typename T, typename G, int V>
__global__ void __launch_bounds__(kThreads)
    dwf_sgd_step_multi_kernel(MultiStepTable<T, G> table, int depth, SgdStep<acc_type_t<T>> step) {
  using acc_t = acc_type_t<T>;
  const int layer = table.block_layer[blockIdx.x];
  const int64_t n = table.n[layer];
  const acc_t* grad_sumsq = table.grad_sumsq[layer];
  const bool has_penalty = grad_sumsq != nullptr;
  const acc_t two_s = has_penalty ? acc_t(2) * *grad_sumsq : acc_t(0);
  const int64_t first = int64_t(table.block_chunk[blockIdx.x]) * kMultiChunkPacks;
  const int64_t end = n / V < first + kMultiChunkPacks ? n / V : first + kMultiChunkPacks;
  for (int64_t p = first + threadIdx.x; p < end; p += blockDim.x) {
    sgd_step_pack<kD, T, G, V>(table.factors[layer], table.buffers[layer], table.grad_w[layer], n, p, depth,
                               has_penalty, two_s, step);
  }
}

// dwf_sgd_step on every layer of the lists, which share the factors' dtype, grad_w's dtype and the
// depth (the caller checks): one launch per kMultiLayers layers or kMultiBlocks chunks, whichever
// fills first (a layer longer than a launch's blocks continues in the next launch). The vector path
// when every layer's operands fit packs, else the element-wise one for all.
template <typename Launcher>
void run_sgd_step_multi(const MultiStepLayers& layers, const SgdOptions& options, const Launcher& launcher) {
  const std::vector<at::Tensor>& factors = layers.factors;
  const std::vector<at::Tensor>& buffers = layers.momentum_buffers;
  const std::vector<at::Tensor>& grad_w_args = layers.grad_w;
  const std::vector<std::optional<at::Tensor>>& grad_sumsq = layers.grad_sumsq;
  if (factors.empty()) return;
  TORCH_CHECK(layers.uniform(), "dwf_sgd_step_multi: one launch serves layers of one device, dtypes and depth");
  const int64_t depth = factors[0].size(0);
  std::vector<at::Tensor> grad_w, scales;
  for (size_t i = 0; i < factors.size(); ++i) {
    grad_w.push_back(grad_w_args[i].contiguous());
    scales.push_back(penalty_scale(factors[i], grad_sumsq[i]));
  }
  dispatch_io(factors[0].scalar_type(), grad_w[0].scalar_type(), [&](auto types) {
    using T = typename decltype(types)::factor;
    using G = typename decltype(types)::io;
    using acc_t = acc_type_t<T>;
    bool vector = true;
    for (size_t i = 0; i < factors.size(); ++i) {
      const int64_t n = factors[i].numel() / depth;
      const T* B = options.momentum != 0 ? buffers[i].const_data_ptr<T>() : nullptr;
      vector = vector && fits_packs<T>(n, factors[i].const_data_ptr<T>(), grad_w[i].const_data_ptr<G>(), B);
    }
    const SgdStep<acc_t> step = make_sgd_step<acc_t>(options);
    dispatch_depth_and_pack<T>(depth, vector, [&](auto kd, auto kv) {
      constexpr int kV = decltype(kv)::value;
      const auto kernel = dwf_sgd_step_multi_kernel<decltype(kd)::value, T, G, kV>;
      MultiStepTable<T, G> table{};
      int layers = 0, blocks = 0;
      auto launch = [&] {
        launcher.launch(kernel, blocks, kThreads, table, int(depth), step);
        blocks = 0;
      };
      for (size_t i = 0; i < factors.size(); ++i) {
        const int64_t n = factors[i].numel() / depth;
        const int64_t chunks = (n / kV + kMultiChunkPacks - 1) / kMultiChunkPacks;
        if (chunks == 0) continue;
        if (layers == kMultiLayers) {
          if (blocks > 0) launch();
          layers = 0;
        }
        const int slot = layers++;
        table.factors[slot] = factors[i].mutable_data_ptr<T>();
        table.buffers[slot] = options.momentum != 0 ? buffers[i].mutable_data_ptr<T>() : nullptr;
        table.grad_w[slot] = grad_w[i].const_data_ptr<G>();
        table.grad_sumsq[slot] = scales[i].defined() ? scales[i].const_data_ptr<acc_t>() : nullptr;
        table.n[slot] = n;
        for (int64_t c = 0; c < chunks; ++c) {
          table.block_layer[blocks] = static_cast<int16_t>(layers - 1);
          table.block_chunk[blocks] = static_cast<int32_t>(c);
          if (++blocks == kMultiBlocks) {
            launch();
            if (c + 1 < chunks) {  // the layer goes on in the next launch, as its first
              table.factors[0] = table.factors[layers - 1];
              table.buffers[0] = table.buffers[layers - 1];
              table.grad_w[0] = table.grad_w[layers - 1];
              table.grad_sumsq[0] = table.grad_sumsq[layers - 1];
              table.n[0] = table.n[layers - 1];
              layers = 1;
            } else {
              layers = 0;
            }
          }
        }
      }
      if (blocks > 0) launch();
    });
  });
}

}  // namespace cuda_impl
}  // namespace dwf
