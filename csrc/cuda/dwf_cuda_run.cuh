// The host code that plans and launches the kernels of dwf_cuda_kernels.cuh: run_forward / run_backward /
// run_sgd_step / run_grad_sumsq pick the depth and pack width, size the grid (grid_for, or
// grid_covering for the backward) and reduce sumsq's per-block partials. Each takes a Launcher (see
// dwf_cuda_kernels.cuh), so the same code serves dwf_cuda.cu (nvcc, the current CUDA stream) and
// the host emulation of the CPU test suite (tests/cuda_emulation/). The ops' arguments are
// validated (dwf_dispatch.h) before run_* is called.
#pragma once

#include <optional>
#include <tuple>

#include "dwf_cuda_kernels.cuh"

namespace dwf {
namespace cuda_impl {

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
      launcher.launch(kernel, grid_covering(n / kV), kThreads, F, GW, GF, S, n, int(depth));
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
