// Host side of decode attention over the KV cache: the split plan, the launchers and the
// dtype/vector-width dispatch; the kernels are in decode_attention_kernels.cuh (CUDA cores, and
// the combine pass) and decode_attention_mma.cuh (tensor cores), the contract in
// decode_attention.cuh.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "attention/decode_attention.cuh"
#include "attention/decode_attention_kernels.cuh"
#include "attention/decode_attention_mma.cuh"
#include "common/programmatic_launch.cuh"

namespace toyllm {
namespace {

using namespace decode_attention_kernels;  // NOLINT(build/namespaces): this file's own kernels

// Shared memory a block may use for its K/V tiles before the pipeline drops to one stage.
constexpr int64_t kDoubleBufferBytes = 96 * 1024;

// K/V stages in shared memory: two (the next tile's copy in flight) where they fit.
int64_t stages_for(int64_t head_dim, int64_t tile, int64_t elem_bytes) {
    return 2 * 2 * tile * head_dim * elem_bytes <= kDoubleBufferBytes ? 2 : 1;
}

struct LaunchArgs {
    const void* q;
    const void* k_cache;
    const void* v_cache;
    const int32_t* seq_lens;
    void* out;
    float* partial_out;
    float* partial_max;
    float* partial_sum;
    int64_t batch, num_q_heads, num_kv_heads, head_dim, max_seq_len;
    float scale_log2;
    DecodeAttentionPlan plan;
    cudaStream_t stream;
    PagedKeys pages;  // paged K/V only: where the keys are (k_cache / v_cache are the pools)
};

// Lets `kernel` use `smem` bytes of dynamic shared memory. Above 48 KiB a kernel must opt in,
// per device: once per device (bit d of `opted_in` for device d < 64), to the device's limit,
// so that no later launch (a CUDA-graph capture, say) has to.
template <typename Kernel>
cudaError_t allow_shared_memory(Kernel* kernel, int64_t smem, std::atomic<uint64_t>& opted_in) {
    if (smem <= 48 * 1024) {
        return cudaSuccess;
    }
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) {
        return err;
    }
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (bit != 0 && (opted_in.load() & bit) != 0) {
        return cudaSuccess;
    }
    int limit = 0;
    err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) {
        return err;
    }
    if (smem > limit) {
        return cudaErrorInvalidValue;
    }
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
    if (err != cudaSuccess) {
        return err;
    }
    opted_in.fetch_or(bit);
    return cudaSuccess;
}

// Pass 2, when there is more than one chunk.
template <typename T>
cudaError_t launch_combine(const LaunchArgs& a) {
    if (a.plan.num_splits == 1) {
        return cudaSuccess;
    }
    const dim3 combine_grid(static_cast<unsigned>(a.num_q_heads), static_cast<unsigned>(a.batch));
    return launch_kernel(decode_attention_combine_kernel<T>, combine_grid, dim3(kCombineThreads), 0,
                         a.stream, a.partial_out, a.partial_max, a.partial_sum,
                         static_cast<T*>(a.out), static_cast<int>(a.num_q_heads),
                         static_cast<int>(a.head_dim), static_cast<int>(a.plan.num_splits),
                         a.scale_log2);
}

// Pass 1 (`kernel`, `threads` a block, `smem` bytes of shared memory, opted in through its own
// `opted_in`) over the plan's grid (split, KV head x head block, row), then pass 2.
template <typename T, typename Kernel, typename... Args>
cudaError_t launch_passes(const LaunchArgs& a, Kernel* kernel, int threads, int64_t smem,
                          std::atomic<uint64_t>& opted_in, Args... args) {
    const cudaError_t err = allow_shared_memory(kernel, smem, opted_in);
    if (err != cudaSuccess) {
        return err;
    }
    const dim3 grid(static_cast<unsigned>(a.plan.num_splits),
                    static_cast<unsigned>(a.num_kv_heads * a.plan.head_blocks),
                    static_cast<unsigned>(a.batch));
    const cudaError_t launched = launch_kernel(kernel, grid, dim3(threads),
                                               static_cast<size_t>(smem), a.stream, args...);
    return launched != cudaSuccess ? launched : launch_combine<T>(a);
}

// Pass 1 on CUDA cores (decode_attention_kernels.cuh), then pass 2.
template <typename T, int VecBytes, int Tile, bool Paged>
cudaError_t launch_typed(const LaunchArgs& a) {
    const int64_t stages = stages_for(a.head_dim, Tile, sizeof(T));
    static std::atomic<uint64_t> opted_in{0};
    return launch_passes<T>(
        a, decode_attention_split_kernel<T, VecBytes, Tile, Paged>, kThreads,
        split_smem_bytes(a.head_dim, Tile, stages, sizeof(T)), opted_in,
        static_cast<const T*>(a.q), static_cast<const T*>(a.k_cache),
        static_cast<const T*>(a.v_cache), a.seq_lens, static_cast<T*>(a.out), a.partial_out,
        a.partial_max, a.partial_sum, static_cast<int>(a.num_q_heads),
        static_cast<int>(a.num_kv_heads), static_cast<int>(a.head_dim), a.max_seq_len,
        static_cast<int>(a.plan.num_splits), static_cast<int>(a.plan.head_blocks), a.scale_log2,
        a.plan.reverse, static_cast<int>(stages), a.pages);
}

// Pass 1 on tensor cores (decode_attention_mma.cuh), then pass 2.
template <typename T, int HeadDim, int Tile, bool Paged>
cudaError_t launch_mma(const LaunchArgs& a) {
    namespace mma = decode_attention_mma;
    static std::atomic<uint64_t> opted_in{0};
    return launch_passes<T>(
        a, mma::decode_attention_mma_kernel<T, HeadDim, Tile, Paged>, mma::kThreads,
        mma::mma_smem_bytes(HeadDim), opted_in, static_cast<const T*>(a.q),
        static_cast<const T*>(a.k_cache), static_cast<const T*>(a.v_cache), a.seq_lens,
        static_cast<T*>(a.out), a.partial_out, a.partial_max, a.partial_sum,
        static_cast<int>(a.num_q_heads), static_cast<int>(a.num_kv_heads), a.max_seq_len,
        static_cast<int>(a.plan.num_splits), static_cast<int>(a.plan.head_blocks), a.scale_log2,
        a.plan.reverse, a.pages);
}

// The tensor-core instantiations: (head_dim, tile) in (64, 64), (64, 128), (128, 64).
template <typename T, bool Paged>
cudaError_t launch_mma_for_shape(const LaunchArgs& a) {
    if (a.head_dim == 64) {
        return a.plan.tile == 128 ? launch_mma<T, 64, 128, Paged>(a)
                                  : launch_mma<T, 64, 64, Paged>(a);
    }
    return launch_mma<T, 128, 64, Paged>(a);
}

// The tile: the plan's, unless one stage of 128-key K/V tiles would not fit in shared memory
// (fp32 with head_dim > 128), where it is 64.
template <typename T, int VecBytes, bool Paged>
cudaError_t launch_tiled(const LaunchArgs& a) {
    if (a.plan.tile == 128 &&
        2 * 128 * a.head_dim * static_cast<int64_t>(sizeof(T)) <= 128 * 1024) {
        return launch_typed<T, VecBytes, 128, Paged>(a);
    }
    return launch_typed<T, VecBytes, 64, Paged>(a);
}

// The widest load that divides the row size and both cache pointers (rows then stay aligned:
// every row starts a multiple of head_dim elements from the base).
template <typename T, bool Paged>
cudaError_t launch_for_dtype(const LaunchArgs& a) {
    const uintptr_t bits = reinterpret_cast<uintptr_t>(a.k_cache) |
                           reinterpret_cast<uintptr_t>(a.v_cache) |
                           static_cast<uintptr_t>(a.head_dim * sizeof(T));
    if (bits % 16 == 0) {
        return launch_tiled<T, 16, Paged>(a);
    }
    if (bits % 8 == 0) {
        return launch_tiled<T, 8, Paged>(a);
    }
    if constexpr (sizeof(T) == 4) {
        return launch_tiled<T, 4, Paged>(a);
    } else {
        if (bits % 4 == 0) {
            return launch_tiled<T, 4, Paged>(a);
        }
        return launch_tiled<T, 2, Paged>(a);
    }
}

// Checks the sizes and the plan, then launches pass 1 (tensor or CUDA cores) and pass 2; the
// contiguous and the paged entry points below differ only in Paged and a.pages.
template <bool Paged>
cudaError_t launch_checked(const LaunchArgs& a, AttentionDtype dtype) {
    const DecodeAttentionPlan& plan = a.plan;
    if (a.batch < 0 || a.num_q_heads < 1 || a.num_kv_heads < 1 ||
        a.num_q_heads % a.num_kv_heads != 0 || a.head_dim < 1 ||
        a.head_dim > kDecodeAttentionMaxHeadDim || a.max_seq_len < 1) {
        return cudaErrorInvalidValue;
    }
    if (a.batch == 0) {
        return cudaSuccess;
    }
    if (a.batch > 65535 || a.num_kv_heads * plan.head_blocks > 65535 ||
        a.num_q_heads > 2147483647 || plan.num_splits < 1 || plan.num_splits > 2147483647 ||
        (plan.tile != 64 && plan.tile != 128) ||
        plan.head_blocks * (plan.tensor_cores ? decode_attention_mma::kRows : kHeads) <
            a.num_q_heads / a.num_kv_heads) {
        return cudaErrorInvalidValue;
    }
    const bool aligned = (reinterpret_cast<uintptr_t>(a.k_cache) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(a.v_cache) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(a.q) % 4 == 0);
    if (plan.tensor_cores &&
        !decode_attention_tensor_cores_apply(dtype, a.head_dim, plan.tile, aligned)) {
        return cudaErrorInvalidValue;
    }
    if (a.q == nullptr || a.k_cache == nullptr || a.v_cache == nullptr || a.seq_lens == nullptr ||
        a.out == nullptr ||
        (plan.num_splits > 1 &&
         (a.partial_out == nullptr || a.partial_max == nullptr || a.partial_sum == nullptr))) {
        return cudaErrorInvalidValue;
    }
    if (Paged && (a.pages.block_tables == nullptr || a.pages.table_stride < 0 ||
                  a.pages.block_shift < 0 || a.pages.block_shift > 30 || a.pages.num_blocks < 1)) {
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case AttentionDtype::kFloat32:
            return launch_for_dtype<float, Paged>(a);
        case AttentionDtype::kFloat16:
            return plan.tensor_cores ? launch_mma_for_shape<__half, Paged>(a)
                                     : launch_for_dtype<__half, Paged>(a);
        case AttentionDtype::kBFloat16:
            return plan.tensor_cores ? launch_mma_for_shape<__nv_bfloat16, Paged>(a)
                                     : launch_for_dtype<__nv_bfloat16, Paged>(a);
    }
    return cudaErrorInvalidValue;
}

}  // namespace

bool decode_attention_tensor_cores_apply(AttentionDtype dtype, int64_t head_dim, int64_t tile,
                                         bool aligned) {
    return dtype != AttentionDtype::kFloat32 && (head_dim == 64 || head_dim == 128) &&
           (tile == 64 || tile == 128) && tile * head_dim <= 8192 && aligned;
}

DecodeAttentionPlan plan_decode_attention(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t head_dim, int64_t max_seq_len,
                                          AttentionDtype dtype, bool aligned, int sm_count,
                                          int64_t tile, bool reverse, bool tensor_cores) {
    DecodeAttentionPlan plan{1, tile, 1, reverse, false};
    if (batch < 1 || num_q_heads < 1 || num_kv_heads < 1 || max_seq_len < 1 || tile < 1) {
        return plan;
    }
    const int64_t group = std::max<int64_t>(num_q_heads / num_kv_heads, 1);
    const int64_t most_tiles = (max_seq_len + tile - 1) / tile;
    if (tensor_cores && decode_attention_tensor_cores_apply(dtype, head_dim, tile, aligned)) {
        // About eight blocks per SM in all (two fit at a time at head_dim 64, one at 128: their
        // slot rings take most of the shared memory): short blocks, so that rows of different
        // lengths leave little tail. But no chunk shorter than a tile per warp while the cache
        // has that many, so a short cache is one chunk and needs no pass 2. (Two blocks per SM
        // in all left the last wave half full at 16 x 4096 keys: docs/PERF.md.)
        namespace mma = decode_attention_mma;
        plan.tensor_cores = true;
        plan.head_blocks = (group + mma::kRows - 1) / mma::kRows;
        const int64_t blocks_per_split = batch * num_kv_heads * plan.head_blocks;
        const int64_t target =
            (8 * std::max(sm_count, 1) + blocks_per_split - 1) / blocks_per_split;
        const int64_t most = (most_tiles + mma::kWarps - 1) / mma::kWarps;
        plan.num_splits = std::max<int64_t>(1, std::min(target, most));
        return plan;
    }
    plan.head_blocks = (group + kHeads - 1) / kHeads;
    // About two blocks per SM in all, but never more chunks than the cache has tiles. The
    // chunks of a row share its actual tiles on the device, so a short row leaves the rest idle.
    const int64_t blocks_per_split = batch * num_kv_heads * plan.head_blocks;
    const int64_t target = (2 * std::max(sm_count, 1) + blocks_per_split - 1) / blocks_per_split;
    plan.num_splits = std::max<int64_t>(1, std::min(target, most_tiles));
    return plan;
}

int64_t decode_attention_partial_out_floats(const DecodeAttentionPlan& plan, int64_t batch,
                                            int64_t num_q_heads, int64_t head_dim) {
    return plan.num_splits > 1 ? batch * num_q_heads * plan.num_splits * head_dim : 0;
}

int64_t decode_attention_partial_stat_floats(const DecodeAttentionPlan& plan, int64_t batch,
                                             int64_t num_q_heads) {
    return plan.num_splits > 1 ? batch * num_q_heads * plan.num_splits : 0;
}

cudaError_t launch_decode_attention(const void* q, const void* k_cache, const void* v_cache,
                                    const int32_t* seq_lens, void* out, float* partial_out,
                                    float* partial_max, float* partial_sum, AttentionDtype dtype,
                                    int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                    int64_t head_dim, int64_t max_seq_len, float scale,
                                    const DecodeAttentionPlan& plan, cudaStream_t stream) {
    // flash attention's constant: the scale folded into exp2's argument, rounded to fp32 once.
    const LaunchArgs args{q,           k_cache,        v_cache,      seq_lens,
                          out,         partial_out,    partial_max,  partial_sum,
                          batch,       num_q_heads,    num_kv_heads, head_dim,
                          max_seq_len, scale * kLog2e, plan,         stream,
                          PagedKeys{nullptr, 0, 0, 0}};
    return launch_checked<false>(args, dtype);
}

cudaError_t launch_paged_decode_attention(const void* q, const void* k_pool, const void* v_pool,
                                          const PagedKeys& pages, const int32_t* seq_lens,
                                          void* out, float* partial_out, float* partial_max,
                                          float* partial_sum, AttentionDtype dtype, int64_t batch,
                                          int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t head_dim, int64_t capacity, float scale,
                                          const DecodeAttentionPlan& plan, cudaStream_t stream) {
    const LaunchArgs args{q,        k_pool,         v_pool,       seq_lens,
                          out,      partial_out,    partial_max,  partial_sum,
                          batch,    num_q_heads,    num_kv_heads, head_dim,
                          capacity, scale * kLog2e, plan,         stream,
                          pages};
    return launch_checked<true>(args, dtype);
}

}  // namespace toyllm
