// The device math of rotate-half RoPE, shared by toyllm::rope (fused_kernels.cu) and
// toyllm::rope_kv_update (rope_kv_update.cu), so both round exactly as models/rope.py does.
#pragma once

#include "common/float_convert.cuh"
#include "common/vector_pack.cuh"

namespace toyllm {

// Rotates N consecutive pairs (i + k, i + k + D/2), k < N, of one head. x1 = x[i, i + N) and
// x2 = x[i + D/2, i + D/2 + N); c1, c2 and s1, s2 the same slices of cos and sin. For each k:
//   o1[k] = x1[k] * c1[k] + (-x2[k]) * s1[k]      (out[i + k])
//   o2[k] = x2[k] * c2[k] + x1[k] * s2[k]         (out[i + D/2 + k])
// each product rounded to T, then the sum rounded to T (torch's x * cos + rotate_half(x) * sin
// is three kernels, each writing T); __fmul_rn / __fadd_rn keep nvcc from contracting them into
// an FMA (which rounds once instead of twice).
template <typename T, int N>
__device__ __forceinline__ void rope_rotate(const Pack<T, N>& x1, const Pack<T, N>& x2,
                                            const Pack<T, N>& c1, const Pack<T, N>& c2,
                                            const Pack<T, N>& s1, const Pack<T, N>& s2,
                                            Pack<T, N>& o1, Pack<T, N>& o2) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const float a1 = to_float(x1.v[k]);
        const float a2 = to_float(x2.v[k]);
        // negation is exact, so -(x2) * s rounds like torch's (-x2) * s
        const float lo_a = round_to<T>(__fmul_rn(a1, to_float(c1.v[k])));
        const float lo_b = round_to<T>(__fmul_rn(-a2, to_float(s1.v[k])));
        const float hi_a = round_to<T>(__fmul_rn(a2, to_float(c2.v[k])));
        const float hi_b = round_to<T>(__fmul_rn(a1, to_float(s2.v[k])));
        o1.v[k] = from_float<T>(__fadd_rn(lo_a, lo_b));
        o2.v[k] = from_float<T>(__fadd_rn(hi_a, hi_b));
    }
}

}  // namespace toyllm
