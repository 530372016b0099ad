// CUDA kernel for the KV-cache update: a position-indexed copy of rows, K and V in one launch.
#include <algorithm>
#include <cstdint>

#include "cache/kv_update.cuh"
#include "common/programmatic_launch.cuh"
#include "common/vector_pack.cuh"

namespace toyllm {
namespace {

// Threads per block: 1024 measured fastest, level with two cudaMemcpyAsync; 512 and 256 were
// slower, and so were unrolling 4 or 8, streaming loads or stores and capped grids
// (docs/PERF.md, "KV-cache update").
constexpr int kThreads = 1024;
constexpr int kUnroll = 2;                       // vectors each thread has in flight per loop trip
constexpr int64_t kMaxGridX = int64_t{1} << 24;  // blocks along a slab (grid-stride past that)
constexpr int64_t kMaxGridY = 65535;             // (sequence, K/V) pairs per launch

// blockIdx.y is the (sequence, K-or-V) pair first_pair + blockIdx.y; blockIdx.x splits the
// pair's slab. For a sequence b the num_tokens new rows are contiguous in `new` and land
// contiguously in the cache at row positions[b], so each pair is one contiguous copy of
// num_tokens * row_vecs vectors: adjacent threads touch adjacent vectors (coalesced),
// grid-stride over the slab. One pair per block row (no loop over pairs) keeps the kernel at 32
// registers, so two 1024-thread blocks fit on an SM. Vec is the copy unit (uint4 = 16 bytes when
// sizes and pointers allow it, narrower otherwise).
template <typename Vec>
__global__ void __launch_bounds__(kThreads, 2)
    kv_update_kernel(Vec* __restrict__ k_cache,              // [batch, max_seq_len, row_vecs]
                     Vec* __restrict__ v_cache,              // [batch, max_seq_len, row_vecs]
                     const Vec* __restrict__ new_k,          // [batch, num_tokens, row_vecs]
                     const Vec* __restrict__ new_v,          // [batch, num_tokens, row_vecs]
                     const int32_t* __restrict__ positions,  // [batch]
                     int64_t first_pair, int64_t max_seq_len, int64_t num_tokens,
                     int64_t row_vecs) {
    wait_for_inputs();
    const int64_t pair = first_pair + blockIdx.y;
    const int64_t b = pair >> 1;
    const int64_t pos = positions[b];
    // NOTE: a negative position marks an inactive sequence: nothing is written for it.
    // NOTE: a sequence whose rows would reach max_seq_len is skipped whole (the host checks
    //       first; this guard only makes sure no other sequence's rows are ever touched).
    // Both conditions are uniform across the block, so no thread diverges here.
    if (pos < 0 || pos + num_tokens > max_seq_len) {
        return;
    }
    const int64_t slab_vecs = num_tokens * row_vecs;
    const bool is_v = (pair & 1) != 0;
    const Vec* __restrict__ src = (is_v ? new_v : new_k) + b * slab_vecs;
    Vec* __restrict__ dst = (is_v ? v_cache : k_cache) + (b * max_seq_len + pos) * row_vecs;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kUnroll;
    for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
         base < slab_vecs; base += stride) {
        // All loads first, then all stores: kUnroll independent 16-byte loads in flight.
        Vec tmp[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t i = base + static_cast<int64_t>(u) * kThreads;
            if (i < slab_vecs) {
                tmp[u] = src[i];
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int64_t i = base + static_cast<int64_t>(u) * kThreads;
            if (i < slab_vecs) {
                dst[i] = tmp[u];
            }
        }
    }
}

template <typename Vec>
cudaError_t launch_with(void* k_cache, void* v_cache, const void* new_k, const void* new_v,
                        const int32_t* positions, int64_t batch, int64_t max_seq_len,
                        int64_t num_tokens, int64_t row_bytes, cudaStream_t stream) {
    const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(Vec));
    const int64_t slab_vecs = num_tokens * row_vecs;
    const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;

    // y: one block row per (sequence, K/V) pair, up to the hardware limit per launch (more
    // pairs: more launches). x: one block per kThreads * kUnroll vectors of a slab: on an H200
    // this full grid reached 97-98% of cudaMemcpy's bandwidth at 256 MiB, against 94% for a grid
    // capped at four waves of the GPU. The kernel grid-strides over x, so its cap only bounds
    // the launch, not the sizes.
    const int64_t grid_x =
        std::max<int64_t>(1, std::min<int64_t>((slab_vecs + per_block - 1) / per_block, kMaxGridX));
    for (int64_t first_pair = 0; first_pair < 2 * batch; first_pair += kMaxGridY) {
        const int64_t grid_y = std::min<int64_t>(2 * batch - first_pair, kMaxGridY);
        const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
        const cudaError_t err =
            launch_kernel(kv_update_kernel<Vec>, grid, dim3(kThreads), 0, stream,
                          static_cast<Vec*>(k_cache), static_cast<Vec*>(v_cache),
                          static_cast<const Vec*>(new_k), static_cast<const Vec*>(new_v), positions,
                          first_pair, max_seq_len, num_tokens, row_vecs);
        if (err != cudaSuccess) {
            return err;
        }
    }
    return cudaSuccess;
}

}  // namespace

cudaError_t launch_kv_update(void* k_cache, void* v_cache, const void* new_k, const void* new_v,
                             const int32_t* positions, int64_t batch, int64_t max_seq_len,
                             int64_t num_tokens, int64_t num_kv_heads, int64_t head_dim,
                             int64_t element_size, cudaStream_t stream) {
    if (batch < 0 || max_seq_len < 0 || num_tokens < 0 || num_kv_heads < 0 || head_dim < 0) {
        return cudaErrorInvalidValue;
    }
    if (element_size != 1 && element_size != 2 && element_size != 4 && element_size != 8) {
        return cudaErrorInvalidValue;
    }
    const int64_t row_bytes = num_kv_heads * head_dim * element_size;
    if (batch == 0 || num_tokens == 0 || row_bytes == 0) {
        return cudaSuccess;
    }
    if (k_cache == nullptr || v_cache == nullptr || new_k == nullptr || new_v == nullptr ||
        positions == nullptr) {
        return cudaErrorInvalidValue;
    }

    // The widest copy unit that divides the row size and every base pointer: every row then
    // starts on that boundary too (row offsets are multiples of row_bytes). An odd head_dim in
    // fp16 (row of 6 bytes, say) falls back to 2-byte copies; 40 or 72 in fp16 stay at 16.
    const uintptr_t bits = reinterpret_cast<uintptr_t>(k_cache) |
                           reinterpret_cast<uintptr_t>(v_cache) |
                           reinterpret_cast<uintptr_t>(new_k) | reinterpret_cast<uintptr_t>(new_v) |
                           static_cast<uintptr_t>(row_bytes);
    return with_copy_unit(bits, [&](auto unit) {
        return launch_with<decltype(unit)>(k_cache, v_cache, new_k, new_v, positions, batch,
                                           max_seq_len, num_tokens, row_bytes, stream);
    });
}

}  // namespace toyllm
