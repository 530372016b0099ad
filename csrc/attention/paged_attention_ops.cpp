// The CPU and CUDA implementations of `toyllm::paged_decode_attention` (schema:
// registration.cpp): one query token per sequence attends over the first seq_lens[b] keys of its
// blocks, read in place through its row of the block table (GQA-aware; no gather into a
// contiguous copy). Key j of row b is at pool slot block_tables[b, j / block_size] * block_size
// + j % block_size. CPU: a loop in fp32 per (row, KV head), its query heads sharing each K/V
// read. CUDA: decode_attention's flash-decoding kernels, reading each key row through the table.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

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

constexpr const char* kOp = "paged_decode_attention";

// Checks every argument of paged_decode_attention (the same on every device).
void check_paged_decode_attention_args(const at::Tensor& q, const at::Tensor& k_pool,
                                       const at::Tensor& v_pool, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, double scale, int64_t tile) {
    TORCH_CHECK_VALUE(q.dim() == 3,
                      "paged_decode_attention: expected q of 3 dims [batch, num_q_heads, "
                      "head_dim], got shape ",
                      q.sizes());
    TORCH_CHECK_VALUE(k_pool.dim() == 4,
                      "paged_decode_attention: expected k_pool of 4 dims [num_blocks, block_size, "
                      "num_kv_heads, head_dim], got shape ",
                      k_pool.sizes());
    TORCH_CHECK_VALUE(v_pool.sizes() == k_pool.sizes(),
                      "paged_decode_attention: expected v_pool of k_pool's shape ", k_pool.sizes(),
                      ", got ", v_pool.sizes());
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t num_blocks = k_pool.size(0);
    const int64_t block_size = k_pool.size(1);
    const int64_t num_kv_heads = k_pool.size(2);
    TORCH_CHECK_VALUE(k_pool.size(3) == head_dim,
                      "paged_decode_attention: expected k_pool of shape [num_blocks, block_size, "
                      "num_kv_heads, ",
                      head_dim, "] (q's head_dim), got ", k_pool.sizes());
    TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= kMaxHeadDim,
                      "paged_decode_attention: expected head_dim in [1, ", kMaxHeadDim, "], got ",
                      head_dim);
    TORCH_CHECK_VALUE(num_blocks >= 1 && num_blocks <= std::numeric_limits<int32_t>::max(),
                      "paged_decode_attention: expected num_blocks (k_pool.size(0)) in [1, ",
                      std::numeric_limits<int32_t>::max(), "], got ", num_blocks);
    // The kernels find a key's block and offset by a shift and a mask; every power of two is a
    // whole number of the CUDA kernels' rows per copy, whatever their 64- or 128-key tiles.
    TORCH_CHECK_VALUE(block_size >= 1 && (block_size & (block_size - 1)) == 0,
                      "paged_decode_attention: expected block_size (k_pool.size(1)) a power of "
                      "two, got ",
                      block_size);
    TORCH_CHECK_VALUE(num_kv_heads >= 1 && num_q_heads >= 1 && num_q_heads % num_kv_heads == 0,
                      "paged_decode_attention: expected num_q_heads (", num_q_heads,
                      ") to be a positive multiple of num_kv_heads, got num_kv_heads ",
                      num_kv_heads);

    const at::ScalarType dtype = q.scalar_type();
    check_float_dtype(kOp, "q", dtype);
    check_dtype(kOp, "k_pool", k_pool, dtype, "q's");
    check_dtype(kOp, "v_pool", v_pool, dtype, "q's");
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
    TORCH_CHECK_VALUE(seq_lens.scalar_type() == at::kInt,
                      "paged_decode_attention: expected seq_lens of dtype torch.int32, got ",
                      dtype_name(seq_lens.scalar_type()));
    TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == batch,
                      "paged_decode_attention: expected seq_lens of shape [", batch,
                      "] (q's batch), got ", seq_lens.sizes());

    const at::Device device = q.device();
    check_device(kOp, "k_pool", k_pool, device, "q's device");
    check_device(kOp, "v_pool", v_pool, device, "q's device");
    check_device(kOp, "block_tables", block_tables, device, "q's device");
    check_device(kOp, "seq_lens", seq_lens, device, "q's device");

    check_contiguous(kOp, "q", q);
    check_contiguous(kOp, "k_pool", k_pool);
    check_contiguous(kOp, "v_pool", v_pool);
    // Rows of a wider table are fine (a column slice of cache.block_tables()): entries of a row
    // side by side, rows any distance apart.
    TORCH_CHECK_VALUE(
        (block_tables.size(1) <= 1 || block_tables.stride(1) == 1) && block_tables.stride(0) >= 0,
        "paged_decode_attention: expected block_tables with each row contiguous (stride 1 "
        "between entries), got strides ",
        block_tables.strides(), " for shape ", block_tables.sizes());
    check_contiguous(kOp, "seq_lens", seq_lens);
    TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0.0,
                      "paged_decode_attention: expected a finite scale > 0, got ", scale);
    TORCH_CHECK_VALUE(tile == 0 || tile == 64 || tile == 128,
                      "paged_decode_attention: expected tile to be 0 (default), 64 or 128, got ",
                      tile);
}

// A K or V row as floats: the row itself for fp32, else converted into `buf`.
template <typename T>
inline const float* row_as_float(const T* row, int64_t n, float* buf) {
    if constexpr (std::is_same_v<T, float>) {
        return row;
    } else {
        for (int64_t d = 0; d < n; ++d) {
            buf[d] = static_cast<float>(row[d]);
        }
        return buf;
    }
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
        TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= width * block_size,
                          "paged_decode_attention: expected seq_lens[", b,
                          "] in [0, block_tables.size(1) * block_size = ", width * block_size,
                          "], got ", lens[b]);
        const int64_t used = (lens[b] + block_size - 1) / block_size;
        for (int64_t i = 0; i < used; ++i) {
            const int32_t block = tables[b * table_stride + i];
            TORCH_CHECK_VALUE(block >= 0 && block < num_blocks,
                              "paged_decode_attention: expected block_tables[", b, ", ", i,
                              "] in [0, num_blocks ", num_blocks, ") (it holds keys of seq_lens[",
                              b, "] = ", lens[b], "), got ", block);
        }
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
        default:
            paged_decode_attention_cpu_typed<float>(q, k_pool, v_pool, block_tables, lens, longest,
                                                    scale, out);
            break;
    }
    return out;
}

#ifdef WITH_CUDA_KERNELS
// The key tile where the kernel rounds, as decode_attention's (attention_ops.cpp): tile 0 is
// FlashAttention-2's choice, 128 keys up to head_dim 64, else 64.
int64_t rounding_tile(int64_t tile, int64_t head_dim) {
    if (tile != 0) {
        return tile;  // 64 or 128 (checked)
    }
    return head_dim <= 64 ? 128 : 64;
}

at::Tensor paged_decode_attention_cuda(const at::Tensor& q, const at::Tensor& k_pool,
                                       const at::Tensor& v_pool, const at::Tensor& block_tables,
                                       const at::Tensor& seq_lens, double scale, int64_t tile,
                                       bool reverse, bool tensor_cores) {
    check_paged_decode_attention_args(q, k_pool, v_pool, block_tables, seq_lens, scale, tile);
    // NOTE: seq_lens and block_tables live on the device; the kernel clamps a length to the
    // table's capacity and reads an entry outside the pool as a zero key and value instead of
    // checking (a check would need a host sync and break CUDA-graph capture).
    const c10::cuda::CUDAGuard guard(q.device());
    const int64_t batch = q.size(0);
    const int64_t num_q_heads = q.size(1);
    const int64_t head_dim = q.size(2);
    const int64_t block_size = k_pool.size(1);
    const int64_t num_kv_heads = k_pool.size(2);
    const int64_t capacity = block_tables.size(1) * block_size;  // fits in int32 (checked)

    const auto dtype = kernel_dtype<AttentionDtype>(q.scalar_type());
    const bool aligned = reinterpret_cast<uintptr_t>(k_pool.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(v_pool.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 4 == 0;
    const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // The plan of decode_attention over a contiguous cache of `capacity` keys per row: the same
    // chunks, tiles and rounding.
    const DecodeAttentionPlan plan = plan_decode_attention(
        batch, num_q_heads, num_kv_heads, head_dim, capacity, dtype, aligned, sm_count,
        rounding_tile(tile, head_dim), reverse, tensor_cores);
    // Scratch for the split pass: sizes depend on shapes only, so a captured graph keeps them.
    const auto float_options = q.options().dtype(at::kFloat);
    const int64_t stat_floats = decode_attention_partial_stat_floats(plan, batch, num_q_heads);
    at::Tensor partial_out = at::empty(
        {decode_attention_partial_out_floats(plan, batch, num_q_heads, head_dim)}, float_options);
    at::Tensor partial_stats = at::empty({2 * stat_floats}, float_options);
    at::Tensor out = at::empty_like(q);

    const PagedKeys pages{block_tables.const_data_ptr<int32_t>(),
                          block_tables.size(0) > 1 ? block_tables.stride(0) : 0,
                          __builtin_ctzll(static_cast<uint64_t>(block_size)), k_pool.size(0)};
    float* stats = plan.num_splits > 1 ? partial_stats.data_ptr<float>() : nullptr;
    const cudaError_t err = launch_paged_decode_attention(
        q.const_data_ptr(), k_pool.const_data_ptr(), v_pool.const_data_ptr(), pages,
        seq_lens.const_data_ptr<int32_t>(), out.data_ptr(),
        plan.num_splits > 1 ? partial_out.data_ptr<float>() : nullptr, stats,
        stats == nullptr ? nullptr : stats + stat_floats, dtype, batch, num_q_heads, num_kv_heads,
        head_dim, capacity, static_cast<float>(scale), plan,
        at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess,
                "paged_decode_attention: CUDA kernel launch failed: ", cudaGetErrorString(err));
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
