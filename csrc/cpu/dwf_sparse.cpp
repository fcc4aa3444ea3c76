// CPU kernels of sparse inference, with the weight held as CSR (one row per output feature or
// channel): y = x W^T + b (sparse_linear) and the 2-d convolution (sparse_conv2d).
//
// At the sparsities DWF reaches (a few nonzeros per thousand weights) the work is the nonzeros
// times the batch, and what costs is the overhead around it: torch.sparse's CSR matmul transposes
// and converts around a general kernel. Here every output element is one dot product of a CSR row
// with an input row, eight input rows at a time so that each nonzero's value and column are loaded
// once per eight products; the batch is split between threads. Sums run in fp32 (fp64 for fp64),
// in the order of the row's nonzeros.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

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

// Calls body(col_ptr) with col's data as int32_t* or int64_t*.
template <typename F>
void with_col(const at::Tensor& col, const F& body) {
  if (col.scalar_type() == at::kInt) {
    body(col.const_data_ptr<int32_t>());
  } else {
    body(col.const_data_ptr<int64_t>());
  }
}

// The CSR weight's checks, shared by the ops: structure, dtypes, devices, and every access in
// bounds (offsets from 0 to nnz, never decreasing; columns in [0, columns)). One pass over the
// structure, cheaper than the product it guards. Returns the number of rows (outputs).
int64_t check_csr(const char* op, const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col,
                  const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t columns) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong && row_ptr.is_contiguous() &&
                  row_ptr.numel() >= 1,
              op, ": row_ptr must be a contiguous int64 vector of out + 1 offsets");
  TORCH_CHECK(col.dim() == 1 && (col.scalar_type() == at::kInt || col.scalar_type() == at::kLong) &&
                  col.is_contiguous(),
              op, ": col must be a contiguous int32 or int64 vector");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() == col.numel(), op,
              ": values must be a contiguous vector as long as col");
  TORCH_CHECK(values.scalar_type() == input.scalar_type(), op, ": values are ", values.scalar_type(),
              " but input is ", input.scalar_type());
  const int64_t out = row_ptr.numel() - 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == out && bias->is_contiguous() &&
                    bias->scalar_type() == input.scalar_type(),
                op, ": bias must be a contiguous vector of out elements in the input's dtype");
  }
  for (const at::Tensor* t : {&input, &row_ptr, &col, &values}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU");
  }
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[out] == col.numel(), op, ": row_ptr must run from 0 to nnz");
  for (int64_t o = 0; o < out; ++o) {
    TORCH_CHECK(rp[o] <= rp[o + 1], op, ": row_ptr must not decrease (at row ", o, ")");
  }
  bool inside = true;  // a plain loop: at these sizes cheaper than an ATen reduction's dispatch
  with_col(col, [&](auto* c) {
    for (int64_t j = 0, n = col.numel(); j < n; ++j) inside &= c[j] >= 0 && c[j] < columns;
  });
  TORCH_CHECK(inside, op, ": col must lie in [0, ", columns, ") for this input");
  return out;
}

at::Tensor sparse_linear_cpu(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2 && input.is_contiguous(), "sparse_linear: input must be a contiguous (batch, in) matrix");
  const int64_t rows = input.size(0), in = input.size(1);
  const int64_t out = check_csr("sparse_linear", input, row_ptr, col, values, bias, in);
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  at::Tensor y = at::empty({rows, out}, input.options());
  const int64_t nnz = col.numel();
  // Enough work per thread to pay for it: about 64K multiply-adds.
  const int64_t grain = std::max<int64_t>(kRows, (65536 / std::max<int64_t>(nnz + out, 1)) / kRows * kRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "sparse_linear", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_col(col, [&](auto* c) {
      at::parallel_for(0, (rows + kRows - 1) / kRows, (grain + kRows - 1) / kRows, [&](int64_t begin, int64_t end) {
        const int64_t r0 = begin * kRows, r1 = std::min(rows, end * kRows);
        sparse_linear_rows(x + r0 * in, r1 - r0, in, rp, c, v, b, yp + r0 * out, out);
      });
    });
  });
  return y;
}


// The geometry of one 2-d convolution, as torch.nn.Conv2d defines it (zero padding).
struct ConvGeometry {
  int64_t channels, height, width;  // input
  int64_t kh, kw, sh, sw, ph, pw, dh, dw, groups;
  int64_t out_height, out_width;
};

// The output range [lo, hi) whose taps at offset `shift` (kernel offset times dilation minus
// padding) read inside an input of `size`: 0 <= o * stride + shift < size.
inline std::pair<int64_t, int64_t> valid_range(int64_t shift, int64_t stride, int64_t size, int64_t out) {
  const int64_t lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
  const int64_t last = size - 1 - shift;  // largest o * stride that stays inside
  const int64_t hi = last < 0 ? 0 : std::min(out, last / stride + 1);
  return {lo, std::max(lo, hi)};
}

// One output plane (image n, channel o): acc starts at the bias, and every nonzero weight adds its
// value times the input plane it reads, shifted by its kernel offset: a scaled row addition, over
// contiguous memory at stride 1. Work is nonzeros times output pixels, independent of the zeros.
template <typename T, typename I, typename A>
void sparse_conv2d_plane(const T* image, const ConvGeometry& g, int64_t first_channel, const int64_t* rp,
                         const I* col, const T* values, int64_t o, A bias, A* acc) {
  const int64_t oh_n = g.out_height, ow_n = g.out_width, taps = g.kh * g.kw;
  std::fill(acc, acc + oh_n * ow_n, bias);
  for (int64_t j = rp[o]; j < rp[o + 1]; ++j) {
    const A v = static_cast<A>(values[j]);
    const int64_t c = col[j] / taps, tap = col[j] % taps;
    const int64_t dy = (tap / g.kw) * g.dh - g.ph, dx = (tap % g.kw) * g.dw - g.pw;
    const auto [oh0, oh1] = valid_range(dy, g.sh, g.height, oh_n);
    const auto [ow0, ow1] = valid_range(dx, g.sw, g.width, ow_n);
    const T* plane = image + (first_channel + c) * g.height * g.width;
    for (int64_t oh = oh0; oh < oh1; ++oh) {
      const T* xr = plane + (oh * g.sh + dy) * g.width + dx;
      A* ar = acc + oh * ow_n;
      if (g.sw == 1) {
        for (int64_t ow = ow0; ow < ow1; ++ow) ar[ow] += v * static_cast<A>(xr[ow]);
      } else {
        for (int64_t ow = ow0; ow < ow1; ++ow) ar[ow] += v * static_cast<A>(xr[ow * g.sw]);
      }
    }
  }
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& col,
                             const at::Tensor& values, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(),
              "sparse_conv2d: input must be a contiguous (batch, channels, height, width) tensor");
  for (const auto& [name, arg, least] :
       {std::tuple{"kernel_size", kernel_size, 1}, {"stride", stride, 1}, {"padding", padding, 0},
        {"dilation", dilation, 1}}) {
    TORCH_CHECK(arg.size() == 2 && arg[0] >= least && arg[1] >= least, "sparse_conv2d: ", name,
                " must be two ints >= ", least);
  }
  TORCH_CHECK(groups >= 1 && input.size(1) % groups == 0, "sparse_conv2d: groups must be >= 1 and divide the ",
              input.size(1), " input channels");
  ConvGeometry g{input.size(1), input.size(2), input.size(3), kernel_size[0], kernel_size[1], stride[0],
                 stride[1], padding[0], padding[1], dilation[0], dilation[1], groups, 0, 0};
  g.out_height = (g.height + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.out_width = (g.width + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.height + 2 * g.ph >= g.dh * (g.kh - 1) + 1 && g.width + 2 * g.pw >= g.dw * (g.kw - 1) + 1,
              "sparse_conv2d: the padded input (", g.height, "x", g.width, ") is smaller than the dilated kernel");
  const int64_t group_channels = g.channels / groups;
  const int64_t out = check_csr("sparse_conv2d", input, row_ptr, col, values, bias, group_channels * g.kh * g.kw);
  TORCH_CHECK(out % groups == 0, "sparse_conv2d: groups=", groups, " must divide the ", out, " output channels");
  const int64_t batch = input.size(0), plane = g.out_height * g.out_width, per_group = out / groups;
  at::Tensor y = at::empty({batch, out, g.out_height, g.out_width}, input.options());
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  // Enough work per thread to pay for it: about 32K multiply-adds.
  const int64_t work = (col.numel() / std::max<int64_t>(out, 1) + 1) * std::max<int64_t>(plane, 1);
  const int64_t grain = std::max<int64_t>(1, 32768 / work);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "sparse_conv2d", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_col(col, [&](auto* c) {
      at::parallel_for(0, batch * out, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> scratch(std::is_same_v<acc_t, scalar_t> ? 0 : plane);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / out, o = task % out;
          scalar_t* dst = yp + task * plane;
          acc_t* acc = nullptr;
          if constexpr (std::is_same_v<acc_t, scalar_t>) {
            acc = dst;  // accumulate in the output itself
          } else {
            acc = scratch.data();
          }
          const acc_t bo = b ? static_cast<acc_t>(b[o]) : acc_t(0);
          sparse_conv2d_plane(x + n * g.channels * g.height * g.width, g, (o / per_group) * group_channels, rp, c,
                              v, o, bo, acc);
          if constexpr (!std::is_same_v<acc_t, scalar_t>) {
            for (int64_t i = 0; i < plane; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
          }
        }
      });
    });
  });
  return y;
}

}  // namespace
}  // namespace dwf

TORCH_LIBRARY_IMPL(dwf_kernels, CPU, m) {
  m.impl("sparse_linear", &dwf::sparse_linear_cpu);
  m.impl("sparse_conv2d", &dwf::sparse_conv2d_cpu);
}
