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

#include "attention/decode_attention_cpu.h"
#include "common/op_args.h"

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attention/decode_attention.cuh"
#endif

namespace toyllm {
namespace {

constexpr int64_t kMaxHeadDim = 256;

constexpr const char* kOp = "decode_attention";

// Checks every argument of decode_attention (the same on every device).
void check_decode_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 double scale, int64_t tile) {
    TORCH_CHECK_VALUE(q.dim() == 3,
                      "decode_attention: expected q of 3 dims [batch, num_q_heads, head_dim], got "
                      "shape ",
                      q.sizes());
    TORCH_CHECK_VALUE(k_cache.dim() == 4,
                      "decode_attention: expected k_cache of 4 dims [batch, max_seq_len, "
                      "num_kv_heads, head_dim], got shape ",
                      k_cache.sizes());
    TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(),
                      "decode_attention: expected v_cache of k_cache's shape ", k_cache.sizes(),
                      ", got ", v_cache.sizes());
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_kv_heads = k_cache.size(2);
    TORCH_CHECK_VALUE(k_cache.size(0) == batch && k_cache.size(3) == head_dim,
                      "decode_attention: expected k_cache of shape [", batch,
                      ", max_seq_len, "
                      "num_kv_heads, ",
                      head_dim, "] (q's batch and head_dim), got ", k_cache.sizes());
    TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= kMaxHeadDim,
                      "decode_attention: expected head_dim in [1, ", kMaxHeadDim, "], got ",
                      head_dim);
    TORCH_CHECK_VALUE(max_seq_len >= 1, "decode_attention: expected max_seq_len >= 1, got ",
                      max_seq_len);
    TORCH_CHECK_VALUE(num_kv_heads >= 1 && num_q_heads >= 1 && num_q_heads % num_kv_heads == 0,
                      "decode_attention: expected num_q_heads (", num_q_heads,
                      ") to be a positive multiple of num_kv_heads, got num_kv_heads ",
                      num_kv_heads);

    const at::ScalarType dtype = q.scalar_type();
    check_float_dtype(kOp, "q", dtype);
    check_dtype(kOp, "k_cache", k_cache, dtype, "q's");
    check_dtype(kOp, "v_cache", v_cache, dtype, "q's");
    TORCH_CHECK_VALUE(seq_lens.scalar_type() == at::kInt,
                      "decode_attention: expected seq_lens of dtype torch.int32, got ",
                      dtype_name(seq_lens.scalar_type()));
    TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == batch,
                      "decode_attention: expected seq_lens of shape [", batch,
                      "] (q's batch), got ", seq_lens.sizes());

    const at::Device device = q.device();
    check_device(kOp, "k_cache", k_cache, device, "q's device");
    check_device(kOp, "v_cache", v_cache, device, "q's device");
    check_device(kOp, "seq_lens", seq_lens, device, "q's device");

    check_contiguous(kOp, "q", q);
    check_contiguous(kOp, "k_cache", k_cache);
    check_contiguous(kOp, "v_cache", v_cache);
    TORCH_CHECK_VALUE(seq_lens.is_contiguous(),
                      "decode_attention: expected contiguous seq_lens, got strides ",
                      seq_lens.strides());
    TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0,
                      "decode_attention: expected a finite scale > 0, got ", scale);
    TORCH_CHECK_VALUE(tile == 0 || tile == 64 || tile == 128,
                      "decode_attention: expected tile to be 0 (default), 64 or 128, got ", tile);
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
        TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= max_seq_len,
                          "decode_attention: expected "
                          "seq_lens[",
                          b, "] in [0, max_seq_len ", max_seq_len, "], got ", lens[b]);
        longest = std::max<int64_t>(longest, lens[b]);
    }
    at::Tensor out = at::zeros_like(q);
    if (batch == 0 || longest == 0) {
        return out;
    }
    if (q.scalar_type() == at::kFloat) {
        decode_attention_fp32_cpu(q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(),
                                  v_cache.const_data_ptr<float>(), lens,
                                  out.mutable_data_ptr<float>(), batch, num_q_heads, num_kv_heads,
                                  head_dim, max_seq_len, longest, static_cast<float>(scale));
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
// The kernel's key tiles and their order set where p is rounded (see decode_attention.cuh).
// tile 0 takes FlashAttention-2's forward pass (PyTorch's flash SDPA backend): blocks of 128
// keys for head dims up to 64, of 64 above (walked last to first: reverse, the default).
// Experiments that compare rounding against other attention kernels pass 64 or 128.
int64_t rounding_tile(int64_t tile, int64_t head_dim) {
    if (tile != 0) {
        return tile;  // 64 or 128 (checked)
    }
    return head_dim <= 64 ? 128 : 64;
}

// tensor_cores: pass 1 on tensor cores where it applies (decode_attention.cuh); false keeps the
// CUDA cores (to compare the two implementations).
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& seq_lens,
                                 double scale, int64_t tile, bool reverse, bool tensor_cores) {
    check_decode_attention_args(q, k_cache, v_cache, seq_lens, scale, tile);
    // NOTE: seq_lens live on the device; the kernel clamps them to [0, max_seq_len] instead of
    // checking (a check would need a host sync and break CUDA-graph capture).
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_kv_heads = k_cache.size(2);

    const auto dtype = kernel_dtype<AttentionDtype>(q.scalar_type());
    const bool aligned = reinterpret_cast<uintptr_t>(k_cache.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(v_cache.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 4 == 0;
    const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const DecodeAttentionPlan plan = plan_decode_attention(
        batch, num_q_heads, num_kv_heads, head_dim, max_seq_len, dtype, aligned, sm_count,
        rounding_tile(tile, head_dim), reverse, tensor_cores);
    // Scratch for the split pass: sizes depend on shapes only, so a captured graph keeps them.
    const auto float_options = q.options().dtype(at::kFloat);
    at::Tensor partial_out = at::empty(
        {decode_attention_partial_out_floats(plan, batch, num_q_heads, head_dim)}, float_options);
    at::Tensor partial_stats = at::empty(
        {2 * decode_attention_partial_stat_floats(plan, batch, num_q_heads)}, float_options);
    const int64_t stat_floats = decode_attention_partial_stat_floats(plan, batch, num_q_heads);
    at::Tensor out = at::empty_like(q);

    float* stats = plan.num_splits > 1 ? partial_stats.data_ptr<float>() : nullptr;
    const cudaError_t err = launch_decode_attention(
        q.const_data_ptr(), k_cache.const_data_ptr(), v_cache.const_data_ptr(),
        seq_lens.const_data_ptr<int32_t>(), out.data_ptr(),
        plan.num_splits > 1 ? partial_out.data_ptr<float>() : nullptr, stats,
        stats == nullptr ? nullptr : stats + stat_floats, dtype, batch, num_q_heads, num_kv_heads,
        head_dim, max_seq_len, static_cast<float>(scale), plan,
        at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess,
                "decode_attention: CUDA kernel launch failed: ", cudaGetErrorString(err));
    return out;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("decode_attention", &toyllm::decode_attention_cpu); }

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("decode_attention", &toyllm::decode_attention_cuda); }
#endif
