// Raw CUDA launcher for a decode step's q/k/v product after the residual add and input RMSNorm,
// with RoPE and the K/V write in its epilogue: sum = x + residual; qkv = rms_norm(sum) @ W^T;
// then what toyllm::rope_kv_update does with qkv: q = rope(q heads) into q_out, rope(k heads)
// and the v heads into k_cache / v_cache at positions[0]. One kernel where add_rms_norm, gemv
// and rope_kv_update took three, for one row (the operator toyllm::gemv_add_rms_norm_rope_kv,
// gemv/cuda_gemv.cpp, runs those three for more rows). Plain pointers and sizes only.
//
// Same bits as the three kernels: the norm and the product are gemv_add_rms_norm.cu's (the
// staged GEMV with rows paired within each head: gemv_staged.cuh's staged_row_pairs), and each
// pair (i, i + D/2) of a q or k head is rotated with rope_rotate.cuh, rope_kv_update's device
// code, from the product's values rounded to the dtype.
//
// Launch sizes depend on shapes and the SM count only and nothing is allocated, so every
// launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gemv/gemv.cuh"

namespace toyllm {

// x, residual, norm_weight: [in]; weight: [(num_q_heads + 2 * num_kv_heads) * head_dim, in]
// contiguous; cos, sin: [head_dim] (the token's, contiguous); k_cache, v_cache: [max_seq_len,
// num_kv_heads, head_dim] contiguous (one row of the cache); positions: [1] int32 on the device
// (a negative position, or one >= max_seq_len, writes no K/V); sum_out: [in]; q_out:
// [num_q_heads * head_dim]. head_dim even. The shared memory per block is
// gemv_staged_shared_bytes's; warps: warps per block, 4, 8 or 16. Returns
// cudaErrorInvalidValue for bad sizes or warps, otherwise as launch_gemv_add_rms_norm.
cudaError_t launch_gemv_norm_rope_kv(const void* x, const void* residual, const void* norm_weight,
                                     const void* weight, const void* cos, const void* sin,
                                     const int32_t* positions, void* sum_out, void* q_out,
                                     void* k_cache, void* v_cache, GemvDtype dtype, int64_t in,
                                     int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                     int64_t max_seq_len, float eps, int num_sms, int warps,
                                     cudaStream_t stream);

}  // namespace toyllm
