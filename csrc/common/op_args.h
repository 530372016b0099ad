// Argument checks that several operators make, each with one message shape. Every check throws
// c10::ValueError (Python ValueError) as "<op>: expected <what>, got <what was given>"; `op` and
// `name` are the operator's and the argument's names as the user wrote them.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "common/dtype_names.h"

#ifdef WITH_CUDA_KERNELS
#include <cuda_runtime.h>
#endif

namespace toyllm {

// t has dtype `dtype`; `why` says whose it is: "k_cache's", "x's dtype", ...
inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                        const char* why) {
    TORCH_CHECK_VALUE(t.scalar_type() == dtype, op, ": expected ", name, " of dtype ",
                      dtype_name(dtype), " (", why, "), got ", dtype_name(t.scalar_type()));
}

// t is on `device`; `why` says whose it is: "q's device", "the cache's device", ...
inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Device& device, const char* why) {
    TORCH_CHECK_VALUE(t.device() == device, op, ": expected ", name, " on ", device, " (", why,
                      "), got ", t.device());
}

// A K/V pair of caches or pools: k of 4 dims (`dims` names them: "[batch, max_seq_len,
// num_kv_heads, head_dim]"), v of k's shape.
inline void check_kv_pair(const char* op, const char* k_name, const at::Tensor& k,
                          const char* v_name, const at::Tensor& v, const char* dims) {
    TORCH_CHECK_VALUE(k.dim() == 4, op, ": expected ", k_name, " of 4 dims ", dims, ", got shape ",
                      k.sizes());
    TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": expected ", v_name, " of ", k_name,
                      "'s shape ", k.sizes(), ", got ", v.sizes());
}

// `dtype` (of the argument `name`) is one the float kernels take: fp32, fp16 or bf16.
inline void check_float_dtype(const char* op, const char* name, at::ScalarType dtype) {
    TORCH_CHECK_VALUE(is_supported_dtype(dtype), op, ": expected ", name,
                      " of dtype torch.float32, torch.float16 or torch.bfloat16, got ",
                      dtype_name(dtype));
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": expected a contiguous ", name, ", got strides ",
                      t.strides(), " for shape ", t.sizes());
}

// Elements of the last dim side by side (stride 1; any stride when it has one element or none).
inline void check_last_dim_contiguous(const char* op, const char* name, at::IntArrayRef sizes,
                                      at::IntArrayRef strides) {
    TORCH_CHECK_VALUE(sizes.empty() || sizes.back() <= 1 || strides.back() == 1, op, ": expected ",
                      name, " with a contiguous last dim (stride 1), got strides ", strides,
                      " for shape ", sizes);
}

inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
    check_last_dim_contiguous(op, name, t.sizes(), t.strides());
}

inline void check_eps(const char* op, double eps) {
    TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": expected a finite eps >= 0, got ",
                      eps);
}

// A row index per cache row (kv_update's and rope_kv_update's positions): int32 [rows], on
// `device`, contiguous. `rows_why` and `device_why` say where rows and device come from.
inline void check_positions(const char* op, const at::Tensor& positions, int64_t rows,
                            const char* rows_why, const at::Device& device,
                            const char* device_why) {
    TORCH_CHECK_VALUE(positions.scalar_type() == at::kInt, op,
                      ": expected positions of dtype torch.int32, got ",
                      dtype_name(positions.scalar_type()));
    TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == rows, op,
                      ": expected positions of shape [", rows, "] (", rows_why, "), got ",
                      positions.sizes());
    check_device(op, "positions", positions, device, device_why);
    TORCH_CHECK_VALUE(positions.is_contiguous(), op,
                      ": expected contiguous positions, got strides ", positions.strides());
}

// The kernels' own dtype enum (GemvDtype, FusedDtype, AttentionDtype, ArgmaxDtype: each has
// kFloat32, kFloat16 and kBFloat16) for a checked fp32, fp16 or bf16 tensor dtype.
template <typename KernelDtype>
KernelDtype kernel_dtype(at::ScalarType t) {
    if (t == at::kHalf) {
        return KernelDtype::kFloat16;
    }
    if (t == at::kBFloat16) {
        return KernelDtype::kBFloat16;
    }
    return KernelDtype::kFloat32;
}

#ifdef WITH_CUDA_KERNELS
// A launcher's return: anything but cudaSuccess is a RuntimeError naming the op and the error.
inline void check_cuda_launch(const char* op, cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace toyllm
