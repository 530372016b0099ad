// The `toyllm::kv_update` operator, callable from C++ through the PyTorch dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

namespace toyllm {

// Writes new_k[b, t] to k_cache[b, positions[b] + t] (and new_v to v_cache) for every t,
// skipping sequences whose position is negative. Dispatches to the CPU or CUDA kernel through
// `toyllm::kv_update` (so profilers and torch.compile see the operator). Validates every
// argument and throws c10::ValueError (Python ValueError) saying what was expected and given.
void kv_update(at::Tensor& k_cache,           // [batch, max_seq_len, num_kv_heads, head_dim]
               at::Tensor& v_cache,           // [batch, max_seq_len, num_kv_heads, head_dim]
               const at::Tensor& new_k,       // [batch, num_tokens, num_kv_heads, head_dim]
               const at::Tensor& new_v,       // [batch, num_tokens, num_kv_heads, head_dim]
               const at::Tensor& positions);  // [batch] int32, on the caches' device

}  // namespace toyllm
