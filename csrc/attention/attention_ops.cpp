// The CPU and CUDA implementations of `toyllm::decode_attention` (schema: registration.cpp): one
// query token per sequence attends over the first seq_lens[b] keys of its KV-cache rows
// (GQA-aware). CPU: a loop in fp32 (decode_attention_cpu.cpp), and for fp16/bf16 ATen ops
// (matmul + masked softmax in fp32). CUDA: the flash-decoding kernels of decode_attention.cu,
// whose key tiles, their order and the kind of core of pass 1 are the operator's tile, reverse
// and tensor_cores arguments.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/decode_attention_args.h"
#include "attention/decode_attention_cpu.h"

#ifdef WITH_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#endif

namespace toyllm {
namespace {

constexpr AttentionNames kNames{"decode_attention", "k_cache", "v_cache",
                                "[batch, max_seq_len, num_kv_heads, head_dim]"};

// Checks every argument of decode_attention (the same on every device): the checks it shares
// with paged_decode_attention (decode_attention_args.h), then the cache's batch, head_dim and
// length against q's, and seq_lens' strides.
void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 double scale, int64_t tile) {
    check_attention_args(kNames, q, k_cache, v_cache, seq_lens, scale, tile);
    const int64_t batch = q.size(0);
    const int64_t head_dim = q.size(2);
    TORCH_CHECK_VALUE(k_cache.size(0) == batch && k_cache.size(3) == head_dim,
                      "decode_attention: expected k_cache of shape [", batch,
                      ", max_seq_len, num_kv_heads, ", head_dim,
                      "] (q's batch and head_dim), got ", k_cache.sizes());
    TORCH_CHECK_VALUE(k_cache.size(1) >= 1, "decode_attention: expected max_seq_len >= 1, got ",
                      k_cache.size(1));
    TORCH_CHECK_VALUE(seq_lens.is_contiguous(),
                      "decode_attention: expected contiguous seq_lens, got strides ",
                      seq_lens.strides());
}

// The CPU has no key tiles and no tensor cores: `tile` is checked as on CUDA (so a call that
// fails on one device fails on the other), `reverse` and `tensor_cores` change nothing here.
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& seq_lens, double scale,
                                int64_t tile, bool /*reverse*/, bool /*tensor_cores*/) {
    check_decode_attention_args(q, k_cache, v_cache, seq_lens, scale, tile);
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_kv_heads = k_cache.size(2);
    const int64_t group = num_q_heads / num_kv_heads;

    // On the CPU the lengths can be read for free, so their range is checked.
    const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; ++b) {
        check_seq_len(kNames.op, b, lens[b], max_seq_len, "max_seq_len ");
        longest = std::max<int64_t>(longest, lens[b]);
    }
    at::Tensor out = at::zeros_like(q);
    if (batch == 0 || longest == 0) {
        return out;
    }
    if (q.scalar_type() == at::kFloat) {
        CacheRows rows;
        rows.max_seq_len = max_seq_len;
        decode_attention_fp32_cpu(q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(),
                                  v_cache.const_data_ptr<float>(), rows, lens,
                                  out.mutable_data_ptr<float>(), batch, num_q_heads, num_kv_heads,
                                  head_dim, longest, static_cast<float>(scale));
        return out;
    }

    // Only the first `longest` keys can be valid: [B, L, Hkv, D] -> [B, Hkv, L, D], in fp32.
    const at::Tensor k = k_cache.narrow(1, 0, longest).to(at::kFloat).permute({0, 2, 1, 3});
    // Key j of sequence b is valid when j < seq_lens[b]; invalid values are zeroed so that
    // whatever the cache holds past a sequence's end (even inf or NaN) cannot leak in.
    const at::Tensor key_index = at::arange(longest, seq_lens.options().dtype(at::kLong));
    const at::Tensor masked = key_index.unsqueeze(0) >= seq_lens.to(at::kLong).unsqueeze(1);
    const at::Tensor v = v_cache.narrow(1, 0, longest)
                             .to(at::kFloat)
                             .permute({0, 2, 1, 3})
                             .masked_fill(masked.view({batch, 1, longest, 1}), 0.0);
    // q [B, Hq, D] -> [B, Hkv, G, D]: the G query heads of a group share one KV head.
    const at::Tensor qf = q.to(at::kFloat).view({batch, num_kv_heads, group, head_dim});
    at::Tensor scores = at::matmul(qf, k.transpose(-1, -2)).mul_(scale);  // [B, Hkv, G, L]
    scores.masked_fill_(masked.view({batch, 1, 1, longest}),
                        -std::numeric_limits<float>::infinity());
    at::Tensor probs = at::softmax(scores, -1);
    // A sequence with no keys has all scores -inf (softmax NaN): its output is zero.
    const at::Tensor empty = (seq_lens == 0).view({batch, 1, 1, 1});
    probs.masked_fill_(empty, 0.0);
    const at::Tensor attended = at::matmul(probs, v);  // [B, Hkv, G, D]
    out.copy_(attended.reshape({batch, num_q_heads, head_dim}));
    return out;
}

#ifdef WITH_CUDA_KERNELS
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 double scale, int64_t tile, bool reverse, bool tensor_cores) {
    check_decode_attention_args(q, k_cache, v_cache, seq_lens, scale, tile);
    // NOTE: seq_lens live on the device; the kernel clamps them to [0, max_seq_len] instead of
    // checking (a check would need a host sync and break CUDA-graph capture).
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t max_seq_len = k_cache.size(1);
    AttentionLaunch launch =
        plan_attention_launch(q, k_cache, v_cache, max_seq_len, tile, reverse, tensor_cores);
    at::Tensor out = at::empty_like(q);
    check_cuda_launch(
        kNames.op,
        launch_decode_attention(
            q.const_data_ptr(), k_cache.const_data_ptr(), v_cache.const_data_ptr(),
            seq_lens.const_data_ptr<int32_t>(), out.data_ptr(), launch.partial_out_ptr(),
            launch.partial_max_ptr(), launch.partial_sum_ptr(), launch.dtype, q.size(0),
            q.size(1), k_cache.size(2), q.size(2), max_seq_len, static_cast<float>(scale),
            launch.plan, at::cuda::getCurrentCUDAStream().stream()));
    return out;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("decode_attention", &toyllm::decode_attention_cpu); }

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("decode_attention", &toyllm::decode_attention_cuda); }
#endif
