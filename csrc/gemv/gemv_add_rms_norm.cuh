// Raw CUDA launcher for the product that follows a residual add and an RMSNorm at decode:
// sum = x + residual, y = rms_norm(sum) @ W^T for one row, in one kernel, where
// toyllm::add_rms_norm and toyllm::gemv took two (a Llama layer's q/k/v product after its input
// norm, its gate/up product after the post-attention norm). Plain pointers and sizes only (no
// torch), so nvcc compiles it alone; the operator toyllm::gemv_add_rms_norm (gemv/cuda_gemv.cpp)
// calls it (and runs launch_add_rms_norm then launch_gemv for 2 to 4 rows, or where the row does
// not fit a block's shared memory).
//
// Same bits as launch_add_rms_norm then launch_gemv on fresh (16-byte aligned) outputs: every
// block repeats add_rms_norm's arithmetic with its threads laid out as that kernel's (the same
// accesses per thread, the same warp sums in the same order: rms_norm_threads in
// fused_kernels.cuh), and the product is summed by gemv's row code (gemv_row.cuh) with gemv's
// group and pack sizes.
//
// Launch sizes depend on shapes and the SM count only and nothing is allocated, so every
// launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "gemv/gemv.cuh"

namespace toyllm {

// sum_out[i] = to_dtype(x[i] + residual[i]) for i < in; n = launch_add_rms_norm's normalised
// output for norm_weight and eps; y[j] = to_dtype(sum_i float(n[i]) * float(weight[j, i])) for
// j < out. in >= 1. num_sms: the device's SM count; warps: warps per block, 4, 8 or 16 (the
// grid is at most 16 / warps blocks per SM: gemv_staged.cuh). sum_out and y must not overlap
// the inputs.
// Returns cudaErrorInvalidValue for in < 1, out < 0, num_sms < 1 or other warps, cudaSuccess
// without a launch when out is 0 (sum_out is then not written either: call launch_add_rms_norm),
// the error of cudaFuncSetAttribute when the shared memory exceeds the device's limit, otherwise
// the launch's error.
cudaError_t launch_gemv_add_rms_norm(const void* x,            // [in]
                                     const void* residual,     // [in]
                                     const void* norm_weight,  // [in]
                                     const void* weight,       // [out, in], contiguous
                                     void* sum_out,            // [in]
                                     void* y,                  // [out]
                                     GemvDtype dtype, int64_t in, int64_t out, float eps,
                                     int num_sms, int warps, cudaStream_t stream);

// The same with W = [gate; up] (out = 2 * inter rows, out even), writing h[j] =
// to_dtype(to_dtype(silu(y[j])) * y[inter + j]) for j < inter instead of y: the h that
// launch_silu_mul writes for the y that launch_gemv writes (same bits). Returns
// cudaErrorInvalidValue for an odd out, otherwise as launch_gemv_add_rms_norm.
cudaError_t launch_gemv_add_rms_norm_silu_mul(const void* x,            // [in]
                                              const void* residual,     // [in]
                                              const void* norm_weight,  // [in]
                                              const void* weight,       // [out, in]: gate; up
                                              void* sum_out,            // [in]
                                              void* h,                  // [out / 2]
                                              GemvDtype dtype, int64_t in, int64_t out, float eps,
                                              int num_sms, int warps, cudaStream_t stream);

}  // namespace toyllm
