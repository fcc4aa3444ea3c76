// The CUDA build's kernels and host code (csrc/cuda/dwf_cuda_kernels.cuh), compiled by g++ against
// cuda_on_host.h and registered as ops on CPU tensors: dwf_cuda_emulated::forward / backward /
// sgd_step / sum_partials, and launches / occupancy_queries to observe them. Built by
// tests/test_cuda_emulated.py. `multiprocessors` sets the SM count of the emulated device; its
// occupancy is kBlocksPerMultiprocessor for every kernel, so grid = min(packs / 256,
// kBlocksPerMultiprocessor * multiprocessors) and small inputs take several grid-stride iterations
// (all kernels but the backward, which launches one thread per pack).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cuda_on_host.h"
// After the emulation, so the kernels see its __global__, threadIdx, __syncthreads, ...
#include "cuda/dwf_cuda_run.cuh"
#include "cuda/dwf_cuda_multi_step.cuh"

namespace {

using namespace dwf;
using namespace dwf::cuda_impl;

// The emulated occupancy: resident 256-thread blocks per SM (a GPU answers 2-8 for these kernels).
constexpr int kBlocksPerMultiprocessor = 3;

int64_t occupancy_query_count = 0;

struct HostLauncher {
  int device;  // emulated devices are told apart by their SM count
  int multiprocessors() const { return device; }
  template <typename... Params>
  int blocks_per_multiprocessor(void (*)(Params...), int threads) const {
    TORCH_CHECK(threads == kThreads, "dwf_cuda_emulated: occupancy asked for ", threads, " threads");
    ++occupancy_query_count;
    return kBlocksPerMultiprocessor;
  }
  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), int64_t grid, int threads, Args... args) const {
    cuda_on_host::launch(grid, threads, [&] { kernel(args...); });
  }
};

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dwf_cuda_emulated: ", name, " must be a CPU tensor");
}

HostLauncher launcher(int64_t multiprocessors) {
  TORCH_CHECK(multiprocessors >= 1 && multiprocessors <= 64, "dwf_cuda_emulated: multiprocessors in [1, 64]");
  return HostLauncher{int(multiprocessors)};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& factors, std::optional<at::ScalarType> out_dtype,
                                           bool with_sumsq, int64_t multiprocessors) {
  check_cpu(factors, "factors");
  const at::ScalarType out = check_forward_args(factors, out_dtype);
  return run_forward(factors, out, with_sumsq, launcher(multiprocessors));
}

at::Tensor backward(const at::Tensor& factors, const at::Tensor& grad_w, const std::optional<at::Tensor>& grad_sumsq,
                    int64_t multiprocessors) {
  check_cpu(factors, "factors");
  check_backward_args(factors, grad_w, grad_sumsq);
  return run_backward(factors, grad_w, grad_sumsq, launcher(multiprocessors));
}

at::Tensor grad_sumsq_op(const at::Tensor& factors, const at::Tensor& grad_w,
                      const std::optional<at::Tensor>& grad_sumsq, int64_t multiprocessors) {
  check_cpu(factors, "factors");
  check_backward_args(factors, grad_w, grad_sumsq);
  return run_grad_sumsq(factors, grad_w, grad_sumsq, launcher(multiprocessors));
}

void sgd_step(const at::Tensor& factors, const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& grad_w,
              const std::optional<at::Tensor>& grad_sumsq, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, bool init_buffer, int64_t multiprocessors) {
  check_cpu(factors, "factors");
  const SgdOptions options{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer};
  check_sgd_step_args(factors, momentum_buffer, grad_w, grad_sumsq, options.momentum);
  run_sgd_step(factors, momentum_buffer, grad_w, grad_sumsq, options, launcher(multiprocessors));
}

void sgd_step_multi(at::TensorList factors, at::TensorList momentum_buffers, at::TensorList grad_w,
                    const c10::List<std::optional<at::Tensor>>& grad_sumsq, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize, bool init_buffer,
                    int64_t multiprocessors) {
  for (const at::Tensor& f : factors) check_cpu(f, "factors");
  const MultiStepLayers layers = check_multi_step(factors, momentum_buffers, grad_w, grad_sumsq, momentum);
  const SgdOptions options{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer};
  run_sgd_step_multi(layers, options, launcher(multiprocessors));
}

// sum_partials_kernel alone, over any number of partials (the forward makes one per resident block).
at::Tensor sum_partials(const at::Tensor& partials) {
  check_cpu(partials, "partials");
  TORCH_CHECK(partials.dim() == 1 && partials.is_contiguous(), "dwf_cuda_emulated: partials must be contiguous 1-d");
  at::Tensor out = at::empty({}, partials.options());
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble,
              "dwf_cuda_emulated: partials must be float32 or float64; got ", partials.scalar_type());
  dispatch_io(partials.scalar_type(), partials.scalar_type(), [&](auto types) {
    using A = typename decltype(types)::factor;
    HostLauncher{1}.launch(sum_partials_kernel<A>, 1, kReduceThreads, partials.const_data_ptr<A>(),
                           partials.numel(), out.mutable_data_ptr<A>());
  });
  return out;
}

// The launches since the last call, flattened: (grid, threads, widest access in bytes) each.
std::vector<int64_t> launches() {
  std::vector<int64_t> flat;
  for (const auto& r : cuda_on_host::launch_log) {
    flat.insert(flat.end(), {r.grid, int64_t(r.threads), int64_t(r.widest_access)});
  }
  cuda_on_host::launch_log.clear();
  return flat;
}

int64_t occupancy_queries() { return occupancy_query_count; }

}  // namespace

TORCH_LIBRARY(dwf_cuda_emulated, m) {
  m.def("forward(Tensor factors, ScalarType? out_dtype, bool with_sumsq, int multiprocessors) -> (Tensor, Tensor)",
        &forward);
  m.def("backward(Tensor factors, Tensor grad_w, Tensor? grad_sumsq, int multiprocessors) -> Tensor", &backward);
  m.def(
      "sgd_step(Tensor(a!) factors, Tensor(b!)? momentum_buffer, Tensor grad_w, Tensor? grad_sumsq, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool init_buffer, "
      "int multiprocessors) -> ()",
      &sgd_step);
  m.def("grad_sumsq(Tensor factors, Tensor grad_w, Tensor? grad_sumsq, int multiprocessors) -> Tensor",
        &grad_sumsq_op);
  m.def(
      "sgd_step_multi(Tensor(a!)[] factors, Tensor(b!)[] momentum_buffers, Tensor[] grad_w, Tensor?[] grad_sumsq, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool init_buffer, "
      "int multiprocessors) -> ()",
      &sgd_step_multi);
  m.def("sum_partials(Tensor partials) -> Tensor", &sum_partials);
  m.def("launches() -> int[]", &launches);
  m.def("occupancy_queries() -> int", &occupancy_queries);
}
