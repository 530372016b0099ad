// The schemas of every `toyllm::` operator, in one place: what each op takes and returns. The
// implementations register beside their code (TORCH_LIBRARY_IMPL blocks for CPU and CUDA):
//   cache/kv_ops.cpp                kv_update
//   cache/paged_kv_write_ops.cpp    paged_kv_write
//   attention/attention_ops.cpp     decode_attention
//   attention/paged_attention_ops.cpp  paged_decode_attention
//   elementwise/fused_ops.cpp       rms_norm, add_rms_norm, rope, silu_mul
//   elementwise/rope_kv_ops.cpp     rope_kv_update
//   gemv/cpu_gemv.cpp, cuda_gemv.cpp  gemv, gemv_silu_mul and the norm-fused products
//   sampling/argmax_ops.cpp         argmax
//   layer/cpu_decode_step.cpp       cpu_decode_step (CPU only)
// Every op checks its arguments in C++ on every device and raises ValueError (TORCH_CHECK_VALUE)
// naming what was expected and what was given. Tensor(a!) marks an argument written in place.
#include <torch/library.h>

TORCH_LIBRARY(toyllm, m) {
    // KV cache: writes new_k[b, t] / new_v[b, t] at row positions[b] + t of each cache
    // (positions[b] < 0: sequence b is skipped).
    m.def(
        "kv_update(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor new_k, Tensor new_v, "
        "Tensor positions) -> ()");

    // Decode attention: one query token per sequence over the first seq_lens[b] keys (GQA).
    // tile: keys per tile of the CUDA kernel, 0 (FlashAttention-2's choice: 128 up to head_dim
    // 64, else 64), 64 or 128; reverse: its tiles last to first; tensor_cores: pass 1 on tensor
    // cores where it applies. The three set where the CUDA kernel rounds (probes compare them);
    // the CPU checks tile and ignores the rest.
    m.def(
        "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, "
        "int tile=0, bool reverse=True, bool tensor_cores=True) -> Tensor");

    // Paged KV cache (cache/paged_kv_cache.h): pools [num_blocks, block_size, num_kv_heads,
    // head_dim]; token t's K/V rows go to flat slot slots[t] = block * block_size + offset
    // (slots[t] < 0: a padding token, skipped).
    m.def(
        "paged_kv_write(Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor k, Tensor v, Tensor slots) "
        "-> ()");
    // Decode attention over paged K/V: row b attends over its first seq_lens[b] keys, key j in
    // block block_tables[b, j / block_size], read in place. tile, reverse and tensor_cores as
    // for decode_attention.
    m.def(
        "paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_tables, "
        "Tensor seq_lens, float scale, int tile=0, bool reverse=True, bool tensor_cores=True) "
        "-> Tensor");

    // Elementwise ops of a Llama layer.
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
    m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
    m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
    m.def("silu_mul(Tensor gate_up) -> Tensor");
    // RoPE on a decode step's q and k heads and the K/V write, from the fused q/k/v product.
    m.def(
        "rope_kv_update(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor positions, int num_q_heads) -> Tensor");

    // Decode GEMVs: y = F.linear(x, weight) for a few rows, and the same after silu_mul, or
    // after a residual add and RMSNorm (-> (x + residual, y)). warps: warps per block of the
    // one-row CUDA kernel of the norm-fused products, 4, 8 or 16 (the bits do not depend on it).
    m.def("gemv(Tensor x, Tensor weight) -> Tensor");
    m.def("gemv_silu_mul(Tensor gate_up, Tensor weight) -> Tensor");
    m.def(
        "gemv_add_rms_norm(Tensor x, Tensor residual, Tensor norm_weight, float eps, "
        "Tensor weight, int warps=8) -> (Tensor, Tensor)");
    m.def(
        "gemv_add_rms_norm_silu_mul(Tensor x, Tensor residual, Tensor norm_weight, float eps, "
        "Tensor weight, int warps=8) -> (Tensor, Tensor)");
    m.def(
        "gemv_add_rms_norm_rope_kv(Tensor x, Tensor residual, Tensor norm_weight, float eps, "
        "Tensor weight, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor positions, int num_q_heads, int warps=8) -> (Tensor, Tensor)");

    // A whole CPU decode step, fp32, one new token per row: the embedding of tokens, RoPE's
    // cos/sin at positions, every layer (layer_weights: input_norm, qkv, o, post_norm, gate_up,
    // down of each layer in turn): the residual add (none before the first layer), input
    // RMSNorm, q/k/v, RoPE and the K/V write at positions[r] (< 0: a finished row, nothing
    // written), attention over keys 0..positions[r], o, the residual add, post-attention RMSNorm,
    // gate/up, silu(gate) * up and down; then the final RMSNorm and the head -> logits [rows, 1,
    // vocab]: the bits of the ops it replaces. The caches: per layer [rows, max_seq_len, Hkv, D],
    // or with block_tables (int32 [rows, W]) paged pools [num_blocks, block_size, Hkv, D].
    m.def(
        "cpu_decode_step(Tensor tokens, Tensor embedding, Tensor[] layer_weights, "
        "Tensor final_norm, Tensor head_weight, float eps, Tensor inv_freq, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor positions, int num_q_heads, "
        "Tensor? block_tables=None) -> Tensor");

    // Greedy sampling: torch.argmax(logits, dim=-1) of [rows, vocab] logits; flag_nonfinite:
    // -1 for a row that holds a NaN or an inf.
    m.def("argmax(Tensor logits, bool flag_nonfinite=False) -> Tensor");
}
