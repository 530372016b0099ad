// The residual add and RMSNorm of one row computed by every block of a staged GEMV
// (gemv_staged.cuh) into its shared memory: gemv_add_rms_norm.cu's kernels and
// gemv_norm_rope_kv.cu's.
//
// The norm repeats fused_kernels.cu's rms_norm_kernel<T, NN, true> exactly: its block had
// rms_norm_threads(packs) threads ("virtual threads" here), each summing the squares of its
// accesses p = vt, vt + V, ... in turn, a butterfly per warp, then the warp totals in warp order.
// This block has B threads (whole warps); thread t plays virtual threads t, t + B, ... (lanes
// agree because B is a multiple of 32), so every partial sum, every warp total and the
// final total are the same fp32 operations on the same values in the same order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/float_convert.cuh"
#include "common/vector_pack.cuh"
#include "elementwise/fused_kernels.cuh"
#include "elementwise/rms_norm_math.cuh"
#include "gemv/gemv_row.cuh"
#include "gemv/gemv_staged.cuh"

namespace toyllm {
namespace gemv_staged {

constexpr int kNormWarps = kRmsNormMaxThreads / gemv_row::kWarp;  // virtual warps at most
static_assert(sizeof(float) * kNormWarps <= gemv_staged::kStaticAllowance / 2,
              "the warp totals fit the static allowance");

// n = rms_norm(to_dtype(x + residual)) * norm_weight into `n` (shared, [in]), as add_rms_norm's
// kernel with `norm_threads` threads and NN elements per access computes it; block 0 also writes
// the rounded sum to sum_out. Called by every thread of the block.
template <typename T, int NN>
__device__ __forceinline__ void stage_add_rms_norm(T* __restrict__ n,                // [in], shared
                                                   float* __restrict__ warp_totals,  // shared
                                                   const T* __restrict__ x,
                                                   const T* __restrict__ residual,
                                                   const T* __restrict__ norm_weight,
                                                   T* __restrict__ sum_out, int64_t in,
                                                   int norm_threads, float eps) {
    using P = Pack<T, NN>;
    const int64_t packs = in / NN;
    const P* __restrict__ xp = reinterpret_cast<const P*>(x);
    const P* __restrict__ rp = reinterpret_cast<const P*>(residual);
    const P* __restrict__ wp = reinterpret_cast<const P*>(norm_weight);
    P* __restrict__ np = reinterpret_cast<P*>(n);
    P* __restrict__ sp = reinterpret_cast<P*>(sum_out);
    const bool write_sum = blockIdx.x == 0;
    // pass 1: s = to_dtype(float(x) + float(residual)) into n, and virtual thread vt's sum of
    // squares (norm_threads is a multiple of 32, so whole warps take or skip an iteration)
    for (int vt = threadIdx.x; vt < norm_threads; vt += blockDim.x) {
        float sum = 0.0f;
        for (int64_t p = vt; p < packs; p += norm_threads) {
            const P v = add_residual(xp[p], rp[p]);
            np[p] = v;
            if (write_sum) {
                sp[p] = v;
            }
            sum = add_squares(sum, v);
        }
#pragma unroll
        for (int offset = gemv_row::kWarp / 2; offset > 0; offset /= 2) {
            sum = __fadd_rn(sum, __shfl_xor_sync(0xffffffffu, sum, offset));
        }
        if (vt % gemv_row::kWarp == 0) {
            warp_totals[vt / gemv_row::kWarp] = sum;
        }
    }
    __syncthreads();  // every s and every warp total is written
    float total = 0.0f;
    for (int w = 0; w < norm_threads / gemv_row::kWarp; ++w) {
        total = __fadd_rn(total, warp_totals[w]);
    }
    // rms_norm_kernel's inverse and scaling (rms_norm_math.cuh)
    const float inv = rms_inverse(total, 1.0f / static_cast<float>(in), eps);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        np[p] = rms_scale(np[p], wp[p], inv);
    }
}

// add_rms_norm's choice of 16-byte accesses for the norm (stage_add_rms_norm's NN = kVec16<T>
// where true, else 1): `in` a whole number of packs and every pointer 16-byte aligned (its
// outputs are fresh, so aligned).
template <typename T>
inline bool norm_packs16(const void* x, const void* residual, const void* norm_weight,
                         const void* sum_out, int64_t in) {
    return in % kVec16<T> == 0 && aligned16(x) && aligned16(residual) && aligned16(norm_weight) &&
           aligned16(sum_out);
}

}  // namespace gemv_staged
}  // namespace toyllm
