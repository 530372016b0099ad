// Raw CUDA launcher for the greedy pick of a decode step: the index of the largest logit of
// each row, as torch.argmax(logits, dim=-1) gives it. Plain pointers and sizes only (no torch),
// so nvcc compiles it alone; the operator toyllm::argmax (sampling/argmax_ops.cpp) calls it.
//
// Order (torch's, checked on the CPU): NaN is above every number and the FIRST NaN wins; among
// numbers the largest wins and, among equal values (-0.0 == +0.0, -inf == -inf), the FIRST
// index. fp16/bf16 values are compared after their exact widening to fp32, so the result is the
// one of torch.argmax(logits.float(), -1) too.
//
// Each row is split over `parts` blocks (about two blocks per SM in all, at least ~2 16-byte
// loads per thread); every block writes its (value, index) to a scratch buffer and the last
// block of a row to finish (a per-row counter, zeroed by a cudaMemsetAsync in the same stream
// before the kernel) reduces the row's partials and writes the index. One memset and one
// kernel per call, no host sync, launch sizes from the shapes and the SM count only, scratch
// supplied by the caller: a call can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace toyllm {

enum class ArgmaxDtype { kFloat32, kFloat16, kBFloat16 };

// Blocks a row of `vocab` logits is split over, for `rows` rows on a GPU of `sm_count` SMs.
// Always >= 1 (vocab >= 1); 1 means no scratch and no memset.
int64_t argmax_parts(ArgmaxDtype dtype, int64_t rows, int64_t vocab, int sm_count);

// Bytes of scratch launch_argmax needs for these sizes (0 when every row is one block).
int64_t argmax_scratch_bytes(ArgmaxDtype dtype, int64_t rows, int64_t vocab, int sm_count);

// out[r] = the index of the largest logits[r * row_stride + i] over i < vocab, for r < rows
// (order above). 16-byte loads when logits and every row start 16-byte aligned, element loads
// otherwise. `scratch` holds at least argmax_scratch_bytes(...) bytes, 16-byte aligned (it may
// be null when that is 0); its contents on entry do not matter and it may be reused once the
// stream has passed the kernel.
// flag_nonfinite: out[r] = -1 instead when row r holds a NaN or an inf (found in the same pass,
// so the engine's check of its logits costs no kernel of its own).
// Returns cudaErrorInvalidValue for rows < 0, vocab < 1, a short or missing scratch, or a
// misaligned scratch; cudaSuccess without a launch when rows is 0; otherwise the first error of
// the memset and the launch.
cudaError_t launch_argmax(const void* logits,  // [rows, vocab], row r at logits + r * row_stride
                          int64_t row_stride,  // elements between rows (unused when rows == 1)
                          int64_t* out,        // [rows], int64
                          void* scratch,       // argmax_scratch_bytes(...) bytes
                          int64_t scratch_bytes, ArgmaxDtype dtype, int64_t rows, int64_t vocab,
                          int sm_count, bool flag_nonfinite, cudaStream_t stream);

}  // namespace toyllm
