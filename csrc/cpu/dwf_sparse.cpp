// CPU kernel of sparse inference: y = x W^T + b with W held as CSR (one row per output feature).
//
// At the sparsities DWF reaches (a few nonzeros per thousand weights) the work is the nonzeros
// times the batch, and what costs is the overhead around it: torch.sparse's CSR matmul transposes
// and converts around a general kernel. Here every output element is one dot product of a CSR row
// with an input row, eight input rows at a time so that each nonzero's value and column are loaded
// once per eight products; the batch is split between threads. Sums run in fp32 (fp64 for fp64),
// in the order of the row's nonzeros.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "../dwf_dispatch.h"

namespace dwf {
namespace {

constexpr int64_t kRows = 8;  // input rows per pass over a CSR row

template <typename T, typename I>
void sparse_linear_rows(const T* x, int64_t rows, int64_t in, const int64_t* row_ptr, const I* col, const T* values,
                        const T* bias, T* y, int64_t out) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    const T* xr = x + r * in;
    T* yr = y + r * out;
    for (int64_t o = 0; o < out; ++o) {
      acc_t acc[kRows] = {};
      for (int64_t j = row_ptr[o]; j < row_ptr[o + 1]; ++j) {
        const acc_t v = static_cast<acc_t>(values[j]);
        const int64_t c = col[j];
        for (int64_t k = 0; k < kRows; ++k) acc[k] += v * static_cast<acc_t>(xr[k * in + c]);
      }
      const acc_t b = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
      for (int64_t k = 0; k < kRows; ++k) yr[k * out + o] = static_cast<T>(acc[k] + b);
    }
  }
  for (; r < rows; ++r) {
    const T* xr = x + r * in;
    for (int64_t o = 0; o < out; ++o) {
      acc_t acc = 0;
      for (int64_t j = row_ptr[o]; j < row_ptr[o + 1]; ++j) {
        acc += static_cast<acc_t>(values[j]) * static_cast<acc_t>(xr[col[j]]);
      }
      y[r * out + o] = static_cast<T>(acc + (bias ? static_cast<acc_t>(bias[o]) : acc_t(0)));
    }
  }
}

at::Tensor sparse_linear_cpu(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous(), "sparse_linear: input must be a contiguous (batch, in) matrix");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong && row_ptr.is_contiguous() &&
                  row_ptr.numel() >= 1,
              "sparse_linear: row_ptr must be a contiguous int64 vector of out + 1 offsets");
  TORCH_CHECK(col.dim() == 1 && (col.scalar_type() == at::kInt || col.scalar_type() == at::kLong) &&
                  col.is_contiguous(),
              "sparse_linear: col must be a contiguous int32 or int64 vector");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() == col.numel(),
              "sparse_linear: values must be a contiguous vector as long as col");
  TORCH_CHECK(values.scalar_type() == input.scalar_type(), "sparse_linear: values are ", values.scalar_type(),
              " but input is ", input.scalar_type());
  const int64_t out = row_ptr.numel() - 1;
  const int64_t rows = input.size(0), in = input.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == out && bias->is_contiguous() &&
                    bias->scalar_type() == input.scalar_type(),
                "sparse_linear: bias must be a contiguous vector of out elements in the input's dtype");
  }
  for (const at::Tensor* t : {&row_ptr, &col, &values}) {
    TORCH_CHECK(t->device().is_cpu(), "sparse_linear: every tensor must be on the CPU");
  }
  // Every access in bounds: offsets from 0 to nnz, never decreasing, and columns in [0, in). One
  // pass over the structure, cheaper than the product it guards.
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[out] == col.numel(), "sparse_linear: row_ptr must run from 0 to nnz");
  for (int64_t o = 0; o < out; ++o) {
    TORCH_CHECK(rp[o] <= rp[o + 1], "sparse_linear: row_ptr must not decrease (at row ", o, ")");
  }
  if (col.numel() > 0) {
    const auto [lo, hi] = at::aminmax(col);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < in, "sparse_linear: col must lie in [0, ", in,
                ") for an input of ", in, " columns");
  }
  at::Tensor y = at::empty({rows, out}, input.options());
  const int64_t nnz = col.numel();
  // Enough work per thread to pay for it: about 64K multiply-adds.
  const int64_t grain = std::max<int64_t>(kRows, (65536 / std::max<int64_t>(nnz + out, 1)) / kRows * kRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "sparse_linear", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    auto run = [&](auto* c) {
      at::parallel_for(0, (rows + kRows - 1) / kRows, (grain + kRows - 1) / kRows, [&](int64_t begin, int64_t end) {
        const int64_t r0 = begin * kRows, r1 = std::min(rows, end * kRows);
        sparse_linear_rows(x + r0 * in, r1 - r0, in, rp, c, v, b, yp + r0 * out, out);
      });
    };
    if (col.scalar_type() == at::kInt) {
      run(col.const_data_ptr<int32_t>());
    } else {
      run(col.const_data_ptr<int64_t>());
    }
  });
  return y;
}

}  // namespace
}  // namespace dwf

TORCH_LIBRARY_IMPL(dwf_kernels, CPU, m) { m.impl("sparse_linear", &dwf::sparse_linear_cpu); }
