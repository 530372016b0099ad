// The fp32 CPU loop of one-token decode attention, on pointers: the kernel of
// toyllm::decode_attention on fp32 CPU tensors (attention_ops.cpp) and the attention inside
// toyllm::cpu_decode_step (layer/decode_layer_fp32.cpp) and of toyllm::paged_decode_attention on
// fp32 CPU tensors (paged_attention_ops.cpp), one definition so all three give the same bits;
// its q . k product and work grain, which the paged loop of fp16/bf16 pools shares.
#pragma once

#include <cstdint>

namespace toyllm {

// q . k over n floats in 8 interleaved partial sums, which the compiler keeps in SIMD registers
// (a single running sum is a chain of dependent adds it may not reorder), added pairwise at the
// end, then the last n % 8 products.
inline float dot8(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
    float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) {
        for (int l = 0; l < 8; ++l) {
            part[l] += a[d + l] * b[d + l];
        }
    }
    float sum =
        ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    for (; d < n; ++d) {
        sum += a[d] * b[d];
    }
    return sum;
}

// Where key j of sequence b sits in a cache, in rows of Hkv * D floats: a contiguous cache
// [batch, max_seq_len, Hkv, D] (tables null), or a paged pool [num_blocks, block_size, Hkv, D]
// whose block for key j is tables[b * table_stride + j / block_size] (block_size a power of two,
// 1 << block_shift; the caller checked every entry it reaches).
struct CacheRows {
    int64_t max_seq_len = 0;           // contiguous: keys per sequence
    const int32_t* tables = nullptr;   // paged: [batch, table_stride] block ids
    int64_t table_stride = 0;
    int block_shift = 0;
    int64_t slot(int64_t b, int64_t j) const {
        if (tables == nullptr) {
            return b * max_seq_len + j;
        }
        const int64_t block = tables[b * table_stride + (j >> block_shift)];
        return (block << block_shift) + (j & ((int64_t{1} << block_shift) - 1));
    }
};

// Products of q . k and p * v below which one unit of attention work (a sequence and head) is
// not worth waking another thread for: a decode step of a small model at a short context stays
// on the calling thread, long contexts are split over the cores.
constexpr int64_t kAttentionGrainProducts = int64_t{1} << 15;

// For each sequence b and query head h: out[b, h] = softmax(q[b, h] . K[b, :lens[b]] * scale)
// @ V[b, :lens[b]] over the keys of its KV head h / (Hq / Hkv) (GQA), with a running maximum
// for the softmax; a sequence with lens[b] == 0 gets zeros. Keys and values past lens[b] are
// never read. `longest` is the largest lens[b] (each lens[b] in [0, max_seq_len], checked by
// the caller; paged: every table entry below lens[b] in range). The (sequence, head) pairs are
// split over ATen's threads when there is enough work; a thread walks its heads of a sequence
// key by key, so the caches stream through in order. Each pair's sums run in one order whatever
// the split, with dot8's bits for q . k (AVX2 where the CPU has it, the same bits); keys whose
// softmax weight is under FLT_MIN are skipped (they would add nothing visible: see
// decode_attention_cpu.cpp).
void decode_attention_fp32_cpu(const float* q,        // [batch, Hq, D], contiguous
                               const float* k_cache,  // keys at rows.slot(b, j), contiguous
                               const float* v_cache,  // values at the same slots
                               const CacheRows& rows,
                               const int32_t* lens,   // [batch]
                               float* out,            // [batch, Hq, D], contiguous
                               int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t longest, float scale);

// The same for the pairs [first, last) of (sequence, query head), pair = b * Hq + h, on the
// calling thread: what each thread of a caller's own parallel region runs (cpu_decode_step), the
// same bits per pair. scratch: decode_attention_scratch_floats(min(last - first, Hq), longest,
// head_dim) floats.
int64_t decode_attention_scratch_floats(int64_t heads, int64_t longest, int64_t head_dim);
void decode_attention_fp32_cpu_pairs(const float* q, const float* k_cache, const float* v_cache,
                                     const CacheRows& rows, const int32_t* lens, float* out,
                                     int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                     int64_t longest, float scale, int64_t first, int64_t last,
                                     float* scratch);

}  // namespace toyllm
