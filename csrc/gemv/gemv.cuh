// Raw CUDA launcher for the matrix-vector products of a decode step: y = x @ W^T (nn.Linear's
// [out, in] weight, no bias) for at most kGemvMaxRows rows of x. Plain pointers and sizes only
// (no torch), so nvcc compiles it alone; the operator toyllm::gemv (gemv/cuda_gemv.cpp) calls it.
//
// Every product sums in fp32 (x and W widened exactly) and rounds once to the dtype when it
// writes y. The sums run in another order than cuBLAS's: bf16/fp16 results agree with an fp32
// product rounded once to within 1 ulp, fp32 results to a few fp32 ulps of the dot product.
// The order depends on the shapes only, so a call repeats its bits.
//
// Launch sizes depend on shapes only and nothing is allocated, so every launch can be captured
// in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace toyllm {

enum class GemvDtype { kFloat32, kFloat16, kBFloat16 };

// Rows of x one launch takes: each row is a register accumulator per thread.
constexpr int64_t kGemvMaxRows = 4;

// y[r, j] = to_dtype(sum_i float(x[r, i]) * float(weight[j, i])) for r < rows, j < out.
// in == 0 writes zeros. 16-byte loads when `in` is a multiple of 16 bytes and x and weight are
// 16-byte aligned; element loads otherwise.
// Returns cudaErrorInvalidValue for negative sizes or rows > kGemvMaxRows, cudaSuccess without a
// launch when rows or out is 0, otherwise cudaGetLastError() after the launch.
cudaError_t launch_gemv(const void* x,       // [rows, in], contiguous
                        const void* weight,  // [out, in], contiguous
                        void* y,             // [rows, out], contiguous
                        GemvDtype dtype, int64_t rows, int64_t in, int64_t out,
                        cudaStream_t stream);

// Shared memory one block of a staged one-row GEMV (gemv_staged.cuh: gemv_silu_mul and the
// gemv_add_rms_norm kernels) takes for an x of `in` elements: x staged as [in] of the dtype, plus
// the kernel's static memory. Where it exceeds the device's opt-in limit per block
// (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB on an H100, so in <= ~116k bf16 or ~58k fp32),
// those launches cannot run: call the separate kernels (launch_silu_mul / launch_add_rms_norm,
// then launch_gemv) instead. Defined in gemv_silu_mul.cu.
size_t gemv_staged_shared_bytes(GemvDtype dtype, int64_t in);

}  // namespace toyllm
