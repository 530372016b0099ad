// CUDA kernels for the fused elementwise ops of a Llama layer (RMSNorm, alone or after the
// residual add, RoPE, silu * up), see fused_kernels.cuh for the contracts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/float_convert.cuh"
#include "common/programmatic_launch.cuh"
#include "common/vector_pack.cuh"
#include "elementwise/fused_kernels.cuh"
#include "elementwise/rms_norm_math.cuh"
#include "elementwise/rope_rotate.cuh"
#include "elementwise/silu_mul.cuh"

namespace toyllm {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxNormThreads = kRmsNormMaxThreads;  // threads per RMSNorm block, at most
constexpr int kThreads = 256;                        // threads per block of RoPE and silu * up
constexpr int64_t kMaxGrid = int64_t{1} << 20;       // blocks per launch (grid-stride past that)

int64_t grid_for(int64_t work, int64_t per_block) {
    return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, kMaxGrid));
}

// launch(std::integral_constant<int, N>{}) with N = kVec16<T> (16-byte packs) when `vec`, else
// 1: the one place a launcher turns its alignment test into the kernel's pack width.
template <typename T, typename Launch>
cudaError_t with_pack_width(bool vec, Launch&& launch) {
    if (vec) {
        return launch(std::integral_constant<int, kVec16<T>>{});
    }
    return launch(std::integral_constant<int, 1>{});
}

// A grid-stride elementwise kernel over `total` packs, kThreads a block.
template <typename... Params, typename... Args>
cudaError_t launch_elementwise(void (*kernel)(Params...), int64_t total, cudaStream_t stream,
                               Args... args) {
    return launch_kernel(kernel, dim3(static_cast<unsigned>(grid_for(total, kThreads))),
                         dim3(kThreads), 0, stream, args...);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

// Sum of `v` over the block, returned to every thread. `scratch` holds one float per warp; the
// caller must not reuse it before the trailing __syncthreads() of the next call. Every thread
// adds the warp sums in the same order, so all threads get the same bits.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    const int warp = threadIdx.x / kWarp;
    const int num_warps = (blockDim.x + kWarp - 1) / kWarp;
    if (threadIdx.x % kWarp == 0) {
        scratch[warp] = v;
    }
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < num_warps; ++w) {
        total = __fadd_rn(total, scratch[w]);
    }
    __syncthreads();  // scratch is free again for the next row
    return total;
}

// One block per row (grid-stride over rows); each thread owns every blockDim.x-th pack of N
// elements. The row is read twice (sum of squares, then the output); the second read hits L1/L2.
//
// kAddResidual (add_rms_norm): the row normalised is s = to_dtype(x + residual), torch's
// x + residual (both read as fp32, added, rounded to T); the first pass writes s to sum_out and
// the second reads it back from there. Each thread reads back only the packs it wrote itself
// (the same p loop), so no barrier is needed between the write and the read.
// Without it (rms_norm), residual and sum_out are unused (null).
template <typename T, int N, bool kAddResidual>
__global__ void __launch_bounds__(kMaxNormThreads)
    rms_norm_kernel(const T* __restrict__ x,         // [rows, hidden]
                    const T* __restrict__ residual,  // [rows, hidden], kAddResidual only
                    const T* __restrict__ weight,    // [hidden]
                    T* __restrict__ sum_out,         // [rows, hidden], kAddResidual only
                    T* __restrict__ out,             // [rows, hidden]
                    int64_t rows, int64_t hidden, float inv_hidden, float eps) {
    wait_for_inputs();
    __shared__ float scratch[kMaxNormThreads / kWarp];
    using P = Pack<T, N>;
    const int64_t packs = hidden / N;
    const P* __restrict__ w = reinterpret_cast<const P*>(weight);
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const P* __restrict__ xr = reinterpret_cast<const P*>(x + r * hidden);
        P* __restrict__ outr = reinterpret_cast<P*>(out + r * hidden);
        // The row the norm reads: x, or the rounded sum x + residual stored in sum_out.
        const P* __restrict__ rr = nullptr;
        P* __restrict__ sr = nullptr;
        if constexpr (kAddResidual) {
            rr = reinterpret_cast<const P*>(residual + r * hidden);
            sr = reinterpret_cast<P*>(sum_out + r * hidden);
        }
        // sum(h * h), h = float(x) or float(s) (rms_norm_math.cuh)
        float sum = 0.0f;
        for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
            P v = xr[p];
            if constexpr (kAddResidual) {
                v = add_residual(v, rr[p]);
                sr[p] = v;
            }
            sum = add_squares(sum, v);
        }
        const float inv = rms_inverse(block_sum(sum, scratch), inv_hidden, eps);
        for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
            P v;
            if constexpr (kAddResidual) {
                v = sr[p];  // written by this thread in the first pass
            } else {
                v = xr[p];
            }
            outr[p] = rms_scale(v, w[p], inv);
        }
    }
}

// rms_norm (residual == sum_out == nullptr) or add_rms_norm. Both take the same launch shape and
// the same 16-byte-or-not choice for the same rows, so add_rms_norm's normalised output is
// bit for bit rms_norm's of the sum whenever every pointer is 16-byte aligned (fresh tensors).
template <typename T>
cudaError_t rms_norm_for(const void* x, const void* residual, const void* weight, void* sum_out,
                         void* out, int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const bool add = residual != nullptr;
    const bool vec = hidden % kVec == 0 && aligned16(x) && aligned16(weight) && aligned16(out) &&
                     (!add || (aligned16(residual) && aligned16(sum_out)));
    const int64_t packs = vec ? hidden / kVec : hidden;
    // Enough warps to give every thread one pack, up to kMaxNormThreads (then threads loop).
    const int threads = rms_norm_threads(packs);
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid));
    // torch's CUDA mean multiplies by a float factor 1 / numel.
    const float inv_hidden = 1.0f / static_cast<float>(hidden);
    const T* xt = static_cast<const T*>(x);
    const T* rt = static_cast<const T*>(residual);
    const T* wt = static_cast<const T*>(weight);
    T* st = static_cast<T*>(sum_out);
    T* ot = static_cast<T*>(out);
    return with_pack_width<T>(vec, [&](auto width) {
        constexpr int N = decltype(width)::value;
        auto* kernel = add ? rms_norm_kernel<T, N, true> : rms_norm_kernel<T, N, false>;
        return launch_kernel(kernel, dim3(grid), dim3(threads), 0, stream, xt, rt, wt, st, ot, rows,
                             hidden, inv_hidden, eps);
    });
}

// rms_norm or add_rms_norm (residual and sum_out both null, or both set) for any dtype.
cudaError_t rms_norm_dispatch(const void* x, const void* residual, const void* weight,
                              void* sum_out, void* out, FusedDtype dtype, int64_t rows,
                              int64_t hidden, float eps, cudaStream_t stream) {
    if (rows < 0 || hidden < 0 || (rows > 0 && hidden == 0)) {
        return cudaErrorInvalidValue;
    }
    if (rows == 0) {
        return cudaSuccess;
    }
    if (x == nullptr || weight == nullptr || out == nullptr ||
        (residual == nullptr) != (sum_out == nullptr)) {
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case FusedDtype::kFloat32:
            return rms_norm_for<float>(x, residual, weight, sum_out, out, rows, hidden, eps,
                                       stream);
        case FusedDtype::kFloat16:
            return rms_norm_for<__half>(x, residual, weight, sum_out, out, rows, hidden, eps,
                                        stream);
        case FusedDtype::kBFloat16:
            return rms_norm_for<__nv_bfloat16>(x, residual, weight, sum_out, out, rows, hidden, eps,
                                               stream);
    }
    return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------
// RoPE

// One thread per N consecutive rotation pairs (i, i + D/2) of one (batch, token, head) row,
// rotated by rope_rotate (rope_rotate.cuh: each product and the sum rounded to T, as torch).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    rope_kernel(const T* __restrict__ x,    // [batch, tokens, heads, head_dim], strided
                const T* __restrict__ cos,  // [batch, tokens, 1, head_dim], strided
                const T* __restrict__ sin,  // [batch, tokens, 1, head_dim], strided
                T* __restrict__ out,        // [batch, tokens, heads, head_dim]
                int64_t tokens, int64_t heads, int64_t half, int64_t total_packs,
                int64_t x_stride_batch, int64_t x_stride_token, int64_t x_stride_head,
                int64_t cs_stride_batch, int64_t cs_stride_token) {
    wait_for_inputs();
    using P = Pack<T, N>;
    const int64_t packs_per_row = half / N;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total_packs;
         idx += static_cast<int64_t>(gridDim.x) * kThreads) {
        const int64_t i = (idx % packs_per_row) * N;
        const int64_t row = idx / packs_per_row;  // (b * tokens + t) * heads + h
        const int64_t h = row % heads;
        const int64_t bt = row / heads;
        const int64_t t = bt % tokens;
        const int64_t b = bt / tokens;
        const T* xr = x + b * x_stride_batch + t * x_stride_token + h * x_stride_head;
        const int64_t cs = b * cs_stride_batch + t * cs_stride_token;
        T* outr = out + row * 2 * half;

        const P x1 = *reinterpret_cast<const P*>(xr + i);
        const P x2 = *reinterpret_cast<const P*>(xr + half + i);
        const P c1 = *reinterpret_cast<const P*>(cos + cs + i);
        const P c2 = *reinterpret_cast<const P*>(cos + cs + half + i);
        const P s1 = *reinterpret_cast<const P*>(sin + cs + i);
        const P s2 = *reinterpret_cast<const P*>(sin + cs + half + i);
        P o1;
        P o2;
        rope_rotate(x1, x2, c1, c2, s1, s2, o1, o2);
        *reinterpret_cast<P*>(outr + i) = o1;
        *reinterpret_cast<P*>(outr + half + i) = o2;
    }
}

template <typename T>
cudaError_t rope_for(const void* x, const void* cos, const void* sin, void* out, int64_t batch,
                     int64_t tokens, int64_t heads, int64_t head_dim, int64_t x_stride_batch,
                     int64_t x_stride_token, int64_t x_stride_head, int64_t cs_stride_batch,
                     int64_t cs_stride_token, cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const int64_t half = head_dim / 2;
    // 16-byte accesses need every row start (pointer + strides) and the half offset aligned.
    const int64_t offsets =
        half | x_stride_batch | x_stride_token | x_stride_head | cs_stride_batch | cs_stride_token;
    const bool vec =
        offsets % kVec == 0 && aligned16(x) && aligned16(cos) && aligned16(sin) && aligned16(out);
    const int64_t rows = batch * tokens * heads;
    const T* xt = static_cast<const T*>(x);
    const T* ct = static_cast<const T*>(cos);
    const T* st = static_cast<const T*>(sin);
    T* ot = static_cast<T*>(out);
    return with_pack_width<T>(vec, [&](auto width) {
        constexpr int N = decltype(width)::value;
        const int64_t total = rows * (half / N);
        return launch_elementwise(rope_kernel<T, N>, total, stream, xt, ct, st, ot, tokens, heads,
                                  half, total, x_stride_batch, x_stride_token, x_stride_head,
                                  cs_stride_batch, cs_stride_token);
    });
}

// ---------------------------------------------------------------------------------------------
// silu(gate) * up

// One thread per N consecutive outputs of a row: gate is the first half of the gate_up row, up
// the second; each output is silu_mul_element (silu_mul.cuh), which gemv.cu's down product
// calls too.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    silu_mul_kernel(const T* __restrict__ gate_up,  // [rows, 2 * intermediate]
                    T* __restrict__ out,            // [rows, intermediate]
                    int64_t intermediate, int64_t total_packs) {
    wait_for_inputs();
    using P = Pack<T, N>;
    const int64_t packs_per_row = intermediate / N;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total_packs;
         idx += static_cast<int64_t>(gridDim.x) * kThreads) {
        const int64_t j = (idx % packs_per_row) * N;
        const int64_t r = idx / packs_per_row;
        const T* gr = gate_up + r * 2 * intermediate;
        const P g = *reinterpret_cast<const P*>(gr + j);
        const P u = *reinterpret_cast<const P*>(gr + intermediate + j);
        P o;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            o.v[k] = silu_mul_element(g.v[k], u.v[k]);
        }
        *reinterpret_cast<P*>(out + r * intermediate + j) = o;
    }
}

template <typename T>
cudaError_t silu_mul_for(const void* gate_up, void* out, int64_t rows, int64_t intermediate,
                         cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const bool vec = intermediate % kVec == 0 && aligned16(gate_up) && aligned16(out);
    const T* gt = static_cast<const T*>(gate_up);
    T* ot = static_cast<T*>(out);
    return with_pack_width<T>(vec, [&](auto width) {
        constexpr int N = decltype(width)::value;
        const int64_t total = rows * (intermediate / N);
        return launch_elementwise(silu_mul_kernel<T, N>, total, stream, gt, ot, intermediate,
                                  total);
    });
}

}  // namespace

cudaError_t launch_rms_norm(const void* x, const void* weight, void* out, FusedDtype dtype,
                            int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
    return rms_norm_dispatch(x, nullptr, weight, nullptr, out, dtype, rows, hidden, eps, stream);
}

cudaError_t launch_add_rms_norm(const void* x, const void* residual, const void* weight,
                                void* sum_out, void* out, FusedDtype dtype, int64_t rows,
                                int64_t hidden, float eps, cudaStream_t stream) {
    if (rows != 0 && (residual == nullptr || sum_out == nullptr)) {
        return cudaErrorInvalidValue;  // (null x, weight or out is caught below)
    }
    return rms_norm_dispatch(x, residual, weight, sum_out, out, dtype, rows, hidden, eps, stream);
}

cudaError_t launch_rope(const void* x, const void* cos, const void* sin, void* out,
                        FusedDtype dtype, int64_t batch, int64_t tokens, int64_t heads,
                        int64_t head_dim, int64_t x_stride_batch, int64_t x_stride_token,
                        int64_t x_stride_head, int64_t cs_stride_batch, int64_t cs_stride_token,
                        cudaStream_t stream) {
    if (batch < 0 || tokens < 0 || heads < 0 || head_dim < 0 || head_dim % 2 != 0) {
        return cudaErrorInvalidValue;
    }
    if (batch == 0 || tokens == 0 || heads == 0 || head_dim == 0) {
        return cudaSuccess;
    }
    if (x == nullptr || cos == nullptr || sin == nullptr || out == nullptr) {
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case FusedDtype::kFloat32:
            return rope_for<float>(x, cos, sin, out, batch, tokens, heads, head_dim, x_stride_batch,
                                   x_stride_token, x_stride_head, cs_stride_batch, cs_stride_token,
                                   stream);
        case FusedDtype::kFloat16:
            return rope_for<__half>(x, cos, sin, out, batch, tokens, heads, head_dim,
                                    x_stride_batch, x_stride_token, x_stride_head, cs_stride_batch,
                                    cs_stride_token, stream);
        case FusedDtype::kBFloat16:
            return rope_for<__nv_bfloat16>(x, cos, sin, out, batch, tokens, heads, head_dim,
                                           x_stride_batch, x_stride_token, x_stride_head,
                                           cs_stride_batch, cs_stride_token, stream);
    }
    return cudaErrorInvalidValue;
}

cudaError_t launch_silu_mul(const void* gate_up, void* out, FusedDtype dtype, int64_t rows,
                            int64_t intermediate, cudaStream_t stream) {
    if (rows < 0 || intermediate < 0) {
        return cudaErrorInvalidValue;
    }
    if (rows == 0 || intermediate == 0) {
        return cudaSuccess;
    }
    if (gate_up == nullptr || out == nullptr) {
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case FusedDtype::kFloat32:
            return silu_mul_for<float>(gate_up, out, rows, intermediate, stream);
        case FusedDtype::kFloat16:
            return silu_mul_for<__half>(gate_up, out, rows, intermediate, stream);
        case FusedDtype::kBFloat16:
            return silu_mul_for<__nv_bfloat16>(gate_up, out, rows, intermediate, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
