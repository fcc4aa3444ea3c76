// Host-side dispatch and argument checks shared by the CPU and CUDA implementations.
//
// The Python front door (dwf_kernels/_validate.py) refuses bad input with friendlier messages
// before any op runs; these checks guard direct torch.ops.dwf_kernels calls. The limits are the
// front door's: kMaxDepth (dwf_math.h) is MAX_DEPTH and is_supported_out_dtype is IO_DTYPES there;
// tests/test_validation.py checks that both sides refuse exactly the same depths and dtype pairs.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

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
                "dwf_kernels: momentum_buffer must be a contiguous tensor with the factors' shape, dtype and device (",
                factors.sizes(), ", ", factors.dtype(), ", ", factors.device(), "); got ", momentum_buffer->sizes(), ", ",
                momentum_buffer->dtype(), ", ", momentum_buffer->device(),
                momentum_buffer->is_contiguous() ? "" : ", not contiguous");
  }
  check_not_aliased(factors, "factors", grad_w, "grad_w");
  if (grad_sumsq.has_value()) check_not_aliased(factors, "factors", *grad_sumsq, "grad_sumsq");
  if (momentum_buffer.has_value()) {
    check_not_aliased(*momentum_buffer, "momentum_buffer", factors, "factors");
    check_not_aliased(*momentum_buffer, "momentum_buffer", grad_w, "grad_w");
    if (grad_sumsq.has_value()) check_not_aliased(*momentum_buffer, "momentum_buffer", *grad_sumsq, "grad_sumsq");
  }
}

// dwf_sgd_step_multi's lists, taken apart after every layer is checked (before any is updated).
struct MultiStepLayers {
  std::vector<at::Tensor> factors, momentum_buffers, grad_w;  // momentum_buffers: empty without momentum
  std::vector<std::optional<at::Tensor>> grad_sumsq;

  std::optional<at::Tensor> buffer(size_t i) const {
    return momentum_buffers.empty() ? std::nullopt : std::optional<at::Tensor>(momentum_buffers[i]);
  }
  // One device, factor dtype, grad_w dtype and depth: what one multi-layer launch serves.
  bool uniform() const {
    for (size_t i = 1; i < factors.size(); ++i) {
      if (factors[i].device() != factors[0].device() || factors[i].scalar_type() != factors[0].scalar_type() ||
          grad_w[i].scalar_type() != grad_w[0].scalar_type() || factors[i].size(0) != factors[0].size(0)) {
        return false;
      }
    }
    return true;
  }
};

inline MultiStepLayers check_multi_step(at::TensorList factors, at::TensorList momentum_buffers,
                                        at::TensorList grad_w, const c10::List<std::optional<at::Tensor>>& grad_sumsq,
                                        double momentum) {
  const size_t n = factors.size();
  TORCH_CHECK(grad_w.size() == n && grad_sumsq.size() == n, "dwf_sgd_step_multi: grad_w (", grad_w.size(),
              ") and grad_sumsq (", grad_sumsq.size(), ") must have one entry per factors tensor (", n, ")");
  TORCH_CHECK(momentum_buffers.size() == (momentum != 0 ? n : 0), "dwf_sgd_step_multi: momentum_buffers must have ",
              momentum != 0 ? "one entry per factors tensor" : "no entries when momentum is 0", " (", n,
              " factors); got ", momentum_buffers.size());
  MultiStepLayers layers{{factors.begin(), factors.end()},
                         {momentum_buffers.begin(), momentum_buffers.end()},
                         {grad_w.begin(), grad_w.end()},
                         {}};
  for (size_t i = 0; i < n; ++i) {
    layers.grad_sumsq.push_back(grad_sumsq.get(i));
    check_sgd_step_args(layers.factors[i], layers.buffer(i), layers.grad_w[i], layers.grad_sumsq[i], momentum);
  }
  return layers;
}

// The hyper-parameters of one dwf_sgd_step as the op receives them (its float and bool
// arguments), gathered once where the op is entered and passed down whole.
struct SgdOptions {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool init_buffer;  // the momentum buffer's first step: it is written, not read
};

// The SGD hyper-parameters in the arithmetic type A. They are rounded to A first, exactly as
// torch rounds a Python float Scalar to the tensor's dtype.
template <typename A>
SgdStep<A> make_sgd_step(const SgdOptions& o) {
  return SgdStep<A>{static_cast<A>(-o.lr),          static_cast<A>(o.momentum), static_cast<A>(1.0 - o.dampening),
                    static_cast<A>(o.weight_decay), A(-1),                      o.momentum != 0,
                    o.weight_decay != 0,            o.nesterov,                 o.maximize,
                    o.init_buffer};
}

// The same from the op's arguments one by one.
template <typename A>
SgdStep<A> make_sgd_step(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                         bool maximize, bool init_buffer) {
  return make_sgd_step<A>(SgdOptions{lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer});
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

// The width of the compiled kernels' vector accesses: one pack of kPackBytes / sizeof(T)
// elements of type T (pack_elements<T>()) moves as a single aligned load or store.
constexpr int kPackBytes = 16;

template <typename T>
constexpr int pack_elements() {
  return kPackBytes / int(sizeof(T));
}

// Whether a kernel over (D, n) operands with factors of type T may access every operand in packs
// of V = pack_elements<T>() elements: n % V == 0, so each row d * n starts on a pack boundary when
// the base does, and each base pointer is aligned to a pack of its own element type, sizeof(E) * V
// bytes (16 for the factors; 8 for a bfloat16 w beside float32 factors). A null pointer (an absent
// operand) passes.
template <typename T, typename... E>
bool fits_packs(int64_t n, const E*... operands) {
  constexpr int64_t V = pack_elements<T>();
  return n % V == 0 && ((reinterpret_cast<uintptr_t>(operands) % (sizeof(E) * V) == 0) && ...);
}

// Calls f(std::integral_constant<int, kV>) with the pack width kV in elements of T:
// pack_elements<T>() when `vector` (fits_packs), else 1 (one element per access, any alignment).
template <typename T, typename F>
void dispatch_pack(bool vector, F&& f) {
  if (vector) {
    f(std::integral_constant<int, pack_elements<T>()>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The element types of one op: Factor, the factors' (also their gradients' and the momentum
// buffer's), and IO, w's (forward) or grad_w's (backward, SGD step).
template <typename Factor, typename IO>
struct IoTypes {
  using factor = Factor;
  using io = IO;
};

// Calls f(IoTypes<Factor, IO>{}) for the factor dtype `in` and the dtype `io` of w or grad_w.
// The supported pairs are exactly is_supported_out_dtype's.
template <typename F>
void dispatch_io(at::ScalarType in, at::ScalarType io, F&& f) {
  using c10::BFloat16;
  using c10::Half;
  if (in == at::kFloat && io == at::kFloat) return f(IoTypes<float, float>{});
  if (in == at::kFloat && io == at::kBFloat16) return f(IoTypes<float, BFloat16>{});
  if (in == at::kFloat && io == at::kHalf) return f(IoTypes<float, Half>{});
  if (in == at::kDouble && io == at::kDouble) return f(IoTypes<double, double>{});
  if (in == at::kBFloat16 && io == at::kBFloat16) return f(IoTypes<BFloat16, BFloat16>{});
  if (in == at::kHalf && io == at::kHalf) return f(IoTypes<Half, Half>{});
  TORCH_CHECK(false, "dwf_kernels: unsupported dtype pair (factors ", in, ", w ", io, ")");
}

// dispatch_io with the two element types as null pointer tags: f((Factor*)nullptr, (IO*)nullptr).
template <typename F>
void dispatch_io_types(at::ScalarType in, at::ScalarType io, F&& f) {
  dispatch_io(in, io, [&](auto types) {
    using Types = decltype(types);
    f(static_cast<typename Types::factor*>(nullptr), static_cast<typename Types::io*>(nullptr));
  });
}

}  // namespace dwf
