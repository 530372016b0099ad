// Raw CUDA launcher for a SwiGLU MLP's down product at decode: y = silu_mul(gate_up) @ W^T for one
// row of gate_up in one kernel, which computes h = silu(gate) * up itself instead of reading it
// from a tensor that toyllm::silu_mul's kernel wrote. Plain pointers and sizes only (no torch),
// so nvcc compiles it alone; the operator toyllm::gemv_silu_mul (gemv/cuda_gemv.cpp) calls it
// (and runs launch_silu_mul then launch_gemv for 2 to 4 rows, or where h does not fit).
//
// Same bits as launch_silu_mul then launch_gemv: h is computed by silu_mul's own per-element
// function (silu_mul.cuh) and rounded to the dtype, and the product is summed by gemv's row
// code (gemv_row.cuh) with gemv's group and pack sizes, so y equals launch_gemv's output for the
// h that launch_silu_mul writes (whose base is 16-byte aligned, as every fresh tensor is).
//
// Launch sizes depend on shapes and the SM count only and nothing is allocated, so every
// launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "gemv/gemv.cuh"

namespace toyllm {

// y[j] = to_dtype(sum_i float(h[i]) * float(weight[j, i])) for j < out, with
// h[i] = to_dtype(to_dtype(silu(g)) * u), g = gate_up[i], u = gate_up[in + i] (the value
// launch_silu_mul writes). in == 0 writes zeros. num_sms: the device's SM count (the grid is at
// most 16 / kDefaultBlockWarps blocks per SM: gemv_staged.cuh). 16-byte loads of W when `in` is a
// multiple of 16 bytes and weight is 16-byte aligned, element loads otherwise (as launch_gemv for
// an aligned x); gate_up is read in 16-byte packs when it allows them. Returns
// cudaErrorInvalidValue for negative sizes or num_sms < 1, cudaSuccess without a launch when out is
// 0, the error of cudaFuncSetAttribute when the shared memory exceeds the device's limit, otherwise
// cudaGetLastError() after the launch.
cudaError_t launch_gemv_silu_mul(const void* gate_up,  // [2 * in], contiguous
                                 const void* weight,   // [out, in], contiguous
                                 void* y,              // [out]
                                 GemvDtype dtype, int64_t in, int64_t out, int num_sms,
                                 cudaStream_t stream);

}  // namespace toyllm
