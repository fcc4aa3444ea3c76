// CPU kernels for the fused DWF forward, backward and backward + SGD step (docs/design.md).
//
// at::parallel_for splits the elements into fixed-size chunks; inside a chunk at::vec SIMD runs
// the shared per-element math (dwf_math.h) on two registers' worth of elements per step, with a
// scalar tail through the same templates. Memory traffic is the whole cost: forward reads D
// factors and writes w, backward reads D factors and grad_w and writes D gradients, once each;
// the SGD step reads D factors, grad_w and D momentum buffers and writes factors and buffers.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dwf_dispatch.h"

namespace dwf {
namespace {

using at::vec::Vectorized;

// Chunks are the unit of parallel work and of the sumsq partial sums. Their size is fixed, not
// derived from the thread count, so the reduction order (and hence sumsq) is bitwise identical
// whatever the number of threads. 16K elements keeps per-chunk overhead negligible while giving
// even small layers (64K weights) several chunks to share between cores.
constexpr int64_t kChunk = 16384;

constexpr int64_t kSumBlock = 512;

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

template <typename T>
struct AccType {
  using type = float;  // fp32 math for fp32, bf16 and fp16
};
template <>
struct AccType<double> {
  using type = double;
};

// Moves 2 * Vectorized<acc>::size() elements between memory and two SIMD registers, converting
// bf16/fp16 to and from fp32 in registers (round-to-nearest-even, as c10's scalar conversion).
template <typename T>
struct VecIO {
  using acc_t = typename AccType<T>::type;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();

  static void load(const T* p, Vec& a, Vec& b) {
    if constexpr (std::is_same_v<T, acc_t>) {
      a = Vec::loadu(p);
      b = Vec::loadu(p + Vec::size());
    } else {
      at::vec::load_to_float(p, a, b);
    }
  }
  static void store(T* p, const Vec& a, const Vec& b) {
    if constexpr (std::is_same_v<T, acc_t>) {
      a.store(p);
      b.store(p + Vec::size());
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
};

// w[i] = prod_d F[d, i]; partials[c] = sum of F^2 over chunk c (when with_sumsq).
template <int kD, typename T, typename O>
void forward_kernel(const T* F, O* W, int64_t n, int depth, bool with_sumsq,
                    typename AccType<T>::type* partials) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);

  at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      Vec sq_a(acc_t(0)), sq_b(acc_t(0));
      Vec fa[kSlots], fb[kSlots];
      int64_t i = begin;
      while (i + IO::kStep <= end) {
        // Squares are summed per block of kSumBlock elements, then blocks into the chunk total:
        // long running sums in one register lane would lose low bits on every add.
        Vec blk_a(acc_t(0)), blk_b(acc_t(0));
        const int64_t block_end = std::min(end, i + kSumBlock);
        for (; i + IO::kStep <= block_end; i += IO::kStep) {
          for (int d = 0; d < D; ++d) IO::load(F + d * n + i, fa[d], fb[d]);
          VecIO<O>::store(W + i, product<kD>(fa, depth), product<kD>(fb, depth));
          if (with_sumsq) {
            blk_a = accumulate_squares<kD>(fa, depth, blk_a);
            blk_b = accumulate_squares<kD>(fb, depth, blk_b);
          }
        }
        sq_a = sq_a + blk_a;
        sq_b = sq_b + blk_b;
      }
      acc_t sq_tail = 0;
      for (; i < end; ++i) {
        acc_t f[kSlots];
        for (int d = 0; d < D; ++d) f[d] = static_cast<acc_t>(F[d * n + i]);
        W[i] = static_cast<O>(product<kD>(f, depth));
        if (with_sumsq) sq_tail = accumulate_squares<kD>(f, depth, sq_tail);
      }
      if (with_sumsq) {
        alignas(64) acc_t lanes[Vec::size()];
        (sq_a + sq_b).store(lanes);
        acc_t total = 0;
        for (int64_t k = 0; k < Vec::size(); ++k) total += lanes[k];
        partials[c] = total + sq_tail;
      }
    }
  });
}

// The fused backward's pass over all n elements: loads the D factors and grad_w, forms the D
// factor gradients GW[i] * prod_{k != d} F[k, i] (+ two_s * F[d, i] when has_penalty) in registers,
// and hands them on: on_vec(i, fa, fb, ga, gb) for the two registers' worth of elements at i,
// on_scalar(i, f, g) for each tail element. What is done with them is the caller's.
template <int kD, typename T, typename G, typename OnVec, typename OnScalar>
void for_each_gradient(const T* F, const G* GW, int64_t n, int depth, bool has_penalty,
                       typename AccType<T>::type two_s, OnVec&& on_vec, OnScalar&& on_scalar) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int kSlots = DepthSlots<kD>::value;
  const int D = resolve_depth<kD>(depth);
  const Vec two_s_vec(two_s);

  at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
    const int64_t begin = c0 * kChunk;
    const int64_t end = std::min(n, c1 * kChunk);
    Vec fa[kSlots], fb[kSlots], ga[kSlots], gb[kSlots];
    int64_t i = begin;
    for (; i + IO::kStep <= end; i += IO::kStep) {
      for (int d = 0; d < D; ++d) IO::load(F + d * n + i, fa[d], fb[d]);
      Vec gwa, gwb;
      VecIO<G>::load(GW + i, gwa, gwb);
      factor_grads<kD>(fa, depth, gwa, ga);
      factor_grads<kD>(fb, depth, gwb, gb);
      if (has_penalty) {
        add_penalty_grads<kD>(fa, depth, two_s_vec, ga);
        add_penalty_grads<kD>(fb, depth, two_s_vec, gb);
      }
      on_vec(i, fa, fb, ga, gb);
    }
    for (; i < end; ++i) {
      acc_t f[kSlots], g[kSlots];
      for (int d = 0; d < D; ++d) f[d] = static_cast<acc_t>(F[d * n + i]);
      factor_grads<kD>(f, depth, static_cast<acc_t>(GW[i]), g);
      if (has_penalty) add_penalty_grads<kD>(f, depth, two_s, g);
      on_scalar(i, f, g);
    }
  });
}

// GF[d, i] = the gradients of for_each_gradient, written out.
template <int kD, typename T, typename G>
void backward_kernel(const T* F, const G* GW, T* GF, int64_t n, int depth, bool has_penalty,
                     typename AccType<T>::type two_s) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int D = resolve_depth<kD>(depth);
  for_each_gradient<kD>(
      F, GW, n, depth, has_penalty, two_s,
      [&](int64_t i, const Vec*, const Vec*, const Vec* ga, const Vec* gb) {
        for (int d = 0; d < D; ++d) IO::store(GF + d * n + i, ga[d], gb[d]);
      },
      [&](int64_t i, const acc_t*, const acc_t* g) {
        for (int d = 0; d < D; ++d) GF[d * n + i] = static_cast<T>(g[d]);
      });
}

// The fused backward + SGD step: the gradients of for_each_gradient, applied at once by
// sgd_update to the factors and momentum buffer, in place. Reads D factors, grad_w and D buffers;
// writes D factors and D buffers; no gradient is stored.
template <int kD, typename T, typename G>
void sgd_step_kernel(T* F, T* B, const G* GW, int64_t n, int depth, bool has_penalty,
                     typename AccType<T>::type two_s, const SgdStep<typename AccType<T>::type>& step) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  const int D = resolve_depth<kD>(depth);
  const SgdStep<Vec> vstep{Vec(step.neg_lr),       Vec(step.momentum), Vec(step.one_minus_dampening),
                           Vec(step.weight_decay), Vec(step.minus_one), step.has_momentum,
                           step.has_weight_decay,  step.nesterov,       step.maximize,
                           step.init_buffer};
  const bool read_buffer = step.has_momentum && !step.init_buffer;
  for_each_gradient<kD>(
      F, GW, n, depth, has_penalty, two_s,
      [&](int64_t i, Vec* fa, Vec* fb, const Vec* ga, const Vec* gb) {
        for (int d = 0; d < D; ++d) {
          Vec ba, bb;
          if (read_buffer) IO::load(B + d * n + i, ba, bb);
          sgd_update(vstep, ga[d], fa[d], ba);
          sgd_update(vstep, gb[d], fb[d], bb);
          IO::store(F + d * n + i, fa[d], fb[d]);
          if (step.has_momentum) IO::store(B + d * n + i, ba, bb);
        }
      },
      [&](int64_t i, acc_t* f, const acc_t* g) {
        for (int d = 0; d < D; ++d) {
          acc_t b = read_buffer ? static_cast<acc_t>(B[d * n + i]) : acc_t(0);
          sgd_update(step, g[d], f[d], b);
          F[d * n + i] = static_cast<T>(f[d]);
          if (step.has_momentum) B[d * n + i] = static_cast<T>(b);
        }
      });
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
    using acc_t = typename AccType<T>::type;
    std::vector<acc_t> partials(with_sumsq ? num_chunks(n) : 0);
    dispatch_depth(depth, [&](auto kd) {
      forward_kernel<decltype(kd)::value, T, O>(factors.const_data_ptr<T>(), w.mutable_data_ptr<O>(), n,
                                                static_cast<int>(depth), with_sumsq, partials.data());
    });
    // Fixed-order final reduction of the chunk partials (in double, so many chunks lose nothing).
    double total = 0;
    for (acc_t p : partials) total += static_cast<double>(p);
    *sumsq.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total);
  });
  return {w, sumsq};
}

at::Tensor dwf_backward_cpu(const at::Tensor& factors_arg, const at::Tensor& grad_w_arg,
                            const std::optional<at::Tensor>& grad_sumsq) {
  check_backward_args(factors_arg, grad_w_arg, grad_sumsq);
  const at::Tensor factors = factors_arg.contiguous();
  const at::Tensor grad_w = grad_w_arg.contiguous();
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;
  at::Tensor grad_factors = at::empty(factors.sizes(), factors.options());

  dispatch_io_types(factors.scalar_type(), grad_w.scalar_type(), [&](auto* t_tag, auto* g_tag) {
    using T = std::remove_pointer_t<decltype(t_tag)>;
    using G = std::remove_pointer_t<decltype(g_tag)>;
    using acc_t = typename AccType<T>::type;
    const bool has_penalty = grad_sumsq.has_value();
    const acc_t two_s = has_penalty ? acc_t(2) * grad_sumsq->item<acc_t>() : acc_t(0);
    dispatch_depth(depth, [&](auto kd) {
      backward_kernel<decltype(kd)::value, T, G>(factors.const_data_ptr<T>(), grad_w.const_data_ptr<G>(),
                                                 grad_factors.mutable_data_ptr<T>(), n, static_cast<int>(depth),
                                                 has_penalty, two_s);
    });
  });
  return grad_factors;
}

void dwf_sgd_step_cpu(const at::Tensor& factors, const std::optional<at::Tensor>& momentum_buffer,
                      const at::Tensor& grad_w_arg, const std::optional<at::Tensor>& grad_sumsq, double lr,
                      double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                      bool init_buffer) {
  check_sgd_step_args(factors, momentum_buffer, grad_w_arg, grad_sumsq, momentum);
  const at::Tensor grad_w = grad_w_arg.contiguous();
  const int64_t depth = factors.size(0);
  const int64_t n = factors.numel() / depth;

  dispatch_io_types(factors.scalar_type(), grad_w.scalar_type(), [&](auto* t_tag, auto* g_tag) {
    using T = std::remove_pointer_t<decltype(t_tag)>;
    using G = std::remove_pointer_t<decltype(g_tag)>;
    using acc_t = typename AccType<T>::type;
    const bool has_penalty = grad_sumsq.has_value();
    const acc_t two_s = has_penalty ? acc_t(2) * grad_sumsq->item<acc_t>() : acc_t(0);
    const SgdStep<acc_t> step =
        make_sgd_step<acc_t>(lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer);
    T* B = momentum != 0 ? momentum_buffer->mutable_data_ptr<T>() : nullptr;
    dispatch_depth(depth, [&](auto kd) {
      sgd_step_kernel<decltype(kd)::value, T, G>(factors.mutable_data_ptr<T>(), B, grad_w.const_data_ptr<G>(), n,
                                                 static_cast<int>(depth), has_penalty, two_s, step);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dwf_kernels, CPU, m) {
  m.impl("dwf_forward", &dwf_forward_cpu);
  m.impl("dwf_backward", &dwf_backward_cpu);
  m.impl("dwf_sgd_step", &dwf_sgd_step_cpu);
}

}  // namespace dwf
