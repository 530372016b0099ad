// The CUDA implementations of `toyllm::gemv(x, weight) -> y`,
// `toyllm::gemv_silu_mul(gate_up, weight) -> y` and `toyllm::gemv_add_rms_norm(x, residual,
// norm_weight, eps, weight, warps) -> (sum, y)` and its silu_mul and rope_kv variants (schemas:
// registration.cpp; the CPU kernels: cpu_gemv.cpp): y = F.linear(x, weight) (no bias) for the
// few-row products of a decode step, with the kernel of gemv.cu; y = F.linear(silu_mul(gate_up),
// weight), a SwiGLU MLP's down product, with the kernel of gemv_silu_mul.cu, which computes
// silu(gate) * up itself (the same bits as toyllm::silu_mul then toyllm::gemv); and sum = x +
// residual, y = F.linear( rms_norm(sum), weight), the product after a residual add and RMSNorm,
// with the kernel of gemv_add_rms_norm.cu (the same bits as toyllm::add_rms_norm then
// toyllm::gemv).
//
// x: [..., in] with at most 4 rows (x.numel() / in), fp32, fp16 or bf16 (packed here when it is
// not contiguous); weight: [out, in] contiguous (nn.Linear's layout), x's dtype and device.
// Sums in fp32, one rounding to the dtype. Prefill's many rows stay with cuBLAS (the engine's
// dispatch sends them there). gemv_silu_mul takes the same arguments with
// gate_up [..., 2 * in] in x's place; its kernel takes one row (a decode step's), 2 to 4 rows run
// silu_mul's and gemv's kernels. Only y is allocated (through torch's caching allocator; and h,
// where gemv_silu_mul runs two kernels), so a call can be captured in a CUDA graph.
#ifdef WITH_CUDA_KERNELS
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "common/dispatched_ops.h"
#include "common/op_args.h"
#include "elementwise/fused_kernels.cuh"
#include "elementwise/rope_kv_args.h"
#include "gemv/gemv.cuh"
#include "gemv/gemv_add_rms_norm.cuh"
#include "gemv/gemv_args.h"
#include "gemv/gemv_norm_rope_kv.cuh"
#include "gemv/gemv_silu_mul.cuh"

namespace toyllm {
namespace {

GemvDtype gemv_dtype(at::ScalarType t) { return kernel_dtype<GemvDtype>(t); }

// Rows of x: the product of its leading dims (x.numel() / in, also when in == 0).
int64_t leading_rows(const at::Tensor& x) {
    int64_t rows = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) {
        rows *= x.size(d);
    }
    return rows;
}

// How an operator's messages name it, its first argument and that argument's rows.
struct OpNames {
    const char* op;       // "gemv"
    const char* x;        // "x"
    const char* rows;     // how rows are counted: "x.numel() / in"
    const char* instead;  // what to use for more rows: "F.linear"
};
constexpr OpNames kGemvNames{"gemv", "x", "x.numel() / in", "F.linear"};
constexpr OpNames kGemvSiluMulNames{"gemv_silu_mul", "gate_up", "gate_up.numel() / (2 * in)",
                                    "silu_mul and F.linear"};
constexpr OpNames kGemvAddRmsNormNames{"gemv_add_rms_norm", "x", "x.numel() / in",
                                       "add_rms_norm and F.linear"};
constexpr OpNames kGemvAddRmsNormSiluMulNames{"gemv_add_rms_norm_silu_mul", "x", "x.numel() / in",
                                              "add_rms_norm, F.linear and silu_mul"};
constexpr OpNames kGemvAddRmsNormRopeKvNames{"gemv_add_rms_norm_rope_kv", "x", "x.numel() / in",
                                             "add_rms_norm, F.linear and rope_kv_update"};

// The CUDA rules of gemv (x, weight) and gemv_silu_mul (gate_up, weight); check_shapes is the
// operator's shape check of gemv_args.h.
void check_gemv_cuda_args(const OpNames& n, const at::Tensor& x, const at::Tensor& weight,
                          void (*check_shapes)(const at::Tensor&, const at::Tensor&)) {
    TORCH_CHECK_VALUE(x.device().is_cuda(), n.op, ": expected ", n.x,
                      " on a CUDA device (weight is on ", weight.device(), "), got ", x.device());
    TORCH_CHECK_VALUE(weight.device() == x.device(), n.op, ": expected weight on ", x.device(),
                      " (", n.x, "'s device), got ", weight.device());
    TORCH_CHECK_VALUE(is_supported_dtype(x.scalar_type()), n.op, ": expected ", n.x,
                      " of dtype torch.float32, torch.float16 or torch.bfloat16 on CUDA, got ",
                      dtype_name(x.scalar_type()));
    TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), n.op, ": expected weight of dtype ",
                      dtype_name(x.scalar_type()), " (", n.x, "'s dtype), got ",
                      dtype_name(weight.scalar_type()));
    check_shapes(x, weight);
    TORCH_CHECK_VALUE(weight.is_contiguous(), n.op,
                      ": expected a contiguous weight [out, in] (strides [in, 1]) on CUDA, "
                      "got strides ",
                      weight.strides(), " for shape ", weight.sizes());
    TORCH_CHECK_VALUE(leading_rows(x) <= kGemvMaxRows, n.op, ": expected at most ", kGemvMaxRows,
                      " rows of ", n.x, " on CUDA (", n.rows, "), got ", leading_rows(x), " (", n.x,
                      " of shape ", x.sizes(), "); use ", n.instead, " for more");
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& weight) {
    check_gemv_cuda_args(kGemvNames, x, weight, check_gemv_shapes);
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
    const cudaError_t err =
        launch_gemv(xc.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr(),
                    gemv_dtype(x.scalar_type()), leading_rows(x), in, out,
                    at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("gemv", err);
    return y;
}

FusedDtype fused_dtype(GemvDtype t) {
    if (t == GemvDtype::kFloat16) {
        return FusedDtype::kFloat16;
    }
    if (t == GemvDtype::kBFloat16) {
        return FusedDtype::kBFloat16;
    }
    return FusedDtype::kFloat32;
}

at::Tensor gemv_silu_mul_cuda(const at::Tensor& gate_up, const at::Tensor& weight) {
    check_gemv_cuda_args(kGemvSiluMulNames, gate_up, weight, check_gemv_silu_mul_shapes);
    const c10::cuda::CUDAGuard guard(gate_up.device());
    const int64_t out = weight.size(0);
    const int64_t in = weight.size(1);
    std::vector<int64_t> out_shape = gate_up.sizes().vec();
    out_shape.back() = out;
    at::Tensor y =
        at::empty(out_shape, gate_up.options().memory_format(at::MemoryFormat::Contiguous));
    if (y.numel() == 0) {
        return y;
    }
    // rows at a fixed pitch, as in gemv_cuda (in the model gate_up is gemv's fresh output)
    const at::Tensor gu = gate_up.contiguous();
    const int64_t rows = leading_rows(gate_up);
    const GemvDtype dtype = gemv_dtype(gate_up.scalar_type());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    cudaError_t err = cudaSuccess;
    if (rows == 1 && gemv_staged_shared_bytes(dtype, in) <= props->sharedMemPerBlockOptin) {
        err =
            launch_gemv_silu_mul(gu.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr(),
                                 dtype, in, out, props->multiProcessorCount, stream);
    } else {
        // 2 to 4 rows (not a decode step's shape: the model sends them to cuBLAS), or h too big
        // for a block's shared memory (in > ~58k fp32 or ~116k bf16 on an H100): silu_mul's
        // kernel writes h and gemv's reads it, the two kernels the fused one stands for, so the
        // same bits.
        at::Tensor h = at::empty({rows, in}, gu.options());
        err = launch_silu_mul(gu.const_data_ptr(), h.mutable_data_ptr(), fused_dtype(dtype), rows,
                              in, stream);
        if (err == cudaSuccess) {
            err = launch_gemv(h.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr(),
                              dtype, rows, in, out, stream);
        }
    }
    check_cuda_launch("gemv_silu_mul", err);
    return y;
}

// The CUDA rules of the products after a residual add and RMSNorm (names.op says which).
void check_norm_product_cuda(const OpNames& names, const at::Tensor& x, const at::Tensor& residual,
                             const at::Tensor& norm_weight, double eps, const at::Tensor& weight,
                             bool silu, int64_t warps) {
    check_gemv_add_rms_norm_shapes(names.op, x, residual, norm_weight, weight, eps, silu, warps);
    check_gemv_cuda_args(names, x, weight, check_gemv_shapes);
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"residual", residual},
                                  {"norm_weight", norm_weight}}) {
        check_device(names.op, name, t, x.device(), "x's device");
        check_dtype(names.op, name, t, x.scalar_type(), "x's dtype");
    }
    TORCH_CHECK_VALUE(norm_weight.is_contiguous(), names.op,
                      ": expected a contiguous norm_weight, got strides ", norm_weight.strides());
}

// gemv_add_rms_norm (x, residual, norm_weight, eps, weight, warps) -> (x + residual, y), and with
// `silu` gemv_add_rms_norm_silu_mul -> (x + residual, silu_mul(y)): one kernel for one row
// (gemv_add_rms_norm.cu), add_rms_norm's, gemv's (and silu_mul's) kernels for 2 to 4 rows or a
// row too long for a block's shared memory (the same bits either way).
std::tuple<at::Tensor, at::Tensor> add_rms_norm_product_cuda(
    const OpNames& names, const at::Tensor& x, const at::Tensor& residual,
    const at::Tensor& norm_weight, double eps, const at::Tensor& weight, bool silu, int64_t warps) {
    check_norm_product_cuda(names, x, residual, norm_weight, eps, weight, silu, warps);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t out = weight.size(0);
    const int64_t in = weight.size(1);
    // rows at a fixed pitch, as in gemv_cuda (in the model both are fresh outputs)
    const at::Tensor xc = x.contiguous();
    const at::Tensor rc = residual.contiguous();
    at::Tensor sum = at::empty_like(xc, at::MemoryFormat::Contiguous);
    std::vector<int64_t> out_shape = x.sizes().vec();
    out_shape.back() = silu ? out / 2 : out;
    at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t rows = leading_rows(x);
    if (rows == 0) {
        return {sum, y};
    }
    const GemvDtype dtype = gemv_dtype(x.scalar_type());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    cudaError_t err = cudaSuccess;
    if (rows == 1 && out > 0 &&
        gemv_staged_shared_bytes(dtype, in) <= props->sharedMemPerBlockOptin) {
        const auto launch = silu ? launch_gemv_add_rms_norm_silu_mul : launch_gemv_add_rms_norm;
        err = launch(xc.const_data_ptr(), rc.const_data_ptr(), norm_weight.const_data_ptr(),
                     weight.const_data_ptr(), sum.mutable_data_ptr(), y.mutable_data_ptr(), dtype,
                     in, out, static_cast<float>(eps), props->multiProcessorCount,
                     static_cast<int>(warps), stream);
    } else {
        // the kernels the fused one stands for (2 to 4 rows, no output rows, or a row past the
        // shared memory), so the same bits
        at::Tensor normed = at::empty_like(sum);
        err = launch_add_rms_norm(xc.const_data_ptr(), rc.const_data_ptr(),
                                  norm_weight.const_data_ptr(), sum.mutable_data_ptr(),
                                  normed.mutable_data_ptr(), fused_dtype(dtype), rows, in,
                                  static_cast<float>(eps), stream);
        at::Tensor product = silu ? at::empty({rows, out}, xc.options()) : y;
        if (err == cudaSuccess) {
            err = launch_gemv(normed.const_data_ptr(), weight.const_data_ptr(),
                              product.mutable_data_ptr(), dtype, rows, in, out, stream);
        }
        if (err == cudaSuccess && silu && out > 0) {
            err = launch_silu_mul(product.const_data_ptr(), y.mutable_data_ptr(),
                                  fused_dtype(dtype), rows, out / 2, stream);
        }
    }
    check_cuda_launch(names.op, err);
    return {sum, y};
}

std::tuple<at::Tensor, at::Tensor> gemv_add_rms_norm_cuda(const at::Tensor& x,
                                                          const at::Tensor& residual,
                                                          const at::Tensor& norm_weight, double eps,
                                                          const at::Tensor& weight, int64_t warps) {
    return add_rms_norm_product_cuda(kGemvAddRmsNormNames, x, residual, norm_weight, eps, weight,
                                     false, warps);
}

std::tuple<at::Tensor, at::Tensor> gemv_add_rms_norm_silu_mul_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, int64_t warps) {
    return add_rms_norm_product_cuda(kGemvAddRmsNormSiluMulNames, x, residual, norm_weight, eps,
                                     weight, true, warps);
}

// gemv_add_rms_norm_rope_kv: (x + residual, q) with the product's q/k/v handed to
// rope_kv_update. One kernel for one row where the cache rows are one (gemv_norm_rope_kv.cu);
// otherwise gemv_add_rms_norm, then toyllm::rope_kv_update on its product (the same bits).
// Everything is checked before anything is written.
std::tuple<at::Tensor, at::Tensor> gemv_add_rms_norm_rope_kv_cuda(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
    at::Tensor& v_cache, const at::Tensor& positions, int64_t num_q_heads, int64_t warps) {
    const OpNames& names = kGemvAddRmsNormRopeKvNames;
    check_norm_product_cuda(names, x, residual, norm_weight, eps, weight, false, warps);
    // the q/k/v this product makes, [rows, 1, heads, head_dim], for rope_kv_update's checks
    const int64_t head_dim = k_cache.dim() == 4 ? k_cache.size(3) : 0;
    const int64_t out = weight.size(0);
    TORCH_CHECK_VALUE(head_dim >= 1 && out % head_dim == 0, names.op, ": expected weight rows (",
                      out, ") to be whole heads of k_cache's head_dim (k_cache of shape ",
                      k_cache.sizes(), ")");
    const std::vector<int64_t> qkv_sizes{leading_rows(x), 1, out / head_dim, head_dim};
    const std::vector<int64_t> qkv_strides{out, out, head_dim, 1};
    check_rope_kv_update_args({qkv_sizes, qkv_strides, x.scalar_type(), x.device()}, cos, sin,
                              k_cache, v_cache, positions, num_q_heads);
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t in = weight.size(1);
    const GemvDtype dtype = gemv_dtype(x.scalar_type());
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    const bool one_kernel = leading_rows(x) == 1 && cos.is_contiguous() && sin.is_contiguous() &&
                            gemv_staged_shared_bytes(dtype, in) <= props->sharedMemPerBlockOptin;
    if (!one_kernel) {
        auto [sum, qkv] = add_rms_norm_product_cuda(kGemvAddRmsNormNames, x, residual, norm_weight,
                                                    eps, weight, false, warps);
        at::Tensor q = call_rope_kv_update(qkv.view(qkv_sizes), cos, sin, k_cache, v_cache,
                                           positions, num_q_heads);
        return {sum, q};
    }
    const at::Tensor xc = x.contiguous();
    const at::Tensor rc = residual.contiguous();
    at::Tensor sum = at::empty_like(xc, at::MemoryFormat::Contiguous);
    at::Tensor q = at::empty({1, 1, num_q_heads, head_dim}, x.options());
    const cudaError_t err = launch_gemv_norm_rope_kv(
        xc.const_data_ptr(), rc.const_data_ptr(), norm_weight.const_data_ptr(),
        weight.const_data_ptr(), cos.const_data_ptr(), sin.const_data_ptr(),
        positions.const_data_ptr<int32_t>(), sum.mutable_data_ptr(), q.mutable_data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), dtype, in, num_q_heads, k_cache.size(2), head_dim,
        k_cache.size(1), static_cast<float>(eps), props->multiProcessorCount,
        static_cast<int>(warps), at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch(names.op, err);
    return {sum, q};
}

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CUDA, m) {
    m.impl("gemv", &toyllm::gemv_cuda);
    m.impl("gemv_silu_mul", &toyllm::gemv_silu_mul_cuda);
    m.impl("gemv_add_rms_norm", &toyllm::gemv_add_rms_norm_cuda);
    m.impl("gemv_add_rms_norm_silu_mul", &toyllm::gemv_add_rms_norm_silu_mul_cuda);
    m.impl("gemv_add_rms_norm_rope_kv", &toyllm::gemv_add_rms_norm_rope_kv_cuda);
}
#endif  // WITH_CUDA_KERNELS
