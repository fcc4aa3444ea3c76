// The CUDA build of the fused DWF ops: dwf_cuda_kernels.cuh's kernels and dwf_cuda_run.cuh's host code, launched on
// the current CUDA stream of the tensors' device, registered for the CUDA dispatch key.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "dwf_cuda_run.cuh"
#include "dwf_cuda_multi_step.cuh"

namespace dwf {
namespace {

using namespace cuda_impl;

int sm_count(int device) {
  static std::vector<int> counts;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

// Launches on the current stream of `device` (the caller holds a guard for it); errors are checked.
struct CudaLauncher {
  int device;
  cudaStream_t stream;

  explicit CudaLauncher(const at::Tensor& t) : device(t.get_device()), stream(c10::cuda::getCurrentCUDAStream()) {}
  int multiprocessors() const { return sm_count(device); }
  // Resident blocks per SM (run_* cache the answer per kernel and device).
  template <typename... Params>
  int blocks_per_multiprocessor(void (*kernel)(Params...), int threads) const {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0));
    return blocks;
  }
  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), int64_t grid, int threads, Args... args) const {
    kernel<<<grid, threads, 0, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> dwf_forward_cuda(const at::Tensor& factors,
                                                    std::optional<at::ScalarType> out_dtype, bool with_sumsq) {
  const at::ScalarType out = check_forward_args(factors, out_dtype);
  const c10::cuda::CUDAGuard guard(factors.device());
  return run_forward(factors, out, with_sumsq, CudaLauncher(factors));
}

at::Tensor dwf_backward_cuda(const at::Tensor& factors, const at::Tensor& grad_w,
                             const std::optional<at::Tensor>& grad_sumsq) {
  check_backward_args(factors, grad_w, grad_sumsq);
  const c10::cuda::CUDAGuard guard(factors.device());
  return run_backward(factors, grad_w, grad_sumsq, CudaLauncher(factors));
}

at::Tensor dwf_grad_sumsq_cuda(const at::Tensor& factors, const at::Tensor& grad_w,
                               const std::optional<at::Tensor>& grad_sumsq) {
  check_backward_args(factors, grad_w, grad_sumsq);
  const c10::cuda::CUDAGuard guard(factors.device());
  return run_grad_sumsq(factors, grad_w, grad_sumsq, CudaLauncher(factors));
}

void dwf_sgd_step_cuda(const at::Tensor& factors, const std::optional<at::Tensor>& momentum_buffer,
                       const at::Tensor& grad_w, const std::optional<at::Tensor>& grad_sumsq, double lr,
                       double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                       bool init_buffer) {
  const SgdOptions options{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer};
  check_sgd_step_args(factors, momentum_buffer, grad_w, grad_sumsq, options.momentum);
  const c10::cuda::CUDAGuard guard(factors.device());
  run_sgd_step(factors, momentum_buffer, grad_w, grad_sumsq, options, CudaLauncher(factors));
}

// dwf_sgd_step on each layer of the lists, in one op call: layers that share device, dtypes and
// depth (as FusedSGD groups them) in one launch per 48 layers (run_sgd_step_multi); any other mix
// layer by layer.
void dwf_sgd_step_multi_cuda(at::TensorList factors, at::TensorList momentum_buffers, at::TensorList grad_w,
                             const c10::List<std::optional<at::Tensor>>& grad_sumsq, double lr, double momentum,
                             double dampening, double weight_decay, bool nesterov, bool maximize, bool init_buffer) {
  const SgdOptions options{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer};
  const MultiStepLayers layers = check_multi_step(factors, momentum_buffers, grad_w, grad_sumsq, momentum);
  if (layers.factors.empty()) return;
  if (layers.uniform()) {
    const c10::cuda::CUDAGuard guard(layers.factors[0].device());
    run_sgd_step_multi(layers, options, CudaLauncher(layers.factors[0]));
    return;
  }
  for (size_t i = 0; i < layers.factors.size(); ++i) {
    const c10::cuda::CUDAGuard guard(layers.factors[i].device());
    run_sgd_step(layers.factors[i], layers.buffer(i), layers.grad_w[i], layers.grad_sumsq[i], options,
                 CudaLauncher(layers.factors[i]));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dwf_kernels, CUDA, m) {
  m.impl("dwf_forward", &dwf_forward_cuda);
  m.impl("dwf_backward", &dwf_backward_cuda);
  m.impl("dwf_sgd_step", &dwf_sgd_step_cuda);
  m.impl("dwf_grad_sumsq", &dwf_grad_sumsq_cuda);
  m.impl("dwf_sgd_step_multi", &dwf_sgd_step_multi_cuda);
}

}  // namespace dwf
