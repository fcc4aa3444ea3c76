// The autograd formula of dwf_kernels::dwf_forward, in C++ (docs/design.md, The math).
//
// Registered for the Autograd dispatch key, so a training step crosses no Python to differentiate
// the op: with torch.library.register_autograd every call paid ~20 us forward and ~30 us backward
// of Python glue, which on small layers costs more than the fused kernels themselves. torch.compile
// traces through it like any autograd kernel (the backward is the dwf_backward op, whose fake
// implementation is registered from Python). Nothing is saved but the factors. Under
// create_graph=True the backward is formed by differentiable ATen ops instead, so it can be
// differentiated again.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace dwf {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& factors, std::optional<at::ScalarType> out_dtype,
                                                bool with_sumsq) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dwf_kernels::dwf_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, std::optional<at::ScalarType>, bool)>();
  return op.call(factors, out_dtype, with_sumsq);
}

at::Tensor call_backward(const at::Tensor& factors, const at::Tensor& grad_w,
                         const std::optional<at::Tensor>& grad_sumsq) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dwf_kernels::dwf_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(factors, grad_w, grad_sumsq);
}

// The backward as differentiable ATen ops, for a backward with create_graph=True (double backward,
// meta-gradients): d/df_d = grad_w * prod_{k != d} f_k (+ 2 grad_sumsq f_d) is itself a product of
// the factors and grad_w, so autograd differentiates it with respect to all three. The products
// are taken in the reference chain's order: prefix f_0*...*f_{d-1} times suffix grad_w*f_{D-1}*...*f_{d+1}.
// Mirrors dwf_kernels/backends/reference.py dwf_backward_differentiable.
at::Tensor differentiable_backward(const at::Tensor& factors, const at::Tensor& grad_w,
                                   const std::optional<at::Tensor>& grad_sumsq) {
  const at::ScalarType acc = factors.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor f = factors.to(acc);
  const at::Tensor g = grad_w.to(acc);
  const int64_t depth = f.size(0);
  std::vector<at::Tensor> grads(depth);
  if (depth == 1) {
    grads[0] = g;
  } else {
    std::vector<at::Tensor> prefix(depth);  // prefix[d] = f_0 * ... * f_{d-1}
    prefix[1] = f[0];
    for (int64_t d = 2; d < depth; ++d) prefix[d] = prefix[d - 1] * f[d - 1];
    at::Tensor suffix = g;  // grad_w * f_{D-1} * ... * f_{d+1}
    for (int64_t d = depth - 1; d >= 1; --d) {
      grads[d] = suffix * prefix[d];
      if (d > 1) suffix = suffix * f[d];
    }
    grads[0] = suffix * f[1];
  }
  at::Tensor grad = at::stack(grads);
  if (grad_sumsq.has_value()) {
    const at::Tensor twice = grad_sumsq->reshape({}).to(acc) * f;
    grad = grad + (twice + twice);
  }
  return grad.to(factors.scalar_type());
}

class DWFProduct : public torch::autograd::Function<DWFProduct> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& factors,
                               std::optional<at::ScalarType> out_dtype, bool with_sumsq) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w, sumsq] = call_forward(factors, out_dtype, with_sumsq);
    ctx->save_for_backward({factors});
    ctx->saved_data["with_sumsq"] = with_sumsq;
    return {w, sumsq};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor factors = ctx->get_saved_variables()[0];
    // Autograd hands a zero grad for an unused sumsq; when sumsq was not requested the penalty term
    // is left out entirely, as in the reference (0 * Inf would otherwise make NaN).
    const std::optional<at::Tensor> grad_sumsq =
        ctx->saved_data["with_sumsq"].toBool() ? std::optional<at::Tensor>(grads[1]) : std::nullopt;
    // The engine runs the backward with grad mode on exactly when create_graph=True: then the
    // gradient must itself be differentiable. A first-order backward keeps the fused kernel.
    if (at::GradMode::is_enabled()) {
      return {differentiable_backward(factors, grads[0], grad_sumsq), at::Tensor(), at::Tensor()};
    }
    return {call_backward(factors, grads[0], grad_sumsq), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> dwf_forward_autograd(const at::Tensor& factors,
                                                        std::optional<at::ScalarType> out_dtype, bool with_sumsq) {
  const variable_list out = DWFProduct::apply(factors, out_dtype, with_sumsq);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dwf_kernels, Autograd, m) { m.impl("dwf_forward", &dwf_forward_autograd); }

}  // namespace dwf
