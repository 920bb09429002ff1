// CUDA launchers of the (max, min) products: entry checks, then at::Tensor -> params on the current stream.
// Inputs are read through their strides (no copies); the per-output tensors a backward receives are
// converted to the type the kernels read only when they arrive in another one. Outputs are contiguous and
// every element is written by the kernels (or zero-filled here when there is no output to differentiate).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "flow/maxmin_cuda.h"

namespace pk {
namespace {

namespace flow = cuda::flow;

template <typename S>
using cuda_t = cuda::cuda_scalar_t<S>;

struct ProductDims {
  int64_t batch, m, n, k;
};

ProductDims check_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  PK_CHECK_DIM(op, "a", a, 3);
  PK_CHECK_DIM(op, "b", b, 3);
  const at::ScalarType t = a.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": a must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(b.scalar_type() == t, op, ": a is ", t, " but b is ", b.scalar_type());
  TORCH_CHECK(a.is_cuda(), op, ": a must be a CUDA tensor, got one on ", a.device());
  PK_CHECK_SAME_DEVICE(op, "b", b, a);
  TORCH_CHECK(b.size(0) == a.size(0) && b.size(1) == a.size(2), op, ": b ", b.sizes(), " does not fit a ", a.sizes(),
              ": expected [", a.size(0), ", ", a.size(2), ", n]");
  TORCH_CHECK(a.size(2) >= 1, op, ": the inner size k must be at least 1 (a max over no terms is undefined)");
  TORCH_CHECK(a.size(2) <= std::numeric_limits<int32_t>::max(), op, ": k = ", a.size(2), " does not fit argk's int32");
  return {a.size(0), a.size(1), b.size(2), a.size(2)};
}

void check_per_output(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a,
                      const ProductDims& d) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == d.batch && t.size(1) == d.m && t.size(2) == d.n, op, ": ", name,
              " must be [batch, m, n] = [", d.batch, ", ", d.m, ", ", d.n, "], got ", t.sizes());
  PK_CHECK_SAME_DEVICE(op, name, t, a);
}

// A per-output float tensor in the type the kernels read: a no-op when it already is.
at::Tensor per_output_float(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a,
                            const ProductDims& d, at::ScalarType type) {
  check_per_output(op, name, t, a, d);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a float tensor, got ", t.scalar_type());
  return t.to(type);
}

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be a finite number > 0, got ",
              temperature);
}

at::ScalarType sum_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename P>
flow::Matrix<const P> matrix(const P* data, const at::Tensor& t) {
  return {data, t.stride(0), t.stride(1), t.stride(2)};
}

template <typename S>
flow::Matrix<const cuda_t<S>> matrix(const at::Tensor& t) {
  return matrix<cuda_t<S>>(cuda::data<S>(t), t);
}

std::tuple<at::Tensor, at::Tensor> grad_buffers(const at::Tensor& a, const at::Tensor& b, const ProductDims& d,
                                                bool a_grad, bool b_grad) {
  at::Tensor grad_a = a_grad ? at::empty(a.sizes(), a.options()) : at::empty({0}, a.options());
  at::Tensor grad_b = b_grad ? at::empty(b.sizes(), b.options()) : at::empty({0}, b.options());
  if (d.batch * d.m * d.n == 0) {  // no output, so nothing flows back
    grad_a.zero_();
    grad_b.zero_();
  }
  return {grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor> maxmin_matmul_cuda(const at::Tensor& a, const at::Tensor& b) {
  const char* op = "pykernels.maxmin_matmul";
  const ProductDims d = check_operands(op, a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor argk = at::empty({d.batch, d.m, d.n}, a.options().dtype(at::kInt));
  PK_DISPATCH_FLOATS(a.scalar_type(), "maxmin_matmul_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const flow::ForwardParams<T> p{matrix<scalar_t>(a), matrix<scalar_t>(b), d.batch, d.m, d.n, d.k,
                                   cuda::data<scalar_t>(out), argk.data_ptr<int32_t>(), nullptr, nullptr, 0, 0,
                                   cuda::current_stream()};
    C10_CUDA_CHECK(flow::forward(p));
  });
  return {out, argk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_maxmin_matmul_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                       double temperature) {
  const char* op = "pykernels.soft_maxmin_matmul";
  const ProductDims d = check_operands(op, a, b);
  check_temperature(op, temperature);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor hard = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor sum = at::empty({d.batch, d.m, d.n}, a.options().dtype(sum_type(a.scalar_type())));
  PK_DISPATCH_FLOATS(a.scalar_type(), "soft_maxmin_matmul_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = flow::acc_t<T>;
    const flow::ForwardParams<T> p{matrix<scalar_t>(a),
                                   matrix<scalar_t>(b),
                                   d.batch,
                                   d.m,
                                   d.n,
                                   d.k,
                                   cuda::data<scalar_t>(out),
                                   nullptr,
                                   cuda::data<scalar_t>(hard),
                                   sum.data_ptr<A>(),
                                   static_cast<A>(temperature),
                                   static_cast<A>(1.0 / temperature),
                                   cuda::current_stream()};
    C10_CUDA_CHECK(flow::forward(p));
  });
  return {out, hard, sum};
}

std::tuple<at::Tensor, at::Tensor> maxmin_matmul_backward_cuda(const at::Tensor& a, const at::Tensor& b,
                                                               const at::Tensor& argk, const at::Tensor& grad_out,
                                                               bool a_grad, bool b_grad) {
  const char* op = "pykernels.maxmin_matmul_backward";
  const ProductDims d = check_operands(op, a, b);
  check_per_output(op, "argk", argk, a, d);
  TORCH_CHECK(argk.scalar_type() == at::kInt, op, ": argk must be int32, got ", argk.scalar_type());
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor g = per_output_float(op, "grad_out", grad_out, a, d, a.scalar_type());
  at::Tensor grad_a, grad_b;
  std::tie(grad_a, grad_b) = grad_buffers(a, b, d, a_grad, b_grad);
  PK_DISPATCH_FLOATS(a.scalar_type(), "maxmin_matmul_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const flow::BackwardParams<T> p{matrix<scalar_t>(a),
                                    matrix<scalar_t>(b),
                                    d.batch,
                                    d.m,
                                    d.n,
                                    d.k,
                                    false,
                                    matrix<int32_t>(argk.data_ptr<int32_t>(), argk),
                                    {},
                                    {},
                                    matrix<scalar_t>(g),
                                    a_grad ? cuda::data<scalar_t>(grad_a) : nullptr,
                                    b_grad ? cuda::data<scalar_t>(grad_b) : nullptr,
                                    0,
                                    cuda::current_stream()};
    C10_CUDA_CHECK(flow::backward(p));
  });
  return {grad_a, grad_b};
}

std::tuple<at::Tensor, at::Tensor> soft_maxmin_matmul_backward_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                    const at::Tensor& hard, const at::Tensor& sum,
                                                                    const at::Tensor& grad_out, double temperature,
                                                                    bool a_grad, bool b_grad) {
  const char* op = "pykernels.soft_maxmin_matmul_backward";
  const ProductDims d = check_operands(op, a, b);
  check_temperature(op, temperature);
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor h = per_output_float(op, "hard", hard, a, d, a.scalar_type());
  const at::Tensor s = per_output_float(op, "sum", sum, a, d, sum_type(a.scalar_type()));
  const at::Tensor g = per_output_float(op, "grad_out", grad_out, a, d, a.scalar_type());
  at::Tensor grad_a, grad_b;
  std::tie(grad_a, grad_b) = grad_buffers(a, b, d, a_grad, b_grad);
  PK_DISPATCH_FLOATS(a.scalar_type(), "soft_maxmin_matmul_backward_cuda", [&] {
    using T = cuda_t<scalar_t>;
    using A = flow::acc_t<T>;
    const flow::BackwardParams<T> p{matrix<scalar_t>(a),
                                    matrix<scalar_t>(b),
                                    d.batch,
                                    d.m,
                                    d.n,
                                    d.k,
                                    true,
                                    {},
                                    matrix<scalar_t>(h),
                                    matrix<A>(s.data_ptr<A>(), s),
                                    matrix<scalar_t>(g),
                                    a_grad ? cuda::data<scalar_t>(grad_a) : nullptr,
                                    b_grad ? cuda::data<scalar_t>(grad_b) : nullptr,
                                    static_cast<A>(1.0 / temperature),
                                    cuda::current_stream()};
    C10_CUDA_CHECK(flow::backward(p));
  });
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("maxmin_matmul", &maxmin_matmul_cuda);
  m.impl("maxmin_matmul_backward", &maxmin_matmul_backward_cuda);
  m.impl("soft_maxmin_matmul", &soft_maxmin_matmul_cuda);
  m.impl("soft_maxmin_matmul_backward", &soft_maxmin_matmul_backward_cuda);
}

}  // namespace pk
