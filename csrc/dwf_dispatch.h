// Host-side dispatch and argument checks shared by the CPU and CUDA implementations.
//
// The Python front door (dwf_kernels/_validate.py) refuses bad input with friendlier messages
// before any op runs; these checks guard direct torch.ops.dwf_kernels calls. The limits are the
// front door's: kMaxDepth (dwf_math.h) is MAX_DEPTH and is_supported_out_dtype is IO_DTYPES there;
// tests/test_validation.py checks that both sides refuse exactly the same depths and dtype pairs.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>
#include <type_traits>

#include "dwf_math.h"

namespace dwf {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// w may be narrower than the factors only for fp32 factors (mixed precision): bf16/fp16.
inline bool is_supported_out_dtype(at::ScalarType in, at::ScalarType out) {
  return out == in || (in == at::kFloat && (out == at::kBFloat16 || out == at::kHalf));
}

inline at::ScalarType sumsq_dtype(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_factors(const at::Tensor& factors) {
  TORCH_CHECK(factors.dim() >= 1,
              "dwf_kernels: factors must have a leading depth axis, shape (D, *weight_shape); got a 0-d tensor");
  TORCH_CHECK(factors.size(0) >= 1 && factors.size(0) <= kMaxDepth,
              "dwf_kernels: factors.shape[0] is the depth D and must be in [1, ", kMaxDepth, "]; got ",
              factors.size(0));
  TORCH_CHECK(is_supported_float(factors.scalar_type()),
              "dwf_kernels: factors must be float16, bfloat16, float32 or float64; got ", factors.scalar_type());
}

inline at::ScalarType check_forward_args(const at::Tensor& factors, std::optional<at::ScalarType> out_dtype) {
  check_factors(factors);
  const at::ScalarType out = out_dtype.value_or(factors.scalar_type());
  TORCH_CHECK(is_supported_out_dtype(factors.scalar_type(), out),
              "dwf_kernels: out_dtype must equal the factors' dtype, or be bfloat16/float16 for float32 factors; got "
              "factors ", factors.scalar_type(), " and out_dtype ", out);
  return out;
}

inline void check_backward_args(const at::Tensor& factors, const at::Tensor& grad_w,
                                const std::optional<at::Tensor>& grad_sumsq) {
  check_factors(factors);
  TORCH_CHECK(grad_w.device() == factors.device(), "dwf_kernels: grad_w must be on the factors' device ",
              factors.device(), "; got ", grad_w.device());
  TORCH_CHECK(grad_w.sizes() == factors.sizes().slice(1),
              "dwf_kernels: grad_w must have the weight shape factors.shape[1:] = ", factors.sizes().slice(1),
              "; got ", grad_w.sizes());
  TORCH_CHECK(is_supported_out_dtype(factors.scalar_type(), grad_w.scalar_type()),
              "dwf_kernels: grad_w must have the dtype of w (the factors' dtype, or bfloat16/float16 for float32 "
              "factors); got factors ", factors.scalar_type(), " and grad_w ", grad_w.scalar_type());
  if (grad_sumsq.has_value()) {
    TORCH_CHECK(grad_sumsq->numel() == 1, "dwf_kernels: grad_sumsq must hold one value; got shape ",
                grad_sumsq->sizes());
    TORCH_CHECK(grad_sumsq->device() == factors.device(), "dwf_kernels: grad_sumsq must be on the factors' device ",
                factors.device(), "; got ", grad_sumsq->device());
    TORCH_CHECK(is_supported_float(grad_sumsq->scalar_type()), "dwf_kernels: grad_sumsq must be floating; got ",
                grad_sumsq->scalar_type());
  }
}

// A tensor updated in place must not share memory with another argument: the result would depend on
// the order of the element accesses.
inline void check_not_aliased(const at::Tensor& written, const char* written_name, const at::Tensor& other,
                              const char* other_name) {
  const at::MemOverlapStatus status = at::get_overlap_status(written, other);
  TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, "dwf_kernels: ",
              written_name, " and ", other_name, " share memory; ", written_name,
              " is updated in place, so it must not overlap ", other_name);
}

// The fused backward + SGD step updates factors (and the momentum buffer) in place.
inline void check_sgd_step_args(const at::Tensor& factors, const std::optional<at::Tensor>& momentum_buffer,
                                const at::Tensor& grad_w, const std::optional<at::Tensor>& grad_sumsq,
                                double momentum) {
  check_backward_args(factors, grad_w, grad_sumsq);
  TORCH_CHECK(factors.is_contiguous(), "dwf_kernels: factors must be contiguous to be updated in place");
  if (momentum != 0) {
    TORCH_CHECK(momentum_buffer.has_value(), "dwf_kernels: momentum_buffer is required when momentum != 0");
    TORCH_CHECK(momentum_buffer->sizes() == factors.sizes() && momentum_buffer->dtype() == factors.dtype() &&
                    momentum_buffer->device() == factors.device() && momentum_buffer->is_contiguous(),
                "dwf_kernels: momentum_buffer must be a contiguous tensor with the factors' shape ", factors.sizes(),
                ", dtype and device; got shape ", momentum_buffer->sizes(), ", ", momentum_buffer->dtype(), ", ",
                momentum_buffer->device());
  }
  check_not_aliased(factors, "factors", grad_w, "grad_w");
  if (grad_sumsq.has_value()) check_not_aliased(factors, "factors", *grad_sumsq, "grad_sumsq");
  if (momentum_buffer.has_value()) {
    check_not_aliased(*momentum_buffer, "momentum_buffer", factors, "factors");
    check_not_aliased(*momentum_buffer, "momentum_buffer", grad_w, "grad_w");
    if (grad_sumsq.has_value()) check_not_aliased(*momentum_buffer, "momentum_buffer", *grad_sumsq, "grad_sumsq");
  }
}

// The SGD hyper-parameters in the arithmetic type A. They are rounded to A first, exactly as
// torch rounds a Python float Scalar to the tensor's dtype.
template <typename A>
SgdStep<A> make_sgd_step(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                         bool maximize, bool init_buffer) {
  return SgdStep<A>{static_cast<A>(-lr), static_cast<A>(momentum), static_cast<A>(1.0 - dampening),
                    static_cast<A>(weight_decay), A(-1), momentum != 0, weight_decay != 0, nesterov, maximize,
                    init_buffer};
}

// Calls f(std::integral_constant<int, kD>) with the depth policy kD of dwf_math.h: the depth
// itself (compile-time) for 1..8, and padded slots for the rare deep factorizations: kD = -12 for
// 9..12, kD = -16 for 13..16 (runtime depth, loops over 12 or 16 guarded slots). Every depth thus
// gets a path whose per-element arrays are indexed by constants (registers on a GPU), for 10
// instantiations per kernel and dtype instead of 16.
template <typename F>
void dispatch_depth(int64_t depth, F&& f) {
  switch (depth) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default:
      TORCH_CHECK(depth >= 1 && depth <= kMaxDepth, "dwf_kernels: depth must be in [1, ", kMaxDepth, "]; got ",
                  depth);
      if (depth <= 12) {
        f(std::integral_constant<int, -12>{});
      } else {
        f(std::integral_constant<int, -kMaxDepth>{});
      }
      break;
  }
}

// Calls f(factor_tag, io_tag) where the tags are null pointers of the element types: the factor
// dtype and the dtype of w (forward) or grad_w (backward). The supported pairs are exactly
// is_supported_out_dtype's.
template <typename F>
void dispatch_io_types(at::ScalarType in, at::ScalarType io, F&& f) {
  using c10::BFloat16;
  using c10::Half;
  if (in == at::kFloat && io == at::kFloat) return f((float*)nullptr, (float*)nullptr);
  if (in == at::kFloat && io == at::kBFloat16) return f((float*)nullptr, (BFloat16*)nullptr);
  if (in == at::kFloat && io == at::kHalf) return f((float*)nullptr, (Half*)nullptr);
  if (in == at::kDouble && io == at::kDouble) return f((double*)nullptr, (double*)nullptr);
  if (in == at::kBFloat16 && io == at::kBFloat16) return f((BFloat16*)nullptr, (BFloat16*)nullptr);
  if (in == at::kHalf && io == at::kHalf) return f((Half*)nullptr, (Half*)nullptr);
  TORCH_CHECK(false, "dwf_kernels: unsupported dtype pair (factors ", in, ", w ", io, ")");
}

}  // namespace dwf
