// Raw CUDA launcher for a decode step's RoPE and K/V write: from the fused q/k/v projection of one
// new token per row, rotates q into a new tensor and writes rotated k and raw v into the KV cache
// at each row's position, in one launch. Plain pointers and sizes only (no torch), so nvcc
// compiles it alone.
//
// Layout (Hq query heads, Hkv KV heads, head_dim D, heads side by side as the projection makes
// them: Hq q heads, then Hkv k heads, then Hkv v heads):
//   qkv:   [rows, 1, Hq + 2 * Hkv, D], strided (its last dim contiguous)
//   cos:   [rows, 1, 1, D], sin alike, strided (last dim contiguous; one pair of strides)
//   q_out: [rows, 1, Hq, D], contiguous
//   cache: [rows, max_seq_len, Hkv, D], contiguous (k_cache and v_cache)
// For every row r:  q_out[r, 0]                  = rope(qkv[r, 0, :Hq])
//                   k_cache[r, positions[r]]     = rope(qkv[r, 0, Hq : Hq + Hkv])
//                   v_cache[r, positions[r]]     = qkv[r, 0, Hq + Hkv :]
// with rope's rounding that of toyllm::rope (rope_rotate.cuh), so the bits are those of
// launch_rope followed by launch_kv_update.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "elementwise/fused_kernels.cuh"  // FusedDtype

namespace toyllm {

// NOTE: positions[r] < 0 marks a finished row: nothing is written to its cache rows (its q is
//       still rotated and returned, as toyllm::rope would).
// NOTE: a row with positions[r] >= max_seq_len is skipped the same way: the host checks bounds
//       where it can (CPU); on CUDA this guard keeps the kernel inside the row's slab, as
//       launch_kv_update's does.
// Positions are read on the device and the launch size depends on the shapes only, so the
// launch can be captured in a CUDA graph and replayed after the positions have moved. Launched
// with programmatic dependent launch where enabled (programmatic_launch.cuh). 16-byte
// accesses when head_dim / 2, every stride and every pointer allow them, narrower otherwise;
// the bits do not depend on which.
//
// Returns cudaErrorInvalidValue for negative sizes, an odd head_dim, or a null pointer when
// there is work to do; otherwise cudaGetLastError() after the launch (cudaSuccess when there was
// nothing to do).
cudaError_t launch_rope_kv_update(const void* qkv,           // [rows, 1, Hq + 2 * Hkv, D]
                                  const void* cos,           // [rows, 1, 1, D]
                                  const void* sin,           // [rows, 1, 1, D]
                                  const int32_t* positions,  // [rows], device memory
                                  void* q_out,               // [rows, 1, Hq, D]
                                  void* k_cache,             // [rows, max_seq_len, Hkv, D]
                                  void* v_cache,             // [rows, max_seq_len, Hkv, D]
                                  FusedDtype dtype, int64_t rows, int64_t max_seq_len,
                                  int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t qkv_stride_row, int64_t qkv_stride_head,
                                  int64_t cs_stride_row, cudaStream_t stream);

}  // namespace toyllm
