// Raw CUDA launchers for the fused elementwise ops of a Llama layer: RMSNorm (alone or after the
// residual add), rotate-half RoPE and SwiGLU's silu(gate) * up, one kernel each. Plain pointers
// and sizes only (no torch), so nvcc compiles it alone.
//
// Each op mirrors the plain torch code of models/ (layer_math.py, rope.py) rounding for
// rounding: every intermediate that torch materialises in the model dtype is rounded to that
// dtype here too, and fp32 products and sums are written __fmul_rn / __fadd_rn so nvcc cannot
// contract them into an FMA (which rounds once instead of twice). The only freedom taken is the
// order of RMSNorm's fp32 sum of squares.
//
// Launch sizes depend on shapes only, so every launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace toyllm {

enum class FusedDtype { kFloat32, kFloat16, kBFloat16 };

// Threads of an RMSNorm block (one row) for a row of `packs` accesses: one access per thread in
// whole warps, at most kRmsNormMaxThreads (then threads loop). The fp32 sum of squares runs in
// this block's order: each thread sums its accesses p, p + threads, ... in turn, each warp
// sums its threads (butterfly), then the warp totals are added in warp order. The add+RMSNorm
// GEMV (gemv_add_rms_norm.cu) repeats that order with its own threads, for the same bits.
constexpr int kRmsNormMaxThreads = 1024;
inline int rms_norm_threads(int64_t packs) {
    const int64_t warps = (packs + 31) / 32;
    return static_cast<int>(warps * 32 < kRmsNormMaxThreads ? warps * 32 : kRmsNormMaxThreads);
}

// out[r] = to_dtype(weight * to_dtype(x[r] * rsqrt(mean(x[r]^2) + eps))), x in fp32 for the
// normalisation (the order of models/layer_math.py: normalise in fp32, scale in the dtype).
// One block per row; 16-byte loads when hidden and the pointers allow them.
// Returns cudaErrorInvalidValue for negative sizes or hidden == 0 with rows > 0, otherwise
// cudaGetLastError() after the launch (cudaSuccess when rows == 0).
cudaError_t launch_rms_norm(const void* x,       // [rows, hidden], contiguous
                            const void* weight,  // [hidden]
                            void* out,           // [rows, hidden], contiguous
                            FusedDtype dtype, int64_t rows, int64_t hidden, float eps,
                            cudaStream_t stream);

// sum_out = to_dtype(x + residual) (torch's x + residual: fp32 add, rounded to the dtype), then
// out = launch_rms_norm's output for sum_out, from the rounded sum: a Llama layer's residual add
// and the RMSNorm after it, one kernel. The same kernel code as launch_rms_norm, so out is bit
// for bit rms_norm(sum_out) when all pointers are 16-byte aligned (otherwise it may take the
// narrow path where rms_norm would not, and differ by the order of the fp32 sum of squares).
// Returns cudaErrorInvalidValue for negative sizes, hidden == 0 with rows > 0 or a null pointer
// with rows > 0, otherwise cudaGetLastError() after the launch (cudaSuccess when rows == 0).
cudaError_t launch_add_rms_norm(const void* x,         // [rows, hidden], contiguous
                                const void* residual,  // [rows, hidden], contiguous
                                const void* weight,    // [hidden]
                                void* sum_out,         // [rows, hidden], contiguous
                                void* out,             // [rows, hidden], contiguous
                                FusedDtype dtype, int64_t rows, int64_t hidden, float eps,
                                cudaStream_t stream);

// out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]).
// x may be a strided view (for instance q and k heads sliced out of a fused qkv product): only
// its last dim must be contiguous; its strides (in elements) are passed. cos/sin broadcast over
// heads; their last dim is contiguous, strides of batch and token passed.
// Returns cudaErrorInvalidValue for negative sizes or an odd head_dim, otherwise
// cudaGetLastError() after the launch.
cudaError_t launch_rope(const void* x,    // [batch, tokens, heads, head_dim], strided
                        const void* cos,  // [batch, tokens, 1, head_dim], strided
                        const void* sin,  // [batch, tokens, 1, head_dim], strided
                        void* out,        // [batch, tokens, heads, head_dim], contiguous
                        FusedDtype dtype, int64_t batch, int64_t tokens, int64_t heads,
                        int64_t head_dim, int64_t x_stride_batch, int64_t x_stride_token,
                        int64_t x_stride_head, int64_t cs_stride_batch, int64_t cs_stride_token,
                        cudaStream_t stream);

// out[r, j] = to_dtype(to_dtype(silu(g)) * u) with g = gate_up[r, j], u = gate_up[r, I + j],
// silu(g) = g / (1 + expf(-g)) in fp32: torch's F.silu(gate) * up on the chunks of gate_up.
// Returns cudaErrorInvalidValue for negative sizes, otherwise cudaGetLastError() after the
// launch.
cudaError_t launch_silu_mul(const void* gate_up,  // [rows, 2 * intermediate], contiguous
                            void* out,            // [rows, intermediate], contiguous
                            FusedDtype dtype, int64_t rows, int64_t intermediate,
                            cudaStream_t stream);

}  // namespace toyllm
