// The fp32 CPU loop of one-token decode attention (decode_attention_cpu.h).
#include "attention/decode_attention_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ATTENTION_X86 1
#endif

namespace toyllm {
namespace {

// Below this, exp(x) is under FLT_MIN (ln(FLT_MIN) = -87.34): the key's weight p is 0 or a
// denormal, whose products would each cost a microcode assist and add nothing visible (the
// row's largest weight is exp(0) = 1, so total >= 1 and each output is a weighted mean of
// values). Such keys are skipped.
constexpr float kNegligibleExponent = -87.5f;

// acc[d] += p * v[d] for d < n: one product and one add, each rounded.
void axpy_portable(float p, const float* v, float* acc, int64_t n) {
    for (int64_t d = 0; d < n; ++d) {
        acc[d] += p * v[d];
    }
}

#ifdef ATTENTION_X86
// dot8 in AVX2 with dot8's bits: one 8-lane register holds its eight partial sums, each a
// product then an add (no FMA: the target has none), combined in dot8's order
// ((p0 + p4) + (p1 + p5)) + ((p2 + p6) + (p3 + p7)), then the last n % 8 products.
__attribute__((target("avx2"))) float dot8_avx2(const float* a, const float* b, int64_t n) {
    __m256 part = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) {
        part = _mm256_add_ps(part, _mm256_mul_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d)));
    }
    // s = (p0 + p4, p1 + p5, p2 + p6, p3 + p7)
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(part), _mm256_extractf128_ps(part, 1));
    // lane 0: s0 + s1, lane 2: s2 + s3
    const __m128 pairs = _mm_add_ps(s, _mm_movehdup_ps(s));
    float sum = _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehl_ps(pairs, pairs)));
    for (; d < n; ++d) {
        sum += a[d] * b[d];
    }
    return sum;
}

// axpy_portable's bits eight lanes at a time (each lane a product then an add).
__attribute__((target("avx2"))) void axpy_avx2(float p, const float* v, float* acc, int64_t n) {
    const __m256 pv = _mm256_set1_ps(p);
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) {
        _mm256_storeu_ps(acc + d, _mm256_add_ps(_mm256_loadu_ps(acc + d),
                                                _mm256_mul_ps(pv, _mm256_loadu_ps(v + d))));
    }
    for (; d < n; ++d) {
        acc[d] += p * v[d];
    }
}
#endif

// How many keys ahead of the loop a key's (or value's) row is fetched (attend_heads): in a
// decode step the caches come cold, the weights having streamed through the caches since this
// layer last ran, and without it the loads wait on the last-level cache key after key.
constexpr int64_t kPrefetchKeys = 16;

// Asks for the cache lines of `bytes` bytes from p (a hint: nothing waits, nothing faults).
inline void prefetch_bytes(const float* p, int64_t bytes) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t b = 0; b < bytes; b += 64) {
        __builtin_prefetch(c + b, 0, 3);
    }
}

using DotFn = float (*)(const float*, const float*, int64_t);
using AxpyFn = void (*)(float, const float*, float*, int64_t);

// The query heads [h0, h1) of sequence b with len >= 1 keys, key by key: each key's row of
// the cache (all its KV heads, contiguous; rows.slot says where) is read once, front to back,
// for all the heads, so the K and V caches stream through in order (a head at a time would
// stride through them).
// Each head's sums run in key order exactly as a head at a time would: scores[h][j] =
// dot(q_h, k_j) * scale, the running maximum, p = exp(score - max), total += p and acc +=
// p * v_j. scores: (h1 - h0) * len floats, acc: (h1 - h0) * head_dim, best and total: h1 - h0.
template <DotFn dot, AxpyFn axpy>
void attend_heads(const float* q,        // [Hq, D] of the sequence
                  const float* k_cache,  // key j of sequence b at rows.slot(b, j) * key_stride
                  const float* v_cache,  // its value at the same place
                  const CacheRows& rows, int64_t b, int64_t len, int64_t h0, int64_t h1,
                  int64_t group, int64_t key_stride, int64_t head_dim, float scale,
                  float* scores, float* acc, float* best, float* total,
                  float* out) {  // [Hq, D] of the sequence
    const int64_t heads = h1 - h0;
    // the part of a key's or value's row that these heads read
    const int64_t kv0 = (h0 / group) * head_dim;
    const int64_t kv_bytes = ((h1 - 1) / group + 1) * head_dim * 4 - kv0 * 4;
    std::fill(best, best + heads, -std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < len; ++j) {
        const float* kj = k_cache + rows.slot(b, j) * key_stride;
        if (j + kPrefetchKeys < len) {
            prefetch_bytes(k_cache + rows.slot(b, j + kPrefetchKeys) * key_stride + kv0, kv_bytes);
        }
        for (int64_t i = 0; i < heads; ++i) {
            const int64_t h = h0 + i;
            const float s = dot(q + h * head_dim, kj + (h / group) * head_dim, head_dim) * scale;
            scores[i * len + j] = s;
            best[i] = std::max(best[i], s);
        }
    }
    std::fill(acc, acc + heads * head_dim, 0.f);
    std::fill(total, total + heads, 0.f);
    for (int64_t j = 0; j < len; ++j) {
        const float* vj = v_cache + rows.slot(b, j) * key_stride;
        if (j + kPrefetchKeys < len) {
            prefetch_bytes(v_cache + rows.slot(b, j + kPrefetchKeys) * key_stride + kv0, kv_bytes);
        }
        for (int64_t i = 0; i < heads; ++i) {
            const float x = scores[i * len + j] - best[i];
            if (x < kNegligibleExponent) {
                continue;
            }
            const float p = std::exp(x);
            total[i] += p;
            axpy(p, vj + ((h0 + i) / group) * head_dim, acc + i * head_dim, head_dim);
        }
    }
    for (int64_t i = 0; i < heads; ++i) {
        const float inv = 1.f / total[i];
        float* oh = out + (h0 + i) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
            oh[d] = acc[i * head_dim + d] * inv;
        }
    }
}

using HeadsLoop = decltype(&attend_heads<dot8, axpy_portable>);

HeadsLoop heads_loop() {
#ifdef ATTENTION_X86
    static const HeadsLoop loop = __builtin_cpu_supports("avx2")
                                      ? attend_heads<dot8_avx2, axpy_avx2>
                                      : attend_heads<dot8, axpy_portable>;
    return loop;
#else
    return attend_heads<dot8, axpy_portable>;
#endif
}

}  // namespace

int64_t decode_attention_scratch_floats(int64_t heads, int64_t longest, int64_t head_dim) {
    return heads * (std::max<int64_t>(longest, 1) + head_dim + 2);
}

void decode_attention_fp32_cpu_pairs(const float* q, const float* k_cache, const float* v_cache,
                                     const CacheRows& rows, const int32_t* lens, float* out,
                                     int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                     int64_t longest, float scale, int64_t first, int64_t last,
                                     float* scratch) {
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t key_stride = num_kv_heads * head_dim;  // contiguous caches
    const HeadsLoop attend = heads_loop();
    const int64_t most_heads = std::min(last - first, num_q_heads);
    float* scores = scratch;
    float* acc = scores + most_heads * std::max<int64_t>(longest, 1);
    float* best = acc + most_heads * head_dim;
    float* total = best + most_heads;
    // a thread takes its pairs a sequence at a time
    for (int64_t pair = first; pair < last;) {
        const int64_t b = pair / num_q_heads;
        const int64_t h0 = pair % num_q_heads;
        const int64_t h1 = std::min(num_q_heads, h0 + (last - pair));
        const int64_t len = lens[b];
        float* ob = out + b * num_q_heads * head_dim;
        if (len == 0) {  // no keys: the output is zero
            std::fill(ob + h0 * head_dim, ob + h1 * head_dim, 0.f);
        } else {
            attend(q + b * num_q_heads * head_dim, k_cache, v_cache, rows, b, len, h0, h1, group,
                   key_stride, head_dim, scale, scores, acc, best, total, ob);
        }
        pair += h1 - h0;
    }
}

// A loop per sequence over its own keys, for a run of its query heads. A decode step of a
// small model attends over a few hundred keys; ATen ops cost ~15 ops (~70 us) per layer there,
// this a few us.
void decode_attention_fp32_cpu(const float* q, const float* k_cache, const float* v_cache,
                               const CacheRows& rows, const int32_t* lens, float* out,
                               int64_t batch, int64_t num_q_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t longest, float scale) {
    const int64_t pair_products = std::max<int64_t>(1, 2 * longest * head_dim);
    const int64_t grain = std::max<int64_t>(1, kAttentionGrainProducts / pair_products);
    // (sequence, query head) pairs split over the threads
    at::parallel_for(0, batch * num_q_heads, grain, [&](int64_t first, int64_t last) {
        std::vector<float> scratch(static_cast<size_t>(decode_attention_scratch_floats(
            std::min(last - first, num_q_heads), longest, head_dim)));
        decode_attention_fp32_cpu_pairs(q, k_cache, v_cache, rows, lens, out, num_q_heads,
                                        num_kv_heads, head_dim, longest, scale, first, last,
                                        scratch.data());
    });
}

}  // namespace toyllm
