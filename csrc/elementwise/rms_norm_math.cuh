// The arithmetic of RMSNorm (and of the residual add before it) on a pack of elements, rounded
// as torch's Llama RMSNorm in T: the one definition that fused_kernels.cu's rms_norm_kernel and
// the staged GEMVs' add_rms_norm_stage.cuh both call, so their outputs are the same bits. How
// the squares are summed across threads (the order of the partial sums) is each kernel's own.
#pragma once

#include "common/float_convert.cuh"
#include "common/vector_pack.cuh"

namespace toyllm {

// s = to_dtype(float(x) + float(residual)) per element: torch's x + residual (alpha 1).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> add_residual(const Pack<T, N>& x, const Pack<T, N>& r) {
    Pack<T, N> s;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        s.v[k] = from_float<T>(__fadd_rn(to_float(x.v[k]), to_float(r.v[k])));
    }
    return s;
}

// sum + h * h for the pack's elements in order, h = float(element), each square rounded to fp32
// as torch's h.pow(2) is.
template <typename T, int N>
__device__ __forceinline__ float add_squares(float sum, const Pack<T, N>& v) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const float h = to_float(v.v[k]);
        sum = __fadd_rn(sum, __fmul_rn(h, h));
    }
    return sum;
}

// 1 / sqrt(mean + eps) from the row's sum of squares: mean = sum * (1 / hidden) as torch's CUDA
// mean computes it (inv_hidden = 1.0f / hidden), then rsqrtf (torch's CUDA rsqrt).
__device__ __forceinline__ float rms_inverse(float sum, float inv_hidden, float eps) {
    return rsqrtf(__fadd_rn(__fmul_rn(sum, inv_hidden), eps));
}

// out = to_dtype(float(weight) * float(n)) with n = to_dtype(float(v) * inv), per element.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> rms_scale(const Pack<T, N>& v, const Pack<T, N>& w,
                                                float inv) {
    Pack<T, N> o;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const float n = round_to<T>(__fmul_rn(to_float(v.v[k]), inv));
        o.v[k] = from_float<T>(__fmul_rn(to_float(w.v[k]), n));
    }
    return o;
}

}  // namespace toyllm
