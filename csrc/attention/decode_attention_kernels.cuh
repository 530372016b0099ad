// Device code of decode attention over the KV cache (flash-decoding with GQA): the split pass,
// the combine pass and their helpers. Included by decode_attention.cu only, which plans the
// split and launches them; the contract is in decode_attention.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include <cstdint>
#include <cstring>

#include "attention/decode_attention.cuh"
#include "common/float_convert.cuh"
#include "common/programmatic_launch.cuh"

namespace toyllm {
namespace decode_attention_kernels {

constexpr int kThreads = 256;  // threads per block of the split pass
constexpr int kWarps = kThreads / 32;
constexpr int kCombineThreads = 128;
constexpr int kHeads = kDecodeAttentionHeadsPerBlock;  // query heads per block, at most
constexpr float kLog2e = 1.4426950408889634f;

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

// Starts copying `count` rows of `vecs` VecBytes-vectors into shared memory, rows packed: row t
// from src + row_offset(t) in global memory (row_offset(t) = t * row_stride for a contiguous
// cache; through the block table for a paged one, where a negative offset, a table entry outside
// the pool, fills the row with zeros when Paged). 4-16 byte vectors go through cp.async (the
// copy overlaps whatever the block does until __pipeline_wait_prior); 2-byte ones are copied
// synchronously (cp.async has no 2-byte form).
template <typename T, int VecBytes, bool Paged, typename RowOffset>
__device__ __forceinline__ void copy_tile(T* smem, const T* __restrict__ src, RowOffset row_offset,
                                          int count, int vecs) {
    constexpr int kElems = VecBytes / static_cast<int>(sizeof(T));
    using Vec = typename RawVec<VecBytes>::type;
    for (int i = threadIdx.x; i < count * vecs; i += kThreads) {
        const int t = i / vecs;
        const int c = i - t * vecs;
        T* dst = smem + (t * vecs + c) * kElems;
        const int64_t offset = row_offset(t);
        if constexpr (Paged) {
            if (offset < 0) {
                *reinterpret_cast<Vec*>(dst) = Vec{};
                continue;
            }
        }
        const T* from = src + offset + c * kElems;
        if constexpr (VecBytes >= 4) {
            __pipeline_memcpy_async(dst, from, VecBytes);
        } else {
            *reinterpret_cast<Vec*>(dst) = *reinterpret_cast<const Vec*>(from);
        }
    }
}

template <typename T, int VecBytes>
__device__ __forceinline__ void load_vec(float (&out)[VecBytes / sizeof(T)], const T* smem) {
    using Vec = typename RawVec<VecBytes>::type;
    constexpr int kElems = VecBytes / static_cast<int>(sizeof(T));
    const Vec raw = *reinterpret_cast<const Vec*>(smem);
    T vals[kElems];
    memcpy(vals, &raw, VecBytes);
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
        out[e] = to_float(vals[e]);
    }
}

// Bytes of shared memory of the split kernel.
__host__ __device__ constexpr int64_t split_smem_bytes(int64_t head_dim, int64_t tile,
                                                       int64_t stages, int64_t elem_bytes) {
    return (kHeads * head_dim    // q_s: [kHeads, head_dim] fp32
            + kHeads * tile      // p_s: [kHeads, tile] scores, then probabilities
            + kHeads * head_dim  // o_s: [kHeads, head_dim] the block's output, summed
            + 3 * kHeads) *
               4                                         // m_s, l_s, alpha_s: [kHeads]
           + stages * 2 * tile * head_dim * elem_bytes;  // K and V tiles, per stage
}

// The keys [begin, end) of chunk `split` of sequence b: its length (clamped to [0, max_seq_len]:
// the host cannot check it without a sync) cut into num_splits chunks of whole tiles. Empty
// (begin >= end) past the row's last tile, and for a sequence of length 0.
struct KeyRange {
    int64_t begin;
    int64_t end;
};

template <int Tile>
__device__ __forceinline__ KeyRange chunk_keys(const int32_t* __restrict__ seq_lens, int64_t b,
                                               int64_t max_seq_len, int split, int num_splits) {
    const int64_t seq_len = min(max(static_cast<int64_t>(seq_lens[b]), int64_t{0}), max_seq_len);
    const int64_t row_tiles = (seq_len + Tile - 1) / Tile;
    const int64_t chunk_tiles = (row_tiles + num_splits - 1) / num_splits;
    const int64_t begin = static_cast<int64_t>(split) * chunk_tiles * Tile;
    return {begin, min(begin + chunk_tiles * Tile, seq_len)};
}

// The work of a pass-1 block (split, kv_head * head_blocks + head_block, b) that takes up to
// HeadsPerBlock query heads: chunk `split` of sequence b's keys (chunk_keys), KV head kv_head,
// its group's query heads h_begin .. h_begin + nh - 1, from (b, h) row head_row on.
struct SplitBlock {
    int split;
    int kv_head;
    int64_t b;
    int nh;            // query heads here, >= 1
    int64_t head_row;  // first (b, h) row here
    KeyRange keys;     // empty past the row's last tile
};

template <int HeadsPerBlock, int Tile>
__device__ __forceinline__ SplitBlock split_block(const int32_t* __restrict__ seq_lens,
                                                  int num_q_heads, int num_kv_heads,
                                                  int head_blocks, int64_t max_seq_len,
                                                  int num_splits) {
    const int split = blockIdx.x;
    const int kv_head = blockIdx.y / head_blocks;
    const int head_block = blockIdx.y - kv_head * head_blocks;
    const int64_t b = blockIdx.z;
    const int group = num_q_heads / num_kv_heads;
    const int h_begin = kv_head * group + head_block * HeadsPerBlock;
    const int nh = min(HeadsPerBlock, (kv_head + 1) * group - h_begin);
    return {split, kv_head, b, nh, b * num_q_heads + h_begin,
            chunk_keys<Tile>(seq_lens, b, max_seq_len, split, num_splits)};
}

// What a block with an empty chunk leaves for its nh query heads from (b, h) row head_row on:
// a zero output with one chunk; with more, a partial that the combine pass leaves out.
template <typename T>
__device__ __forceinline__ void write_empty_chunk(T* __restrict__ out,
                                                  float* __restrict__ partial_max,
                                                  float* __restrict__ partial_sum, int64_t head_row,
                                                  int nh, int head_dim, int split, int num_splits,
                                                  int threads) {
    const int tid = threadIdx.x;
    if (num_splits == 1) {
        for (int i = tid; i < nh * head_dim; i += threads) {
            out[head_row * head_dim + i] = from_float<T>(0.0f);
        }
    } else if (tid < nh) {
        partial_max[(head_row + tid) * num_splits + split] = -INFINITY;
        partial_sum[(head_row + tid) * num_splits + split] = 0.0f;
    }
}

// The element offset, in a cache or pool, of the row of key `key` (from 0) of sequence b for the
// KV head at element kv_offset of a row: b's row of a contiguous cache [batch, max_seq_len,
// ...], or the slot its block table gives in paged pools (-1 for an entry outside the pool).
template <bool Paged>
__device__ __forceinline__ int64_t key_row_offset(const PagedKeys& pages, int64_t b, int64_t key,
                                                  int64_t max_seq_len, int64_t row_stride,
                                                  int64_t kv_offset) {
    if constexpr (Paged) {
        const int64_t block =
            pages.block_tables[b * pages.table_stride + (key >> pages.block_shift)];
        if (block < 0 || block >= pages.num_blocks) {
            return -1;
        }
        const int64_t mask = (int64_t{1} << pages.block_shift) - 1;
        return ((block << pages.block_shift) + (key & mask)) * row_stride + kv_offset;
    } else {
        return (b * max_seq_len + key) * row_stride + kv_offset;
    }
}

// Pass 1. Block (split, kv_head * head_blocks + head_block, b): chunk `split` of sequence b's
// keys, KV head kv_head, query heads h_begin .. h_begin + nh - 1 of its group. Paged: the keys
// are found through `pages` (k_cache and v_cache are the pools, max_seq_len the capacity).
template <typename T, int VecBytes, int Tile, bool Paged>
__global__ void __launch_bounds__(kThreads, 3) decode_attention_split_kernel(
    const T* __restrict__ q,               // [batch, num_q_heads, head_dim]
    const T* __restrict__ k_cache,         // [batch, max_seq_len, num_kv_heads, head_dim]
    const T* __restrict__ v_cache,         // [batch, max_seq_len, num_kv_heads, head_dim]
    const int32_t* __restrict__ seq_lens,  // [batch]
    T* __restrict__ out,                   // [batch, num_q_heads, head_dim] (num_splits == 1)
    float* __restrict__ partial_out,       // [batch, num_q_heads, num_splits, head_dim]
    float* __restrict__ partial_max,       // [batch, num_q_heads, num_splits]
    float* __restrict__ partial_sum,       // [batch, num_q_heads, num_splits]
    int num_q_heads, int num_kv_heads, int head_dim, int64_t max_seq_len, int num_splits,
    int head_blocks, float scale_log2, bool reverse, int stages, PagedKeys pages) {
    wait_for_inputs();
    constexpr int kElems = VecBytes / static_cast<int>(sizeof(T));
    static_assert(Tile % 32 == 0, "a tile is whole warps of keys");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* q_s = reinterpret_cast<float*>(smem_raw);
    float* p_s = q_s + kHeads * head_dim;
    float* o_s = p_s + kHeads * Tile;
    float* m_s = o_s + kHeads * head_dim;
    float* l_s = m_s + kHeads;
    float* alpha_s = l_s + kHeads;
    // The K/V stages follow the floats; (2 * kHeads * head_dim + kHeads * Tile + 3 * kHeads) * 4
    // bytes is a multiple of 32, so they start 16-byte aligned.
    T* kv_s = reinterpret_cast<T*>(alpha_s + kHeads);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    // This block's query heads, and its chunk of the row's tiles (dealt out in whole tiles).
    const SplitBlock block = split_block<kHeads, Tile>(seq_lens, num_q_heads, num_kv_heads,
                                                        head_blocks, max_seq_len, num_splits);
    const int split = block.split;
    const int64_t b = block.b;
    const int nh = block.nh;
    const int outputs = nh * head_dim;  // (head, dim) pairs
    const int64_t head_row = block.head_row;
    const int64_t key_begin = block.keys.begin;
    const int64_t key_end = block.keys.end;
    if (key_begin >= key_end) {  // nothing to attend to in this chunk (or at all)
        write_empty_chunk(out, partial_max, partial_sum, head_row, nh, head_dim, split, num_splits,
                          kThreads);
        return;
    }
    const int num_tiles = static_cast<int>((key_end - key_begin + Tile - 1) / Tile);

    const int vecs = head_dim / kElems;  // vectors per K/V row
    const int64_t row_stride = static_cast<int64_t>(num_kv_heads) * head_dim;  // key to key
    const int64_t kv_offset = static_cast<int64_t>(block.kv_head) * head_dim;
    const int stage_elems = 2 * Tile * head_dim;  // K tile then V tile
    // Tile i of the walk: its first key (from key_begin) and its length.
    auto tile_start = [&](int i) { return (reverse ? num_tiles - 1 - i : i) * Tile; };
    auto tile_len = [&](int i) {
        return static_cast<int>(
            min(static_cast<int64_t>(Tile), key_end - key_begin - tile_start(i)));
    };
    // K and V rows of a key sit at the same offset of their cache or pool.
    auto issue = [&](int i, int stage) {
        T* dst = kv_s + stage * stage_elems;
        const int64_t first = key_begin + tile_start(i);
        auto row_offset = [&](int t) {
            return key_row_offset<Paged>(pages, b, first + t, max_seq_len, row_stride, kv_offset);
        };
        copy_tile<T, VecBytes, Paged>(dst, k_cache, row_offset, tile_len(i), vecs);
        copy_tile<T, VecBytes, Paged>(dst + Tile * head_dim, v_cache, row_offset, tile_len(i),
                                      vecs);
        __pipeline_commit();
    };
    issue(0, 0);

    for (int i = tid; i < outputs; i += kThreads) {
        q_s[i] = to_float(q[head_row * head_dim + i]);
        o_s[i] = 0.0f;
    }
    if (tid < nh) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }

    // Scores: a key row is read by `lanes` adjacent lanes (a power of two, each a vector at a
    // time), which then sum their parts by shuffles; a warp scores 32 / lanes keys at once.
    int lanes = 1;
    while (lanes < vecs && lanes < 32) {
        lanes <<= 1;
    }
    const int sub = lane & (lanes - 1);
    const int key_groups = kWarps * (32 / lanes);
    const int key_group = warp * (32 / lanes) + lane / lanes;
    // P @ V: thread (key lane kl, vector c) sums keys kl, kl + key_lanes, ... for its c.
    const int key_lanes = kThreads / vecs;
    const int c = tid % vecs;
    const int kl = tid / vecs;
    float acc[kHeads][kElems];
#pragma unroll
    for (int g = 0; g < kHeads; ++g) {
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
            acc[g][e] = 0.0f;
        }
    }

    for (int i = 0; i < num_tiles; ++i) {
        const int stage = stages == 2 ? (i & 1) : 0;
        if (stages == 2 && i + 1 < num_tiles) {
            issue(i + 1, stage ^ 1);  // its buffer's last reader finished before the last barrier
            __pipeline_wait_prior(1);
        } else {
            __pipeline_wait_prior(0);
        }
        __syncthreads();  // tile i (and q_s, o_s, the stats on the first trip) visible to all
        const T* k_s = kv_s + stage * stage_elems;
        const T* v_s = k_s + Tile * head_dim;
        const int tile_n = tile_len(i);

        // 1. Raw scores s[g][t] = q_g . k_t in fp32; -inf past the tile's end.
        for (int t0 = 0; t0 < Tile; t0 += key_groups) {  // the same trip count in every lane
            const int t = t0 + key_group;
            float dot[kHeads];
#pragma unroll
            for (int g = 0; g < kHeads; ++g) {
                dot[g] = 0.0f;
            }
            if (t < tile_n) {
                for (int cv = sub; cv < vecs; cv += lanes) {
                    float kv[kElems];
                    load_vec<T, VecBytes>(kv, k_s + (t * vecs + cv) * kElems);
#pragma unroll
                    for (int g = 0; g < kHeads; ++g) {
                        if (g < nh) {
                            const float* qg = q_s + g * head_dim + cv * kElems;
#pragma unroll
                            for (int e = 0; e < kElems; ++e) {
                                dot[g] = fmaf(qg[e], kv[e], dot[g]);
                            }
                        }
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < kHeads; ++g) {
                if (g < nh) {
                    for (int offset = lanes / 2; offset > 0; offset >>= 1) {
                        dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], offset);
                    }
                    if (sub == 0 && t < Tile) {
                        p_s[g * Tile + t] = t < tile_n ? dot[g] : -INFINITY;
                    }
                }
            }
        }
        __syncthreads();

        // 2. Online softmax, a warp per query head, in flash attention's arithmetic:
        //    m' = max(m, max_t s_t); p_t = exp2(s_t * c - m' * c) with c = scale * log2(e);
        //    l' = l * exp2((m - m') * c) + sum_t p_t. P @ V takes p rounded to the cache dtype
        //    while l sums it unrounded, as flash attention (the prefill, the no-cache forward)
        //    does; exact for fp32, where the rounding is an identity.
        for (int g = warp; g < nh; g += kWarps) {
            float s[Tile / 32];
            float tile_max = -INFINITY;
#pragma unroll
            for (int j = 0; j < Tile / 32; ++j) {
                s[j] = p_s[g * Tile + lane + 32 * j];
                tile_max = fmaxf(tile_max, s[j]);
            }
            const float m_old = m_s[g];
            const float m_new = fmaxf(m_old, warp_max(tile_max));  // finite: tile_n >= 1
            const float max_scaled = m_new * scale_log2;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < Tile / 32; ++j) {
                const float p = exp2f(fmaf(s[j], scale_log2, -max_scaled));  // 0 for s = -inf
                sum += p;
                p_s[g * Tile + lane + 32 * j] = round_to<T>(p);
            }
            sum = warp_sum(sum);
            __syncwarp();  // every lane has read m_s[g] before lane 0 overwrites it
            if (lane == 0) {
                const float alpha = exp2f((m_old - m_new) * scale_log2);  // 0 on the first tile
                alpha_s[g] = alpha;
                l_s[g] = l_s[g] * alpha + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();

        // 3. acc[g] = acc[g] * alpha_g + sum_t p[g][t] * v_t over this thread's keys.
        if (kl < key_lanes) {
#pragma unroll
            for (int g = 0; g < kHeads; ++g) {
                if (g < nh) {
                    const float alpha = alpha_s[g];
#pragma unroll
                    for (int e = 0; e < kElems; ++e) {
                        acc[g][e] *= alpha;
                    }
                }
            }
            for (int t = kl; t < tile_n; t += key_lanes) {
                float v[kElems];
                load_vec<T, VecBytes>(v, v_s + (t * vecs + c) * kElems);
#pragma unroll
                for (int g = 0; g < kHeads; ++g) {
                    if (g < nh) {
                        const float p = p_s[g * Tile + t];
#pragma unroll
                        for (int e = 0; e < kElems; ++e) {
                            acc[g][e] = fmaf(p, v[e], acc[g][e]);
                        }
                    }
                }
            }
        }
        __syncthreads();  // the stage, p_s and alpha_s are rewritten next trip
        if (stages == 1 && i + 1 < num_tiles) {
            issue(i + 1, 0);  // one stage: the next tile's copy starts once this one is used
        }
    }

    // The key lanes' sums into o_s, in a fixed order (the output never depends on timing).
    // When a row's vectors tile a warp (every thread takes part), the lanes holding the same
    // vector add up by shuffles, each warp writes its sums to the K/V stage (no longer needed;
    // kWarps * outputs <= 64 * head_dim floats fit in it) and o_s adds the warps up in order.
    // Otherwise (odd head dims) the key lanes add into o_s one after another.
    const bool warp_tiled = vecs <= 32 && (vecs & (vecs - 1)) == 0;
    if (warp_tiled) {
        float* red = reinterpret_cast<float*>(kv_s);  // [kWarps, outputs]
#pragma unroll
        for (int g = 0; g < kHeads; ++g) {
            if (g < nh) {
#pragma unroll
                for (int e = 0; e < kElems; ++e) {
                    float a = acc[g][e];
                    for (int offset = vecs; offset < 32; offset <<= 1) {
                        a += __shfl_xor_sync(0xffffffffu, a, offset);
                    }
                    if (lane < vecs) {
                        red[warp * outputs + g * head_dim + c * kElems + e] = a;
                    }
                }
            }
        }
        __syncthreads();
        for (int i = tid; i < outputs; i += kThreads) {
            float o = 0.0f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                o += red[w * outputs + i];
            }
            o_s[i] = o;
        }
    } else {
        for (int r = 0; r < key_lanes; ++r) {
            if (kl == r) {
#pragma unroll
                for (int g = 0; g < kHeads; ++g) {
                    if (g < nh) {
#pragma unroll
                        for (int e = 0; e < kElems; ++e) {
                            o_s[g * head_dim + c * kElems + e] += acc[g][e];
                        }
                    }
                }
            }
            __syncthreads();
        }
    }
    __syncthreads();

    if (num_splits == 1) {
        for (int i = tid; i < outputs; i += kThreads) {
            out[head_row * head_dim + i] = from_float<T>(o_s[i] / l_s[i / head_dim]);
        }
        return;
    }
    for (int i = tid; i < outputs; i += kThreads) {
        const int g = i / head_dim;
        const int d = i - g * head_dim;
        partial_out[((head_row + g) * num_splits + split) * head_dim + d] = o_s[i];
    }
    if (tid < nh) {
        partial_max[(head_row + tid) * num_splits + split] = m_s[tid];
        partial_sum[(head_row + tid) * num_splits + split] = l_s[tid];
    }
}

// Pass 2. Block (h, b): out[b, h] = sum_s w_s * o_s / sum_s w_s * l_s, w_s = exp(m_s - max m)
// (scores in raw units: exp2 of the difference times scale * log2(e)). Empty chunks (sum 0)
// are left out; no chunk at all (seq_len 0) gives zeros.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) decode_attention_combine_kernel(
    const float* __restrict__ partial_out,  // [batch, num_q_heads, num_splits, head_dim]
    const float* __restrict__ partial_max,  // [batch, num_q_heads, num_splits]
    const float* __restrict__ partial_sum,  // [batch, num_q_heads, num_splits]
    T* __restrict__ out,                    // [batch, num_q_heads, head_dim]
    int num_q_heads, int head_dim, int num_splits, float scale_log2) {
    wait_for_inputs();
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
            l_all += l[s] * exp2f((m[s] - m_all) * scale_log2);
        }
    }
    for (int d = threadIdx.x; d < head_dim; d += kCombineThreads) {
        float o = 0.0f;
        for (int s = 0; s < num_splits; ++s) {
            if (l[s] > 0.0f) {
                o = fmaf(exp2f((m[s] - m_all) * scale_log2),
                         partial_out[(row * num_splits + s) * head_dim + d], o);
            }
        }
        out[row * head_dim + d] = from_float<T>(l_all > 0.0f ? o / l_all : 0.0f);
    }
}

}  // namespace decode_attention_kernels
}  // namespace toyllm
