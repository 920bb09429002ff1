// The (max, min) products on the CPU: a GEMM with another semiring, register-blocked like cpu::gemm.
//
// b is packed once per call into the accumulation type, row-major and padded to whole vectors (padding
// -inf, which never wins a max); each task packs its own rows of a. A tile of MR rows x NV vectors keeps
// its running maxima (and arg-max k, or the soft sums) in registers while k streams past, so the
// [m, k, n] tensor of the broadcast formulation never exists. Tasks are (batch, block of rows), which
// serves both Vico's thousands of 16 x 16 products and single 4096 x 4096 ones.
//
// The backward ops own their outputs: grad_a by (batch, rows), grad_b by (batch, columns), each summing
// in a fixed order, so results do not depend on the thread count and no atomics are needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/cpu_vec.h"
#include "flow/maxmin.h"
#include "flow/maxmin_checks.h"

namespace pk {
namespace {

constexpr int64_t kRowBlock = 16;   // rows of a per task
constexpr int64_t kColBlock = 64;   // columns of b per grad_b task
constexpr int kRows = 4;            // rows per register tile

// --------------------------------------------------------------------------------------------- operands

// b in the accumulation type, [slices][k][ldb], ldb a multiple of every vector width, padded with -inf;
// a broadcast batch (stride 0) is packed once. When each batch slice is read by a single task (per_task),
// that task packs it itself, so the slice goes from the input straight to its cache.
template <typename T, typename A>
struct PackedB {
  const T* src;
  int64_t s0, s1, s2, k, n;
  at::Tensor buffer;
  int64_t ldb, slice;  // slice: elements between batches, 0 when broadcast
  bool per_task, has_nan = false;

  const A* row(int64_t bi, int64_t kk) const { return buffer.data_ptr<A>() + bi * slice + kk * ldb; }

  // Rows [k0, k1) of batch slice bi into dst (row-major, ldb); true if any value is NaN.
  bool pack(int64_t bi, int64_t k0, int64_t k1, A* dst) const {
    bool seen = false;
    for (int64_t kk = k0; kk < k1; ++kk) {
      const T* x = src + bi * s0 + kk * s1;
      A* y = dst + (kk - k0) * ldb;
      for (int64_t j = 0; j < n; ++j) y[j] = cpu::to_acc(x[j * s2]), seen |= y[j] != y[j];
      std::fill(y + n, y + ldb, A(-INFINITY));
    }
    return seen;
  }

  PackedB(const at::Tensor& b, const ProductDims& d, bool one_task_per_batch)
      : src(b.data_ptr<T>()), s0(b.stride(0)), s1(b.stride(1)), s2(b.stride(2)), k(d.k), n(d.n),
        ldb(cpu::round_up_lanes(std::max<int64_t>(d.n, 1), 16)),
        per_task(one_task_per_batch && b.stride(0) != 0 && d.batch > 1) {
    if (per_task) return;
    const int64_t slices = (b.stride(0) == 0 || d.batch <= 1) ? 1 : d.batch;
    slice = slices == 1 ? 0 : d.k * ldb;
    buffer = at::empty({slices, d.k, ldb}, b.options().dtype(c10::CppTypeToScalarType<A>::value));
    A* dst = buffer.data_ptr<A>();
    std::atomic<bool> nan{false};
    at::parallel_for(0, slices * d.k, grain_for(slices * d.k, ldb), [&](int64_t begin, int64_t end) {
      bool seen = false;
      // Chunks may start and end inside a slice: pack them slice by slice.
      for (int64_t row = begin; row < end;) {
        const int64_t bi = row / d.k, stop = std::min(end, (bi + 1) * d.k);
        seen |= pack(bi, row % d.k, row % d.k + (stop - row), dst + row * ldb);
        row = stop;
      }
      if (seen) nan = true;
    });
    has_nan = nan;
  }
};

// Element reads of a through its strides.
template <typename T>
struct StridedA {
  const T* data;
  int64_t s0, s1, s2;
  explicit StridedA(const at::Tensor& a) : data(a.data_ptr<T>()), s0(a.stride(0)), s1(a.stride(1)), s2(a.stride(2)) {}
  T operator()(int64_t bi, int64_t i, int64_t k) const { return data[bi * s0 + i * s1 + k * s2]; }
};

// Rows [i0, i0 + rows) of batch bi of a, as [rows][k] in the accumulation type; true if any is NaN.
template <typename T, typename A>
bool pack_rows(const StridedA<T>& a, int64_t bi, int64_t i0, int64_t rows, int64_t k, std::vector<A>& out) {
  out.resize(rows * k);
  bool seen = false;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < k; ++c) out[r * k + c] = cpu::to_acc(a(bi, i0 + r, c)), seen |= out[r * k + c] != out[r * k + c];
  return seen;
}

// ------------------------------------------------------------------------------------------ vector math

template <typename A, int kBytes>
struct Lanes {
  using V = typename cpu::Vec<A, kBytes>::type;
  using U = typename cpu::Vec<A, kBytes>::unaligned;
  using Idx = std::conditional_t<sizeof(A) == 8, int64_t, int32_t>;
  using I = typename cpu::Vec<Idx, kBytes>::type;
  static constexpr int64_t L = kBytes / sizeof(A);

  // Vectors travel by reference: by value, their ABI would differ between the per-ISA instantiations.
  static __attribute__((always_inline)) void load(V& v, const A* p) { v = *reinterpret_cast<const U*>(p); }
  static __attribute__((always_inline)) void store(A* p, const V& v) { *reinterpret_cast<U*>(p) = v; }

  // e = exp(min((h - x) / t, clamp)) lane by lane, with h = x giving exponent 0; see flow/maxmin.h's
  // soft_exponent.
  static __attribute__((always_inline)) void soft_exp(V& e, const V& h, const V& x, A inv_t) {
    e = h == x ? V{} : (h - x) * inv_t;
    e = flow::SoftExp<A>::clamp < e ? V{} + flow::SoftExp<A>::clamp : e;
    if constexpr (sizeof(A) == 4) {
      cpu::tile::exp_vec(e);
    } else {
      for (int64_t l = 0; l < L; ++l) e[l] = std::exp(e[l]);
    }
  }
  // 1 / (exp(...x) + exp(...y)) and the two exponentials.
  static __attribute__((always_inline)) void soft_term(V& term, V& ex, V& ey, const V& h, const V& x, const V& y,
                                                       A inv_t) {
    soft_exp(ex, h, x, inv_t);
    soft_exp(ey, h, y, inv_t);
    term = A(1) / (ex + ey);
  }
};

// Buffers of one parallel chunk's tasks, freed when the chunk ends: thread_local ones would keep each
// thread's high-water panel (16 MiB for a per-batch b with k = n = 2048 in float32) for the process's life.
template <typename A>
struct Scratch {
  std::vector<A> a_rows, b_rows, best, total;
  std::vector<std::conditional_t<sizeof(A) == 8, int64_t, int32_t>> which;
};

// ---------------------------------------------------------------------------------------- forward tiles

// MR rows x NV vectors of max_k min(a, b) (and the lowest arg-max k), then, for the soft product, the sum
// of exp((smin_k - hard) / t) over k with the hard result as the shift.
template <int MR, int NV, int kBytes, bool kArg, bool kSoft, typename A>
__attribute__((always_inline)) inline void forward_tile(int64_t K, const A* a, const A* b, int64_t ldb, A inv_t,
                                                        A* hard, A* sum, typename Lanes<A, kBytes>::Idx* arg,
                                                        int64_t ldo) {
  using W = Lanes<A, kBytes>;
  using V = typename W::V;
  using I = typename W::I;
  constexpr int64_t L = W::L;
  V best[MR][NV];
  I which[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) best[r][v] = V{} - INFINITY, which[r][v] = I{};
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) W::load(bv[v], b + k * ldb + v * L);
    const I kv = I{} + static_cast<typename W::Idx>(k);
    for (int r = 0; r < MR; ++r) {
      const V x = V{} + a[r * K + k];
      for (int v = 0; v < NV; ++v) {
        const V low = x < bv[v] ? x : bv[v];
        const auto wins = low > best[r][v];  // strictly: the lowest k keeps a tie
        best[r][v] = wins ? low : best[r][v];
        if constexpr (kArg) which[r][v] = wins ? kv : which[r][v];
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      W::store(hard + r * ldo + v * L, best[r][v]);
      if constexpr (kArg) *reinterpret_cast<typename cpu::Vec<typename W::Idx, kBytes>::unaligned*>(
                              arg + r * ldo + v * L) = which[r][v];
    }
  if constexpr (kSoft) {
    V total[MR][NV] = {};
    for (int64_t k = 0; k < K; ++k) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) W::load(bv[v], b + k * ldb + v * L);
      for (int r = 0; r < MR; ++r) {
        const V x = V{} + a[r * K + k];
        for (int v = 0; v < NV; ++v) {
          V term, ex, ey;
          W::soft_term(term, ex, ey, best[r][v], x, bv[v], inv_t);
          total[r][v] += term;
        }
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) W::store(sum + r * ldo + v * L, total[r][v]);
  }
}

// All rows of one column panel: full MR-row tiles, then one narrower tile for the remainder.
template <int MR, int NV, int kBytes, bool kArg, bool kSoft, typename A>
__attribute__((always_inline)) inline void forward_panel(int64_t rows, int64_t K, const A* a, const A* b,
                                                         int64_t ldb, A inv_t, A* hard, A* sum,
                                                         typename Lanes<A, kBytes>::Idx* arg, int64_t ldo) {
  int64_t r = 0;
  for (; r + MR <= rows; r += MR)
    forward_tile<MR, NV, kBytes, kArg, kSoft>(K, a + r * K, b, ldb, inv_t, hard + r * ldo, sum + r * ldo,
                                              arg + r * ldo, ldo);
  if constexpr (MR > 1)
    if (r < rows)
      forward_panel<MR - 1, NV, kBytes, kArg, kSoft>(rows - r, K, a + r * K, b, ldb, inv_t, hard + r * ldo,
                                                     sum + r * ldo, arg + r * ldo, ldo);
}

// One task: rows [i0, i0 + rows) of batch bi, every column.
template <typename T, typename A, bool kSoft>
struct ForwardTask {
  StridedA<T> a;
  const PackedB<T, A>& b;
  ProductDims d;
  int64_t row_blocks;
  A temperature;
  T* out;
  T* hard;          // soft only
  A* sum;           // soft only
  int32_t* argk;    // hard only
  std::atomic<bool>* saw_nan;  // hard only: packing met a NaN in a or b
  using Buffers = Scratch<A>;

  template <int kBytes>
  __attribute__((always_inline)) void run(int64_t task, Buffers& scratch) const {
    using W = Lanes<A, kBytes>;
    // Two vectors per tile where there are 32 registers (AVX-512); the soft tile also holds its sums.
    constexpr int NV = (kBytes == 64 && !kSoft) ? 2 : 1;
    const int64_t bi = task / row_blocks, i0 = task % row_blocks * kRowBlock;
    const int64_t rows = std::min(kRowBlock, d.m - i0), ldo = b.ldb;
    auto& [a_rows, b_rows, best, total, which] = scratch;
    bool nan = pack_rows(a, bi, i0, rows, d.k, a_rows);
    const A* b_panel = b.per_task ? nullptr : b.row(bi, 0);
    if (b.per_task) {
      b_rows.resize(d.k * b.ldb);
      nan |= b.pack(bi, 0, d.k, b_rows.data());
      b_panel = b_rows.data();
    }
    if (nan && !kSoft) *saw_nan = true;
    best.resize(rows * ldo);
    total.resize(kSoft ? rows * ldo : 0);
    which.resize(kSoft ? 0 : rows * ldo);
    const A inv_t = kSoft ? A(1) / temperature : A(0);
    int64_t j = 0;
    for (; j + NV * W::L <= ldo; j += NV * W::L)
      forward_panel<kRows, NV, kBytes, !kSoft, kSoft>(rows, d.k, a_rows.data(), b_panel + j, b.ldb, inv_t,
                                                      best.data() + j, total.data() + j, which.data() + j, ldo);
    for (; j < ldo; j += W::L)
      forward_panel<kRows, 1, kBytes, !kSoft, kSoft>(rows, d.k, a_rows.data(), b_panel + j, b.ldb, inv_t,
                                                     best.data() + j, total.data() + j, which.data() + j, ldo);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = (bi * d.m + i0 + r) * d.n;
      const A* h = best.data() + r * ldo;
      if constexpr (kSoft) {
        const A* s = total.data() + r * ldo;
        for (int64_t c = 0; c < d.n; ++c) {
          out[o + c] = static_cast<T>(h[c] + temperature * std::log(s[c]));
          hard[o + c] = static_cast<T>(h[c]);
          sum[o + c] = s[c];
        }
      } else {
        const auto* w = which.data() + r * ldo;
        for (int64_t c = 0; c < d.n; ++c) out[o + c] = static_cast<T>(h[c]), argk[o + c] = static_cast<int32_t>(w[c]);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------- dispatch

#ifdef PK_TILE_X86
template <class Task>
__attribute__((target("avx512f"))) void run_avx512(const Task& task, int64_t begin, int64_t end,
                                                   typename Task::Buffers& scratch) {
  for (int64_t t = begin; t < end; ++t) task.template run<64>(t, scratch);
}
template <class Task>
__attribute__((target("avx2,fma"))) void run_avx2(const Task& task, int64_t begin, int64_t end,
                                                  typename Task::Buffers& scratch) {
  for (int64_t t = begin; t < end; ++t) task.template run<32>(t, scratch);
}
#endif

// Runs task.run<vector bytes>(t) for t in [0, tasks) in parallel, with the widest vectors the CPU has.
template <class Task>
void parallel_tasks(const Task& task, int64_t tasks, int64_t work_per_task) {
  at::parallel_for(0, tasks, grain_for(tasks, work_per_task), [&](int64_t begin, int64_t end) {
    typename Task::Buffers scratch;
#ifdef PK_TILE_X86
    switch (cpu::tile::isa()) {
      case cpu::tile::Isa::kAvx512: return run_avx512(task, begin, end, scratch);
      case cpu::tile::Isa::kAvx2: return run_avx2(task, begin, end, scratch);
      case cpu::tile::Isa::kBase: break;
    }
#endif
    for (int64_t t = begin; t < end; ++t) task.template run<16>(t, scratch);
  });
}

// NaN is not ordered, so the vector loops skip it; torch.minimum and amax propagate it. out[i, j] is NaN
// exactly when row i of a or column j of b holds one, at the first such k. Runs only when packing saw one.
template <typename T>
void propagate_nan(const at::Tensor& a, const at::Tensor& b, const ProductDims& d, T* out, int32_t* argk) {
  const at::Tensor first_a = at::where(at::isnan(a), at::arange(d.k, a.options().dtype(at::kLong)).view({1, 1, -1}),
                                       d.k).amin(2).contiguous();
  const at::Tensor first_b = at::where(at::isnan(b), at::arange(d.k, b.options().dtype(at::kLong)).view({1, -1, 1}),
                                       d.k).amin(1).contiguous();
  const int64_t* fa = first_a.data_ptr<int64_t>();
  const int64_t* fb = first_b.data_ptr<int64_t>();
  at::parallel_for(0, d.batch * d.m, grain_for(d.batch * d.m, d.n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / d.m;
      for (int64_t j = 0; j < d.n; ++j) {
        const int64_t first = std::min(fa[row], fb[bi * d.n + j]);
        if (first == d.k) continue;
        out[row * d.n + j] = static_cast<T>(NAN);
        if (argk) argk[row * d.n + j] = static_cast<int32_t>(first);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------------- forward

std::tuple<at::Tensor, at::Tensor> maxmin_matmul_cpu(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "pykernels.maxmin_matmul";
  const ProductDims d = check_product(op, a, b);
  at::Tensor out = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor argk = at::empty({d.batch, d.m, d.n}, a.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, argk};
  PK_DISPATCH_FLOATS(a.scalar_type(), "maxmin_matmul", [&] {
    using A = cpu::acc_t<scalar_t>;
    const int64_t row_blocks = (d.m + kRowBlock - 1) / kRowBlock;
    const PackedB<scalar_t, A> packed(b, d, row_blocks == 1);
    std::atomic<bool> saw_nan{false};
    const ForwardTask<scalar_t, A, false> task{StridedA<scalar_t>(a), packed, d, row_blocks, A(0),
                                               out.data_ptr<scalar_t>(), nullptr, nullptr, argk.data_ptr<int32_t>(),
                                               &saw_nan};
    parallel_tasks(task, d.batch * row_blocks, kRowBlock * packed.ldb * d.k);
    if (saw_nan || packed.has_nan) propagate_nan(a, b, d, out.data_ptr<scalar_t>(), argk.data_ptr<int32_t>());
  });
  return {out, argk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_maxmin_matmul_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                      double temperature) {
  const char* op = "pykernels.soft_maxmin_matmul";
  const ProductDims d = check_product(op, a, b);
  check_temperature(op, temperature);
  const auto acc_dtype = product_acc_dtype(a.scalar_type());
  at::Tensor out = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor hard = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor sum = at::empty({d.batch, d.m, d.n}, a.options().dtype(acc_dtype));
  if (out.numel() == 0) return {out, hard, sum};
  PK_DISPATCH_FLOATS(a.scalar_type(), "maxmin_matmul", [&] {
    using A = cpu::acc_t<scalar_t>;
    const int64_t row_blocks = (d.m + kRowBlock - 1) / kRowBlock;
    const PackedB<scalar_t, A> packed(b, d, row_blocks == 1);
    const ForwardTask<scalar_t, A, true> task{StridedA<scalar_t>(a), packed, d, row_blocks, A(temperature),
                                              out.data_ptr<scalar_t>(), hard.data_ptr<scalar_t>(),
                                              sum.data_ptr<A>(), nullptr, nullptr};
    parallel_tasks(task, d.batch * row_blocks, 8 * kRowBlock * packed.ldb * d.k);
  });
  return {out, hard, sum};
}

// ---------------------------------------------------------------------------------------------- backward

std::tuple<at::Tensor, at::Tensor> maxmin_matmul_backward_cpu(const at::Tensor& a, const at::Tensor& b,
                                                              const at::Tensor& argk_in, const at::Tensor& grad_in,
                                                              bool a_grad, bool b_grad) {
  const char* op = "pykernels.maxmin_matmul_backward";
  const ProductDims d = check_product(op, a, b);
  check_like(op, "argk", argk_in, at::kInt, d, a);
  check_like(op, "grad_out", grad_in, a.scalar_type(), d, a);
  const at::Tensor argk = argk_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor grad_a = a_grad ? at::zeros(a.sizes(), a.options()) : at::empty({0}, a.options());
  at::Tensor grad_b = b_grad ? at::zeros(b.sizes(), b.options()) : at::empty({0}, b.options());
  if (d.batch * d.m * d.n == 0) return {grad_a, grad_b};
  PK_DISPATCH_FLOATS(a.scalar_type(), "maxmin_matmul", [&] {
    using A = cpu::acc_t<scalar_t>;
    const StridedA<scalar_t> av(a), bv(b);
    const int32_t* ks = argk.data_ptr<int32_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // Rows of grad_a, summed over j in order.
    if (a_grad) {
      scalar_t* ga = grad_a.data_ptr<scalar_t>();
      at::parallel_for(0, d.batch * d.m, grain_for(d.batch * d.m, d.n), [&](int64_t begin, int64_t end) {
        std::vector<A> acc(d.k);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t bi = row / d.m, i = row % d.m;
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t j = 0; j < d.n; ++j) {
            const int64_t k = ks[row * d.n + j];
            if (flow::grad_to_a(av(bi, i, k), bv(bi, k, j))) acc[k] += cpu::to_acc(g[row * d.n + j]);
          }
          for (int64_t k = 0; k < d.k; ++k) ga[row * d.k + k] = static_cast<scalar_t>(acc[k]);
        }
      });
    }
    // Column blocks of grad_b, summed over i in order.
    if (b_grad) {
      scalar_t* gb = grad_b.data_ptr<scalar_t>();
      const int64_t col_blocks = (d.n + kColBlock - 1) / kColBlock;
      at::parallel_for(0, d.batch * col_blocks, grain_for(d.batch * col_blocks, d.m * kColBlock),
                       [&](int64_t begin, int64_t end) {
        std::vector<A> acc(d.k * kColBlock);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bi = task / col_blocks, j0 = task % col_blocks * kColBlock;
          const int64_t cols = std::min(kColBlock, d.n - j0);
          std::fill(acc.begin(), acc.end(), A(0));
          for (int64_t i = 0; i < d.m; ++i) {
            const int64_t row = bi * d.m + i;
            for (int64_t c = 0; c < cols; ++c) {
              const int64_t j = j0 + c, k = ks[row * d.n + j];
              if (flow::grad_to_b(av(bi, i, k), bv(bi, k, j))) acc[k * kColBlock + c] += cpu::to_acc(g[row * d.n + j]);
            }
          }
          for (int64_t k = 0; k < d.k; ++k)
            for (int64_t c = 0; c < cols; ++c)
              gb[(bi * d.k + k) * d.n + j0 + c] = static_cast<scalar_t>(acc[k * kColBlock + c]);
        }
      });
    }
  });
  return {grad_a, grad_b};
}

// The soft backward's per-output factors, padded like packed b: hard (the shift) and grad_out / sum
// (padding 0, so padded lanes add nothing).
template <typename T, typename A>
struct SoftFactors {
  at::Tensor hard, weight;  // [batch, m, ldo]
  int64_t ldo;
  SoftFactors(const at::Tensor& h, const at::Tensor& s, const at::Tensor& g, const ProductDims& d, int64_t ld)
      : ldo(ld) {
    const auto options = h.options().dtype(c10::CppTypeToScalarType<A>::value);
    hard = at::zeros({d.batch, d.m, ldo}, options);
    weight = at::zeros({d.batch, d.m, ldo}, options);
    const T* hp = h.data_ptr<T>();
    const A* sp = s.data_ptr<A>();
    const T* gp = g.data_ptr<T>();
    A* ho = hard.data_ptr<A>();
    A* wo = weight.data_ptr<A>();
    at::parallel_for(0, d.batch * d.m, grain_for(d.batch * d.m, d.n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t j = 0; j < d.n; ++j) {
          ho[row * ldo + j] = cpu::to_acc(hp[row * d.n + j]);
          wo[row * ldo + j] = cpu::to_acc(gp[row * d.n + j]) / sp[row * d.n + j];
        }
    });
  }
};

// grad_a rows [i0, i0 + rows) of batch bi: sum over j of weight * e_x * term^2.
template <typename T, typename A>
struct SoftGradATask {
  StridedA<T> a;
  const PackedB<T, A>& b;
  const SoftFactors<T, A>& f;
  ProductDims d;
  int64_t row_blocks;
  A inv_t;
  T* grad_a;
  using Buffers = Scratch<A>;

  template <int kBytes>
  __attribute__((always_inline)) void run(int64_t task, Buffers& scratch) const {
    using W = Lanes<A, kBytes>;
    using V = typename W::V;
    const int64_t bi = task / row_blocks, i0 = task % row_blocks * kRowBlock;
    const int64_t rows = std::min(kRowBlock, d.m - i0);
    std::vector<A>& a_rows = scratch.a_rows;
    pack_rows(a, bi, i0, rows, d.k, a_rows);
    const A* h = f.hard.template data_ptr<A>() + (bi * d.m + i0) * f.ldo;
    const A* w = f.weight.template data_ptr<A>() + (bi * d.m + i0) * f.ldo;
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t tile = std::min<int64_t>(kRows, rows - r0);
      for (int64_t k = 0; k < d.k; ++k) {
        V acc[kRows] = {};
        const A* bk = b.row(bi, k);
        for (int64_t j = 0; j < f.ldo; j += W::L) {
          V bv;
          W::load(bv, bk + j);
          for (int r = 0; r < kRows; ++r) {
            if (r >= tile) break;
            const V x = V{} + a_rows[(r0 + r) * d.k + k];
            V hv, wv, term, ex, ey;
            W::load(hv, h + (r0 + r) * f.ldo + j);
            W::load(wv, w + (r0 + r) * f.ldo + j);
            W::soft_term(term, ex, ey, hv, x, bv, inv_t);
            acc[r] += wv * ex * term * term;
          }
        }
        for (int64_t r = 0; r < tile; ++r) {
          A s = 0;
          for (int64_t l = 0; l < W::L; ++l) s += acc[r][l];
          grad_a[(bi * d.m + i0 + r0 + r) * d.k + k] = static_cast<T>(s);
        }
      }
    }
  }
};

// grad_b columns [j0, j0 + kColBlock) of batch bi: sum over i of weight * e_y * term^2.
template <typename T, typename A>
struct SoftGradBTask {
  StridedA<T> a;
  const PackedB<T, A>& b;
  const SoftFactors<T, A>& f;
  ProductDims d;
  int64_t col_blocks;
  A inv_t;
  T* grad_b;
  using Buffers = Scratch<A>;

  template <int kBytes>
  __attribute__((always_inline)) void run(int64_t task, Buffers&) const {
    using W = Lanes<A, kBytes>;
    using V = typename W::V;
    constexpr int64_t NV = kColBlock / W::L;
    const int64_t bi = task / col_blocks, j0 = task % col_blocks * kColBlock;
    const int64_t width = std::min(kColBlock, f.ldo - j0), vectors = width / W::L;
    const int64_t cols = std::min(kColBlock, d.n - j0);
    const A* h = f.hard.template data_ptr<A>() + bi * d.m * f.ldo + j0;
    const A* w = f.weight.template data_ptr<A>() + bi * d.m * f.ldo + j0;
    for (int64_t k = 0; k < d.k; ++k) {
      V acc[NV] = {}, bv[NV];
      const A* bk = b.row(bi, k) + j0;
      for (int64_t v = 0; v < vectors; ++v) W::load(bv[v], bk + v * W::L);
      for (int64_t i = 0; i < d.m; ++i) {
        const V x = V{} + cpu::to_acc(a(bi, i, k));
        for (int64_t v = 0; v < vectors; ++v) {
          V hv, wv, term, ex, ey;
          W::load(hv, h + i * f.ldo + v * W::L);
          W::load(wv, w + i * f.ldo + v * W::L);
          W::soft_term(term, ex, ey, hv, x, bv[v], inv_t);
          acc[v] += wv * ey * term * term;
        }
      }
      T* out = grad_b + (bi * d.k + k) * d.n + j0;
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<T>(acc[c / W::L][c % W::L]);
    }
  }
};

std::tuple<at::Tensor, at::Tensor> soft_maxmin_matmul_backward_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                   const at::Tensor& hard_in,
                                                                   const at::Tensor& sum_in,
                                                                   const at::Tensor& grad_in, double temperature,
                                                                   bool a_grad, bool b_grad) {
  const char* op = "pykernels.soft_maxmin_matmul_backward";
  const ProductDims d = check_product(op, a, b);
  check_temperature(op, temperature);
  const auto acc_dtype = product_acc_dtype(a.scalar_type());
  check_like(op, "hard", hard_in, a.scalar_type(), d, a);
  check_like(op, "sum", sum_in, acc_dtype, d, a);
  check_like(op, "grad_out", grad_in, a.scalar_type(), d, a);
  at::Tensor grad_a = a_grad ? at::zeros(a.sizes(), a.options()) : at::empty({0}, a.options());
  at::Tensor grad_b = b_grad ? at::zeros(b.sizes(), b.options()) : at::empty({0}, b.options());
  if (d.batch * d.m * d.n == 0 || (!a_grad && !b_grad)) return {grad_a, grad_b};
  const at::Tensor hard = hard_in.contiguous(), sum = sum_in.contiguous(), grad = grad_in.contiguous();
  PK_DISPATCH_FLOATS(a.scalar_type(), "maxmin_matmul", [&] {
    using A = cpu::acc_t<scalar_t>;
    const PackedB<scalar_t, A> packed(b, d, false);
    const SoftFactors<scalar_t, A> factors(hard, sum, grad, d, packed.ldb);
    const A inv_t = A(1) / A(temperature);
    const int64_t exp_cost = sizeof(A) == 8 ? 64 : 8;
    if (a_grad) {
      const int64_t row_blocks = (d.m + kRowBlock - 1) / kRowBlock;
      const SoftGradATask<scalar_t, A> task{StridedA<scalar_t>(a), packed, factors, d, row_blocks, inv_t,
                                            grad_a.data_ptr<scalar_t>()};
      parallel_tasks(task, d.batch * row_blocks, exp_cost * kRowBlock * packed.ldb * d.k);
    }
    if (b_grad) {
      const int64_t col_blocks = (packed.ldb + kColBlock - 1) / kColBlock;
      const SoftGradBTask<scalar_t, A> task{StridedA<scalar_t>(a), packed, factors, d, col_blocks, inv_t,
                                            grad_b.data_ptr<scalar_t>()};
      parallel_tasks(task, d.batch * col_blocks, exp_cost * kColBlock * d.m * d.k);
    }
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("maxmin_matmul", &maxmin_matmul_cpu);
  m.impl("maxmin_matmul_backward", &maxmin_matmul_backward_cpu);
  m.impl("soft_maxmin_matmul", &soft_maxmin_matmul_cpu);
  m.impl("soft_maxmin_matmul_backward", &soft_maxmin_matmul_backward_cpu);
}

}  // namespace pk
