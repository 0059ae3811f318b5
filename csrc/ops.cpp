// Every op schema of the dst_kernels library, defined once. Kernels live in
// csrc/cpu (CPU) and csrc/cuda (CUDA) and register with TORCH_LIBRARY_IMPL.
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#include "dst/cpu_isa.h"
#include "dst/recycle.h"
#include "dst/sparse.h"

#if __has_include("dst/build_config.h")
#include "dst/build_config.h"
#endif

#ifndef DST_TORCH_VERSION
#define DST_TORCH_VERSION TORCH_VERSION
#endif
#ifndef DST_CUDA_VERSION
#define DST_CUDA_VERSION ""
#endif
#ifndef DST_CUDA_ARCHS
#define DST_CUDA_ARCHS ""
#endif

namespace dst {

// "key=value" pairs separated by ';': what this library was built against.
std::string build_info() {
  std::string info = "torch=" DST_TORCH_VERSION;
  info += ";cuda=" DST_CUDA_VERSION;
  info += ";archs=" DST_CUDA_ARCHS;
#ifdef DST_WITH_CUDA
  info += ";with_cuda=1";
#else
  info += ";with_cuda=0";
#endif
  return info;
}

}  // namespace dst

TORCH_LIBRARY(dst_kernels, m) {
  m.def("build_info() -> str", &dst::build_info);
  // The instruction set of the CPU row kernels: "avx512", "avx2" or "portable" (the
  // best the CPU runs, capped by DST_KERNELS_CPU_ISA; csrc/include/dst/cpu_isa.h).
  m.def("cpu_isa() -> str", &dst::cpu::isa_name);
  // The bytes idle in the pool of large CPU buffers that the kernels recycle across steps
  // (P and dW of the linear layers, the sparse convolution's outputs; dst/recycle.h), and
  // freeing them (returns the bytes freed).
  m.def("cpu_recycled_bytes() -> int",
        []() { return static_cast<int64_t>(dst::cpu::recycled_idle_bytes()); });
  m.def("cpu_recycled_release() -> int",
        []() { return static_cast<int64_t>(dst::cpu::release_recycled()); });
  // One pass: P = W * (|W| > t[row]) and the kept count; with min_density set, the
  // reset rule on the device (t_eff = 0 and P recomputed when kept <= min_density *
  // numel). Returns (P, t_eff); t_eff is t, or zeros after a reset.
  m.def("dst_mask(Tensor weight, Tensor threshold, float? min_density) -> (Tensor, Tensor)");
  // One pass: dW = G*M + G*|W|*H(Q) and dt[row] = -sum_j G*W*H(Q), Q = |W| - t[row].
  m.def("dst_weight_grad(Tensor grad_masked, Tensor weight, Tensor threshold) -> (Tensor, Tensor)");
  // The same, writing dW over grad_masked (same layout as weight); returns dt.
  m.def("dst_weight_grad_(Tensor(a!) grad_masked, Tensor weight, Tensor threshold) -> Tensor");
  // The linear layer's forward: (P, t_eff) = dst_mask(weight, threshold, min_density), then
  // y = linear(x, P, bias). Returns (y, P, t_eff). Its backward (csrc/autograd.cpp) saves
  // x, W, t_eff (on the CPU also P): dx from P (recomputed where not saved), dW and dt from
  // dst_linear_weight_grad.
  m.def(
      "dst_linear(Tensor x, Tensor weight, Tensor threshold, Tensor? bias, float? min_density) -> "
      "(Tensor, Tensor, Tensor)");
  // The conv layer's forward: dst_mask, then ATen's convolution (cuDNN / oneDNN). Returns
  // (y, P, t_eff); its backward recomputes P and runs convolution_backward, then
  // dst_weight_grad_ over the weight gradient's buffer.
  // dX = dY P for the linear layer, P = W * (|W| > t[row]) recomputed from (W, t), or the
  // forward's P when `masked` is given (W's shape, dtype and device): ATen's GEMM on every
  // device; on the CPU the sparse kernel below the density crossover.
  m.def(
      "dst_linear_grad_input(Tensor grad_y, Tensor weight, Tensor threshold, Tensor? masked=None) "
      "-> Tensor");
  // (dW, dt) for the linear layer from G = dY^T X (x and grad_y flattened to rows), as
  // dst_weight_grad(G, W, t) returns them: one GEMM and dst_weight_grad_ over its buffer on
  // every device; on the CPU each thread runs the estimator pass over the block of G rows
  // that its own GEMM call just wrote (the block still in its cache).
  m.def(
      "dst_linear_weight_grad(Tensor grad_y, Tensor x, Tensor weight, Tensor threshold) -> "
      "(Tensor, Tensor)");
  // The sparse family (csrc/cpu/sparse.cpp). dst_sparse_mask: P = W * (|W| > t[row]) in
  // CSR, (crow_indices int32 [rows + 1], col_indices int32 [nnz], values [nnz]), rows
  // being W's first dimension and columns the rest flattened; with transpose=True the
  // CSR of P^T. dst_sparse_mm: y = x A^T + bias for the CSR matrix A (its rows are y's
  // features, its columns x's last dimension); relu=True returns relu(y) from the same pass.
  m.def(
      "dst_sparse_mask(Tensor weight, Tensor threshold, bool transpose=False) -> (Tensor, "
      "Tensor, Tensor)");
  m.def(
      "dst_sparse_mm(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor? bias=None, bool relu=False) -> Tensor");
  // When the CPU dst_linear kernels use the sparse path: 0 auto (the measured density
  // crossover), 1 always, 2 never; -1 only queries. Returns the previous mode.
  m.def("sparse_mode(int mode=-1) -> int", &dst::sparse_mode);
  // The density below which they do so in auto mode, for a layer of that shape.
  m.def("sparse_crossover(int tokens, int in_features, int out_features) -> float",
        &dst::sparse_crossover);
  m.def(
      "dst_conv2d(Tensor x, Tensor weight, Tensor threshold, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, float? min_density) -> (Tensor, Tensor, "
      "Tensor)");
  // dX = conv_transpose(dY, P) for the conv layer (x gives the input's shape), P recomputed
  // from (W, t): ATen's convolution backward on every device; on the CPU the direct sparse
  // convolution below the density crossover.
  m.def(
      "dst_conv2d_grad_input(Tensor grad_y, Tensor x, Tensor weight, Tensor threshold, int[2] "
      "stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // dst_sparse_conv2d: y = conv2d(x, A) + bias for A in CSR over [out_channels, in_channels *
  // KH * KW] (the filters' kept taps; groups 1), the sparse conv layers' inference op; with
  // relu and a pool window other than 1 x 1, y = max_pool2d(relu(y), pool_kernel, pool_stride)
  // (no padding, floor), the ReLU and the pool fused into its output pass.
  m.def(
      "dst_sparse_conv2d(Tensor x, Tensor crow_indices, Tensor col_indices, Tensor values, "
      "Tensor? bias, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool "
      "relu=False, int[2] pool_kernel=[1, 1], int[2] pool_stride=[1, 1]) -> Tensor");
  // One LSTM / GRU layer and direction (mode "lstm" | "gru"; PyTorch's gate order; x is
  // [steps, batch, input], h0 / c0 [batch, hidden]; c0 only for the LSTM). dst_sparse_rnn:
  // inference on the CSR of the gate matrices, returns (y, h_n, c_n); with feature_major, y
  // has strides [batch, 1, steps * batch] (h^T as the kernel writes it; an x laid out so is
  // read without a copy: what a stack of layers passes on). dst_sparse_rnn_train: on
  // the masked gate matrices P_ih, P_hh (each multiplied through its CSR below the density
  // crossover, else dense), returns (y, h_n, c_n, saved); dst_sparse_rnn_backward returns (dx,
  // dh0, dc0, dP_ih, dP_hh, db_ih, db_hh), dx empty unless input_grad. c_n / dc0 are empty for
  // the GRU.
  m.def(
      "dst_sparse_rnn(Tensor x, Tensor h0, Tensor? c0, Tensor ih_crow_indices, Tensor "
      "ih_col_indices, Tensor ih_values, Tensor hh_crow_indices, Tensor hh_col_indices, Tensor "
      "hh_values, Tensor? bias_ih, Tensor? bias_hh, str mode, bool reverse=False, bool "
      "feature_major=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "dst_sparse_rnn_train(Tensor x, Tensor h0, Tensor? c0, Tensor weight_ih, Tensor "
      "weight_hh, Tensor? bias_ih, Tensor? bias_hh, str mode, bool reverse=False) -> (Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "dst_sparse_rnn_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, "
      "Tensor h0, Tensor? c0, Tensor weight_ih, Tensor weight_hh, Tensor y, Tensor saved, str "
      "mode, bool reverse, bool input_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  // When dst_conv2d's CPU kernels go sparse in auto mode (the density, for that shape).
  m.def(
      "sparse_conv_crossover(int batch, int in_channels, int out_channels, int kernel, int "
      "out_pixels) -> float",
      &dst::sparse_conv_crossover);
}

namespace {

// _C.sparse_mm(x, crow_indices, col_indices, values, bias, relu): dst_sparse_mm called
// through the dispatcher (so fake tensors, dispatch modes, autograd's fallback and the
// profiler see the op as from torch.ops), without the boxed call of torch.ops: its argument
// boxing and schema matching cost about a microsecond per call, which is most of a
// SparseLinear's time at a few tokens. The GIL is released only for products large enough
// to pay for it. SparseLinear's eager forward uses it; traced code uses torch.ops.
PyObject* sparse_mm_call(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_Format(PyExc_TypeError,
                 "sparse_mm takes 6 arguments (x, crow_indices, col_indices, values, bias, "
                 "relu), got %zd",
                 nargs);
    return nullptr;
  }
  static const char* const names[] = {"x", "crow_indices", "col_indices", "values"};
  for (int i = 0; i < 4; ++i) {
    if (!THPVariable_Check(args[i])) {
      PyErr_Format(PyExc_TypeError, "sparse_mm: %s must be a Tensor, got %s", names[i],
                   Py_TYPE(args[i])->tp_name);
      return nullptr;
    }
  }
  std::optional<at::Tensor> bias;
  if (args[4] != Py_None) {
    if (!THPVariable_Check(args[4])) {
      PyErr_Format(PyExc_TypeError, "sparse_mm: bias must be a Tensor or None, got %s",
                   Py_TYPE(args[4])->tp_name);
      return nullptr;
    }
    bias = THPVariable_Unpack(args[4]);
  }
  if (!PyBool_Check(args[5])) {
    PyErr_Format(PyExc_TypeError, "sparse_mm: relu must be a bool, got %s",
                 Py_TYPE(args[5])->tp_name);
    return nullptr;
  }
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dst_kernels::dst_sparse_mm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& crow = THPVariable_Unpack(args[1]);
  const at::Tensor& col = THPVariable_Unpack(args[2]);
  const at::Tensor& values = THPVariable_Unpack(args[3]);
  const bool relu = args[5] == Py_True;
  // Multiply-adds above which the GIL is released (a release and re-acquire costs about a
  // third of a microsecond).
  constexpr double kReleaseWork = 1 << 20;
  const double rows =
      x.dim() > 0 && x.size(-1) > 0 ? static_cast<double>(x.numel()) / x.size(-1) : 0.0;
  at::Tensor y;
  if (rows * static_cast<double>(col.numel()) > kReleaseWork) {
    pybind11::gil_scoped_release no_gil;
    y = op.call(x, crow, col, values, bias, relu);
  } else {
    y = op.call(x, crow, col, values, bias, relu);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"sparse_mm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&sparse_mm_call)),
     METH_FASTCALL,
     "sparse_mm(x, crow_indices, col_indices, values, bias, relu): "
     "torch.ops.dst_kernels.dst_sparse_mm for eager calls"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// An importable module, so `import dst_kernels._C` loads the library and registers the ops
// above; it exposes sparse_mm, the eager entry of dst_sparse_mm.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "dst_kernels compiled ops (see torch.ops.dst_kernels)",
      -1,
      methods,
  };
  return PyModule_Create(&module_def);
}
