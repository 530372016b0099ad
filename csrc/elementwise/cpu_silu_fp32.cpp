// silu(gate) * up with ATen's bits (cpu_silu_fp32.h).
#include "elementwise/cpu_silu_fp32.h"

#include <ATen/Version.h>
#include <ATen/TensorIterator.h>

#include <algorithm>
#include <cmath>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SILU_X86 1
#endif

#ifdef SILU_X86
// SLEEF's exp as ATen's Vectorized<float>::exp() calls it (libtorch_cpu exports both; each
// picks its code for the CPU once, as it does for ATen).
extern "C" {
__attribute__((target("avx512f"))) __m512 Sleef_expf16_u10(__m512);
__attribute__((target("avx2,fma"))) __m256 Sleef_expf8_u10(__m256);
}
#endif

namespace toyllm {
namespace {

// ATen's scalar form, std::exp and one IEEE divide (its silu kernel's scalar lambda), then up.
inline float silu_mul_scalar(float g, float u) {
    return g / (1.0f + std::exp(-g)) * u;
}

void run_scalar(const float* gate, const float* up, float* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        out[i] = silu_mul_scalar(gate[i], up[i]);
    }
}

#ifdef SILU_X86
// Vectorized<float>'s x / (1 + (-x).exp()) (neg: the sign bit flipped, here in AVX512F's integer
// xor), 16 lanes.
__attribute__((target("avx512f"))) void run_avx512(const float* gate, const float* up,
                                                    float* out, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const int64_t vec_end = n - n % 32;
    int64_t i = 0;
    for (; i < vec_end; i += 16) {
        const __m512 x = _mm512_loadu_ps(gate + i);
        const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign));
        const __m512 e = Sleef_expf16_u10(neg);
        const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, e));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
    }
    run_scalar(gate + i, up + i, out + i, n - i);
}

// The same in 8 lanes (Vectorized<float> under AVX2).
__attribute__((target("avx2,fma"))) void run_avx2(const float* gate, const float* up, float* out,
                                                  int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t vec_end = n - n % 16;
    int64_t i = 0;
    for (; i < vec_end; i += 8) {
        const __m256 x = _mm256_loadu_ps(gate + i);
        const __m256 e = Sleef_expf8_u10(_mm256_xor_ps(x, sign));
        const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    run_scalar(gate + i, up + i, out + i, n - i);
}
#endif

using RunFn = void (*)(const float*, const float*, float*, int64_t);

struct SiluKind {
    RunFn run;      // null: not repeatable here
    int64_t chunk;  // two vector registers of ATen's
};

SiluKind silu_kind() {
    static const SiluKind kind = [] {
        const std::string cap = at::get_cpu_capability();
#ifdef SILU_X86
        if (cap == "AVX512" && __builtin_cpu_supports("avx512f")) {
            return SiluKind{run_avx512, 32};
        }
        if (cap == "AVX2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            return SiluKind{run_avx2, 16};
        }
        if (cap == "DEFAULT") {  // Vectorized<float> maps std::exp over its lanes
            return SiluKind{run_scalar, 1};
        }
#endif
        return SiluKind{nullptr, 1};
    }();
    return kind;
}

}  // namespace

bool silu_fp32_available() {
    return silu_kind().run != nullptr;
}

int64_t silu_fp32_chunk() {
    return silu_kind().chunk;
}

void silu_mul_fp32_run(const float* gate, const float* up, float* out, int64_t n) {
    silu_kind().run(gate, up, out, n);
}

bool silu_fp32_rows_are_runs(int64_t rows, int64_t inter, int64_t threads) {
    return rows * inter <= at::internal::GRAIN_SIZE || threads <= 1;
}

void silu_mul_fp32(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
                   float* out, int64_t out_stride, int64_t rows, int64_t inter, int64_t threads) {
    const int64_t numel = rows * inter;
    if (numel == 0) {
        return;
    }
    // ATen's chunks: one when its for_each runs serially, else at::parallel_for's split of the
    // elements over min(threads, numel / grain rounded up) threads
    int64_t chunk = numel;
    if (!silu_fp32_rows_are_runs(rows, inter, threads)) {
        const int64_t grain = at::internal::GRAIN_SIZE;
        const int64_t parts = std::min(threads, (numel + grain - 1) / grain);
        chunk = (numel + parts - 1) / parts;
    }
    for (int64_t begin = 0; begin < numel; begin += chunk) {
        const int64_t end = std::min(numel, begin + chunk);
        // the chunk's runs: the parts of rows it covers, each from where it starts in the row
        for (int64_t r = begin / inter; r * inter < end; ++r) {
            const int64_t c0 = std::max(begin, r * inter) - r * inter;
            const int64_t c1 = std::min(end, (r + 1) * inter) - r * inter;
            silu_mul_fp32_run(gate + r * gate_stride + c0, up + r * up_stride + c0,
                              out + r * out_stride + c0, c1 - c0);
        }
    }
}

}  // namespace toyllm
