// CPU implementation of the KV-cache update: memcpy of contiguous row runs, in parallel when
// the update is large.
#include "cache/kv_update_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace toyllm {

void kv_update_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& new_k,
                   const at::Tensor& new_v, const at::Tensor& positions) {
    const int64_t batch = k_cache.size(0);
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_tokens = new_k.size(1);
    const int64_t row_bytes = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();

    char* const caches[2] = {static_cast<char*>(k_cache.data_ptr()),
                             static_cast<char*>(v_cache.data_ptr())};
    const char* const news[2] = {static_cast<const char*>(new_k.const_data_ptr()),
                                 static_cast<const char*>(new_v.const_data_ptr())};
    const int32_t* const pos = positions.const_data_ptr<int32_t>();

    // Work items are rows (pair, token), pair = 2 * b + (0 for K, 1 for V). A chunk of items
    // is copied as a few memcpy calls, one per contiguous run of rows within a pair.
    const int64_t total_rows = 2 * batch * num_tokens;
    const int64_t grain_rows =
        std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(row_bytes, 1));
    at::parallel_for(0, total_rows, grain_rows, [&](int64_t begin, int64_t end) {
        int64_t i = begin;
        while (i < end) {
            const int64_t pair = i / num_tokens;
            const int64_t t0 = i % num_tokens;
            const int64_t t1 = std::min(num_tokens, t0 + (end - i));
            const int64_t b = pair / 2;
            const int64_t which = pair % 2;
            const int64_t p = pos[b];
            // NOTE: inactive sequence (negative position): nothing written.
            if (p >= 0 && p + num_tokens <= max_seq_len) {
                char* dst = caches[which] + ((b * max_seq_len) + p + t0) * row_bytes;
                const char* src = news[which] + ((b * num_tokens) + t0) * row_bytes;
                std::memcpy(dst, src, static_cast<size_t>((t1 - t0) * row_bytes));
            }
            i += t1 - t0;
        }
    });
}

}  // namespace toyllm
