// CUDA kernel of a decode step's RoPE and K/V write (toyllm::rope_kv_update), one launch; see
// rope_kv_update.cuh for the contract.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common/programmatic_launch.cuh"
#include "common/vector_pack.cuh"
#include "elementwise/rope_kv_update.cuh"
#include "elementwise/rope_rotate.cuh"

namespace toyllm {
namespace {

constexpr int kThreads = 256;                   // threads per block
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // blocks per launch (grid-stride past that)

// One thread per N consecutive rotation pairs (i, i + D/2) of one head of one row, over all
// Hq + 2 * Hkv heads of the projection: adjacent threads take adjacent packs of a head, then the
// next head, then the next row. A q head is rotated into q_out; a k head is rotated into the
// cache row at the row's position; a v head is copied there as it is (no rounding at all).
// The rotation is rope_rotate, the very code of toyllm::rope's kernel, so q and k have its bits.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    rope_kv_update_kernel(const T* __restrict__ qkv,  // [rows, 1, Hq + 2 * Hkv, D], strided
                          const T* __restrict__ cos,  // [rows, 1, 1, D], strided
                          const T* __restrict__ sin,  // [rows, 1, 1, D], strided
                          const int32_t* __restrict__ positions,  // [rows]
                          T* __restrict__ q_out,                  // [rows, 1, Hq, D]
                          T* __restrict__ k_cache,                // [rows, max_seq_len, Hkv, D]
                          T* __restrict__ v_cache,                // [rows, max_seq_len, Hkv, D]
                          int64_t max_seq_len, int64_t num_q_heads, int64_t num_kv_heads,
                          int64_t half, int64_t total_packs, int64_t qkv_stride_row,
                          int64_t qkv_stride_head, int64_t cs_stride_row) {
    wait_for_inputs();  // launched through launch_kernel: see programmatic_launch.cuh
    using P = Pack<T, N>;
    const int64_t packs_per_head = half / N;
    const int64_t heads = num_q_heads + 2 * num_kv_heads;
    const int64_t head_dim = 2 * half;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total_packs;
         idx += static_cast<int64_t>(gridDim.x) * kThreads) {
        const int64_t i = (idx % packs_per_head) * N;
        const int64_t head_row = idx / packs_per_head;  // r * heads + h
        const int64_t h = head_row % heads;
        const int64_t r = head_row / heads;

        // Where this head goes: q_out's row, or the cache row of the new token.
        T* dst;
        bool rotate = true;
        if (h < num_q_heads) {
            dst = q_out + (r * num_q_heads + h) * head_dim;
        } else {
            const int64_t pos = positions[r];
            // NOTE: a negative position marks a finished row: nothing is written for it.
            // NOTE: a position past the cache's end is skipped the same way (the CPU operator
            //       raises; here it only keeps the write inside the row's own slab).
            if (pos < 0 || pos >= max_seq_len) {
                continue;
            }
            const int64_t kv = h - num_q_heads;  // [0, Hkv): k heads, [Hkv, 2 * Hkv): v heads
            rotate = kv < num_kv_heads;
            T* cache = rotate ? k_cache : v_cache;
            const int64_t kv_head = rotate ? kv : kv - num_kv_heads;
            dst = cache + ((r * max_seq_len + pos) * num_kv_heads + kv_head) * head_dim;
        }

        const T* x = qkv + r * qkv_stride_row + h * qkv_stride_head;
        const P x1 = *reinterpret_cast<const P*>(x + i);
        const P x2 = *reinterpret_cast<const P*>(x + half + i);
        P o1 = x1;  // v: the projection's bits, unchanged
        P o2 = x2;
        if (rotate) {
            const T* c = cos + r * cs_stride_row;
            const T* s = sin + r * cs_stride_row;
            const P c1 = *reinterpret_cast<const P*>(c + i);
            const P c2 = *reinterpret_cast<const P*>(c + half + i);
            const P s1 = *reinterpret_cast<const P*>(s + i);
            const P s2 = *reinterpret_cast<const P*>(s + half + i);
            rope_rotate(x1, x2, c1, c2, s1, s2, o1, o2);
        }
        *reinterpret_cast<P*>(dst + i) = o1;
        *reinterpret_cast<P*>(dst + half + i) = o2;
    }
}

template <typename T>
cudaError_t rope_kv_update_for(const void* qkv, const void* cos, const void* sin,
                               const int32_t* positions, void* q_out, void* k_cache, void* v_cache,
                               int64_t rows, int64_t max_seq_len, int64_t num_q_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t qkv_stride_row,
                               int64_t qkv_stride_head, int64_t cs_stride_row,
                               cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const int64_t half = head_dim / 2;
    // 16-byte accesses need every head start (pointer + strides) and the half offset aligned;
    // the outputs' row pitches (Hq * D, Hkv * D) are multiples of half.
    const int64_t offsets = half | qkv_stride_row | qkv_stride_head | cs_stride_row;
    const bool vec = offsets % kVec == 0 && aligned16(qkv) && aligned16(cos) && aligned16(sin) &&
                     aligned16(q_out) && aligned16(k_cache) && aligned16(v_cache);
    const int64_t heads = num_q_heads + 2 * num_kv_heads;
    const int64_t per_head = vec ? half / kVec : half;
    const int64_t total = rows * heads * per_head;
    const unsigned grid = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxGrid)));
    const T* qt = static_cast<const T*>(qkv);
    const T* ct = static_cast<const T*>(cos);
    const T* st = static_cast<const T*>(sin);
    T* ot = static_cast<T*>(q_out);
    T* kt = static_cast<T*>(k_cache);
    T* vt = static_cast<T*>(v_cache);
    // Programmatic dependent launch, as kv_update's (programmatic_launch.cuh): the kernel may
    // start while the projection is still being computed and waits for it on the device.
    return launch_kernel(vec ? rope_kv_update_kernel<T, kVec> : rope_kv_update_kernel<T, 1>,
                         dim3(grid), dim3(kThreads), 0, stream, qt, ct, st, positions, ot, kt, vt,
                         max_seq_len, num_q_heads, num_kv_heads, half, total, qkv_stride_row,
                         qkv_stride_head, cs_stride_row);
}

}  // namespace

cudaError_t launch_rope_kv_update(const void* qkv, const void* cos, const void* sin,
                                  const int32_t* positions, void* q_out, void* k_cache,
                                  void* v_cache, FusedDtype dtype, int64_t rows,
                                  int64_t max_seq_len, int64_t num_q_heads, int64_t num_kv_heads,
                                  int64_t head_dim, int64_t qkv_stride_row, int64_t qkv_stride_head,
                                  int64_t cs_stride_row, cudaStream_t stream) {
    if (rows < 0 || max_seq_len < 0 || num_q_heads < 0 || num_kv_heads < 0 || head_dim < 0 ||
        head_dim % 2 != 0) {
        return cudaErrorInvalidValue;
    }
    if (rows == 0 || head_dim == 0 || num_q_heads + num_kv_heads == 0) {
        return cudaSuccess;
    }
    if (qkv == nullptr || cos == nullptr || sin == nullptr || positions == nullptr ||
        q_out == nullptr || k_cache == nullptr || v_cache == nullptr) {
        return cudaErrorInvalidValue;
    }
    if (rows == 1) {
        // A size-1 dim's stride is never used (r is 0), but it may be anything: keep it from
        // ruling out the 16-byte path.
        qkv_stride_row = 0;
        cs_stride_row = 0;
    }
    switch (dtype) {
        case FusedDtype::kFloat32:
            return rope_kv_update_for<float>(
                qkv, cos, sin, positions, q_out, k_cache, v_cache, rows, max_seq_len, num_q_heads,
                num_kv_heads, head_dim, qkv_stride_row, qkv_stride_head, cs_stride_row, stream);
        case FusedDtype::kFloat16:
            return rope_kv_update_for<__half>(
                qkv, cos, sin, positions, q_out, k_cache, v_cache, rows, max_seq_len, num_q_heads,
                num_kv_heads, head_dim, qkv_stride_row, qkv_stride_head, cs_stride_row, stream);
        case FusedDtype::kBFloat16:
            return rope_kv_update_for<__nv_bfloat16>(
                qkv, cos, sin, positions, q_out, k_cache, v_cache, rows, max_seq_len, num_q_heads,
                num_kv_heads, head_dim, qkv_stride_row, qkv_stride_head, cs_stride_row, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
