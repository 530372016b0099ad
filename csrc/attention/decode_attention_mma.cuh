// Device code of the tensor-core split pass of decode attention: the same contract, chunks and
// arithmetic as the CUDA-core split kernel (decode_attention_kernels.cuh), with q . k and p . v
// done by mma.sync (m16n8k16, fp32 accumulation) on fp16/bf16 caches. Included by
// decode_attention.cu only, which plans the split and launches it; the contract is in
// decode_attention.cuh.
//
// Block (split, kv_head * head_blocks + head_block, b) takes up to kRows = 16 query heads of one
// KV head's group: they are the 16 rows of the mma's A operand (rows past the group are zeros).
// The block's chunk of whole tiles is cut into kWarps runs of consecutive tiles, one per warp.
// Each warp walks its run alone, as FlashAttention-2 walks a query block's key tiles: the raw
// scores S = Q K^T of a whole tile, the online softmax over them, then O += P V. Its K and V
// rows stream through a ring of Ring shared-memory slots of kSlotKeys keys (a tile is one or two
// slots of K, then as many of V), copied with cp.async Ring - 1 slots ahead of their use, so
// the copies run while the warp computes. p is rounded to the cache dtype as it becomes the A
// operand of P V, and the normaliser sums it unrounded, as flash attention does. At the end the
// warps' (max, sum, output) are added up in a fixed order (warp 0 first) through shared memory; a
// chunk of one tile is thus one warp's work, rounded as the fused prefill kernels round it.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16): lane l holds, with r = l / 4 and
// c = 2 * (l % 4), A rows r and r + 8 at columns c, c + 1, c + 8, c + 9; B column r at rows c,
// c + 1, c + 8, c + 9; C rows r and r + 8 at columns c, c + 1. ldmatrix (.trans for V, stored
// key-major) loads the B operands from shared memory rows padded by 16 bytes, so the 8 rows of
// each 8x8 matrix fall in distinct banks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "attention/decode_attention.cuh"
#include "attention/decode_attention_kernels.cuh"
#include "common/float_convert.cuh"
#include "common/programmatic_launch.cuh"

namespace toyllm {
namespace decode_attention_mma {

constexpr int kWarps = 4;  // warps per block, each a run of the chunk's tiles
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kDecodeAttentionMmaHeadsPerBlock;  // query heads per block: the mma's M
constexpr int kPad = 8;        // elements after each shared-memory row (16 bytes)
constexpr int kSlotKeys = 64;  // K or V rows per ring slot

// Ring slots per warp: three (two copies in flight while one slot is used) for head_dim 64,
// where two blocks then fit on an SM, and for 128 (one block).
__host__ __device__ constexpr int ring_slots(int64_t head_dim) { return head_dim <= 128 ? 3 : 2; }

// Bytes of shared memory of the kernel: each warp's ring of slots; the cross-warp reduction at
// the end re-uses them.
__host__ __device__ constexpr int64_t mma_smem_bytes(int64_t head_dim) {
    return kWarps * ring_slots(head_dim) * kSlotKeys * (head_dim + kPad) * 2;
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes from global to shared memory, asynchronously; zeros instead when !valid (nothing is
// read then), so a tile's rows past the chunk's end hold zeros, never stale values.
__device__ __forceinline__ void copy16_async(uint32_t dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void commit_copies() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most Pending committed groups of copies are still in flight.
template <int Pending>
__device__ __forceinline__ void wait_copies_but() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
}

__device__ __forceinline__ void wait_all_copies() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void load_matrices(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

__device__ __forceinline__ void load_matrices_transposed(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address)
                 : "memory");
}

// d += a * b: a 16x16 (row), b 16x8 (col), d 16x8 fp32.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T (to nearest even, as from_float), packed low element first.
template <typename T>
__device__ __forceinline__ uint32_t pack_rounded(float lo, float hi) {
    const T pair[2] = {from_float<T>(lo), from_float<T>(hi)};
    uint32_t bits;
    memcpy(&bits, pair, sizeof(bits));
    return bits;
}

// Two adjacent elements of global memory (4-byte aligned).
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// The split pass on tensor cores. Same arguments and outputs as decode_attention_split_kernel,
// with query heads taken kRows per block. HeadDim is a multiple of 16, Tile of 16. Paged: the
// keys are found through `pages` (k_cache and v_cache are the pools, max_seq_len the capacity).
template <typename T, int HeadDim, int Tile, bool Paged>
__global__ void __launch_bounds__(kThreads, 2) decode_attention_mma_kernel(
    const T* __restrict__ q,               // [batch, num_q_heads, HeadDim]
    const T* __restrict__ k_cache,         // [batch, max_seq_len, num_kv_heads, HeadDim]
    const T* __restrict__ v_cache,         // [batch, max_seq_len, num_kv_heads, HeadDim]
    const int32_t* __restrict__ seq_lens,  // [batch]
    T* __restrict__ out,                   // [batch, num_q_heads, HeadDim] (num_splits == 1)
    float* __restrict__ partial_out,       // [batch, num_q_heads, num_splits, HeadDim]
    float* __restrict__ partial_max,       // [batch, num_q_heads, num_splits]
    float* __restrict__ partial_sum,       // [batch, num_q_heads, num_splits]
    int num_q_heads, int num_kv_heads, int64_t max_seq_len, int num_splits, int head_blocks,
    float scale_log2, bool reverse, PagedKeys pages) {
    wait_for_inputs();
    static_assert(HeadDim % 16 == 0 && Tile % kSlotKeys == 0, "whole mma steps and slots");
    constexpr int kPitch = HeadDim + kPad;     // elements from one shared-memory row to the next
    constexpr int kDimSteps = HeadDim / 16;    // k-steps of Q K^T
    constexpr int kKeyTiles = Tile / 8;        // 8-key column tiles of S
    constexpr int kKeySteps = Tile / 16;       // k-steps of P V
    constexpr int kDimTiles = HeadDim / 8;     // 8-dim column tiles of O
    constexpr int kVecs = HeadDim / 8;         // 16-byte vectors per K/V row
    constexpr int kHalves = Tile / kSlotKeys;  // slots per tile, of K and of V
    constexpr int kRing = ring_slots(HeadDim);
    constexpr int kSlotElems = kSlotKeys * kPitch;
    extern __shared__ __align__(16) unsigned char smem_raw[];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const decode_attention_kernels::SplitBlock block =
        decode_attention_kernels::split_block<kRows, Tile>(seq_lens, num_q_heads, num_kv_heads,
                                                           head_blocks, max_seq_len, num_splits);
    const int split = block.split;
    const int64_t b = block.b;
    const int nh = block.nh;
    const int64_t head_row = block.head_row;
    const int64_t key_begin = block.keys.begin;
    const int64_t key_end = block.keys.end;
    if (key_begin >= key_end) {  // nothing to attend to in this chunk (or at all)
        decode_attention_kernels::write_empty_chunk(out, partial_max, partial_sum, head_row, nh,
                                                    HeadDim, split, num_splits, kThreads);
        return;
    }
    const int num_tiles = static_cast<int>((key_end - key_begin + Tile - 1) / Tile);
    // This warp's run of tiles [first_tile, last_tile), numbered from key_begin.
    const int per_warp = (num_tiles + kWarps - 1) / kWarps;
    const int first_tile = min(warp * per_warp, num_tiles);
    const int run = min(first_tile + per_warp, num_tiles) - first_tile;

    const int64_t row_stride = static_cast<int64_t>(num_kv_heads) * HeadDim;  // key to key
    const int64_t kv_offset = static_cast<int64_t>(block.kv_head) * HeadDim;
    const T* k_rows = k_cache + (b * max_seq_len + key_begin) * row_stride + kv_offset;
    const T* v_rows = v_cache + (b * max_seq_len + key_begin) * row_stride + kv_offset;
    T* ring = reinterpret_cast<T*>(smem_raw) + warp * kRing * kSlotElems;

    // Step i of the run: its tile, last to first with `reverse`; its number of keys.
    auto tile_at = [&](int i) { return first_tile + (reverse ? run - 1 - i : i); };
    auto keys_in = [&](int tile) {
        return static_cast<int>(min(static_cast<int64_t>(Tile),
                                    key_end - key_begin - static_cast<int64_t>(tile) * Tile));
    };
    // Copy number c of the run (2 * kHalves per step: K slots, then V slots) into its slot:
    // kSlotKeys rows, zeros past the tile's keys. Past the run's last copy it copies nothing;
    // the caller commits either way, so that every step commits one group.
    const int copies = run * 2 * kHalves;
    auto start_copy = [&](int c) {
        if (c >= copies) {
            return;
        }
        const int step = c / (2 * kHalves);
        const int part = c - step * 2 * kHalves;
        const int half = part % kHalves;
        const int tile = tile_at(step);
        const int n = keys_in(tile) - half * kSlotKeys;  // rows of this slot with keys
        const int64_t first = static_cast<int64_t>(tile) * Tile + half * kSlotKeys;
        T* slot = ring + (c % kRing) * kSlotElems;
        if constexpr (Paged) {
            // Each row through the table; an entry outside the pool fills it with zeros. Lane l
            // looks up rows l and l + 32 first (independent loads, all in flight at once), and
            // the copies take each row's offset from its lane by a shuffle: looked up inside the
            // copy loop, each lookup waited for the copy before it (the copy's asm clobbers
            // memory), and the paged pass ran at half the contiguous one's speed.
            const T* pool = part < kHalves ? k_cache : v_cache;
            static_assert(kSlotKeys == 64 && 32 % kVecs == 0,
                          "lane l looks up rows l and l + 32; a copy step holds whole rows");
            const int64_t low = lane < n ? decode_attention_kernels::key_row_offset<true>(
                                               pages, b, key_begin + first + lane, max_seq_len,
                                               row_stride, kv_offset)
                                         : -1;
            const int64_t high = lane + 32 < n ? decode_attention_kernels::key_row_offset<true>(
                                                     pages, b, key_begin + first + lane + 32,
                                                     max_seq_len, row_stride, kv_offset)
                                               : -1;
#pragma unroll
            for (int i = 0; i < kSlotKeys * kVecs / 32; ++i) {
                const int e = lane + 32 * i;
                const int key = e / kVecs;
                const int vec = e - key * kVecs;
                // a step's rows are all below 32 or all above: which is known at compile time
                const int64_t offset =
                    __shfl_sync(0xffffffffu, i * 32 / kVecs < 32 ? low : high, key & 31);
                const bool valid = offset >= 0;
                copy16_async(shared_address(slot + key * kPitch + vec * 8),
                             pool + (valid ? offset : 0) + vec * 8, valid);
            }
        } else {
            const T* src = (part < kHalves ? k_rows : v_rows) + first * row_stride;
#pragma unroll 4
            for (int e = lane; e < kSlotKeys * kVecs; e += 32) {
                const int key = e / kVecs;
                const int vec = e - key * kVecs;
                const bool valid = key < n;
                copy16_async(shared_address(slot + key * kPitch + vec * 8),
                             src + (valid ? key : 0) * row_stride + vec * 8, valid);
            }
        }
    };
    // Waits for copy c (the copies committed: kRing - 1 + c), and its slot.
    auto slot_ready = [&](int c) {
        wait_copies_but<kRing - 2>();
        __syncwarp();
        return ring + (c % kRing) * kSlotElems;
    };
    // Slot of copy c used up: the copy kRing - 1 ahead goes into the slot used before it.
    auto slot_done = [&](int c) {
        __syncwarp();  // every lane has read the slot before a copy lands there again
        start_copy(c + kRing - 1);
        commit_copies();
    };

    const int r = lane >> 2;       // this lane's rows r and r + 8 of A, C
    const int c = (lane & 3) * 2;  // and its column pair
    float o[kDimTiles][4];
#pragma unroll
    for (int u = 0; u < kDimTiles; ++u) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            o[u][e] = 0.0f;
        }
    }
    float m[2] = {-INFINITY, -INFINITY};  // running max of rows r, r + 8 (raw score units)
    float l[2] = {0.0f, 0.0f};            // this lane's part of their running sums

#pragma unroll
    for (int c = 0; c < kRing - 1; ++c) {
        start_copy(c);
        commit_copies();
    }

    // Q as the A operand, once: rows past this block's heads are zeros.
    uint32_t qa[kDimSteps][4];
    {
        const T* q0 = q + (head_row + r) * HeadDim + c;
        const T* q8 = q + (head_row + r + 8) * HeadDim + c;
#pragma unroll
        for (int t = 0; t < kDimSteps; ++t) {
            qa[t][0] = r < nh ? load_pair(q0 + 16 * t) : 0u;
            qa[t][1] = r + 8 < nh ? load_pair(q8 + 16 * t) : 0u;
            qa[t][2] = r < nh ? load_pair(q0 + 16 * t + 8) : 0u;
            qa[t][3] = r + 8 < nh ? load_pair(q8 + 16 * t + 8) : 0u;
        }
    }

    // ldmatrix: lane l addresses row l % 8 of matrix l / 8.
    const int mat = lane >> 3;
    const int mat_row = lane & 7;
    int copy = 0;  // the next copy to use
    for (int i = 0; i < run; ++i) {
        const int n = keys_in(tile_at(i));

        // 1. S = Q K^T in fp32, a slot of K at a time.
        float s[kKeyTiles][4];
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = 0.0f;
            }
        }
#pragma unroll
        for (int half = 0; half < kHalves; ++half) {
            const T* k_slot = slot_ready(copy);
#pragma unroll
            for (int jj = 0; jj < kSlotKeys / 8; jj += 2) {
                const int j = half * (kSlotKeys / 8) + jj;
                // matrices: keys 8jj.. (dims +0, +8), keys 8jj+8.. (dims +0, +8)
                const T* row =
                    k_slot + (8 * jj + (mat >> 1) * 8 + mat_row) * kPitch + (mat & 1) * 8;
#pragma unroll
                for (int t = 0; t < kDimSteps; ++t) {
                    uint32_t kb[4];
                    load_matrices(kb, shared_address(row + 16 * t));
                    mma_16816<T>(s[j], qa[t], kb[0], kb[1]);
                    mma_16816<T>(s[j + 1], qa[t], kb[2], kb[3]);
                }
            }
            slot_done(copy++);
        }

        // 2. Online softmax in flash attention's arithmetic (see decode_attention.cuh).
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (8 * j + c + (e & 1) >= n) {
                    s[j][e] = -INFINITY;
                }
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[j][e]);
            }
        }
        float alpha[2];
        float max_scaled[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            // the 4 lanes of a quad hold a row's columns
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
            const float m_new = fmaxf(m[h], tile_max[h]);   // finite: n >= 1
            alpha[h] = exp2f((m[h] - m_new) * scale_log2);  // 0 on the first tile
            max_scaled[h] = m_new * scale_log2;
            m[h] = m_new;
        }
        float sum[2] = {0.0f, 0.0f};
        uint32_t pa[kKeySteps][4];  // P as the A operand, rounded to T
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                p[e] = exp2f(fmaf(s[j][e], scale_log2, -max_scaled[e >> 1]));  // 0 for -inf
                sum[e >> 1] += p[e];
            }
            pa[j >> 1][(j & 1) * 2] = pack_rounded<T>(p[0], p[1]);
            pa[j >> 1][(j & 1) * 2 + 1] = pack_rounded<T>(p[2], p[3]);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l[h] = l[h] * alpha[h] + sum[h];
        }
#pragma unroll
        for (int u = 0; u < kDimTiles; ++u) {
            o[u][0] *= alpha[0];
            o[u][1] *= alpha[0];
            o[u][2] *= alpha[1];
            o[u][3] *= alpha[1];
        }

        // 3. O += P V, a slot of V at a time.
#pragma unroll
        for (int half = 0; half < kHalves; ++half) {
            const T* v_slot = slot_ready(copy);
#pragma unroll
            for (int tt = 0; tt < kSlotKeys / 16; ++tt) {
                const int t = half * (kSlotKeys / 16) + tt;
                // matrices: keys 16tt.. and 16tt+8.. (dims +0), the same keys (dims +8)
                const T* row =
                    v_slot + (16 * tt + (mat & 1) * 8 + mat_row) * kPitch + (mat >> 1) * 8;
#pragma unroll
                for (int u = 0; u < kDimTiles; u += 2) {
                    uint32_t vb[4];
                    load_matrices_transposed(vb, shared_address(row + 8 * u));
                    mma_16816<T>(o[u], pa[t], vb[0], vb[1]);
                    mma_16816<T>(o[u + 1], pa[t], vb[2], vb[3]);
                }
            }
            slot_done(copy++);
        }
    }
    wait_all_copies();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }

    // The warps' results, added up in a fixed order through shared memory (the tile buffers,
    // now unused): red_o [kWarps][kRows][HeadDim], red_m and red_l [kWarps][kRows].
    __syncthreads();
    float* red_o = reinterpret_cast<float*>(smem_raw);
    float* red_m = red_o + kWarps * kRows * HeadDim;
    float* red_l = red_m + kWarps * kRows;
#pragma unroll
    for (int u = 0; u < kDimTiles; ++u) {
        float* row0 = red_o + (warp * kRows + r) * HeadDim + 8 * u + c;
        float* row8 = row0 + 8 * HeadDim;
        row0[0] = o[u][0];
        row0[1] = o[u][1];
        row8[0] = o[u][2];
        row8[1] = o[u][3];
    }
    if ((lane & 3) == 0) {
        red_m[warp * kRows + r] = m[0];
        red_m[warp * kRows + r + 8] = m[1];
        red_l[warp * kRows + r] = l[0];
        red_l[warp * kRows + r + 8] = l[1];
    }
    __syncthreads();
    for (int i = tid; i < nh * HeadDim; i += kThreads) {
        const int g = i / HeadDim;
        const int d = i - g * HeadDim;
        float m_all = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            if (red_l[w * kRows + g] > 0.0f) {  // warps without tiles hold (-inf, 0)
                m_all = fmaxf(m_all, red_m[w * kRows + g]);
            }
        }
        float l_all = 0.0f;
        float o_all = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            const float lw = red_l[w * kRows + g];
            if (lw > 0.0f) {
                const float weight = exp2f((red_m[w * kRows + g] - m_all) * scale_log2);
                l_all = fmaf(lw, weight, l_all);
                o_all = fmaf(weight, red_o[(w * kRows + g) * HeadDim + d], o_all);
            }
        }
        if (num_splits == 1) {
            out[head_row * HeadDim + i] = from_float<T>(o_all / l_all);
        } else {
            partial_out[((head_row + g) * num_splits + split) * HeadDim + d] = o_all;
            if (d == 0) {
                partial_max[(head_row + g) * num_splits + split] = m_all;
                partial_sum[(head_row + g) * num_splits + split] = l_all;
            }
        }
    }
}

}  // namespace decode_attention_mma
}  // namespace toyllm
