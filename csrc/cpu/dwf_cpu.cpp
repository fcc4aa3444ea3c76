// The CPU ops: argument checks, allocation and element-type dispatch, compiled with the baseline
// flags, then the kernels of the SIMD variant that ATen itself runs (dwf_cpu_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../dwf_dispatch.h"
#include "dwf_cpu.h"
#include "dwf_cpu_kernels.h"

namespace dwf::cpu {
namespace {

// The variants setup.py built (DWF_CPU_AVX2 / DWF_CPU_AVX512; the baseline always is).
constexpr bool kBuilt[] = {
    true,
#if defined(DWF_CPU_AVX2)
    true,
#else
    false,
#endif
#if defined(DWF_CPU_AVX512)
    true,
#else
    false,
#endif
};

// The widest built variant at or below ATen's CPU capability: ATen's own choice for its kernels
// (the CPU's best, lowered by ATEN_CPU_CAPABILITY), read once.
Isa selected_isa() {
  static const Isa isa = [] {
    const std::string capability = at::get_cpu_capability();
    Isa wanted = Isa::kDefault;
    if (capability == "AVX512") {
      wanted = Isa::kAvx512;
    } else if (capability == "AVX2") {
      wanted = Isa::kAvx2;
    }
    while (!kBuilt[static_cast<int>(wanted)]) wanted = static_cast<Isa>(static_cast<int>(wanted) - 1);
    return wanted;
  }();
  return isa;
}

// Calls f(Kernels<isa>{}) for the selected variant.
template <typename F>
void with_kernels(F&& f) {
  switch (selected_isa()) {
#if defined(DWF_CPU_AVX512)
    case Isa::kAvx512:
      return f(Kernels<Isa::kAvx512>{});
#endif
#if defined(DWF_CPU_AVX2)
    case Isa::kAvx2:
      return f(Kernels<Isa::kAvx2>{});
#endif
    default:
      return f(Kernels<Isa::kDefault>{});
  }
}

std::tuple<at::Tensor, at::Tensor> dwf_forward_cpu(const at::Tensor& factors_arg,
                                                   std::optional<at::ScalarType> out_dtype, bool with_sumsq) {
  const at::ScalarType out = check_forward_args(factors_arg, out_dtype);
  const at::Tensor factors = factors_arg.contiguous();  // non-contiguous input: copied once
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;
  at::Tensor w = at::empty(factors.sizes().slice(1), factors.options().dtype(out));
  at::Tensor sumsq = at::empty({}, factors.options().dtype(sumsq_dtype(factors.scalar_type())));

  dispatch_io_types(factors.scalar_type(), out, [&](auto* t_tag, auto* o_tag) {
    using T = std::remove_pointer_t<decltype(t_tag)>;
    using O = std::remove_pointer_t<decltype(o_tag)>;
    using acc_t = acc_type<T>;
    std::vector<acc_t> partials(with_sumsq ? num_chunks(n) : 0);
    with_kernels([&](auto kernels) {
      kernels.template forward<T, O>(factors.const_data_ptr<T>(), w.mutable_data_ptr<O>(), n,
                                     static_cast<int>(depth), with_sumsq, partials.data());
    });
    // Fixed-order final reduction of the chunk partials (in double, so many chunks lose nothing).
    double total = 0;
    for (acc_t p : partials) total += static_cast<double>(p);
    *sumsq.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total);
  });
  return {w, sumsq};
}

// A one-element tensor's value as A: read in place when it holds an A (item() is an op call, about
// half a microsecond per layer of a multi-layer step), else converted by item().
template <typename A>
A scalar_value(const at::Tensor& t) {
  if (t.scalar_type() == c10::CppTypeToScalarType<A>::value && !t.is_neg() && !t._is_zerotensor()) {
    return *t.const_data_ptr<A>();
  }
  return t.item<A>();
}

// The gradient ops' common part: the operands contiguous, and body(T*, G*, factors, grad_w, n, depth,
// has_penalty, two_s) called with the element types' tags (the arguments are already checked).
template <typename Body>
void with_gradient_operands(const at::Tensor& factors_arg, const at::Tensor& grad_w_arg,
                            const std::optional<at::Tensor>& grad_sumsq, Body&& body) {
  const at::Tensor factors = factors_arg.contiguous();  // in-place callers pass contiguous factors
  const at::Tensor grad_w = grad_w_arg.contiguous();
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;
  dispatch_io_types(factors.scalar_type(), grad_w.scalar_type(), [&](auto* t_tag, auto* g_tag) {
    using acc_t = acc_type<std::remove_pointer_t<decltype(t_tag)>>;
    const bool has_penalty = grad_sumsq.has_value();
    const acc_t two_s = has_penalty ? acc_t(2) * scalar_value<acc_t>(*grad_sumsq) : acc_t(0);
    body(t_tag, g_tag, factors, grad_w, n, static_cast<int>(depth), has_penalty, two_s);
  });
}

at::Tensor dwf_backward_cpu(const at::Tensor& factors, const at::Tensor& grad_w,
                            const std::optional<at::Tensor>& grad_sumsq) {
  check_backward_args(factors, grad_w, grad_sumsq);
  at::Tensor grad_factors = at::empty(factors.sizes(), factors.options());
  with_gradient_operands(factors, grad_w, grad_sumsq,
                         [&](auto* t_tag, auto* g_tag, const at::Tensor& f, const at::Tensor& gw, int64_t n, int depth,
                             bool has_penalty, auto two_s) {
                           using T = std::remove_pointer_t<decltype(t_tag)>;
                           using G = std::remove_pointer_t<decltype(g_tag)>;
                           with_kernels([&](auto kernels) {
                             kernels.template backward<T, G>(f.const_data_ptr<T>(), gw.const_data_ptr<G>(),
                                                             grad_factors.mutable_data_ptr<T>(), n, depth, has_penalty,
                                                             two_s);
                           });
                         });
  return grad_factors;
}

at::Tensor dwf_grad_sumsq_cpu(const at::Tensor& factors, const at::Tensor& grad_w,
                              const std::optional<at::Tensor>& grad_sumsq) {
  check_backward_args(factors, grad_w, grad_sumsq);
  at::Tensor result = at::empty({}, factors.options().dtype(sumsq_dtype(factors.scalar_type())));
  with_gradient_operands(factors, grad_w, grad_sumsq,
                         [&](auto* t_tag, auto* g_tag, const at::Tensor& f, const at::Tensor& gw, int64_t n, int depth,
                             bool has_penalty, auto two_s) {
                           using T = std::remove_pointer_t<decltype(t_tag)>;
                           using G = std::remove_pointer_t<decltype(g_tag)>;
                           using acc_t = acc_type<T>;
                           std::vector<acc_t> partials(num_chunks(n));
                           with_kernels([&](auto kernels) {
                             kernels.template grad_sumsq<T, G>(f.const_data_ptr<T>(), gw.const_data_ptr<G>(), n, depth,
                                                               has_penalty, two_s, partials.data());
                           });
                           double total = 0;  // fixed-order final reduction, as the forward's sumsq
                           for (acc_t p : partials) total += static_cast<double>(p);
                           *result.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total);
                         });
  return result;
}

// dwf_sgd_step on arguments already checked.
void run_sgd_step(const at::Tensor& factors, const std::optional<at::Tensor>& momentum_buffer,
                  const at::Tensor& grad_w, const std::optional<at::Tensor>& grad_sumsq, const SgdOptions& args) {
  with_gradient_operands(factors, grad_w, grad_sumsq,
                         [&](auto* t_tag, auto* g_tag, const at::Tensor&, const at::Tensor& gw, int64_t n, int depth,
                             bool has_penalty, auto two_s) {
                           using T = std::remove_pointer_t<decltype(t_tag)>;
                           using G = std::remove_pointer_t<decltype(g_tag)>;
                           T* B = args.momentum != 0 ? momentum_buffer->mutable_data_ptr<T>() : nullptr;
                           with_kernels([&](auto kernels) {
                             kernels.template sgd_step<T, G>(factors.mutable_data_ptr<T>(), B, gw.const_data_ptr<G>(), n,
                                                             depth, has_penalty, two_s, args);
                           });
                         });
}

void dwf_sgd_step_cpu(const at::Tensor& factors, const std::optional<at::Tensor>& momentum_buffer,
                      const at::Tensor& grad_w, const std::optional<at::Tensor>& grad_sumsq, double lr,
                      double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                      bool init_buffer) {
  check_sgd_step_args(factors, momentum_buffer, grad_w, grad_sumsq, momentum);
  run_sgd_step(factors, momentum_buffer, grad_w, grad_sumsq,
               SgdOptions{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer});
}

// Runs step(i) for each tensor i, whose rows have rows[i] elements, in one call: tensors of at most
// one chunk (whose kernel runs on one thread) are spread over the threads, each running whole
// tensors, when together they are more than a chunk of work (less is not worth a parallel region,
// as for ATen's own grain size); larger ones follow one after another, each split between the
// threads as in the single-tensor op. Either way every tensor gets the single-tensor kernel: the
// same results.
template <typename Step>
void step_each(const std::vector<int64_t>& rows, Step&& step) {
  std::vector<size_t> small, large;
  int64_t small_work = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] <= kChunk) {
      small.push_back(i);
      small_work += rows[i];
    } else {
      large.push_back(i);
    }
  }
  if (small_work <= kChunk) {
    for (size_t i : small) step(i);
  } else {
    // A tensor's own parallel_for runs inline inside this one (ATen does not nest parallel regions).
    at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) step(small[k]);
    });
  }
  for (size_t i : large) step(i);
}

// dwf_sgd_step on each of a list of layers, in one op call: every layer checked first, then the
// same kernel per layer, so the results are bitwise the per-layer op's.
void dwf_sgd_step_multi_cpu(at::TensorList factors, at::TensorList momentum_buffers, at::TensorList grad_w,
                            const c10::List<std::optional<at::Tensor>>& grad_sumsq, double lr, double momentum,
                            double dampening, double weight_decay, bool nesterov, bool maximize, bool init_buffer) {
  const MultiStepLayers layers = check_multi_step(factors, momentum_buffers, grad_w, grad_sumsq, momentum);
  const SgdOptions args{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer};
  std::vector<int64_t> rows;
  for (const at::Tensor& f : layers.factors) rows.push_back(f.numel() / std::max<int64_t>(f.size(0), 1));
  step_each(rows, [&](size_t i) {
    run_sgd_step(layers.factors[i], layers.buffer(i), layers.grad_w[i], layers.grad_sumsq[i], args);
  });
}

// torch.optim.SGD's step on a list of plain float32/float64 parameters, in one op call: the
// fused step's update (sgd_update, torch's order and roundings) with the gradient given, which is
// the fused step of a depth-1 factorization without penalty (a factor gradient of one factor is
// dL/dw itself). Results equal torch.optim.SGD's bit for bit where the DWF step's do. A param it
// cannot update so (not a contiguous float32/float64 tensor; a gradient or momentum buffer not a
// contiguous tensor of its shape and dtype) is left alone and its index returned (an int64 tensor,
// which functionalization can carry where a list could not), for the caller to update with torch's
// own code: FusedSGD hands every dense float32/float64 CPU parameter here, and the checks cost
// nothing beside the update. Lists of the wrong lengths and memory shared with the param are
// refused; nothing is updated then.
at::Tensor sgd_step_multi_cpu(at::TensorList params, at::TensorList momentum_buffers, at::TensorList grads,
                              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                              bool maximize, bool init_buffer) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count, "sgd_step_multi: grads (", grads.size(), ") must have one entry per param (",
              count, ")");
  TORCH_CHECK(momentum_buffers.size() == (momentum != 0 ? count : 0), "sgd_step_multi: momentum_buffers must have ",
              momentum != 0 ? "one entry per param" : "no entries when momentum is 0", " (", count, " params); got ",
              momentum_buffers.size());
  const auto like_param = [](const at::Tensor& t, const at::Tensor& p) {
    return t.sizes() == p.sizes() && t.scalar_type() == p.scalar_type() && t.device() == p.device() &&
           t.layout() == at::kStrided && t.is_contiguous();
  };
  std::vector<int64_t> left;  // the indices of the params left alone
  std::vector<size_t> served;
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    if (!(p.device().is_cpu() && (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble) &&
          p.layout() == at::kStrided && p.is_contiguous() && like_param(g, p) &&
          (momentum == 0 || like_param(momentum_buffers[i], p)))) {
      left.push_back(static_cast<int64_t>(i));
      continue;
    }
    check_not_aliased(p, "param", g, "grad");
    if (momentum != 0) {
      check_not_aliased(momentum_buffers[i], "momentum_buffer", p, "param");
      check_not_aliased(momentum_buffers[i], "momentum_buffer", g, "grad");
    }
    served.push_back(i);
  }
  const SgdOptions args{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer};
  std::vector<int64_t> rows;
  for (size_t i : served) rows.push_back(params[i].numel());
  step_each(rows, [&](size_t k) {
    const size_t i = served[k];
    const at::Tensor& p = params[i];
    AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "sgd_step_multi", [&] {
      scalar_t* B = momentum != 0 ? momentum_buffers[i].mutable_data_ptr<scalar_t>() : nullptr;
      with_kernels([&](auto kernels) {
        kernels.template sgd_step<scalar_t, scalar_t>(p.mutable_data_ptr<scalar_t>(), B,
                                                      grads[i].const_data_ptr<scalar_t>(), p.numel(), 1, false,
                                                      scalar_t(0), args);
      });
    });
  });
  at::Tensor result = at::empty({static_cast<int64_t>(left.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(left.begin(), left.end(), result.mutable_data_ptr<int64_t>());
  return result;
}

}  // namespace

const char* selected_variant() {
  static constexpr const char* kNames[] = {"default", "avx2", "avx512"};
  return kNames[static_cast<int>(selected_isa())];
}

TORCH_LIBRARY_IMPL(dwf_kernels, CPU, m) {
  m.impl("dwf_forward", &dwf_forward_cpu);
  m.impl("dwf_backward", &dwf_backward_cpu);
  m.impl("dwf_sgd_step", &dwf_sgd_step_cpu);
  m.impl("dwf_grad_sumsq", &dwf_grad_sumsq_cpu);
  m.impl("dwf_sgd_step_multi", &dwf_sgd_step_multi_cpu);
  m.impl("sgd_step_multi", &sgd_step_multi_cpu);
}

}  // namespace dwf::cpu
