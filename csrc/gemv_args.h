// The shape checks toyllm::gemv makes on every device (cpu_gemv.cpp, cuda_gemv.cpp): weight
// [out, in], x [..., in]. Each device adds its own dtype, device and layout checks.
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

}  // namespace toyllm
