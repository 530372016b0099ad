// What decode_attention (a contiguous cache, attention_ops.cpp) and paged_decode_attention (paged
// pools, paged_attention_ops.cpp) share on the host: the checks of q, K, V, seq_lens, scale and
// tile, the CPU's check of a length, and on CUDA the launch set-up (the rounding tile, the plan,
// the split pass's scratch). Each op file keeps what differs: how K's shape relates to q's, and
// for paged the block table.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common/op_args.h"

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>

#include "attention/decode_attention.cuh"
#endif

namespace toyllm {

constexpr int64_t kAttentionMaxHeadDim = 256;

// How an op's messages name itself, its K and V tensors and K's layout.
struct AttentionNames {
    const char* op;      // "decode_attention"
    const char* k;       // "k_cache"
    const char* v;       // "v_cache"
    const char* k_dims;  // "[batch, max_seq_len, num_kv_heads, head_dim]"
};

// The checks both ops make (the same on every device): q [batch, num_q_heads, head_dim], K of 4
// dims [..., num_kv_heads, head_dim] and V of K's shape; head_dim in [1, 256] and num_q_heads a
// multiple of num_kv_heads; q fp32/fp16/bf16 with K and V of its dtype; seq_lens int32 [batch];
// everything on q's device; q, K, V contiguous; a finite scale > 0 and tile 0, 64 or 128. Not
// checked here: K's other dims against q's, and seq_lens' strides (each op, its own message).
inline void check_attention_args(const AttentionNames& n, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& seq_lens, double scale,
                                 int64_t tile) {
    TORCH_CHECK_VALUE(q.dim() == 3, n.op,
                      ": expected q of 3 dims [batch, num_q_heads, head_dim], got shape ",
                      q.sizes());
    check_kv_pair(n.op, n.k, k, n.v, v, n.k_dims);
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t num_kv_heads = k.size(2);
    TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= kAttentionMaxHeadDim, n.op,
                      ": expected head_dim in [1, ", kAttentionMaxHeadDim, "], got ", head_dim);
    TORCH_CHECK_VALUE(num_kv_heads >= 1 && num_q_heads >= 1 && num_q_heads % num_kv_heads == 0,
                      n.op, ": expected num_q_heads (", num_q_heads,
                      ") to be a positive multiple of num_kv_heads, got num_kv_heads ",
                      num_kv_heads);

    const at::ScalarType dtype = q.scalar_type();
    check_float_dtype(n.op, "q", dtype);
    check_dtype(n.op, n.k, k, dtype, "q's");
    check_dtype(n.op, n.v, v, dtype, "q's");
    TORCH_CHECK_VALUE(seq_lens.scalar_type() == at::kInt, n.op,
                      ": expected seq_lens of dtype torch.int32, got ",
                      dtype_name(seq_lens.scalar_type()));
    TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == batch, n.op,
                      ": expected seq_lens of shape [", batch, "] (q's batch), got ",
                      seq_lens.sizes());

    const at::Device device = q.device();
    check_device(n.op, n.k, k, device, "q's device");
    check_device(n.op, n.v, v, device, "q's device");
    check_device(n.op, "seq_lens", seq_lens, device, "q's device");
    check_contiguous(n.op, "q", q);
    check_contiguous(n.op, n.k, k);
    check_contiguous(n.op, n.v, v);
    TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0, n.op,
                      ": expected a finite scale > 0, got ", scale);
    TORCH_CHECK_VALUE(tile == 0 || tile == 64 || tile == 128, n.op,
                      ": expected tile to be 0 (default), 64 or 128, got ", tile);
}

// On the CPU a length is read for free, so its range is checked: seq_lens[b] in [0, bound];
// `bound_name` is how the message names the bound ("max_seq_len ").
inline void check_seq_len(const char* op, int64_t b, int32_t len, int64_t bound,
                          const char* bound_name) {
    TORCH_CHECK_VALUE(len >= 0 && len <= bound, op, ": expected seq_lens[", b, "] in [0, ",
                      bound_name, bound, "], got ", len);
}

// On the CPU a block table is read for free, so the entries that keys 0..keys-1 of sequence
// `row` reach are checked: each names a block of a pool of num_blocks. `table`: the sequence's
// row of the table; `keys_name` says where `keys` came from ("seq_lens[0] = 9").
inline void check_table_row(const char* op, int64_t row, const int32_t* table, int64_t keys,
                            int64_t block_size, int64_t num_blocks, const std::string& keys_name) {
    const int64_t used = (keys + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
        TORCH_CHECK_VALUE(table[i] >= 0 && table[i] < num_blocks, op, ": expected block_tables[",
                          row, ", ", i, "] in [0, num_blocks ", num_blocks,
                          ") (it holds keys of ", keys_name, "), got ", table[i]);
    }
}

#ifdef WITH_CUDA_KERNELS
// The key tile where the kernel rounds p (see decode_attention.cuh). tile 0 takes
// FlashAttention-2's forward pass (PyTorch's flash SDPA backend): blocks of 128 keys for head
// dims up to 64, of 64 above (walked last to first: reverse, the default). Experiments that
// compare rounding against other attention kernels pass 64 or 128.
inline int64_t rounding_tile(int64_t tile, int64_t head_dim) {
    if (tile != 0) {
        return tile;  // 64 or 128 (checked)
    }
    return head_dim <= 64 ? 128 : 64;
}

// The plan of a launch over `keys` keys per row (a contiguous cache's max_seq_len, a block
// table's capacity) and the scratch of its split pass: sizes depend on shapes only, so a
// captured graph keeps them.
struct AttentionLaunch {
    AttentionDtype dtype;
    DecodeAttentionPlan plan;
    at::Tensor partial_out;    // [batch, num_q_heads, num_splits, head_dim] fp32 (split only)
    at::Tensor partial_stats;  // maxima then sums, [batch, num_q_heads, num_splits] each
    int64_t stat_floats;       // floats of the maxima (and of the sums)

    // The kernels' scratch pointers: null with one chunk (no combine pass).
    float* partial_out_ptr() {
        return plan.num_splits > 1 ? partial_out.data_ptr<float>() : nullptr;
    }
    float* partial_max_ptr() {
        return plan.num_splits > 1 ? partial_stats.data_ptr<float>() : nullptr;
    }
    float* partial_sum_ptr() {
        return plan.num_splits > 1 ? partial_stats.data_ptr<float>() + stat_floats : nullptr;
    }
};

// tensor_cores: pass 1 on tensor cores where it applies (decode_attention.cuh); false keeps the
// CUDA cores (to compare the two implementations). Arguments checked (check_attention_args).
inline AttentionLaunch plan_attention_launch(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, int64_t keys, int64_t tile,
                                             bool reverse, bool tensor_cores) {
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t num_kv_heads = k.size(2);
    const auto dtype = kernel_dtype<AttentionDtype>(q.scalar_type());
    const bool aligned = reinterpret_cast<uintptr_t>(k.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(v.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 4 == 0;
    const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const DecodeAttentionPlan plan = plan_decode_attention(
        batch, num_q_heads, num_kv_heads, head_dim, keys, dtype, aligned, sm_count,
        rounding_tile(tile, head_dim), reverse, tensor_cores);
    const auto float_options = q.options().dtype(at::kFloat);
    const int64_t stat_floats = decode_attention_partial_stat_floats(plan, batch, num_q_heads);
    return {dtype, plan,
            at::empty({decode_attention_partial_out_floats(plan, batch, num_q_heads, head_dim)},
                      float_options),
            at::empty({2 * stat_floats}, float_options), stat_floats};
}
#endif

}  // namespace toyllm
