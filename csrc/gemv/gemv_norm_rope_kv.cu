// CUDA q/k/v product after the residual add and input RMSNorm, with RoPE and the K/V write in its
// epilogue (contract in gemv_norm_rope_kv.cuh). The staged GEMV of gemv_staged.cuh pairs the
// rows (i, i + D/2) of each head, so the thread that finishes a pair holds exactly the two
// values RoPE rotates together: a decode step has one kernel per layer fewer (rope_kv_update's)
// and q/k/v are never written and read back.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include "common/vector_pack.cuh"
#include "elementwise/add_rms_norm_stage.cuh"
#include "elementwise/fused_kernels.cuh"
#include "elementwise/rope_rotate.cuh"
#include "gemv/gemv.cuh"
#include "gemv/gemv_norm_rope_kv.cuh"
#include "gemv/gemv_staged.cuh"

namespace toyllm {
namespace {

using gemv_staged::kNormWarps;
using gemv_staged::kThreads;
using gemv_staged::norm_packs16;
using gemv_staged::stage_add_rms_norm;
using gemv_staged::staged_launch;
using gemv_staged::staged_row_pairs;

// Where one head of the product goes, and what RoPE does to it.
struct RopeKvTarget {
    const int32_t* positions;  // [1]
    int64_t num_q_heads, num_kv_heads, head_dim, max_seq_len;
};

// Pair p of the product (rows h * D + i and h * D + i + D/2 of head h = p / (D/2)), values a and b
// (rounded to T): rope_kv_update_kernel's work for that pair.
template <typename T>
__device__ __forceinline__ void rope_kv_pair(int64_t p, T a, T b, const T* __restrict__ cos,
                                             const T* __restrict__ sin, T* __restrict__ q_out,
                                             T* __restrict__ k_cache, T* __restrict__ v_cache,
                                             const RopeKvTarget& t) {
    const int64_t half = t.head_dim / 2;
    const int64_t h = p / half;
    const int64_t i = p % half;
    T* dst;
    bool rotate = true;
    if (h < t.num_q_heads) {
        dst = q_out + h * t.head_dim;
    } else {
        const int64_t pos = t.positions[0];
        // as rope_kv_update: a negative position (a finished row) or one past the cache's end
        // writes nothing
        if (pos < 0 || pos >= t.max_seq_len) {
            return;
        }
        const int64_t kv = h - t.num_q_heads;  // [0, Hkv): k heads, [Hkv, 2 * Hkv): v heads
        rotate = kv < t.num_kv_heads;
        const int64_t kv_head = rotate ? kv : kv - t.num_kv_heads;
        dst = (rotate ? k_cache : v_cache) + (pos * t.num_kv_heads + kv_head) * t.head_dim;
    }
    Pack<T, 1> o1{{a}};
    Pack<T, 1> o2{{b}};
    if (rotate) {
        rope_rotate<T, 1>(Pack<T, 1>{{a}}, Pack<T, 1>{{b}}, Pack<T, 1>{{cos[i]}},
                          Pack<T, 1>{{cos[half + i]}}, Pack<T, 1>{{sin[i]}},
                          Pack<T, 1>{{sin[half + i]}}, o1, o2);
    }
    dst[i] = o1.v[0];
    dst[half + i] = o2.v[0];
}

// N = elements per load of W, NN = elements per access of the norm (add_rms_norm's choice).
template <typename T, int N, int NN>
__global__ void __launch_bounds__(kThreads, 1)
    gemv_norm_rope_kv_kernel(const T* __restrict__ x,            // [in]
                             const T* __restrict__ residual,     // [in]
                             const T* __restrict__ norm_weight,  // [in]
                             const T* __restrict__ weight,       // [out, in]
                             const T* __restrict__ cos,          // [D]
                             const T* __restrict__ sin,          // [D]
                             T* __restrict__ sum_out,            // [in]
                             T* __restrict__ q_out,              // [Hq * D]
                             T* __restrict__ k_cache,            // [max_seq_len, Hkv, D]
                             T* __restrict__ v_cache,            // [max_seq_len, Hkv, D]
                             RopeKvTarget target, int norm_threads, float eps, int64_t in,
                             int64_t out, int warps_per_row) {
    extern __shared__ __align__(16) unsigned char staged[];  // n: [in] of T
    __shared__ float warp_totals[kNormWarps];
    T* n = reinterpret_cast<T*>(staged);
    staged_row_pairs<T, N>(
        weight, in, out, target.head_dim / 2, warps_per_row, n,
        [&] {
            stage_add_rms_norm<T, NN>(n, warp_totals, x, residual, norm_weight, sum_out, in,
                                      norm_threads, eps);
        },
        [&](int64_t p, T a, T b) {
            rope_kv_pair(p, a, b, cos, sin, q_out, k_cache, v_cache, target);
        });
}

template <typename T, int N>
cudaError_t launch_packs(const T* x, const T* residual, const T* norm_weight, const T* weight,
                         const T* cos, const T* sin, T* sum_out, T* q_out, T* k_cache, T* v_cache,
                         const RopeKvTarget& target, int64_t in, int64_t out, float eps,
                         int num_sms, int warps, cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const bool norm_vec = norm_packs16<T>(x, residual, norm_weight, sum_out, in);
    const int norm_threads = rms_norm_threads(norm_vec ? in / kVec : in);
    const auto kernel =
        norm_vec ? gemv_norm_rope_kv_kernel<T, N, kVec> : gemv_norm_rope_kv_kernel<T, N, 1>;
    return staged_launch<T, N>(kernel, in, out, num_sms, warps, stream, x, residual, norm_weight,
                               weight, cos, sin, sum_out, q_out, k_cache, v_cache, target,
                               norm_threads, eps);
}

template <typename T>
cudaError_t launch_for(const void* x, const void* residual, const void* norm_weight,
                       const void* weight, const void* cos, const void* sin, void* sum_out,
                       void* q_out, void* k_cache, void* v_cache, const RopeKvTarget& target,
                       int64_t in, int64_t out, float eps, int num_sms, int warps,
                       cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const auto* xt = static_cast<const T*>(x);
    const auto* rt = static_cast<const T*>(residual);
    const auto* nt = static_cast<const T*>(norm_weight);
    const auto* wt = static_cast<const T*>(weight);
    const auto* ct = static_cast<const T*>(cos);
    const auto* st = static_cast<const T*>(sin);
    auto* so = static_cast<T*>(sum_out);
    auto* qo = static_cast<T*>(q_out);
    auto* kc = static_cast<T*>(k_cache);
    auto* vc = static_cast<T*>(v_cache);
    // gemv.cu's choice for an aligned x: 16-byte loads of W when its rows start 16-byte aligned
    if (in % kVec == 0 && aligned16(weight)) {
        return launch_packs<T, kVec>(xt, rt, nt, wt, ct, st, so, qo, kc, vc, target, in, out, eps,
                                     num_sms, warps, stream);
    }
    return launch_packs<T, 1>(xt, rt, nt, wt, ct, st, so, qo, kc, vc, target, in, out, eps, num_sms,
                              warps, stream);
}

}  // namespace

cudaError_t launch_gemv_norm_rope_kv(const void* x, const void* residual, const void* norm_weight,
                                     const void* weight, const void* cos, const void* sin,
                                     const int32_t* positions, void* sum_out, void* q_out,
                                     void* k_cache, void* v_cache, GemvDtype dtype, int64_t in,
                                     int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                                     int64_t max_seq_len, float eps, int num_sms, int warps,
                                     cudaStream_t stream) {
    if (in < 1 || num_q_heads < 1 || num_kv_heads < 1 || head_dim < 2 || head_dim % 2 != 0 ||
        max_seq_len < 1 || num_sms < 1 || !gemv_staged::valid_block_warps(warps)) {
        return cudaErrorInvalidValue;
    }
    const RopeKvTarget target{positions, num_q_heads, num_kv_heads, head_dim, max_seq_len};
    const int64_t out = (num_q_heads + 2 * num_kv_heads) * head_dim;
    switch (dtype) {
        case GemvDtype::kFloat16:
            return launch_for<__half>(x, residual, norm_weight, weight, cos, sin, sum_out, q_out,
                                      k_cache, v_cache, target, in, out, eps, num_sms, warps,
                                      stream);
        case GemvDtype::kBFloat16:
            return launch_for<__nv_bfloat16>(x, residual, norm_weight, weight, cos, sin, sum_out,
                                             q_out, k_cache, v_cache, target, in, out, eps, num_sms,
                                             warps, stream);
        case GemvDtype::kFloat32:
            return launch_for<float>(x, residual, norm_weight, weight, cos, sin, sum_out, q_out,
                                     k_cache, v_cache, target, in, out, eps, num_sms, warps,
                                     stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
