// CPU implementation of the KV-cache update (a position-indexed copy of rows).
#pragma once

#include <ATen/core/Tensor.h>

namespace toyllm {

// Copies new_k[b, t] -> k_cache[b, positions[b] + t] (and the same for V) on the CPU.
// Expects arguments already validated by the operator (shapes, dtypes, contiguity, and
// positions[b] + num_tokens <= max_seq_len for every b with positions[b] >= 0).
// NOTE: positions[b] < 0 marks an inactive sequence: its rows are skipped.
void kv_update_cpu(at::Tensor& k_cache,           // [batch, max_seq_len, num_kv_heads, head_dim]
                   at::Tensor& v_cache,           // [batch, max_seq_len, num_kv_heads, head_dim]
                   const at::Tensor& new_k,       // [batch, num_tokens, num_kv_heads, head_dim]
                   const at::Tensor& new_v,       // [batch, num_tokens, num_kv_heads, head_dim]
                   const at::Tensor& positions);  // [batch] int32

}  // namespace toyllm
