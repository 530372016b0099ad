// CUDA kernel for the paged K/V write: a slot-indexed copy of token rows, K and V in one launch.
#include <algorithm>
#include <cstdint>

#include "cache/paged_kv_write.cuh"
#include "common/programmatic_launch.cuh"
#include "common/vector_pack.cuh"

namespace toyllm {
namespace {

constexpr int kThreads = 128;  // threads per block: a block copies one (token, K-or-V) row
constexpr int64_t kMaxGridX = 2147483647;

// Block (pair): token pair / 2, K (even) or V (odd). Adjacent threads copy adjacent vectors of
// the row (coalesced on both sides); a decode token of a Llama-1B shape (8 heads x 64 bf16) is
// 1 KiB, 64 uint4 vectors. Vec is the copy unit (uint4 = 16 bytes when sizes and pointers allow).
template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    paged_kv_write_kernel(Vec* __restrict__ k_pool,            // [num_slots, row_vecs]
                          Vec* __restrict__ v_pool,            // [num_slots, row_vecs]
                          const Vec* __restrict__ new_k,       // [num_tokens, k_stride]
                          const Vec* __restrict__ new_v,       // [num_tokens, v_stride]
                          const int64_t* __restrict__ slots,   // [num_tokens]
                          int64_t num_slots, int64_t row_vecs, int64_t k_stride,
                          int64_t v_stride) {
    wait_for_inputs();
    const int64_t pair = blockIdx.x;
    const int64_t t = pair >> 1;
    const int64_t slot = slots[t];
    // NOTE: a negative slot is a padding token; a slot past the pool is skipped (the CPU raises).
    // Uniform across the block: no thread diverges here.
    if (slot < 0 || slot >= num_slots) {
        return;
    }
    const bool is_v = (pair & 1) != 0;
    const Vec* __restrict__ src = is_v ? new_v + t * v_stride : new_k + t * k_stride;
    Vec* __restrict__ dst = (is_v ? v_pool : k_pool) + slot * row_vecs;
    for (int64_t i = threadIdx.x; i < row_vecs; i += kThreads) {
        dst[i] = src[i];
    }
}

template <typename Vec>
cudaError_t launch_with(void* k_pool, void* v_pool, const void* new_k, const void* new_v,
                        const int64_t* slots, int64_t num_tokens, int64_t num_slots,
                        int64_t row_bytes, int64_t k_stride_bytes, int64_t v_stride_bytes,
                        cudaStream_t stream) {
    constexpr auto kVec = static_cast<int64_t>(sizeof(Vec));
    // Blocks of up to kMaxGridX / 2 tokens per launch (more tokens: more launches).
    const int64_t per_launch = kMaxGridX / 2;
    for (int64_t first = 0; first < num_tokens; first += per_launch) {
        const int64_t count = std::min(per_launch, num_tokens - first);
        const cudaError_t err = launch_kernel(
            paged_kv_write_kernel<Vec>, dim3(static_cast<unsigned>(2 * count)), dim3(kThreads), 0,
            stream, static_cast<Vec*>(k_pool), static_cast<Vec*>(v_pool),
            static_cast<const Vec*>(new_k) + first * (k_stride_bytes / kVec),
            static_cast<const Vec*>(new_v) + first * (v_stride_bytes / kVec), slots + first,
            num_slots, row_bytes / kVec, k_stride_bytes / kVec, v_stride_bytes / kVec);
        if (err != cudaSuccess) {
            return err;
        }
    }
    return cudaSuccess;
}

}  // namespace

cudaError_t launch_paged_kv_write(void* k_pool, void* v_pool, const void* new_k, const void* new_v,
                                  const int64_t* slots, int64_t num_tokens, int64_t num_slots,
                                  int64_t row_elems, int64_t k_token_stride,
                                  int64_t v_token_stride, int64_t element_size,
                                  cudaStream_t stream) {
    if (num_tokens < 0 || num_slots < 0 || row_elems < 0 || k_token_stride < 0 ||
        v_token_stride < 0) {
        return cudaErrorInvalidValue;
    }
    if (element_size != 1 && element_size != 2 && element_size != 4 && element_size != 8) {
        return cudaErrorInvalidValue;
    }
    const int64_t row_bytes = row_elems * element_size;
    if (num_tokens == 0 || num_slots == 0 || row_bytes == 0) {
        return cudaSuccess;
    }
    if (k_pool == nullptr || v_pool == nullptr || new_k == nullptr || new_v == nullptr ||
        slots == nullptr) {
        return cudaErrorInvalidValue;
    }
    const int64_t k_stride_bytes = k_token_stride * element_size;
    const int64_t v_stride_bytes = v_token_stride * element_size;
    // The widest copy unit that divides the row size, the token strides and every base pointer.
    const uintptr_t bits =
        reinterpret_cast<uintptr_t>(k_pool) | reinterpret_cast<uintptr_t>(v_pool) |
        reinterpret_cast<uintptr_t>(new_k) | reinterpret_cast<uintptr_t>(new_v) |
        static_cast<uintptr_t>(row_bytes) | static_cast<uintptr_t>(k_stride_bytes) |
        static_cast<uintptr_t>(v_stride_bytes);
    return with_copy_unit(bits, [&](auto unit) {
        return launch_with<decltype(unit)>(k_pool, v_pool, new_k, new_v, slots, num_tokens,
                                           num_slots, row_bytes, k_stride_bytes, v_stride_bytes,
                                           stream);
    });
}

}  // namespace toyllm
