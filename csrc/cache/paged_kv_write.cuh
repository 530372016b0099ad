// Raw CUDA launcher for the paged K/V write: copies each new token's K and V rows into the pool
// slot the caller mapped it to. Plain pointers and sizes only (no torch), so nvcc compiles it
// alone.
//
// Layout (rows of num_kv_heads * head_dim elements, each row contiguous):
//   pool: [num_slots = num_blocks * block_size, num_kv_heads, head_dim], contiguous
//   new:  [num_tokens, num_kv_heads, head_dim], token t's row at new + t * token_stride
// For each token t with 0 <= slots[t] < num_slots the kernel copies
//   new_k[t] -> k_pool[slots[t]],  new_v[t] -> v_pool[slots[t]]
// in one launch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace toyllm {

// NOTE: slots[t] < 0 marks a padding token: nothing is written for it (vLLM's convention).
// NOTE: slots[t] >= num_slots is skipped too: the host cannot check device slots without a sync,
//       so the kernel makes sure it never writes outside the pool.
// The dtype does not matter (a copy of bytes); element_size is its size in bytes. Slots are read
// on the device, so a launch can be captured in a CUDA graph and replayed with new slots.
//
// Returns cudaErrorInvalidValue for negative sizes or an element_size other than 1, 2, 4, 8;
// otherwise the result of cudaGetLastError() after the launch (cudaSuccess when there was
// nothing to do).
cudaError_t launch_paged_kv_write(void* k_pool,          // [num_slots, num_kv_heads, head_dim]
                                  void* v_pool,          // [num_slots, num_kv_heads, head_dim]
                                  const void* new_k,     // [num_tokens, num_kv_heads, head_dim]
                                  const void* new_v,     // [num_tokens, num_kv_heads, head_dim]
                                  const int64_t* slots,  // [num_tokens], device memory
                                  int64_t num_tokens, int64_t num_slots, int64_t row_elems,
                                  int64_t k_token_stride, int64_t v_token_stride,
                                  int64_t element_size, cudaStream_t stream);

}  // namespace toyllm
