// The shape checks toyllm::gemv and toyllm::gemv_silu_mul make on every device (cpu_gemv.cpp,
// cuda_gemv.cpp): weight [out, in], and x [..., in] (gemv) or gate_up [..., 2 * in]
// (gemv_silu_mul: gate, then up). Each device adds its own dtype, device and layout checks.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace toyllm
