// Raw CUDA launcher for the KV-cache update: copies new K/V rows into the caches at
// per-sequence positions. Plain pointers and sizes only (no torch), so nvcc compiles it alone.
//
// Layout (all contiguous, row-major):
//   cache: [batch, max_seq_len, num_kv_heads, head_dim]
//   new:   [batch, num_tokens,  num_kv_heads, head_dim]
// For each sequence b with positions[b] >= 0, the kernel copies
//   new[b, t] -> cache[b, positions[b] + t]    for t in [0, num_tokens)
// for K and V in one launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace toyllm {

// Copies new_k/new_v into k_cache/v_cache at the positions held in device memory.
//
// NOTE: positions[b] < 0 marks an inactive sequence: its rows are skipped.
// NOTE: a sequence with positions[b] + num_tokens > max_seq_len is skipped entirely (nothing
//       written for it). The host checks bounds before launching; this is only a guard so the
//       kernel can never write past the end of a sequence's slab.
// The dtype does not matter (the update is a copy of bytes); element_size is its size in bytes.
// Positions are read on the device, so the launch can be captured in a CUDA graph and replayed
// after the positions have moved. One launch for K and V, whatever num_tokens is.
//
// Returns cudaErrorInvalidValue for negative sizes or an element_size other than 1, 2, 4, 8;
// otherwise the result of cudaGetLastError() after the launch (cudaSuccess when there was
// nothing to do).
cudaError_t launch_kv_update(void* k_cache,      // [batch, max_seq_len, num_kv_heads, head_dim]
                             void* v_cache,      // [batch, max_seq_len, num_kv_heads, head_dim]
                             const void* new_k,  // [batch, num_tokens, num_kv_heads, head_dim]
                             const void* new_v,  // [batch, num_tokens, num_kv_heads, head_dim]
                             const int32_t* positions,  // [batch], device memory
                             int64_t batch, int64_t max_seq_len, int64_t num_tokens,
                             int64_t num_kv_heads, int64_t head_dim, int64_t element_size,
                             cudaStream_t stream);

}  // namespace toyllm
