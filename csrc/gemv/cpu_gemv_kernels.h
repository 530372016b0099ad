// The fp32 CPU matrix-vector products of a decode step, as a plain function on pointers: the
// kernel behind toyllm::gemv on the CPU (cpu_gemv.cpp) and behind the products of
// toyllm::cpu_decode_step (layer/), so both give the same bits; the step's may also read its
// weights in bf16 (GemvWeight below).
#pragma once

#include <cstdint>

namespace toyllm {

// The instruction sets the kernels come in, from the portable loops up. The product takes
// the best one the CPU runs (cpu_gemv_best_isa), once per process.
enum class GemvIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best GemvIsa this CPU runs (AVX-512F, else AVX2 + FMA, else the portable loops).
GemvIsa cpu_gemv_best_isa();

// Whether this CPU runs the kernels of `isa`.
bool cpu_gemv_supports(GemvIsa isa);

// y[m, j] = sum_i x[m, i] * weight[j, i] for m < rows, j < out (F.linear without bias).
// weight is [out, in] row-major when `row_major` (nn.Linear's layout, the fastest), else the
// transposed view of a contiguous [in, out] matrix (engine/cpu_layout.py's input-major storage).
// Output rows are split over ATen's threads (at::parallel_for), in whole blocks of the
// kernel's rows, so each y[m, j] is summed in one order that does not depend on the number of
// threads; the order does depend on the instruction set (16 partial sums under AVX-512 and 8
// under AVX2 for the row-major kernel; the input-major kernels sum each output in input order
// with one rounding per fused multiply-add, the same bits under AVX-512 and AVX2).
void gemv_fp32_cpu(const float* x,       // [rows, in], contiguous
                   const float* weight,  // [out, in] row-major, or [in, out] row-major
                   float* y,             // [rows, out], contiguous
                   int64_t rows, int64_t in, int64_t out, bool row_major);

// The same product with the kernels of `isa`, which the CPU must run (cpu_gemv_supports):
// what the tests compare the instruction sets with; the product itself calls gemv_fp32_cpu.
// For callers that run their own parallel region (toyllm::cpu_decode_step): how many of
// `threads` threads gemv_fp32_cpu would split a row-major [out, in] product over (each takes at
// least 64 KiB of weights), and the product's row-major output rows [j0, j1) split into `parts`
// even shares of whole kernel blocks, share `part` computed on the calling thread with the best
// instruction set. Each y[m, j] gets gemv_fp32_cpu's bits whatever the split.
int64_t gemv_fp32_cpu_parts(int64_t in, int64_t out, int64_t threads);
void gemv_fp32_cpu_share(const float* x,       // [rows, in], contiguous
                         const float* weight,  // [out, in] row-major
                         float* y,             // [rows, out], contiguous; [., j0, j1) written
                         int64_t rows, int64_t in, int64_t out, int64_t j0, int64_t j1,
                         int64_t part, int64_t parts);

// A row-major [out, in] weight stored in fp32 or in bf16 (its bits; exactly one pointer set).
// A bf16 weight is widened to the fp32 of the same value as it is read, then summed as an fp32
// weight of that value would be: the product is the fp32 product's bits on the rounded weights,
// from half the bytes (what a decode step streams).
struct GemvWeight {
    const float* fp32 = nullptr;
    const uint16_t* bf16 = nullptr;
};
void gemv_fp32_cpu_share(const float* x, GemvWeight weight, float* y, int64_t rows, int64_t in,
                         int64_t out, int64_t j0, int64_t j1, int64_t part, int64_t parts);

void gemv_fp32_cpu_isa(GemvIsa isa, const float* x, const float* weight, float* y,
                       int64_t rows, int64_t in, int64_t out, bool row_major);

// gemv_fp32_cpu_isa for a row-major weight stored in fp32 or bf16 (GemvWeight): the same
// split over ATen's threads, and for a bf16 weight the fp32 product's bits on its values.
void gemv_fp32_cpu_isa(GemvIsa isa, const float* x, GemvWeight weight, float* y, int64_t rows,
                       int64_t in, int64_t out);

}  // namespace toyllm
