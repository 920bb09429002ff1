// Dense attention backward: delta = rowsum(dO * O) per query row, then the deterministic dq and dk/dv
// passes of attention_grad.cuh with dP = dO V^T.
#include "attention/attention_grad.cuh"

namespace pk::cuda::attn {
namespace {

// One warp per (b, h, query) row, lanes strided over Dv.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) delta_kernel(const BackwardParams<T> p) {
  using A = acc_t<T>;
  const Inputs<T>& in = p.in;
  const LaneGroup<kWarpSize> warp;
  const index_t row = LaneGroup<kWarpSize>::id();
  if (row >= in.batch * in.heads * in.nq) return;
  const index_t bh = row / in.nq, i = row % in.nq, b = bh / in.heads, h = bh % in.heads;
  const T* const dout = p.grad_out.at(b, h, i);
  const T* const out = p.out.at(b, h, i);
  A sum = 0;
  for (index_t c = warp.lane; c < in.dv; c += kWarpSize) sum += to_acc(dout[c]) * to_acc(out[c]);
  sum = warp.sum(sum);
  if (warp.lane == 0) p.delta[row] = sum;
}

}  // namespace

template <typename T>
cudaError_t backward(const BackwardParams<T>& p) {
  const Inputs<T>& in = p.in;
  const index_t rows_per_block = kBlockThreads / kWarpSize;
  const cudaError_t err = launch(delta_kernel<T>, ceil_div(in.batch * in.heads * in.nq, rows_per_block), kBlockThreads,
                                 0, in.stream, p);
  if (err != cudaSuccess) return err;
  return launch_grad<GradMode::kAttention>(GradArgs<T>{in, p.lse, p.delta, p.grad_out, Scores<T>{}, acc_t<T>(0),
                                                       p.grad_q, p.grad_k, p.grad_v, p.grad_bias});
}

PK_ATTN_INSTANTIATE(backward, BackwardParams);

}  // namespace pk::cuda::attn
