// The shape checks toyllm::gemv, toyllm::gemv_silu_mul and toyllm::gemv_add_rms_norm make on every
// device (cpu_gemv.cpp, cuda_gemv.cpp): weight [out, in], and x [..., in] (gemv), gate_up
// [..., 2 * in] (gemv_silu_mul: gate, then up) or x and residual [..., in] with norm_weight [in]
// (gemv_add_rms_norm, with its `warps`). Each device adds its own dtype, device and layout
// checks.
#pragma once

#include <ATen/ATen.h>

#include "common/op_args.h"

namespace toyllm {

inline void check_gemv_shapes(const at::Tensor& x, const at::Tensor& weight) {
    TORCH_CHECK_VALUE(weight.dim() == 2, "gemv: expected weight of 2 dims [out, in], got shape ",
                      weight.sizes());
    TORCH_CHECK_VALUE(x.dim() >= 1, "gemv: expected x of at least 1 dim [..., in], got shape ",
                      x.sizes());
    TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), "gemv: expected x [..., ", weight.size(1),
                      "] (weight's in = weight.size(1)), got x of shape ", x.sizes(),
                      " for weight of shape ", weight.sizes());
}

inline void check_gemv_silu_mul_shapes(const at::Tensor& gate_up, const at::Tensor& weight) {
    TORCH_CHECK_VALUE(weight.dim() == 2,
                      "gemv_silu_mul: expected weight of 2 dims [out, in], got shape ",
                      weight.sizes());
    TORCH_CHECK_VALUE(gate_up.dim() >= 1,
                      "gemv_silu_mul: expected gate_up of at least 1 dim [..., 2 * in], got shape ",
                      gate_up.sizes());
    TORCH_CHECK_VALUE(
        gate_up.size(-1) == 2 * weight.size(1), "gemv_silu_mul: expected gate_up [..., ",
        2 * weight.size(1),
        "] (gate then up, each of weight's in = weight.size(1)), got gate_up of shape ",
        gate_up.sizes(), " for weight of shape ", weight.sizes());
}

// `op` is gemv_add_rms_norm, gemv_add_rms_norm_rope_kv or (silu: weight = [gate; up], an even
// number of rows) gemv_add_rms_norm_silu_mul; `warps` their warps per block of the one-row CUDA
// kernel (gemv_staged.cuh), checked on every device.
inline void check_gemv_add_rms_norm_shapes(const char* op, const at::Tensor& x,
                                           const at::Tensor& residual,
                                           const at::Tensor& norm_weight, const at::Tensor& weight,
                                           double eps, bool silu, int64_t warps) {
    TORCH_CHECK_VALUE(weight.dim() == 2, op, ": expected weight of 2 dims [out, in], got shape ",
                      weight.sizes());
    TORCH_CHECK_VALUE(!silu || weight.size(0) % 2 == 0, op,
                      ": expected weight [gate; up] with an even number of rows, got shape ",
                      weight.sizes());
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": expected x of at least 1 dim [..., in], got shape ",
                      x.sizes());
    TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), op, ": expected x [..., ", weight.size(1),
                      "] (weight's in = weight.size(1)), got x of shape ", x.sizes(),
                      " for weight of shape ", weight.sizes());
    TORCH_CHECK_VALUE(x.size(-1) >= 1, op,
                      ": expected in = x.size(-1) >= 1 (the norm's size), got ", x.size(-1));
    TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), op, ": expected residual of x's shape ",
                      x.sizes(), ", got ", residual.sizes());
    TORCH_CHECK_VALUE(norm_weight.dim() == 1 && norm_weight.size(0) == x.size(-1), op,
                      ": expected norm_weight of shape [", x.size(-1), "] (x's last dim), got ",
                      norm_weight.sizes());
    check_eps(op, eps);
    TORCH_CHECK_VALUE(warps == 4 || warps == 8 || warps == 16, op,
                      ": expected warps to be 4, 8 or 16, got ", warps);
}

}  // namespace toyllm
