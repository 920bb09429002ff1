// Every op schema, declared once. Engines (CPU here, CUDA in *_cuda.cpp) only add implementations;
// fake kernels and autograd are registered next to the Python wrappers (pykernels/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(pykernels, m) {
  // Graph message passing. Graphs arrive as target-major CSR (rowptr, col); per-edge tensors are in
  // CSR order; node features are [N, heads, features]. Differentiable ops also take the transpose
  // (rowptr_t, col_t, perm_t: source-major, perm_t mapping to CSR positions), which only their backward
  // reads; it may be None where no gradient is needed.
  m.def("coo_to_csr(Tensor row, Tensor col, int num_rows, int num_cols, str context) -> (Tensor, Tensor, Tensor)");
  m.def("spmm(Tensor rowptr, Tensor col, Tensor? rowptr_t, Tensor? col_t, Tensor? perm_t, Tensor? weight, Tensor x, str reduce) -> (Tensor, Tensor)");
  m.def(
      "spmm_arg_backward(Tensor rowptr, Tensor col, Tensor rowptr_t, Tensor col_t, Tensor perm_t, Tensor? weight, "
      "Tensor arg, Tensor grad_out, Tensor x, bool weight_grad) -> (Tensor, Tensor)");
  m.def("sddmm(Tensor rowptr, Tensor col, Tensor? rowptr_t, Tensor? col_t, Tensor? perm_t, Tensor a, Tensor b) -> Tensor");
  m.def("edge_softmax(Tensor rowptr, Tensor scores) -> Tensor");
  m.def("edge_softmax_backward(Tensor rowptr, Tensor probs, Tensor grad) -> Tensor");
  m.def("graph_attention(Tensor rowptr, Tensor col, Tensor? rowptr_t, Tensor? col_t, Tensor? perm_t, Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> (Tensor, Tensor)");
  m.def(
      "graph_attention_backward(Tensor rowptr, Tensor col, Tensor rowptr_t, Tensor col_t, Tensor perm_t, Tensor q, "
      "Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, Tensor grad_out, float scale, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}
