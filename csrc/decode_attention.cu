// CUDA kernels for decode attention over the KV cache (flash-decoding with GQA), see
// decode_attention.cuh for the contract.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "decode_attention.cuh"
#include "float_convert.cuh"

namespace toyllm {
namespace {

constexpr int kThreads = 128;  // threads per block of either pass
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;       // keys per shared-memory tile: one per lane in the softmax step
constexpr int kMinChunk = 128;  // keys per split, at least
constexpr int kHeads = kDecodeAttentionHeadsPerBlock;  // query heads per block, at most
// Output elements (head, dim) each thread accumulates: kHeads * head_dim / kThreads at most.
constexpr int kAccPerThread = kHeads * kDecodeAttentionMaxHeadDim / kThreads;

// The raw type of one VecBytes-wide load.
template <int VecBytes>
struct RawVec;
template <>
struct RawVec<16> {
    using type = uint4;
};
template <>
struct RawVec<8> {
    using type = uint2;
};
template <>
struct RawVec<4> {
    using type = uint32_t;
};
template <>
struct RawVec<2> {
    using type = uint16_t;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Copies `count` rows of head_dim elements, `row_stride` elements apart in global memory, into
// shared memory as float (row t at smem[t * smem_stride]). Each thread reads VecBytes at a time;
// consecutive threads read consecutive vectors of a row (coalesced).
template <typename T, int VecBytes>
__device__ __forceinline__ void load_rows(float* smem, int smem_stride,
                                          const T* __restrict__ src,  // [count, row_stride]
                                          int64_t row_stride, int count, int head_dim) {
    constexpr int kElems = VecBytes / static_cast<int>(sizeof(T));
    using Vec = typename RawVec<VecBytes>::type;
    const int vecs_per_row = head_dim / kElems;
    for (int i = threadIdx.x; i < count * vecs_per_row; i += kThreads) {
        const int t = i / vecs_per_row;
        const int c = i - t * vecs_per_row;
        const Vec raw = *reinterpret_cast<const Vec*>(src + t * row_stride + c * kElems);
        T vals[kElems];
        memcpy(vals, &raw, VecBytes);
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
            smem[t * smem_stride + c * kElems + e] = to_float(vals[e]);
        }
    }
}

// Shared memory of the split kernel, in floats.
__host__ __device__ constexpr int64_t split_smem_floats(int64_t head_dim) {
    return kHeads * head_dim         // q_s:  [kHeads, head_dim], pre-scaled
           + kTile * (head_dim + 1)  // kv_s: [kTile, head_dim + 1] (+1: no bank conflicts)
           + kHeads * kTile          // p_s:  [kHeads, kTile] scores, then probabilities
           + 3 * kHeads;             // m_s, l_s, alpha_s: [kHeads] running max, sum, rescale
}

// Pass 1. Block (split, kv_head * head_blocks + head_block, b): keys [split * chunk_len, ...)
// of sequence b, KV head kv_head, query heads h_begin .. h_begin + nh - 1 of its group.
template <typename T, int VecBytes>
__global__ void __launch_bounds__(kThreads) decode_attention_split_kernel(
    const T* __restrict__ q,               // [batch, num_q_heads, head_dim]
    const T* __restrict__ k_cache,         // [batch, max_seq_len, num_kv_heads, head_dim]
    const T* __restrict__ v_cache,         // [batch, max_seq_len, num_kv_heads, head_dim]
    const int32_t* __restrict__ seq_lens,  // [batch]
    T* __restrict__ out,                   // [batch, num_q_heads, head_dim] (num_splits == 1)
    float* __restrict__ partial_out,       // [batch, num_q_heads, num_splits, head_dim]
    float* __restrict__ partial_max,       // [batch, num_q_heads, num_splits]
    float* __restrict__ partial_sum,       // [batch, num_q_heads, num_splits]
    int num_q_heads, int num_kv_heads, int head_dim, int64_t max_seq_len, int num_splits,
    int64_t chunk_len, int head_blocks, float scale) {
    extern __shared__ float smem[];
    float* q_s = smem;
    float* kv_s = q_s + kHeads * head_dim;
    const int kv_stride = head_dim + 1;
    float* p_s = kv_s + kTile * kv_stride;
    float* m_s = p_s + kHeads * kTile;
    float* l_s = m_s + kHeads;
    float* alpha_s = l_s + kHeads;

    const int tid = threadIdx.x;
    const int split = blockIdx.x;
    const int kv_head = blockIdx.y / head_blocks;
    const int head_block = blockIdx.y - kv_head * head_blocks;
    const int64_t b = blockIdx.z;
    const int group = num_q_heads / num_kv_heads;
    const int h_begin = kv_head * group + head_block * kHeads;
    const int nh = min(kHeads, (kv_head + 1) * group - h_begin);  // query heads here, >= 1
    const int outputs = nh * head_dim;                            // (head, dim) pairs

    // NOTE: seq_lens cannot be checked by the host without a sync: clamp to [0, max_seq_len].
    const int64_t seq_len = min(max(static_cast<int64_t>(seq_lens[b]), int64_t{0}), max_seq_len);
    const int64_t key_begin = static_cast<int64_t>(split) * chunk_len;
    const int64_t key_end = min(key_begin + chunk_len, seq_len);

    const int64_t head_row = b * num_q_heads + h_begin;  // first (b, h) row of this block
    if (key_begin >= key_end) {
        // Nothing to attend to in this chunk (or at all, when seq_len is 0).
        if (num_splits == 1) {
            for (int i = tid; i < outputs; i += kThreads) {
                out[head_row * head_dim + i] = from_float<T>(0.0f);
            }
        } else if (tid < nh) {
            partial_max[(head_row + tid) * num_splits + split] = -INFINITY;
            partial_sum[(head_row + tid) * num_splits + split] = 0.0f;
        }
        return;
    }

    for (int i = tid; i < outputs; i += kThreads) {
        q_s[i] = to_float(q[head_row * head_dim + i]) * scale;
    }
    if (tid < nh) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }
    float acc[kAccPerThread];  // acc[j]: output i = tid + j * kThreads, unnormalised
#pragma unroll
    for (int j = 0; j < kAccPerThread; ++j) {
        acc[j] = 0.0f;
    }
    __syncthreads();

    const int64_t row_stride = static_cast<int64_t>(num_kv_heads) * head_dim;  // key to key
    const int warp = tid / 32;
    const int lane = tid % 32;
    for (int64_t tile_begin = key_begin; tile_begin < key_end; tile_begin += kTile) {
        const int tile_n = static_cast<int>(min(static_cast<int64_t>(kTile), key_end - tile_begin));
        const int64_t first_row = (b * max_seq_len + tile_begin) * row_stride + kv_head * head_dim;

        // 1. K tile -> kv_s.
        load_rows<T, VecBytes>(kv_s, kv_stride, k_cache + first_row, row_stride, tile_n, head_dim);
        __syncthreads();

        // 2. Scores s[g][t] = (scale * q_g) . k_t; -inf past the chunk's end.
        for (int i = tid; i < nh * kTile; i += kThreads) {
            const int g = i / kTile;
            const int t = i - g * kTile;
            float s = -INFINITY;
            if (t < tile_n) {
                s = 0.0f;
                for (int d = 0; d < head_dim; ++d) {
                    s = fmaf(q_s[g * head_dim + d], kv_s[t * kv_stride + d], s);
                }
            }
            p_s[i] = s;
        }
        __syncthreads();

        // 3. V tile -> kv_s (K is no longer needed), and the online-softmax step, one warp per
        //    query head: m' = max(m, max_t s_t); p_t = exp(s_t - m'); l' = l * exp(m - m') + sum p.
        load_rows<T, VecBytes>(kv_s, kv_stride, v_cache + first_row, row_stride, tile_n, head_dim);
        for (int g = warp; g < nh; g += kWarps) {
            const float s = p_s[g * kTile + lane];
            const float m_old = m_s[g];
            const float m_new = fmaxf(m_old, warp_max(s));  // finite: tile_n >= 1
            const float p = lane < tile_n ? expf(s - m_new) : 0.0f;
            const float tile_sum = warp_sum(p);
            // P @ V takes p rounded to the cache dtype, while l sums the unrounded p: the
            // rounding points of flash attention, which the prefill (SDPA) and the no-cache
            // forward use. A token's attention output then rounds the same way whether it was
            // computed in prefill or in decode (exact for fp32; an identity there).
            p_s[g * kTile + lane] = round_to<T>(p);
            __syncwarp();  // every lane has read m_s[g] before lane 0 overwrites it
            if (lane == 0) {
                const float alpha = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                alpha_s[g] = alpha;
                l_s[g] = l_s[g] * alpha + tile_sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();

        // 4. acc[g][d] = acc[g][d] * alpha_g + sum_t p[g][t] * v[t][d].
#pragma unroll
        for (int j = 0; j < kAccPerThread; ++j) {
            const int i = tid + j * kThreads;
            if (i < outputs) {
                const int g = i / head_dim;
                const int d = i - g * head_dim;
                float a = acc[j] * alpha_s[g];
                for (int t = 0; t < tile_n; ++t) {
                    a = fmaf(p_s[g * kTile + t], kv_s[t * kv_stride + d], a);
                }
                acc[j] = a;
            }
        }
        __syncthreads();  // kv_s, p_s and the stats are rewritten by the next tile
    }

    if (num_splits == 1) {
#pragma unroll
        for (int j = 0; j < kAccPerThread; ++j) {
            const int i = tid + j * kThreads;
            if (i < outputs) {
                out[head_row * head_dim + i] = from_float<T>(acc[j] / l_s[i / head_dim]);
            }
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < kAccPerThread; ++j) {
        const int i = tid + j * kThreads;
        if (i < outputs) {
            const int g = i / head_dim;
            const int d = i - g * head_dim;
            partial_out[((head_row + g) * num_splits + split) * head_dim + d] = acc[j];
        }
    }
    if (tid < nh) {
        partial_max[(head_row + tid) * num_splits + split] = m_s[tid];
        partial_sum[(head_row + tid) * num_splits + split] = l_s[tid];
    }
}

// Pass 2. Block (h, b): out[b, h] = sum_s w_s * o_s / sum_s w_s * l_s, w_s = exp(m_s - max m).
// Empty chunks (sum 0) are left out; no chunk at all (seq_len 0) gives zeros.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_attention_combine_kernel(
    const float* __restrict__ partial_out,  // [batch, num_q_heads, num_splits, head_dim]
    const float* __restrict__ partial_max,  // [batch, num_q_heads, num_splits]
    const float* __restrict__ partial_sum,  // [batch, num_q_heads, num_splits]
    T* __restrict__ out,                    // [batch, num_q_heads, head_dim]
    int num_q_heads, int head_dim, int num_splits) {
    const int64_t row = static_cast<int64_t>(blockIdx.y) * num_q_heads + blockIdx.x;  // (b, h)
    const float* m = partial_max + row * num_splits;
    const float* l = partial_sum + row * num_splits;

    float m_all = -INFINITY;
    for (int s = 0; s < num_splits; ++s) {
        if (l[s] > 0.0f) {
            m_all = fmaxf(m_all, m[s]);
        }
    }
    float l_all = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
        if (l[s] > 0.0f) {
            l_all += l[s] * expf(m[s] - m_all);
        }
    }
    for (int d = threadIdx.x; d < head_dim; d += kThreads) {
        float o = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            if (l[s] > 0.0f) {
                o = fmaf(expf(m[s] - m_all), partial_out[(row * num_splits + s) * head_dim + d], o);
            }
        }
        out[row * head_dim + d] = from_float<T>(l_all > 0.0f ? o / l_all : 0.0f);
    }
}

template <typename T, int VecBytes>
cudaError_t launch_typed(const void* q, const void* k_cache, const void* v_cache,
                         const int32_t* seq_lens, void* out, float* partial_out, float* partial_max,
                         float* partial_sum, int64_t batch, int64_t num_q_heads,
                         int64_t num_kv_heads, int64_t head_dim, int64_t max_seq_len, float scale,
                         const DecodeAttentionPlan& plan, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(plan.num_splits),
                    static_cast<unsigned>(num_kv_heads * plan.head_blocks),
                    static_cast<unsigned>(batch));
    const size_t smem = static_cast<size_t>(split_smem_floats(head_dim)) * sizeof(float);
    decode_attention_split_kernel<T, VecBytes><<<grid, kThreads, smem, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k_cache), static_cast<const T*>(v_cache),
        seq_lens, static_cast<T*>(out), partial_out, partial_max, partial_sum,
        static_cast<int>(num_q_heads), static_cast<int>(num_kv_heads), static_cast<int>(head_dim),
        max_seq_len, static_cast<int>(plan.num_splits), plan.chunk_len,
        static_cast<int>(plan.head_blocks), scale);
    if (plan.num_splits > 1) {
        const dim3 combine_grid(static_cast<unsigned>(num_q_heads), static_cast<unsigned>(batch));
        decode_attention_combine_kernel<T><<<combine_grid, kThreads, 0, stream>>>(
            partial_out, partial_max, partial_sum, static_cast<T*>(out),
            static_cast<int>(num_q_heads), static_cast<int>(head_dim),
            static_cast<int>(plan.num_splits));
    }
    return cudaGetLastError();
}

// The widest load that divides the row size and both cache pointers (rows then stay aligned:
// every row starts a multiple of head_dim elements from the base).
template <typename T>
cudaError_t launch_for_dtype(const void* q, const void* k_cache, const void* v_cache,
                             const int32_t* seq_lens, void* out, float* partial_out,
                             float* partial_max, float* partial_sum, int64_t batch,
                             int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                             int64_t max_seq_len, float scale, const DecodeAttentionPlan& plan,
                             cudaStream_t stream) {
    const uintptr_t bits = reinterpret_cast<uintptr_t>(k_cache) |
                           reinterpret_cast<uintptr_t>(v_cache) |
                           static_cast<uintptr_t>(head_dim * sizeof(T));
#define TOYLLM_LAUNCH(BYTES)                                                                    \
    return launch_typed<T, BYTES>(q, k_cache, v_cache, seq_lens, out, partial_out, partial_max, \
                                  partial_sum, batch, num_q_heads, num_kv_heads, head_dim,      \
                                  max_seq_len, scale, plan, stream)
    if (bits % 16 == 0) {
        TOYLLM_LAUNCH(16);
    }
    if (bits % 8 == 0) {
        TOYLLM_LAUNCH(8);
    }
    if constexpr (sizeof(T) == 4) {
        TOYLLM_LAUNCH(4);
    } else {
        if (bits % 4 == 0) {
            TOYLLM_LAUNCH(4);
        }
        TOYLLM_LAUNCH(2);
    }
#undef TOYLLM_LAUNCH
}

}  // namespace

DecodeAttentionPlan plan_decode_attention(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t max_seq_len, int sm_count) {
    DecodeAttentionPlan plan{1, std::max<int64_t>(max_seq_len, 1), 1};
    if (batch < 1 || num_q_heads < 1 || num_kv_heads < 1 || max_seq_len < 1) {
        return plan;
    }
    const int64_t group = std::max<int64_t>(num_q_heads / num_kv_heads, 1);
    plan.head_blocks = (group + kHeads - 1) / kHeads;
    // About two blocks per SM in total, but no chunk shorter than kMinChunk keys.
    const int64_t blocks_per_split = batch * num_kv_heads * plan.head_blocks;
    const int64_t target = (2 * std::max(sm_count, 1) + blocks_per_split - 1) / blocks_per_split;
    const int64_t most = (max_seq_len + kMinChunk - 1) / kMinChunk;
    const int64_t splits = std::max<int64_t>(1, std::min(target, most));
    int64_t chunk = (max_seq_len + splits - 1) / splits;
    chunk = (chunk + kTile - 1) / kTile * kTile;
    plan.chunk_len = chunk;
    plan.num_splits = (max_seq_len + chunk - 1) / chunk;
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
    if (batch < 0 || num_q_heads < 1 || num_kv_heads < 1 || num_q_heads % num_kv_heads != 0 ||
        head_dim < 1 || head_dim > kDecodeAttentionMaxHeadDim || max_seq_len < 1) {
        return cudaErrorInvalidValue;
    }
    if (batch == 0) {
        return cudaSuccess;
    }
    if (batch > 65535 || num_kv_heads * plan.head_blocks > 65535 || num_q_heads > 2147483647 ||
        plan.num_splits < 1 || plan.num_splits > 2147483647 || plan.chunk_len < 1 ||
        plan.num_splits * plan.chunk_len < max_seq_len ||
        plan.head_blocks * kHeads < num_q_heads / num_kv_heads) {
        return cudaErrorInvalidValue;
    }
    if (q == nullptr || k_cache == nullptr || v_cache == nullptr || seq_lens == nullptr ||
        out == nullptr ||
        (plan.num_splits > 1 &&
         (partial_out == nullptr || partial_max == nullptr || partial_sum == nullptr))) {
        return cudaErrorInvalidValue;
    }
    switch (dtype) {
        case AttentionDtype::kFloat32:
            return launch_for_dtype<float>(
                q, k_cache, v_cache, seq_lens, out, partial_out, partial_max, partial_sum, batch,
                num_q_heads, num_kv_heads, head_dim, max_seq_len, scale, plan, stream);
        case AttentionDtype::kFloat16:
            return launch_for_dtype<__half>(
                q, k_cache, v_cache, seq_lens, out, partial_out, partial_max, partial_sum, batch,
                num_q_heads, num_kv_heads, head_dim, max_seq_len, scale, plan, stream);
        case AttentionDtype::kBFloat16:
            return launch_for_dtype<__nv_bfloat16>(
                q, k_cache, v_cache, seq_lens, out, partial_out, partial_max, partial_sum, batch,
                num_q_heads, num_kv_heads, head_dim, max_seq_len, scale, plan, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
