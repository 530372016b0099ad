// The fp32 CPU loop of one-token decode attention, on pointers: the kernel of
// toyllm::decode_attention on fp32 CPU tensors (attention_ops.cpp) and the attention inside
// toyllm::cpu_decode_layer (layer/cpu_decode_layer.cpp), one definition so both give the same
// bits.
#pragma once

#include <cstdint>

namespace toyllm {

// For each sequence b and query head h: out[b, h] = softmax(q[b, h] . K[b, :lens[b]] * scale)
// @ V[b, :lens[b]] over the keys of its KV head h / (Hq / Hkv) (GQA), with a running maximum
// for the softmax; a sequence with lens[b] == 0 gets zeros. Keys and values past lens[b] are
// never read. `longest` is the largest lens[b] (each lens[b] in [0, max_seq_len], checked by
// the caller). The (sequence, head) pairs are split over ATen's threads when there is enough
// work; each pair's sums run in one order whatever the split.
void decode_attention_fp32_cpu(const float* q,        // [batch, Hq, D], contiguous
                               const float* k_cache,  // [batch, max_seq_len, Hkv, D], contiguous
                               const float* v_cache,  // [batch, max_seq_len, Hkv, D], contiguous
                               const int32_t* lens,   // [batch]
                               float* out,            // [batch, Hq, D], contiguous
                               int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t max_seq_len, int64_t longest,
                               float scale);

}  // namespace toyllm
