// CUDA launchers of the (max, min) products: entry checks, then at::Tensor -> params on the current stream.
// Inputs are read through their strides (no copies); the checks are the CPU engine's (flow/maxmin_checks.h),
// so the per-output tensors a backward receives already have the types the kernels read. Outputs are contiguous and
// every element is written by the kernels (or zero-filled here when there is no output to differentiate).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/checks.h"
#include "common/cuda_launch.h"
#include "flow/maxmin_checks.h"
#include "flow/maxmin_cuda.h"

namespace pk {
namespace {

namespace flow = cuda::flow;

template <typename S>
using cuda_t = cuda::cuda_scalar_t<S>;

// check_product, and the engine reads device memory.
ProductDims check_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  const ProductDims d = check_product(op, a, b);
  TORCH_CHECK(cuda::is_device_tensor(a), op, ": a must be a CUDA tensor, got one on ", a.device());
  return d;
}

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
  const cuda::DeviceGuard guard(a.device());
  at::Tensor out = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor argk = at::empty({d.batch, d.m, d.n}, a.options().dtype(at::kInt));
  PK_DISPATCH_FLOATS(a.scalar_type(), "maxmin_matmul_cuda", [&] {
    using T = cuda_t<scalar_t>;
    const flow::ForwardParams<T> p{matrix<scalar_t>(a), matrix<scalar_t>(b), d.batch, d.m, d.n, d.k,
                                   cuda::data<scalar_t>(out), cuda::data<int32_t>(argk), nullptr, nullptr, 0, 0,
                                   cuda::current_stream()};
    PK_CUDA_CHECK(flow::forward(p));
  });
  return {out, argk};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_maxmin_matmul_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                       double temperature) {
  const char* op = "pykernels.soft_maxmin_matmul";
  const ProductDims d = check_operands(op, a, b);
  check_temperature(op, temperature);
  const cuda::DeviceGuard guard(a.device());
  at::Tensor out = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor hard = at::empty({d.batch, d.m, d.n}, a.options());
  at::Tensor sum = at::empty({d.batch, d.m, d.n}, a.options().dtype(product_acc_dtype(a.scalar_type())));
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
                                   cuda::data<A>(sum),
                                   static_cast<A>(temperature),
                                   static_cast<A>(1.0 / temperature),
                                   cuda::current_stream()};
    PK_CUDA_CHECK(flow::forward(p));
  });
  return {out, hard, sum};
}

std::tuple<at::Tensor, at::Tensor> maxmin_matmul_backward_cuda(const at::Tensor& a, const at::Tensor& b,
                                                               const at::Tensor& argk, const at::Tensor& grad_out,
                                                               bool a_grad, bool b_grad) {
  const char* op = "pykernels.maxmin_matmul_backward";
  const ProductDims d = check_operands(op, a, b);
  check_like(op, "argk", argk, at::kInt, d, a);
  check_like(op, "grad_out", grad_out, a.scalar_type(), d, a);
  const cuda::DeviceGuard guard(a.device());
  const at::Tensor& g = grad_out;
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
                                    matrix<int32_t>(cuda::data<int32_t>(argk), argk),
                                    {},
                                    {},
                                    matrix<scalar_t>(g),
                                    a_grad ? cuda::data<scalar_t>(grad_a) : nullptr,
                                    b_grad ? cuda::data<scalar_t>(grad_b) : nullptr,
                                    0,
                                    cuda::current_stream()};
    PK_CUDA_CHECK(flow::backward(p));
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
  const cuda::DeviceGuard guard(a.device());
  check_like(op, "hard", hard, a.scalar_type(), d, a);
  check_like(op, "sum", sum, product_acc_dtype(a.scalar_type()), d, a);
  check_like(op, "grad_out", grad_out, a.scalar_type(), d, a);
  const at::Tensor &h = hard, &s = sum, &g = grad_out;
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
                                    matrix<A>(cuda::data<A>(s), s),
                                    matrix<scalar_t>(g),
                                    a_grad ? cuda::data<scalar_t>(grad_a) : nullptr,
                                    b_grad ? cuda::data<scalar_t>(grad_b) : nullptr,
                                    static_cast<A>(1.0 / temperature),
                                    cuda::current_stream()};
    PK_CUDA_CHECK(flow::backward(p));
  });
  return {grad_a, grad_b};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("maxmin_matmul", &maxmin_matmul_cuda);
  m.impl("maxmin_matmul_backward", &maxmin_matmul_backward_cuda);
  m.impl("soft_maxmin_matmul", &soft_maxmin_matmul_cuda);
  m.impl("soft_maxmin_matmul_backward", &soft_maxmin_matmul_backward_cuda);
}

}  // namespace pk
