// CUDA down product of a SwiGLU MLP at decode, y = silu_mul(gate_up) @ W^T for one row of
// gate_up, with silu(gate) * up computed in the kernel (contract in gemv_silu_mul.cuh): one
// kernel where toyllm::silu_mul and toyllm::gemv took two, so a decode step has one launch (and
// one gap between kernels) fewer per layer.
//
// The kernel is a staged GEMV (gemv_staged.cuh: blocks of kDefaultBlockWarps warps, 16 warps
// per SM at most, each computing all of h = silu_mul(gate_up) into shared memory, then looping over
// output rows with two rows' loads of W in flight per group). Each block computes h once: gemv.cu
// launches ~2,000 blocks of 4 warps for Llama-1B's down product, and h's 8192 expf and fp32 divides
// in each block would cost more than the product. h is computed by silu_mul's own per-element
// function and rounded to the dtype, so y has the bits of toyllm::silu_mul then toyllm::gemv. For 2
// to 4 rows (not a decode step's shape: there cuBLAS takes the product) and where h does not fit a
// block's shared memory, the operator runs silu_mul and gemv instead (cuda_gemv.cpp). One row also
// keeps the kernel within 128 registers a thread without spills.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "common/vector_pack.cuh"
#include "elementwise/silu_mul.cuh"
#include "gemv/gemv.cuh"
#include "gemv/gemv_silu_mul.cuh"
#include "gemv/gemv_staged.cuh"

namespace toyllm {
namespace {

using gemv_staged::kThreads;
using gemv_staged::staged_launch;
using gemv_staged::staged_rows;

// h[i] = silu_mul_element(gate_up[i], gate_up[in + i]) for i < in, by all the threads of the
// block, N elements per access.
template <typename T, int N>
__device__ __forceinline__ void stage_silu_mul(T* __restrict__ h,              // [in], shared
                                               const T* __restrict__ gate_up,  // [2 * in]
                                               int64_t in) {
    using P = Pack<T, N>;
    const int64_t packs = in / N;
    const P* __restrict__ gate = reinterpret_cast<const P*>(gate_up);
    const P* __restrict__ up = reinterpret_cast<const P*>(gate_up + in);
    P* __restrict__ hp = reinterpret_cast<P*>(h);
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        const P g = gate[p];
        const P u = up[p];
        P o;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            o.v[k] = silu_mul_element(g.v[k], u.v[k]);
        }
        hp[p] = o;
    }
}

// N = elements per load of W. pack_gate_up: gate_up is read in 16-byte packs (in a multiple of
// them, base aligned).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, 1)
    gemv_silu_mul_kernel(const T* __restrict__ gate_up,  // [2 * in]
                         const T* __restrict__ weight,   // [out, in]
                         T* __restrict__ y,              // [out]
                         bool pack_gate_up, int64_t in, int64_t out, int warps_per_row) {
    extern __shared__ __align__(16) unsigned char staged[];  // h: [in] of T
    T* h = reinterpret_cast<T*>(staged);
    staged_rows<T, N>(weight, y, in, out, warps_per_row, h, [&] {
        if (pack_gate_up) {
            stage_silu_mul<T, kVec16<T>>(h, gate_up, in);
        } else {
            stage_silu_mul<T, 1>(h, gate_up, in);
        }
    });
}

template <typename T>
cudaError_t gemv_silu_mul_for(const void* gate_up, const void* weight, void* y, int64_t in,
                              int64_t out, int num_sms, cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const T* gt = static_cast<const T*>(gate_up);
    const T* wt = static_cast<const T*>(weight);
    T* yt = static_cast<T*>(y);
    const bool pack_gate_up = in % kVec == 0 && aligned16(gate_up);
    // gemv.cu's choice for an aligned x (h in shared memory is aligned): 16-byte loads of W
    // when every row of W starts 16-byte aligned
    if (in % kVec == 0 && aligned16(weight)) {
        return staged_launch<T, kVec>(gemv_silu_mul_kernel<T, kVec>, in, out, num_sms,
                                      gemv_staged::kDefaultBlockWarps, stream, gt, wt, yt,
                                      pack_gate_up);
    }
    return staged_launch<T, 1>(gemv_silu_mul_kernel<T, 1>, in, out, num_sms,
                               gemv_staged::kDefaultBlockWarps, stream, gt, wt, yt, pack_gate_up);
}

}  // namespace

size_t gemv_staged_shared_bytes(GemvDtype dtype, int64_t in) {
    switch (dtype) {
        case GemvDtype::kFloat16:
            return gemv_staged::shared_bytes_for<__half>(in);
        case GemvDtype::kBFloat16:
            return gemv_staged::shared_bytes_for<__nv_bfloat16>(in);
        case GemvDtype::kFloat32:
            break;
    }
    return gemv_staged::shared_bytes_for<float>(in);
}

cudaError_t launch_gemv_silu_mul(const void* gate_up, const void* weight, void* y, GemvDtype dtype,
                                 int64_t in, int64_t out, int num_sms, cudaStream_t stream) {
    if (in < 0 || out < 0 || num_sms < 1) {
        return cudaErrorInvalidValue;
    }
    if (out == 0) {
        return cudaSuccess;
    }
    switch (dtype) {
        case GemvDtype::kFloat16:
            return gemv_silu_mul_for<__half>(gate_up, weight, y, in, out, num_sms, stream);
        case GemvDtype::kBFloat16:
            return gemv_silu_mul_for<__nv_bfloat16>(gate_up, weight, y, in, out, num_sms, stream);
        case GemvDtype::kFloat32:
            return gemv_silu_mul_for<float>(gate_up, weight, y, in, out, num_sms, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
