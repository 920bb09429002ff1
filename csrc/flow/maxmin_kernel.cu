// The (max, min) products on CUDA. The semiring has no tensor-core path, so these are classic CUDA-core
// tiled loops: a 256-thread CTA owns a [16 RM, 16 RN] tile (thread (tx, ty) owns rows ty + 16 r and
// columns tx + 16 c, so its shared-memory reads are broadcasts or conflict-free) and streams the reduced
// dimension through shared memory in chunks of kChunk. RM and RN (1, 2 or 4) are picked per call so that
// a tile pads m and n by at most 25%: Vico's 16 x 77 products run 16 x 32 tiles.
//
// Forward: the hard product keeps (best, arg) per output with a strict comparison, so ties keep the
// lowest k. min(a_ik, b_kj) is NaN exactly when a_ik or b_kj is, so the first NaN k of output (i, j) is
// min(first NaN k in row i of a, first NaN k in column j of b): each thread tracks those for its rows and
// columns and patches its NaN outputs at the end, which keeps NaN tests out of the per-(i, j, k) work.
// The soft product runs a second pass over k for the sum of flow/maxmin.h.
//
// Backward: one kernel computes the gradient of the left operand x of out = x (max, min) y, a [16 RM,
// 16 RK] tile of it per CTA, streaming over the outputs' columns; the right operand's gradient is the
// same kernel on out^T = b^T (max, min) a^T (transposed strides). Every gradient element has one owner:
// no atomics, and the sum over outputs runs in a fixed order, so results are bitwise reproducible.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "flow/maxmin.h"
#include "flow/maxmin_cuda.h"

namespace pk::cuda::flow {
namespace {

constexpr int kSide = 16;   // threads per tile side: kSide * kSide == kBlockThreads
constexpr int kChunk = 16;  // values of the reduced dimension staged per pass
static_assert(kSide * kSide == kBlockThreads, "one thread per (row, column) of the thread grid");

PK_HOST_DEVICE index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// __expf is accurate to a few ulp where a soft term matters (exponents below ~20); past that the term is
// negligible next to sum >= 1/2.
__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float recip(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double recip(double x) { return 1.0 / x; }

// Two CTAs per SM (at most 128 registers a thread) hide shared-memory latency better than one; ptxas keeps
// the float kernels within that with at most 16 bytes of spill, while the double ones would spill hundreds.
template <typename T>
constexpr int kMinBlocks = std::is_same_v<T, double> ? 1 : 2;

template <typename A>
__device__ __forceinline__ A soft_exp(A hard, A x, A inv_t) {
  return exp_acc(pk::flow::soft_exponent(hard, x, inv_t));
}

// ---------------------------------------------------------------------------------------------- forward

// Stages rows [row0, row0 + TM) x k [k0, k0 + steps) of a as tile[k][row], and k x columns [col0, col0 +
// TN) of b as tile[k][col]; entries outside the matrices are 0 and never reach a stored output. Consecutive
// threads walk a's k and b's columns, the contiguous directions of row-major operands.
template <int TM, int TN, typename T, typename A>
__device__ __forceinline__ void stage_operands(A (*a_tile)[TM + 1], A (*b_tile)[TN + 1], const ForwardParams<T>& p,
                                               index_t bat, index_t row0, index_t col0, index_t k0, int steps) {
  for (int e = threadIdx.x; e < TM * kChunk; e += kBlockThreads) {
    const int kk = e % kChunk, ii = e / kChunk;
    const index_t i = row0 + ii;
    a_tile[kk][ii] = i < p.m && kk < steps ? to_acc(p.a.at(bat, i, k0 + kk)) : A(0);
  }
  for (int e = threadIdx.x; e < TN * kChunk; e += kBlockThreads) {
    const int jj = e % TN, kk = e / TN;
    const index_t j = col0 + jj;
    b_tile[kk][jj] = j < p.n && kk < steps ? to_acc(p.b.at(bat, k0 + kk, j)) : A(0);
  }
}

template <typename T, bool kSoft, int RM, int RN>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocks<T>) forward_kernel(const ForwardParams<T> p) {
  using A = acc_t<T>;
  constexpr int TM = kSide * RM, TN = kSide * RN;
  __shared__ A a_tile[kChunk][TM + 1];  // +1: the staging writes of consecutive threads hit distinct banks
  __shared__ A b_tile[kChunk][TN + 1];

  const index_t tiles_n = ceil_div(p.n, TN);
  const index_t tiles = ceil_div(p.m, TM) * tiles_n;
  const index_t bat = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const index_t row0 = tile / tiles_n * TM, col0 = tile % tiles_n * TN;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int32_t k_end = static_cast<int32_t>(p.k);  // the launcher checked k < 2^31

  A best[RM][RN];
  int32_t arg[RM][RN];
  int32_t row_nan[RM], col_nan[RN];  // first NaN k of this thread's rows of a / columns of b; k_end: none
#pragma unroll
  for (int r = 0; r < RM; ++r) {
    row_nan[r] = k_end;
#pragma unroll
    for (int c = 0; c < RN; ++c) {
      best[r][c] = A(-INFINITY);
      arg[r][c] = 0;
    }
  }
#pragma unroll
  for (int c = 0; c < RN; ++c) col_nan[c] = k_end;

  for (index_t k0 = 0; k0 < p.k; k0 += kChunk) {
    const int steps = static_cast<int>(p.k - k0 < kChunk ? p.k - k0 : kChunk);
    __syncthreads();  // every thread is done with the previous chunk
    stage_operands<TM, TN>(a_tile, b_tile, p, bat, row0, col0, k0, steps);
    __syncthreads();
    for (int kk = 0; kk < steps; ++kk) {
      const int32_t k = static_cast<int32_t>(k0) + kk;
      A x[RM], y[RN];
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        x[r] = a_tile[kk][ty + kSide * r];
        if (isnan(x[r]) && k < row_nan[r]) row_nan[r] = k;
      }
#pragma unroll
      for (int c = 0; c < RN; ++c) {
        y[c] = b_tile[kk][tx + kSide * c];
        if (isnan(y[c]) && k < col_nan[c]) col_nan[c] = k;
      }
#pragma unroll
      for (int r = 0; r < RM; ++r)
#pragma unroll
        for (int c = 0; c < RN; ++c) {
          // Ties pick a, as torch.minimum does; the two differ only in the sign of a zero.
          const A v = pk::flow::a_is_min(x[r], y[c]) ? x[r] : y[c];
          if (v > best[r][c]) {
            best[r][c] = v;
            if constexpr (!kSoft) arg[r][c] = k;
          }
        }
    }
  }

#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int c = 0; c < RN; ++c) {
      const int32_t nan_k = row_nan[r] < col_nan[c] ? row_nan[r] : col_nan[c];
      if (nan_k < k_end) {
        best[r][c] = A(NAN);
        arg[r][c] = nan_k;
      }
    }

  A total[RM][RN] = {};
  if constexpr (kSoft) {
    const A inv_t = p.inv_temperature;
    for (index_t k0 = 0; k0 < p.k; k0 += kChunk) {
      const int steps = static_cast<int>(p.k - k0 < kChunk ? p.k - k0 : kChunk);
      __syncthreads();
      stage_operands<TM, TN>(a_tile, b_tile, p, bat, row0, col0, k0, steps);
      __syncthreads();
      for (int kk = 0; kk < steps; ++kk) {
        A y[RN];
#pragma unroll
        for (int c = 0; c < RN; ++c) y[c] = b_tile[kk][tx + kSide * c];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
          const A x = a_tile[kk][ty + kSide * r];
#pragma unroll
          for (int c = 0; c < RN; ++c) {
            const A h = best[r][c];
            total[r][c] += recip(soft_exp(h, x, inv_t) + soft_exp(h, y[c], inv_t));
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RM; ++r) {
    const index_t i = row0 + ty + kSide * r;
    if (i >= p.m) continue;
#pragma unroll
    for (int c = 0; c < RN; ++c) {
      const index_t j = col0 + tx + kSide * c;
      if (j >= p.n) continue;
      const index_t o = (bat * p.m + i) * p.n + j;
      if constexpr (kSoft) {
        p.hard[o] = from_acc<T>(best[r][c]);  // one of the inputs (or NaN): exact in T
        p.sum[o] = total[r][c];
        p.out[o] = from_acc<T>(best[r][c] + p.temperature * log(total[r][c]));
      } else {
        p.out[o] = from_acc<T>(best[r][c]);
        p.argk[o] = arg[r][c];
      }
    }
  }
}

// --------------------------------------------------------------------------------------------- backward

// The gradient of x in out = x (max, min) y: x [batch, rows, k], y [batch, k, cols], the per-output
// matrices [batch, rows, cols]. tie_to_left: x gets the gradient where x <= y (x is a); otherwise only
// where x < y (x is b^T). A NaN pair fails both comparisons and sends it to both sides, as the reference's
// autograd does.
template <typename T>
struct LeftGrad {
  Matrix<const T> x, y;
  Matrix<const int32_t> argk;
  Matrix<const T> hard;
  Matrix<const acc_t<T>> sum;
  Matrix<const T> grad_out;
  Matrix<T> grad;
  int64_t batch, rows, cols, k;
  acc_t<T> inv_temperature;
  bool tie_to_left;
};

template <typename T, bool kSoft, int RM, int RK>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocks<T>) grad_left_kernel(const LeftGrad<T> p) {
  using A = acc_t<T>;
  constexpr int TM = kSide * RM, TK = kSide * RK;
  // Per staged output (row, column): soft, g / sum and the hard product; hard, the gradient routed to x
  // and its k* (-1: none). Soft also stages y for this CTA's k columns.
  __shared__ A weight_tile[TM][kChunk + 1];
  __shared__ A hard_tile[kSoft ? TM : 1][kChunk + 1];
  __shared__ int32_t kstar_tile[kSoft ? 1 : TM][kChunk + 1];
  __shared__ A y_tile[kSoft ? TK : 1][kChunk + 1];

  const index_t tiles_k = ceil_div(p.k, TK);
  const index_t tiles = ceil_div(p.rows, TM) * tiles_k;
  const index_t bat = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const index_t row0 = tile / tiles_k * TM, kc0 = tile % tiles_k * TK;
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const A inv_t = p.inv_temperature;

  A acc[RM][RK] = {};
  A x[RM][RK];
  if constexpr (kSoft) {
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int c = 0; c < RK; ++c) {
        const index_t i = row0 + ty + kSide * r, kc = kc0 + tx + kSide * c;
        x[r][c] = i < p.rows && kc < p.k ? to_acc(p.x.at(bat, i, kc)) : A(0);
      }
  }

  for (index_t j0 = 0; j0 < p.cols; j0 += kChunk) {
    const int steps = static_cast<int>(p.cols - j0 < kChunk ? p.cols - j0 : kChunk);
    __syncthreads();  // every thread is done with the previous chunk
    for (int e = threadIdx.x; e < TM * kChunk; e += kBlockThreads) {
      const int jj = e % kChunk, ii = e / kChunk;
      const index_t i = row0 + ii, j = j0 + jj;
      const bool inside = i < p.rows && jj < steps;
      if constexpr (kSoft) {
        weight_tile[ii][jj] = inside ? to_acc(p.grad_out.at(bat, i, j)) / p.sum.at(bat, i, j) : A(0);
        hard_tile[ii][jj] = inside ? to_acc(p.hard.at(bat, i, j)) : A(0);
      } else {
        int32_t routed_k = -1;
        A routed = 0;
        const int32_t ks = inside ? p.argk.at(bat, i, j) : -1;
        // An argk outside [0, k) (not one this engine wrote) routes nothing and reads nothing.
        if (ks >= 0 && ks < p.k) {
          const A xs = to_acc(p.x.at(bat, i, ks)), ys = to_acc(p.y.at(bat, ks, j));
          if (p.tie_to_left ? !(xs > ys) : !(xs >= ys)) {
            routed_k = ks;
            routed = to_acc(p.grad_out.at(bat, i, j));
          }
        }
        kstar_tile[ii][jj] = routed_k;
        weight_tile[ii][jj] = routed;
      }
    }
    if constexpr (kSoft) {
      for (int e = threadIdx.x; e < TK * kChunk; e += kBlockThreads) {
        const int jj = e % kChunk, kk = e / kChunk;
        const index_t kc = kc0 + kk;
        y_tile[kk][jj] = kc < p.k && jj < steps ? to_acc(p.y.at(bat, kc, j0 + jj)) : A(0);
      }
    }
    __syncthreads();

    for (int jj = 0; jj < steps; ++jj) {
#pragma unroll
      for (int r = 0; r < RM; ++r) {
        const int ii = ty + kSide * r;
        const A w = weight_tile[ii][jj];
        if constexpr (kSoft) {
          const A h = hard_tile[ii][jj];
#pragma unroll
          for (int c = 0; c < RK; ++c) {
            const A ex = soft_exp(h, x[r][c], inv_t);
            const A term = recip(ex + soft_exp(h, y_tile[tx + kSide * c][jj], inv_t));
            acc[r][c] += w * ex * term * term;
          }
        } else {
          const index_t ks = kstar_tile[ii][jj];
#pragma unroll
          for (int c = 0; c < RK; ++c)
            if (ks == kc0 + tx + kSide * c) acc[r][c] += w;
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RM; ++r) {
    const index_t i = row0 + ty + kSide * r;
    if (i >= p.rows) continue;
#pragma unroll
    for (int c = 0; c < RK; ++c) {
      const index_t kc = kc0 + tx + kSide * c;
      if (kc < p.k) p.grad.at(bat, i, kc) = from_acc<T>(acc[r][c]);
    }
  }
}

// ------------------------------------------------------------------------------------------------- host

// Thread-tile factor r (tile side 16 r) for a dimension of the given size: the largest power-of-two tile
// up to 64 that pads the dimension by at most 25%, as the Triton engine picks its blocks.
int tile_factor(int64_t size) {
  int64_t side = kSide;
  while (side < 4 * kSide && side < size) side *= 2;
  while (side > kSide && ceil_div(size, side) * side * 4 > size * 5) side /= 2;
  return static_cast<int>(side / kSide);
}

template <typename F>
cudaError_t with_factor(int r, F&& f) {
  switch (r) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

// Launches kernel on one CTA per tile; the grid is one-dimensional, so batch * tiles must fit its 2^31 - 1.
template <typename Kernel, typename Params>
cudaError_t launch(Kernel kernel, int64_t blocks, const Params& p, cudaStream_t stream) {
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  PK_LAUNCH(static_cast<unsigned>(blocks), kBlockThreads, 0, stream, kernel)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_left(const LeftGrad<T>& g, bool soft, cudaStream_t stream) {
  return with_factor(tile_factor(g.rows), [&](auto rm) {
    return with_factor(tile_factor(g.k), [&](auto rk) {
      constexpr int RM = decltype(rm)::value, RK = decltype(rk)::value;
      const int64_t blocks = g.batch * ceil_div(g.rows, kSide * RM) * ceil_div(g.k, kSide * RK);
      return soft ? launch(grad_left_kernel<T, true, RM, RK>, blocks, g, stream)
                  : launch(grad_left_kernel<T, false, RM, RK>, blocks, g, stream);
    });
  });
}

}  // namespace

template <typename T>
cudaError_t forward(const ForwardParams<T>& p) {
  if (p.batch * p.m * p.n == 0) return cudaSuccess;
  return with_factor(tile_factor(p.m), [&](auto rm) {
    return with_factor(tile_factor(p.n), [&](auto rn) {
      constexpr int RM = decltype(rm)::value, RN = decltype(rn)::value;
      const int64_t blocks = p.batch * ceil_div(p.m, kSide * RM) * ceil_div(p.n, kSide * RN);
      return p.argk ? launch(forward_kernel<T, false, RM, RN>, blocks, p, p.stream)
                    : launch(forward_kernel<T, true, RM, RN>, blocks, p, p.stream);
    });
  });
}

template <typename T>
cudaError_t backward(const BackwardParams<T>& p) {
  if (p.batch * p.m * p.n == 0) return cudaSuccess;
  if (p.grad_a) {
    const LeftGrad<T> left{p.a, p.b, p.argk, p.hard, p.sum, p.grad_out, Matrix<T>{p.grad_a, p.m * p.k, p.k, 1},
                           p.batch, p.m, p.n, p.k, p.inv_temperature, true};
    const cudaError_t err = grad_left(left, p.soft, p.stream);
    if (err != cudaSuccess) return err;
  }
  if (p.grad_b) {
    // grad_b is contiguous [batch, k, n]; as the gradient of b^T it is [batch, n, k] with strides (k n, 1, n).
    const LeftGrad<T> right{p.b.transposed(), p.a.transposed(), p.argk.transposed(), p.hard.transposed(),
                            p.sum.transposed(), p.grad_out.transposed(), Matrix<T>{p.grad_b, p.k * p.n, 1, p.n},
                            p.batch, p.n, p.m, p.k, p.inv_temperature, false};
    return grad_left(right, p.soft, p.stream);
  }
  return cudaSuccess;
}

template cudaError_t forward<float>(const ForwardParams<float>&);
template cudaError_t forward<double>(const ForwardParams<double>&);
template cudaError_t forward<__half>(const ForwardParams<__half>&);
template cudaError_t forward<__nv_bfloat16>(const ForwardParams<__nv_bfloat16>&);
template cudaError_t backward<float>(const BackwardParams<float>&);
template cudaError_t backward<double>(const BackwardParams<double>&);
template cudaError_t backward<__half>(const BackwardParams<__half>&);
template cudaError_t backward<__nv_bfloat16>(const BackwardParams<__nv_bfloat16>&);

}  // namespace pk::cuda::flow
