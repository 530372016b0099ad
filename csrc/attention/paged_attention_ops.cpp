// The CPU and CUDA implementations of `toyllm::paged_decode_attention` (schema:
// registration.cpp): one query token per sequence attends over the first seq_lens[b] keys of its
// blocks, read in place through its row of the block table (GQA-aware; no gather into a
// contiguous copy). Key j of row b is at pool slot block_tables[b, j / block_size] * block_size
// + j % block_size. CPU, fp32: decode_attention's loop (decode_attention_cpu.h), through the
// table; fp16/bf16: a loop in fp32 per (row, KV head), its query heads sharing each K/V read.
// CUDA: decode_attention's flash-decoding kernels, reading each key row through the table.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attention/decode_attention_args.h"
#include "attention/decode_attention_cpu.h"

#ifdef WITH_CUDA_KERNELS
#include <c10/cuda/CUDAGuard.h>
#endif

namespace toyllm {
namespace {

constexpr AttentionNames kNames{"paged_decode_attention", "k_pool", "v_pool",
                                "[num_blocks, block_size, num_kv_heads, head_dim]"};

// Checks every argument of paged_decode_attention (the same on every device): the checks it
// shares with decode_attention (decode_attention_args.h), then the pools' head_dim, block count
// and block size, the block table, and seq_lens' strides.
void check_paged_decode_attention_args(const at::Tensor& q, const at::Tensor& k_pool,
                                       const at::Tensor& v_pool, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, double scale, int64_t tile) {
    check_attention_args(kNames, q, k_pool, v_pool, seq_lens, scale, tile);
    const int64_t batch = q.size(0);
    const int64_t head_dim = q.size(2);
    const int64_t num_blocks = k_pool.size(0);
    const int64_t block_size = k_pool.size(1);
    TORCH_CHECK_VALUE(k_pool.size(3) == head_dim,
                      "paged_decode_attention: expected k_pool of shape [num_blocks, block_size, "
                      "num_kv_heads, ",
                      head_dim, "] (q's head_dim), got ", k_pool.sizes());
    TORCH_CHECK_VALUE(num_blocks >= 1 && num_blocks <= std::numeric_limits<int32_t>::max(),
                      "paged_decode_attention: expected num_blocks (k_pool.size(0)) in [1, ",
                      std::numeric_limits<int32_t>::max(), "], got ", num_blocks);
    // The kernels find a key's block and offset by a shift and a mask; every power of two is a
    // whole number of the CUDA kernels' rows per copy, whatever their 64- or 128-key tiles.
    TORCH_CHECK_VALUE(block_size >= 1 && (block_size & (block_size - 1)) == 0,
                      "paged_decode_attention: expected block_size (k_pool.size(1)) a power of "
                      "two, got ",
                      block_size);
    TORCH_CHECK_VALUE(block_tables.scalar_type() == at::kInt,
                      "paged_decode_attention: expected block_tables of dtype torch.int32, got ",
                      dtype_name(block_tables.scalar_type()));
    TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == batch &&
                          block_tables.size(1) >= 1,
                      "paged_decode_attention: expected block_tables of shape [", batch,
                      ", max_blocks >= 1] (q's batch), got ", block_tables.sizes());
    TORCH_CHECK_VALUE(block_tables.size(1) <= std::numeric_limits<int32_t>::max() / block_size,
                      "paged_decode_attention: expected block_tables.size(1) * block_size <= ",
                      std::numeric_limits<int32_t>::max(), ", got ", block_tables.size(1), " * ",
                      block_size);
    check_device(kNames.op, "block_tables", block_tables, q.device(), "q's device");
    // Rows of a wider table are fine (a column slice of cache.block_tables()): entries of a row
    // side by side, rows any distance apart.
    TORCH_CHECK_VALUE(
        (block_tables.size(1) <= 1 || block_tables.stride(1) == 1) && block_tables.stride(0) >= 0,
        "paged_decode_attention: expected block_tables with each row contiguous (stride 1 "
        "between entries), got strides ",
        block_tables.strides(), " for shape ", block_tables.sizes());
    check_contiguous(kNames.op, "seq_lens", seq_lens);
}

// A K or V row of fp16 / bf16 values as floats, converted into `buf`.
template <typename T>
inline const float* row_as_float(const T* row, int64_t n, float* buf) {
    for (int64_t d = 0; d < n; ++d) {
        buf[d] = static_cast<float>(row[d]);
    }
    return buf;
}

// One (row b, KV head) pair at a time, split over threads (at::parallel_for) when there is enough
// work: the group's query heads score each key as it is read (one K/V read for the group), with a
// running maximum for the softmax, in fp32. Keys past seq_lens[b] are never read.
template <typename T>
void paged_decode_attention_cpu_typed(const at::Tensor& q, const at::Tensor& k_pool,
                                      const at::Tensor& v_pool, const at::Tensor& block_tables,
                                      const int32_t* lens, int64_t longest, double scale,
                                      at::Tensor& out) {
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t block_size = k_pool.size(1);
    const int64_t num_kv_heads = k_pool.size(2);
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t slot_stride = num_kv_heads * head_dim;  // contiguous pools (checked)
    const int64_t table_stride = block_tables.stride(0);
    const int shift = __builtin_ctzll(static_cast<uint64_t>(block_size));  // a power of two
    const T* qp = q.const_data_ptr<T>();
    const T* kp = k_pool.const_data_ptr<T>();
    const T* vp = v_pool.const_data_ptr<T>();
    const int32_t* tables = block_tables.const_data_ptr<int32_t>();
    T* op = out.mutable_data_ptr<T>();
    const float sc = static_cast<float>(scale);
    const int64_t pair_products = std::max<int64_t>(1, 2 * group * longest * head_dim);
    const int64_t grain = std::max<int64_t>(1, kAttentionGrainProducts / pair_products);
    at::parallel_for(0, batch * num_kv_heads, grain, [&](int64_t first, int64_t last) {
        std::vector<float> scores(static_cast<size_t>(group * longest));
        std::vector<float> qf(static_cast<size_t>(group * head_dim));
        std::vector<float> acc(static_cast<size_t>(group * head_dim));
        std::vector<float> best(static_cast<size_t>(group));
        std::vector<float> total(static_cast<size_t>(group));
        std::vector<float> row(static_cast<size_t>(head_dim));
        for (int64_t pair = first; pair < last; ++pair) {
            const int64_t b = pair / num_kv_heads;
            const int64_t kvh = pair % num_kv_heads;
            const int64_t len = lens[b];
            if (len == 0) {
                continue;  // no keys: the output stays zero
            }
            const int32_t* table = tables + b * table_stride;
            // Element offset of key j of this KV head in a pool.
            auto key_offset = [&](int64_t j) {
                const int64_t slot =
                    (static_cast<int64_t>(table[j >> shift]) << shift) + (j & (block_size - 1));
                return slot * slot_stride + kvh * head_dim;
            };
            const int64_t h0 = kvh * group;  // first query head of the group
            for (int64_t i = 0; i < group * head_dim; ++i) {
                qf[i] = static_cast<float>(qp[(b * num_q_heads + h0) * head_dim + i]);
            }
            std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
            for (int64_t j = 0; j < len; ++j) {
                const float* kj = row_as_float(kp + key_offset(j), head_dim, row.data());
                for (int64_t g = 0; g < group; ++g) {
                    const float s = dot8(qf.data() + g * head_dim, kj, head_dim) * sc;
                    scores[g * len + j] = s;
                    best[g] = std::max(best[g], s);
                }
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            std::fill(total.begin(), total.end(), 0.f);
            for (int64_t j = 0; j < len; ++j) {
                const float* vj = row_as_float(vp + key_offset(j), head_dim, row.data());
                for (int64_t g = 0; g < group; ++g) {
                    const float p = std::exp(scores[g * len + j] - best[g]);
                    total[g] += p;
                    float* ag = acc.data() + g * head_dim;
                    for (int64_t d = 0; d < head_dim; ++d) {
                        ag[d] += p * vj[d];
                    }
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                T* oh = op + (b * num_q_heads + h0 + g) * head_dim;
                const float inv = 1.f / total[g];
                for (int64_t d = 0; d < head_dim; ++d) {
                    oh[d] = static_cast<T>(acc[g * head_dim + d] * inv);
                }
            }
        }
    });
}

// The CPU has no key tiles and no tensor cores: `tile` is checked as on CUDA (so a call that
// fails on one device fails on the other), `reverse` and `tensor_cores` change nothing here.
at::Tensor paged_decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_pool,
                                      const at::Tensor& v_pool, const at::Tensor& block_tables,
                                      const at::Tensor& seq_lens, double scale, int64_t tile,
                                      bool /*reverse*/, bool /*tensor_cores*/) {
    check_paged_decode_attention_args(q, k_pool, v_pool, block_tables, seq_lens, scale, tile);
    const int64_t batch = q.size(0);
    const int64_t num_blocks = k_pool.size(0);
    const int64_t block_size = k_pool.size(1);
    const int64_t width = block_tables.size(1);
    const int64_t table_stride = block_tables.stride(0);

    // On the CPU the lengths and the table entries they use can be read for free, so they are
    // checked: a length within the row's table, an existing block for every key it covers.
    const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
    const int32_t* tables = block_tables.const_data_ptr<int32_t>();
    int64_t longest = 0;
    for (int64_t b = 0; b < batch; ++b) {
        check_seq_len(kNames.op, b, lens[b], width * block_size,
                      "block_tables.size(1) * block_size = ");
        check_table_row(kNames.op, b, tables + b * table_stride, lens[b], block_size, num_blocks,
                        "seq_lens[" + std::to_string(b) + "] = " + std::to_string(lens[b]));
        longest = std::max<int64_t>(longest, lens[b]);
    }
    at::Tensor out = at::zeros_like(q);
    if (batch == 0 || longest == 0) {
        return out;
    }
    switch (q.scalar_type()) {
        case at::kHalf:
            paged_decode_attention_cpu_typed<at::Half>(q, k_pool, v_pool, block_tables, lens,
                                                       longest, scale, out);
            break;
        case at::kBFloat16:
            paged_decode_attention_cpu_typed<at::BFloat16>(q, k_pool, v_pool, block_tables, lens,
                                                           longest, scale, out);
            break;
        default: {  // fp32: the loop of decode_attention and cpu_decode_step, the same bits
            CacheRows rows;
            rows.tables = tables;
            rows.table_stride = table_stride;
            rows.block_shift = __builtin_ctzll(static_cast<uint64_t>(block_size));
            decode_attention_fp32_cpu(q.const_data_ptr<float>(), k_pool.const_data_ptr<float>(),
                                      v_pool.const_data_ptr<float>(), rows, lens,
                                      out.mutable_data_ptr<float>(), batch, q.size(1),
                                      k_pool.size(2), q.size(2), longest,
                                      static_cast<float>(scale));
            break;
        }
    }
    return out;
}

#ifdef WITH_CUDA_KERNELS
at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_pool,
                                       const at::Tensor& v_pool, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, double scale, int64_t tile,
                                       bool reverse, bool tensor_cores) {
    check_paged_decode_attention_args(q, k_pool, v_pool, block_tables, seq_lens, scale, tile);
    // NOTE: seq_lens and block_tables live on the device; the kernel clamps a length to the
    // table's capacity and reads an entry outside the pool as a zero key and value instead of
    // checking (a check would need a host sync and break CUDA-graph capture).
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t block_size = k_pool.size(1);
    const int64_t capacity = block_tables.size(1) * block_size;  // fits in int32 (checked)
    // The plan of decode_attention over a contiguous cache of `capacity` keys per row: the same
    // chunks, tiles and rounding.
    AttentionLaunch launch =
        plan_attention_launch(q, k_pool, v_pool, capacity, tile, reverse, tensor_cores);
    at::Tensor out = at::empty_like(q);
    const PagedKeys pages{block_tables.const_data_ptr<int32_t>(),
                          block_tables.size(0) > 1 ? block_tables.stride(0) : 0,
                          __builtin_ctzll(static_cast<uint64_t>(block_size)), k_pool.size(0)};
    check_cuda_launch(
        kNames.op,
        launch_paged_decode_attention(
            q.const_data_ptr(), k_pool.const_data_ptr(), v_pool.const_data_ptr(), pages,
            seq_lens.const_data_ptr<int32_t>(), out.data_ptr(), launch.partial_out_ptr(),
            launch.partial_max_ptr(), launch.partial_sum_ptr(), launch.dtype, q.size(0),
            q.size(1), k_pool.size(2), q.size(2), capacity, static_cast<float>(scale),
            launch.plan, at::cuda::getCurrentCUDAStream().stream()));
    return out;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) {
    m.impl("paged_decode_attention", &toyllm::paged_decode_attention_cpu);
}

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) {
    m.impl("paged_decode_attention", &toyllm::paged_decode_attention_cuda);
}
#endif
