// SwiGLU's silu(gate) * up for one element, rounded as torch's F.silu(gate) * up: the one
// definition that toyllm::silu_mul's kernel (fused_kernels.cu) and the down product that
// computes silu * up on the fly (gemv.cu, launch_gemv_silu_mul) both call, so their h values
// are the same bits.
#pragma once

#include "common/float_convert.cuh"

namespace toyllm {

// to_dtype(to_dtype(silu(g)) * u): silu is computed in fp32 and rounded to T (torch's F.silu
// writes T), then the product rounded to T.
template <typename T>
__device__ __forceinline__ T silu_mul_element(T g, T u) {
    const float gf = to_float(g);
    // torch's CUDA silu: x / (1 + exp(-x)) in fp32 with the accurate expf
    const float s = round_to<T>(__fdiv_rn(gf, __fadd_rn(1.0f, expf(-gf))));
    return from_float<T>(__fmul_rn(s, to_float(u)));
}

}  // namespace toyllm
