// The CPU and CUDA implementations of `toyllm::argmax(logits, flag_nonfinite) -> index` (schema:
// registration.cpp): torch.argmax(logits, dim=-1) for the greedy pick of a decode step, and with
// flag_nonfinite -1 for each row that holds a NaN or an inf (the engine stops that request).
//
// logits: [rows, vocab], vocab >= 1, fp32, fp16 or bf16 (the same rules on every device);
// index: int64 [rows], torch's answer bit for bit: the first index of the row's maximum, NaN
// counting as the maximum (the first NaN wins). CPU: at::argmax itself. CUDA: the kernel of
// argmax.cu, which splits a row over many blocks (torch's reduction takes ~27 us for one row of
// 128,256 logits on an H200). A row-strided view (last dim contiguous, e.g. the last position
// of [rows, tokens, vocab] logits) is read in place; any other layout is packed first. Only the
// index and a small scratch are allocated (through torch's caching allocator), so a call can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/op_args.h"

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "sampling/argmax.cuh"
#endif

namespace toyllm {
namespace {

void check_argmax_args(const at::Tensor& logits) {
    TORCH_CHECK_VALUE(logits.dim() == 2,
                      "argmax: expected logits of 2 dims [rows, vocab], got shape ",
                      logits.sizes());
    check_float_dtype("argmax", "logits", logits.scalar_type());
    TORCH_CHECK_VALUE(logits.size(1) >= 1,
                      "argmax: expected a non-empty vocab (logits.size(1) >= 1), got shape ",
                      logits.sizes());
}

at::Tensor argmax_cpu(const at::Tensor& logits, bool flag_nonfinite) {
    check_argmax_args(logits);
    at::Tensor index = at::argmax(logits, 1);
    if (flag_nonfinite) {
        index.masked_fill_(at::isfinite(logits).all(1).logical_not(), -1);
    }
    return index;
}

#ifdef WITH_CUDA_KERNELS
at::Tensor argmax_cuda(const at::Tensor& logits, bool flag_nonfinite) {
    check_argmax_args(logits);
    TORCH_CHECK_VALUE(logits.is_cuda(), "argmax: expected logits on a CUDA device, got ",
                      logits.device());
    const c10::cuda::CUDAGuard guard(logits.device());  // launch on the logits' GPU
    const int64_t rows = logits.size(0);
    const int64_t vocab = logits.size(1);
    at::Tensor index = at::empty({rows}, logits.options().dtype(at::kLong));
    if (rows == 0) {
        return index;
    }
    // the kernel reads each row at a fixed pitch from a contiguous last dim
    const at::Tensor x = logits.stride(1) == 1 || vocab == 1 ? logits : logits.contiguous();
    const ArgmaxDtype dtype = kernel_dtype<ArgmaxDtype>(x.scalar_type());
    const int sm_count = at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;
    const int64_t scratch_bytes = argmax_scratch_bytes(dtype, rows, vocab, sm_count);
    at::Tensor scratch;
    if (scratch_bytes > 0) {
        scratch = at::empty({scratch_bytes}, x.options().dtype(at::kByte));
    }
    const cudaError_t err =
        launch_argmax(x.const_data_ptr(), x.stride(0), index.mutable_data_ptr<int64_t>(),
                      scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr, scratch_bytes,
                      dtype, rows, vocab, sm_count, flag_nonfinite,
                      at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "argmax: CUDA kernel launch failed: ", cudaGetErrorString(err));
    return index;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("argmax", &toyllm::argmax_cpu); }

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("argmax", &toyllm::argmax_cuda); }
#endif
