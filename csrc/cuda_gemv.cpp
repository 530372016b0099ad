// Registers the CUDA implementation of `toyllm::gemv(x, weight) -> y` (the operator and its CPU
// kernel are defined in cpu_gemv.cpp): y = F.linear(x, weight) (no bias) for the few-row
// products of a decode step, with the kernel of gemv.cu.
//
// x: [..., in] with at most 4 rows (x.numel() / in), fp32, fp16 or bf16 (packed here when it is
// not contiguous); weight: [out, in] contiguous (nn.Linear's layout), x's dtype and device.
// Sums in fp32, one rounding to the dtype. Prefill's many rows stay with cuBLAS (the engine's
// dispatch, engine/gemv.py, sends them there). Only y is allocated (through torch's caching
// allocator), so a call can be captured in a CUDA graph. The fake (meta) implementation, with
// the same checks and messages, is registered from Python (engine/gemv.py).
#ifdef TOYLLM_WITH_CUDA
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "dtype_names.h"
#include "gemv_args.h"
#include "gemv.cuh"

namespace toyllm {
namespace {

bool is_gemv_dtype(at::ScalarType t) {
    return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

GemvDtype gemv_dtype(at::ScalarType t) {
    if (t == at::kHalf) {
        return GemvDtype::kFloat16;
    }
    if (t == at::kBFloat16) {
        return GemvDtype::kBFloat16;
    }
    return GemvDtype::kFloat32;
}

// Rows of x: the product of its leading dims (x.numel() / in, also when in == 0).
int64_t leading_rows(const at::Tensor& x) {
    int64_t rows = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) {
        rows *= x.size(d);
    }
    return rows;
}

void check_gemv_cuda_args(const at::Tensor& x, const at::Tensor& weight) {
    TORCH_CHECK_VALUE(x.device().is_cuda(), "gemv: expected x on a CUDA device (weight is on ",
                      weight.device(), "), got ", x.device());
    TORCH_CHECK_VALUE(weight.device() == x.device(), "gemv: expected weight on ", x.device(),
                      " (x's device), got ", weight.device());
    TORCH_CHECK_VALUE(is_gemv_dtype(x.scalar_type()),
                      "gemv: expected x of dtype torch.float32, torch.float16 or torch.bfloat16 "
                      "on CUDA, got ",
                      dtype_name(x.scalar_type()));
    TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "gemv: expected weight of dtype ",
                      dtype_name(x.scalar_type()), " (x's dtype), got ",
                      dtype_name(weight.scalar_type()));
    check_gemv_shapes(x, weight);
    TORCH_CHECK_VALUE(weight.is_contiguous(),
                      "gemv: expected a contiguous weight [out, in] (strides [in, 1]) on CUDA, "
                      "got strides ",
                      weight.strides(), " for shape ", weight.sizes());
    TORCH_CHECK_VALUE(leading_rows(x) <= kGemvMaxRows, "gemv: expected at most ", kGemvMaxRows,
                      " rows of x on CUDA (x.numel() / in), got ", leading_rows(x),
                      " (x of shape ", x.sizes(), "); use F.linear for more");
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& weight) {
    check_gemv_cuda_args(x, weight);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t out = weight.size(0);
    const int64_t in = weight.size(1);
    std::vector<int64_t> out_shape = x.sizes().vec();
    out_shape.back() = out;
    at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
    if (y.numel() == 0) {
        return y;
    }
    // The kernel reads rows of x at a fixed pitch: a strided view (the last token of a batch,
    // say) is packed first; in the model x is contiguous (no copy).
    const at::Tensor xc = x.contiguous();
    const cudaError_t err = launch_gemv(xc.const_data_ptr(), weight.const_data_ptr(),
                                        y.mutable_data_ptr(), gemv_dtype(x.scalar_type()),
                                        leading_rows(x), in, out,
                                        at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "gemv: CUDA kernel launch failed: ", cudaGetErrorString(err));
    return y;
}

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CUDA, m) {
    m.impl("gemv", &toyllm::gemv_cuda);
}
#endif  // TOYLLM_WITH_CUDA
