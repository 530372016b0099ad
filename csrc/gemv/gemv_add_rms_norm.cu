// CUDA product after a residual add and an RMSNorm at decode (contract in gemv_add_rms_norm.cuh):
// sum = x + residual, y = rms_norm(sum) @ W^T for one row, one kernel where add_rms_norm and
// gemv took two; and the SwiGLU gate/up product after the norm with silu(gate) * up taken in
// its epilogue, one kernel where add_rms_norm, gemv and silu_mul took three (the down product
// that follows is then a plain toyllm::gemv, which streams faster than a kernel that has to
// compute silu(gate) * up in every block first: bench_gemv.py). A staged GEMV (gemv_staged.cuh):
// every block (blocks of `warps` warps, 16 warps per SM at most) computes the whole normalised row
// into shared memory, then streams its rows of W. The norm is ~2048 elements against megabytes of
// W, and it runs while the block's first loads of W are under way.
//
// The norm is add_rms_norm_stage.cuh's (add_rms_norm's bits).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "common/float_convert.cuh"
#include "common/vector_pack.cuh"
#include "elementwise/add_rms_norm_stage.cuh"
#include "elementwise/fused_kernels.cuh"
#include "elementwise/silu_mul.cuh"
#include "gemv/gemv.cuh"
#include "gemv/gemv_add_rms_norm.cuh"
#include "gemv/gemv_staged.cuh"

namespace toyllm {
namespace {

using gemv_staged::kNormWarps;
using gemv_staged::kThreads;
using gemv_staged::kWarp;
using gemv_staged::norm_packs16;
using gemv_staged::stage_add_rms_norm;
using gemv_staged::staged_launch;
using gemv_staged::staged_row_pairs;
using gemv_staged::staged_rows;

// N = elements per load of W, NN = elements per access of the norm (add_rms_norm's choice).
template <typename T, int N, int NN>
__global__ void __launch_bounds__(kThreads, 1)
    gemv_add_rms_norm_kernel(const T* __restrict__ x,            // [in]
                             const T* __restrict__ residual,     // [in]
                             const T* __restrict__ norm_weight,  // [in]
                             const T* __restrict__ weight,       // [out, in]
                             T* __restrict__ sum_out,            // [in]
                             T* __restrict__ y,                  // [out]
                             int norm_threads, float eps, int64_t in, int64_t out,
                             int warps_per_row) {
    extern __shared__ __align__(16) unsigned char staged[];  // n: [in] of T
    __shared__ float warp_totals[kNormWarps];
    T* n = reinterpret_cast<T*>(staged);
    staged_rows<T, N>(weight, y, in, out, warps_per_row, n, [&] {
        stage_add_rms_norm<T, NN>(n, warp_totals, x, residual, norm_weight, sum_out, in,
                                  norm_threads, eps);
    });
}

// The same with W's rows in two halves, gate then up (a SwiGLU gate/up product): h[j] =
// silu_mul_element(y[j], y[j + out / 2]) for j < out / 2, y the product launch_gemv would write
// (rounded to T), so h has the bits of toyllm::silu_mul of that product.
template <typename T, int N, int NN>
__global__ void __launch_bounds__(kThreads, 1)
    gemv_add_rms_norm_silu_kernel(const T* __restrict__ x,            // [in]
                                  const T* __restrict__ residual,     // [in]
                                  const T* __restrict__ norm_weight,  // [in]
                                  const T* __restrict__ weight,       // [out, in]: gate; up
                                  T* __restrict__ sum_out,            // [in]
                                  T* __restrict__ h,                  // [out / 2]
                                  int norm_threads, float eps, int64_t in, int64_t out,
                                  int warps_per_row) {
    extern __shared__ __align__(16) unsigned char staged[];  // n: [in] of T
    __shared__ float warp_totals[kNormWarps];
    T* n = reinterpret_cast<T*>(staged);
    staged_row_pairs<T, N>(
        weight, in, out, out / 2, warps_per_row, n,
        [&] {
            stage_add_rms_norm<T, NN>(n, warp_totals, x, residual, norm_weight, sum_out, in,
                                      norm_threads, eps);
        },
        [&](int64_t j, T gate, T up) { h[j] = silu_mul_element(gate, up); });
}

template <typename T, int N>
cudaError_t launch_norm_packs(const T* x, const T* residual, const T* norm_weight, const T* weight,
                              T* sum_out, T* y, int64_t in, int64_t out, float eps, bool silu,
                              int num_sms, int warps, cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const bool norm_vec = norm_packs16<T>(x, residual, norm_weight, sum_out, in);
    const int norm_threads = rms_norm_threads(norm_vec ? in / kVec : in);
    if (norm_vec) {
        return staged_launch<T, N>(
            silu ? gemv_add_rms_norm_silu_kernel<T, N, kVec> : gemv_add_rms_norm_kernel<T, N, kVec>,
            in, out, num_sms, warps, stream, x, residual, norm_weight, weight, sum_out, y,
            norm_threads, eps);
    }
    return staged_launch<T, N>(
        silu ? gemv_add_rms_norm_silu_kernel<T, N, 1> : gemv_add_rms_norm_kernel<T, N, 1>, in, out,
        num_sms, warps, stream, x, residual, norm_weight, weight, sum_out, y, norm_threads, eps);
}

template <typename T>
cudaError_t gemv_add_rms_norm_for(const void* x, const void* residual, const void* norm_weight,
                                  const void* weight, void* sum_out, void* y, int64_t in,
                                  int64_t out, float eps, bool silu, int num_sms, int warps,
                                  cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const T* xt = static_cast<const T*>(x);
    const T* rt = static_cast<const T*>(residual);
    const T* nt = static_cast<const T*>(norm_weight);
    const T* wt = static_cast<const T*>(weight);
    T* st = static_cast<T*>(sum_out);
    T* yt = static_cast<T*>(y);
    // gemv.cu's choice for an aligned x (n in shared memory is aligned, as gemv's fresh input
    // is): 16-byte loads of W when every row of W starts 16-byte aligned
    if (in % kVec == 0 && aligned16(weight)) {
        return launch_norm_packs<T, kVec>(xt, rt, nt, wt, st, yt, in, out, eps, silu, num_sms,
                                          warps, stream);
    }
    return launch_norm_packs<T, 1>(xt, rt, nt, wt, st, yt, in, out, eps, silu, num_sms, warps,
                                   stream);
}

// Both launchers: checks, then the dtype's instance.
cudaError_t launch_any(const void* x, const void* residual, const void* norm_weight,
                       const void* weight, void* sum_out, void* y, GemvDtype dtype, int64_t in,
                       int64_t out, float eps, bool silu, int num_sms, int warps,
                       cudaStream_t stream) {
    if (in < 1 || out < 0 || num_sms < 1 || (silu && out % 2 != 0) ||
        !gemv_staged::valid_block_warps(warps)) {
        return cudaErrorInvalidValue;
    }
    if (out == 0) {
        return cudaSuccess;
    }
    switch (dtype) {
        case GemvDtype::kFloat16:
            return gemv_add_rms_norm_for<__half>(x, residual, norm_weight, weight, sum_out, y, in,
                                                 out, eps, silu, num_sms, warps, stream);
        case GemvDtype::kBFloat16:
            return gemv_add_rms_norm_for<__nv_bfloat16>(x, residual, norm_weight, weight, sum_out,
                                                        y, in, out, eps, silu, num_sms, warps,
                                                        stream);
        case GemvDtype::kFloat32:
            return gemv_add_rms_norm_for<float>(x, residual, norm_weight, weight, sum_out, y, in,
                                                out, eps, silu, num_sms, warps, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_gemv_add_rms_norm(const void* x, const void* residual, const void* norm_weight,
                                     const void* weight, void* sum_out, void* y, GemvDtype dtype,
                                     int64_t in, int64_t out, float eps, int num_sms, int warps,
                                     cudaStream_t stream) {
    return launch_any(x, residual, norm_weight, weight, sum_out, y, dtype, in, out, eps, false,
                      num_sms, warps, stream);
}

cudaError_t launch_gemv_add_rms_norm_silu_mul(const void* x, const void* residual,
                                              const void* norm_weight, const void* weight,
                                              void* sum_out, void* h, GemvDtype dtype, int64_t in,
                                              int64_t out, float eps, int num_sms, int warps,
                                              cudaStream_t stream) {
    return launch_any(x, residual, norm_weight, weight, sum_out, h, dtype, in, out, eps, true,
                      num_sms, warps, stream);
}

}  // namespace toyllm
