// PyTorch bindings for the dequant-matmul kernels (built by compressor/kernels.py). The caller passes
// the current CUDA stream as an integer handle (torch.cuda.current_stream().cuda_stream), so this file
// needs only torch/extension.h and the CUDA runtime, and CI can check it without a CUDA build of torch.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "qgemv.h"

namespace {

compressor::DType dtype_of(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kBFloat16,
              "compressor kernels take float16 or bfloat16 activations, got ", t.scalar_type());
  return t.scalar_type() == torch::kHalf ? compressor::DType::kFloat16 : compressor::DType::kBFloat16;
}

void check(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
           const torch::Tensor& zeros) {
  for (const auto* t : {&x, &qweight, &scales, &zeros}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous(), "compressor kernels need contiguous CUDA tensors");
  }
  TORCH_CHECK(qweight.scalar_type() == torch::kInt32 && zeros.scalar_type() == torch::kUInt8, "bad packed dtypes");
  TORCH_CHECK(scales.scalar_type() == x.scalar_type(), "scales must have the activations' dtype");
}

void cuda_check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "compressor kernel: ", cudaGetErrorString(err)); }

// out [N, K] in scales' dtype
cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                         int64_t group_size, int64_t in_features, int64_t stream) {
  check(scales, qweight, scales, zeros);
  const int N = qweight.size(0), K = in_features;
  auto out = torch::empty({N, K}, scales.options());
  cuda_check(compressor::launch_dequant(dtype_of(scales), bits, qweight.data_ptr<int32_t>(), scales.data_ptr(),
                                        zeros.data_ptr<uint8_t>(), out.data_ptr(), N, K, group_size,
                                        as_stream(stream)));
  return out;
}

// y [..., N] = x [..., K] * dequant(qweight)^T: the streaming kernel for up to 16 rows, else
// dequantize once and use a dense matmul.
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                      int64_t group_size, int64_t stream) {
  const int K = x.size(-1), N = qweight.size(0);
  auto x2 = x.reshape({-1, K}).contiguous();
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 != 0) x2 = x2.clone();  // the kernel reads 16-byte vectors
  check(x2, qweight, scales, zeros);
  const int M = x2.size(0);
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  if (M > compressor::kMaxSmallBatch) {
    return x2.matmul(dequantize(qweight, scales, zeros, bits, group_size, K, stream).t()).reshape(out_shape);
  }
  auto y = torch::empty({M, N}, x.options());
  cuda_check(compressor::launch_qgemv(dtype_of(x2), bits, x2.data_ptr(), qweight.data_ptr<int32_t>(),
                                      scales.data_ptr(), zeros.data_ptr<uint8_t>(), y.data_ptr(), M, N, K, group_size,
                                      as_stream(stream)));
  return y.reshape(out_shape);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul", &qmatmul, "x * dequant(qweight)^T for 2/4-bit codes");
  m.def("dequantize", &dequantize, "dequantize packed 2/4-bit codes");
}
