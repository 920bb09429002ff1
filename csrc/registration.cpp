// Every op schema, declared once. Engines (CPU here, CUDA in *_cuda.cpp) only add implementations;
// fake kernels and autograd are registered next to the Python wrappers (pykernels/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(pykernels, m) {
  // Graph message passing. Graphs arrive as target-major CSR (rowptr, col); per-edge tensors are in
  // CSR order; node features are [N, heads, features]. Differentiable ops also take the transpose
  // (rowptr_t, col_t, perm_t: source-major, perm_t mapping to CSR positions), which only their backward
  // reads; it may be None where no gradient is needed.
  m.def("coo_to_csr(Tensor row, Tensor col, SymInt num_rows, SymInt num_cols, str context) -> (Tensor, Tensor, Tensor)");
  // Turns the CSR positions that a max/min spmm reports (arg, -1 for an empty row) into col[arg] in place,
  // `empty` for -1: scatter's positions in its source. In place because the [rows, F] int64 result is
  // larger than what the reduction reads.
  m.def("arg_to_source_(Tensor(a!) arg, Tensor col, int empty) -> ()");
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

  // Dense attention. q [B, H, Nq, D], k [B, Hkv, Nk, D], v [B, Hkv, Nk, Dv] with H % Hkv == 0 (grouped
  // query heads share kv head h / (H / Hkv)); any strides with a contiguous last dimension. bias: additive
  // float [B, H, Nq, Nk] read through its strides, so an expanded (stride-0) bias costs no memory; -inf
  // masks. causal: key j is visible to query i iff j <= i (top-left aligned, as SDPA's is_causal).
  // Returns out [B, H, Nq, Dv] and the log-sum-exp [B, H, Nq] in the accumulation type (float32;
  // float64 for float64 inputs); a query that sees no key gets out = 0 and lse = -inf.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? bias, bool causal, float scale) -> (Tensor, Tensor)");
  // dbias is [B, H, Nq, Nk] (the caller sums it down to the bias's broadcast shape), or empty.
  m.def(
      "attention_backward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, Tensor grad_out, "
      "bool causal, float scale, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The head-averaged attention map [B, Nq, Nk] = mean over H of exp(q k^T * scale + bias - lse).
  m.def("attention_map(Tensor q, Tensor k, Tensor? bias, Tensor lse, bool causal, float scale) -> Tensor");
  // Gradients of the map with respect to q, k and the bias; lse is treated as a function of q, k and bias
  // (the softmax normalisation is differentiated), so no gradient flows through the lse input itself.
  m.def(
      "attention_map_backward(Tensor q, Tensor k, Tensor? bias, Tensor lse, Tensor grad_map, bool causal, "
      "float scale, bool bias_grad) -> (Tensor, Tensor, Tensor)");
  // attention and attention_map in one op (out, lse, map), and the gradients of both outputs in one backward:
  // engines that can share work between them (the CPU engine: one pass when a query's keys fit one tile,
  // one backward) do; the others run the two ops.
  m.def(
      "attention_with_map(Tensor q, Tensor k, Tensor v, Tensor? bias, bool causal, float scale) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_with_map_backward(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, "
      "Tensor grad_out, Tensor grad_map, bool causal, float scale, bool bias_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");

  // Attention flow. Products are batched: a [batch, m, k], b [batch, k, n] read through their strides (0 on
  // broadcast batch dimensions), outputs contiguous [batch, m, n]; k >= 1.
  // Hard (max, min) product: out[i, j] = max_k min(a[i, k], b[k, j]), bitwise equal to the broadcast
  // formula; argk [batch, m, n] (int32) is the lowest maximising k. NaN anywhere in row i of a or column j
  // of b makes out[i, j] NaN, argk the first such k.
  m.def("maxmin_matmul(Tensor a, Tensor b) -> (Tensor, Tensor)");
  // The gradient of out[i, j] goes to a[i, k*] when a[i, k*] <= b[k*, j], else to b[k*, j].
  m.def(
      "maxmin_matmul_backward(Tensor a, Tensor b, Tensor argk, Tensor grad_out, bool a_grad, bool b_grad) "
      "-> (Tensor, Tensor)");
  // Soft product at temperature t: out = t * log sum_k exp(smin_k / t), smin_k = -t * log(exp(-a_ik / t) +
  // exp(-b_kj / t)). Returns out, the hard product (the shift that keeps every exponent <= 0) and
  // sum = sum_k exp((smin_k - hard) / t) in [1/2, k], both kept for the backward.
  m.def("soft_maxmin_matmul(Tensor a, Tensor b, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "soft_maxmin_matmul_backward(Tensor a, Tensor b, Tensor hard, Tensor sum, Tensor grad_out, "
      "float temperature, bool a_grad, bool b_grad) -> (Tensor, Tensor)");
  // Exact maximum flow from sources[q] to sinks[q] for every query q on a directed graph given as CSR over
  // source nodes (rowptr [num_nodes + 1], col [E]) with capacity [E] (float, >= 0). Returns float64 [Q].
  m.def("max_flow(Tensor rowptr, Tensor col, Tensor capacity, Tensor sources, Tensor sinks) -> Tensor");
  // The layered DAG of attention maps: capacities[l] is [n_{l+1}, n_l]; node (l, j) -> (l + 1, i) carries
  // capacities[l][i, j]. sources index layer 0, sinks the last layer. Returns float64 [Q].
  m.def("max_flow_layered(Tensor[] capacities, Tensor sources, Tensor sinks) -> Tensor");

  // Windowed attention over a token grid: q, k, v [B, heads, H * W, D] with tokens row-major over
  // spatial_shape = (H, W), any strides with a contiguous last dimension. The Swin computation without
  // copies: the grid is cyclically shifted by -shift (torch.roll), padded bottom/right to whole windows
  // (Hp, Wp), cut into windows of window = (wh, ww), attention runs inside each window, and the result is
  // shifted back. Pad tokens are keys/values with k = pad_kv[0, h], v = pad_kv[1, h] ([2, heads, D]; zeros
  // when None: timm pads the features before the qkv projection, so there they are the projection's bias).
  // bias_table [(2wh - 1) * (2ww - 1), heads] is gathered by relative offset (Swin's table); dense_bias
  // [heads, wh * ww, wh * ww]; at most one of them. shift_mask adds -100 between tokens of different Swin
  // regions of the padded grid (split at Hp - wh and Hp - sh, likewise for W). Returns out [B, heads, H * W,
  // Dv] and the log-sum-exp [B, heads, H * W] (float32; float64 for float64 inputs).
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int[2] spatial_shape, int[2] window, int[2] shift, "
      "Tensor? bias_table, Tensor? dense_bias, Tensor? pad_kv, bool shift_mask, float scale) -> (Tensor, Tensor)");
  // Gradients for q, k, v and the bias (shaped like whichever bias was given; empty when bias_grad is false).
  m.def(
      "window_attention_backward(Tensor q, Tensor k, Tensor v, int[2] spatial_shape, int[2] window, "
      "int[2] shift, Tensor? bias_table, Tensor? dense_bias, Tensor? pad_kv, bool shift_mask, float scale, "
      "Tensor out, Tensor lse, Tensor grad_out, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // 2-D neighbourhood attention (NATTEN's semantics): query (y, x) attends to the kernel_size window of
  // keys at dilation spacing centred on it, shifted inwards (clamped, not wrapped) at the borders. rpb
  // [heads, 2 kh - 1, 2 kw - 1] is NATTEN's relative position bias. Same q, k, v layout and outputs as
  // window_attention.
  m.def(
      "neighborhood_attention_2d(Tensor q, Tensor k, Tensor v, int[2] spatial_shape, int[2] kernel_size, "
      "int[2] dilation, Tensor? rpb, float scale) -> (Tensor, Tensor)");
  m.def(
      "neighborhood_attention_2d_backward(Tensor q, Tensor k, Tensor v, int[2] spatial_shape, "
      "int[2] kernel_size, int[2] dilation, Tensor? rpb, float scale, Tensor out, Tensor lse, Tensor grad_out, "
      "bool rpb_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}
