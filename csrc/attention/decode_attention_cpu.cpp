// The fp32 CPU loop of one-token decode attention (decode_attention_cpu.h).
#include "attention/decode_attention_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace toyllm {

// A loop per (sequence, query head) over the sequence's own keys. A decode step of a small model
// attends over a few hundred keys; ATen ops cost ~15 ops (~70 us) per layer there, this a few us.
void decode_attention_fp32_cpu(const float* q, const float* k_cache, const float* v_cache,
                               const int32_t* lens, float* out, int64_t batch, int64_t num_q_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t max_seq_len,
                               int64_t longest, float scale) {
    const int64_t group = num_q_heads / num_kv_heads;
    const int64_t key_stride = num_kv_heads * head_dim;  // contiguous caches
    const int64_t pair_products = std::max<int64_t>(1, 2 * longest * head_dim);
    const int64_t grain = std::max<int64_t>(1, kAttentionGrainProducts / pair_products);
    at::parallel_for(0, batch * num_q_heads, grain, [&](int64_t first, int64_t last) {
        std::vector<float> scores(static_cast<size_t>(std::max<int64_t>(longest, 1)));
        std::vector<float> acc(static_cast<size_t>(head_dim));
        for (int64_t pair = first; pair < last; ++pair) {
            const int64_t b = pair / num_q_heads;
            const int64_t h = pair % num_q_heads;
            const int64_t len = lens[b];
            float* oh = out + (b * num_q_heads + h) * head_dim;
            if (len == 0) {
                std::fill(oh, oh + head_dim, 0.f);  // no keys: the output is zero
                continue;
            }
            const int64_t kvh = h / group;
            const float* qh = q + (b * num_q_heads + h) * head_dim;
            const float* kh = k_cache + b * max_seq_len * key_stride + kvh * head_dim;
            const float* vh = v_cache + b * max_seq_len * key_stride + kvh * head_dim;
            float best = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < len; ++j) {
                scores[j] = dot8(qh, kh + j * key_stride, head_dim) * scale;
                best = std::max(best, scores[j]);
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            float total = 0.f;
            for (int64_t j = 0; j < len; ++j) {
                const float p = std::exp(scores[j] - best);
                total += p;
                const float* vj = vh + j * key_stride;
                for (int64_t d = 0; d < head_dim; ++d) {
                    acc[d] += p * vj[d];
                }
            }
            const float inv = 1.f / total;
            for (int64_t d = 0; d < head_dim; ++d) {
                oh[d] = acc[d] * inv;
            }
        }
    });
}

}  // namespace toyllm
