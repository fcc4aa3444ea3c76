// The autograd formula of dwf_kernels::dwf_forward, in C++ (DESIGN.md §2 backward).
//
// Registered for the Autograd dispatch key, so a training step crosses no Python to differentiate
// the op: with torch.library.register_autograd every call paid ~20 us forward and ~30 us backward
// of Python glue, which on small layers costs more than the fused kernels themselves. torch.compile
// traces through it like any autograd kernel (the backward is the dwf_backward op, whose fake
// implementation is registered from Python). Nothing is saved but the factors.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

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
