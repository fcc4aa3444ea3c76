// The dwf_kernels operator schemas (defined once, here) and the Python module entry point.
//
// Device implementations register beside their code (cpu/dwf_cpu.cpp, cuda/dwf_cuda.cu), the
// autograd formula in dwf_autograd.cpp; the fake (meta) kernels are registered from Python by the
// extension backend (dwf_kernels/backends/extension.py), whose registry is dwf_kernels/backends/__init__.py.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

// setup.py builds the module for Python's stable ABI (named _C.abi3.so, wheels tagged cpXY-abi3):
// the tag is true only if this file compiles under the Py_LIMITED_API version it names.
#if !defined(Py_LIMITED_API) || !defined(DWF_PY_LIMITED_API)
#error "build dwf_kernels._C through setup.py: it must be compiled with Py_LIMITED_API (stable ABI)"
#endif
static_assert(Py_LIMITED_API == DWF_PY_LIMITED_API, "Py_LIMITED_API differs from the version setup.py tags");

#include "cpu/dwf_cpu.h"

// A plain module init instead of pybind11: importing the module runs the static TORCH_LIBRARY
// registrations below, which is nearly all Python needs from it, and it builds in seconds. Its one
// function names the CPU kernels' SIMD variant in use (dwf_kernels/_extension.py).
static PyObject* cpu_variant(PyObject*, PyObject*) { return PyUnicode_FromString(dwf::cpu::selected_variant()); }

static PyMethodDef module_methods[] = {
    {"cpu_variant", cpu_variant, METH_NOARGS, "The CPU kernels' SIMD variant: 'default', 'avx2' or 'avx512'."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dwf_kernels, m) {
  // w = prod_d factors[d] (written in out_dtype), and sumsq = sum(factors^2) in the same pass
  // (fp32, fp64 for fp64 factors; 0 when with_sumsq is false and the squares are skipped).
  m.def("dwf_forward(Tensor factors, ScalarType? out_dtype, bool with_sumsq) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // d/dfactors of L given grad_w = dL/dw and grad_sumsq = dL/dsumsq (None: the penalty is unused).
  m.def("dwf_backward(Tensor factors, Tensor grad_w, Tensor? grad_sumsq) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // The fused backward + torch.optim.SGD step (docs/design.md, The fused SGD step): the factor gradients of dwf_backward
  // are formed in registers and applied at once, updating factors and momentum_buffer in place;
  // no gradient tensor exists. init_buffer: this is the buffer's first step (it is written, not read).
  m.def(
      "dwf_sgd_step(Tensor(a!) factors, Tensor(b!)? momentum_buffer, Tensor grad_w, Tensor? grad_sumsq, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool init_buffer) -> ()",
      {at::Tag::pt2_compliant_tag});
  // dwf_sgd_step on a list of layers (same hyper-parameters, one entry per layer in each list;
  // momentum_buffers empty when momentum is 0), in one call: on a GPU one launch per 48 layers.
  m.def(
      "dwf_sgd_step_multi(Tensor(a!)[] factors, Tensor(b!)[] momentum_buffers, Tensor[] grad_w, Tensor?[] grad_sumsq, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool init_buffer) -> ()",
      {at::Tag::pt2_compliant_tag});
  // torch.optim.SGD's step on a list of plain parameters and their gradients (CPU, float32 and
  // float64, contiguous), in one call, with torch's roundings: FusedSGD's update of the parameters
  // that are not DWF factors (biases, norms), where torch's own runs several ops per tensor.
  // Returns the indices (int64) of the params it cannot update so (another dtype, not contiguous,
  // a gradient or buffer of another shape or dtype), left alone for torch's own update.
  m.def(
      "sgd_step_multi(Tensor(a!)[] params, Tensor(b!)[] momentum_buffers, Tensor[] grads, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool init_buffer) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The squared L2 norm of dwf_backward's result, read-only (the gradient is not stored): for
  // clipping by the global gradient norm. A 0-dim tensor in sumsq's dtype (fp32; fp64 for fp64).
  m.def("dwf_grad_sumsq(Tensor factors, Tensor grad_w, Tensor? grad_sumsq) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Sparse inference: input @ W^T + bias with W (out, in) in CSR (row_ptr: out + 1 offsets into
  // col and values); input is a contiguous (batch, in) matrix.
  m.def("sparse_linear(Tensor input, Tensor row_ptr, Tensor col, Tensor values, Tensor? bias) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // The 2-d convolution of torch.nn.Conv2d (zero padding) with its weight (out, in / groups, kh, kw)
  // in CSR: one row per output channel, columns the flattened (in / groups, kh, kw) index.
  m.def(
      "sparse_conv2d(Tensor input, Tensor row_ptr, Tensor col, Tensor values, Tensor? bias, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}

namespace {

// The ADInplaceOrView kernel of the ops that update tensors in place (the arguments their schema
// marks written, `Tensor(a!)` and `Tensor(a!)[]`): runs the op below this key, then bumps the
// version counter of every tensor it wrote, as ATen's generated kernel does for its own in-place
// ops. So autograd refuses a backward through a saved tensor the op changed, and the lazy factor
// gradients see the update, whoever calls the op (FusedSGD, dwf_kernels.dwf_sgd_step, torch.ops
// directly). Inference tensors have no counter and are skipped. Under InferenceMode the dispatcher
// skips this key for inference tensors; normal ones are still counted, as for ATen's ops.
void count_in_place_update(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const std::vector<c10::Argument>& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::AliasInfo* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) written.push_back(t);
    }  // None (an optional tensor not given) writes nothing
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& t : written) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(dwf_kernels, ADInplaceOrView, m) {
  for (const char* name : {"dwf_sgd_step", "dwf_sgd_step_multi", "sgd_step_multi"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&count_in_place_update>());
  }
}
