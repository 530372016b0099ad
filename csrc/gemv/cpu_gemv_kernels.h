// The fp32 CPU matrix-vector products of a decode step, as a plain function on pointers: the
// kernel behind toyllm::gemv on the CPU (cpu_gemv.cpp) and behind the products of
// toyllm::cpu_decode_layer (layer/cpu_decode_layer.cpp), so both give the same bits.
#pragma once

#include <cstdint>

namespace toyllm {

// y[m, j] = sum_i x[m, i] * weight[j, i] for m < rows, j < out (F.linear without bias).
// weight is [out, in] row-major when `row_major` (nn.Linear's layout, the fastest), else the
// transposed view of a contiguous [in, out] matrix (engine/cpu_layout.py's input-major storage).
// Output rows are split over ATen's threads (at::parallel_for); the AVX2+FMA kernels are chosen
// at run time, with portable loops as the fallback. Each y[m, j] is summed in one order that
// does not depend on the number of threads.
void gemv_fp32_cpu(const float* x,       // [rows, in], contiguous
                   const float* weight,  // [out, in] row-major, or [in, out] row-major
                   float* y,             // [rows, out], contiguous
                   int64_t rows, int64_t in, int64_t out, bool row_major);

}  // namespace toyllm
