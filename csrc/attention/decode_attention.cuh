// Raw CUDA launcher for decode attention over the KV cache (flash-decoding), plain pointers only
// (no torch), so nvcc compiles it alone.
//
// One new query token per sequence attends over the first seq_lens[b] keys of its cache rows:
//   out[b, h] = softmax(scale * q[b, h] . K[b, :L, h / G]) @ V[b, :L, h / G]
// with G = num_q_heads / num_kv_heads query heads per KV head (GQA; G = num_q_heads is MQA),
// fp32 accumulation and an online (running-max) softmax over tiles of `tile` keys, in the
// arithmetic of flash attention: raw scores q . k in fp32, p = exp2(s * scale * log2(e) - m *
// scale * log2(e)) against the running max m, p rounded to the cache dtype before P @ V while
// the normaliser sums it unrounded. The tiles sit at multiples of `tile` from key 0 and are
// walked first to last, or last to first with `reverse` (FlashAttention-2's forward order), so
// that with one chunk a token's output rounds as the fused prefill kernels round it.
//
// Work split: the grid has num_splits chunks per (KV head, batch row, group of up to
// kDecodeAttentionHeadsPerBlock query heads). On the device each row's own length is cut into
// num_splits chunks of whole tiles, so short rows use few blocks and long rows all of them,
// whatever the cache's capacity. Pass 1 reads each K/V tile once for all the block's query
// heads (through shared memory, the next tile's copy in flight while the current one is used)
// and writes an unnormalised partial output with its max and sum; pass 2 combines the chunks of
// each (b, h) by log-sum-exp. With one chunk pass 1 writes the output and pass 2 is not launched.
// Grid sizes depend only on shapes (never on seq_lens), so launches are CUDA-graph capturable.
//
// Two implementations of pass 1, with the same chunks, tiles and arithmetic: on CUDA cores
// (every dtype and head_dim, kDecodeAttentionHeadsPerBlock query heads per block) and on tensor
// cores (decode_attention_mma.cuh: fp16/bf16, head_dim 64 or 128, tile * head_dim <= 8192,
// 16-byte aligned K/V and 4-byte aligned q; kDecodeAttentionMmaHeadsPerBlock query heads per
// block, the chunk's tiles cut into one run per warp). The plan says which.
//
// Paged K/V (launch_paged_decode_attention): the same kernels, chunks, tiles and arithmetic, with
// each key row found through the row's block table instead of at a fixed stride: key j of row b
// is row (block_tables[b][j >> block_shift] << block_shift) + (j & (block_size - 1)) of the pools
// [num_blocks, block_size, num_kv_heads, head_dim]. The kernels copy K/V to shared memory a row
// at a time, so a tile may span any number of blocks and every power-of-two block size works with
// the 64- and 128-key tiles; a row of the table is read once per copied vector (from L1). Given
// the same keys, capacity and plan, the output is bit for bit decode_attention's.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace toyllm {

constexpr int kDecodeAttentionMaxHeadDim = 256;
constexpr int kDecodeAttentionHeadsPerBlock = 4;
constexpr int kDecodeAttentionMmaHeadsPerBlock = 16;

enum class AttentionDtype { kFloat32, kFloat16, kBFloat16 };

// Where the keys of a paged cache are. Passed by value to the kernels (unused for a contiguous
// cache).
struct PagedKeys {
    const int32_t* block_tables;  // [batch, >= capacity / block_size], rows table_stride apart
    int64_t table_stride;         // entries from one row of the table to the next
    int block_shift;              // log2(block_size)
    int64_t num_blocks;           // entries outside [0, num_blocks) read as zeros
};

// How the work is split; depends only on shapes and the GPU, so scratch buffers can be sized
// (and allocated) before the launch.
struct DecodeAttentionPlan {
    int64_t num_splits;   // chunks of each row's keys (1: no combine pass)
    int64_t tile;         // keys per tile: 64 or 128
    int64_t head_blocks;  // blocks per KV head, each for up to 4 (16 on tensor cores) q heads
    bool reverse;         // walk a chunk's tiles last to first
    bool tensor_cores;    // pass 1 on tensor cores (decode_attention_mma.cuh)
};

// True when the tensor-core pass 1 can take these shapes: fp16/bf16, head_dim 64 or 128,
// tile * head_dim <= 8192 and `aligned` (K/V 16-byte, q 4-byte aligned).
bool decode_attention_tensor_cores_apply(AttentionDtype dtype, int64_t head_dim, int64_t tile,
                                         bool aligned);

// Plans the split for `sm_count` multiprocessors: about two blocks per SM in all when the
// cache holds enough tiles (on tensor cores, one block per SM, each with a tile per warp).
// `tile` must be 64 or 128; `tensor_cores` asks for the tensor-core pass, which the plan takes
// where decode_attention_tensor_cores_apply says it can.
DecodeAttentionPlan plan_decode_attention(int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                                          int64_t head_dim, int64_t max_seq_len,
                                          AttentionDtype dtype, bool aligned, int sm_count,
                                          int64_t tile, bool reverse, bool tensor_cores);

// Scratch sizes in floats for a plan (0 when num_splits == 1).
int64_t decode_attention_partial_out_floats(const DecodeAttentionPlan& plan, int64_t batch,
                                            int64_t num_q_heads, int64_t head_dim);
int64_t decode_attention_partial_stat_floats(const DecodeAttentionPlan& plan, int64_t batch,
                                             int64_t num_q_heads);

// NOTE: seq_lens[b] is clamped to [0, max_seq_len] on the device (the host cannot check it
// without a sync); a sequence with seq_lens[b] == 0 gets an all-zero output.
// Returns cudaErrorInvalidValue for bad sizes (head_dim outside [1, 256], num_q_heads not a
// multiple of num_kv_heads, a tile other than 64 or 128, a tensor-core plan for shapes it does
// not apply to, ...), otherwise cudaGetLastError()
// after the launches.
cudaError_t launch_decode_attention(
    const void* q,            // [batch, num_q_heads, head_dim]
    const void* k_cache,      // [batch, max_seq_len, num_kv_heads, head_dim]
    const void* v_cache,      // [batch, max_seq_len, num_kv_heads, head_dim]
    const int32_t* seq_lens,  // [batch], device memory: valid keys per sequence
    void* out,                // [batch, num_q_heads, head_dim], q's dtype
    float* partial_out,       // [batch, num_q_heads, num_splits, head_dim] (unused if 1 split)
    float* partial_max,       // [batch, num_q_heads, num_splits]           (unused if 1 split)
    float* partial_sum,       // [batch, num_q_heads, num_splits]           (unused if 1 split)
    AttentionDtype dtype, int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
    int64_t head_dim, int64_t max_seq_len, float scale, const DecodeAttentionPlan& plan,
    cudaStream_t stream);

// Decode attention over paged K/V: as launch_decode_attention, key j of row b read through
// pages (see PagedKeys and the header comment); `capacity` (the table's width times block_size)
// takes max_seq_len's place, in the plan too.
// NOTE: a table entry outside [0, num_blocks) for a key below seq_lens[b] reads as a zero key and
// value (the host cannot check device tables without a sync; nothing outside the pools is read).
cudaError_t launch_paged_decode_attention(
    const void* q,            // [batch, num_q_heads, head_dim]
    const void* k_pool,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const void* v_pool,       // [num_blocks, block_size, num_kv_heads, head_dim]
    const PagedKeys& pages,   // block_tables in device memory
    const int32_t* seq_lens,  // [batch], device memory: keys each row attends over
    void* out,                // [batch, num_q_heads, head_dim], q's dtype
    float* partial_out,       // [batch, num_q_heads, num_splits, head_dim] (unused if 1 split)
    float* partial_max,       // [batch, num_q_heads, num_splits]           (unused if 1 split)
    float* partial_sum,       // [batch, num_q_heads, num_splits]           (unused if 1 split)
    AttentionDtype dtype, int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
    int64_t head_dim, int64_t capacity, float scale, const DecodeAttentionPlan& plan,
    cudaStream_t stream);

}  // namespace toyllm
