// The fp32 CPU GEMV kernels (cpu_gemv_kernels.h): a row-major loop in AVX-512F, AVX2+FMA and
// portable C++, an input-major loop in AVX2+FMA and portable C++, and the driver that splits
// the output over the threads.
//
// Why: with batch 1 every projection of a decode step is a matrix-vector product that reads
// each weight once, so decode is bound by how fast the weights stream from where they are kept
// (on a small model, the last-level cache, or memory where that is smaller). The row-major loop
// reads one weight row at a time front to back (the whole matrix in one sequential stream); the
// input-major loop keeps 32 outputs in registers while it walks the rows.
// The vector kernels are compiled for their instructions whatever the build's -march (target
// attributes) and chosen at run time (__builtin_cpu_supports, once), so the module runs on any
// x86-64. The AVX-512 row-major kernel does half the AVX2 kernel's loads and FMAs and ends a
// row that is not a multiple of 16 floats with one masked load instead of a scalar loop.
#include "gemv/cpu_gemv_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GEMV_X86 1
#endif

namespace toyllm {
namespace {

// Each thread gets at least this many bytes of weights: below it, waking a second thread
// costs more than it saves.
constexpr int64_t kMinBytesPerThread = 64 * 1024;
constexpr int64_t kRowBlock = 4;   // the row-major kernel's output rows come in shares of these
constexpr int64_t kColBlock = 32;  // output columns per step of the input-major kernel

// ---------------------------------------------------------------------------------------------
// Portable kernels (any CPU; the compiler vectorises what it can).

// A weight's value: fp32 as stored; a bf16 (its bits, uint16_t) widened to the fp32 of the same
// value, exactly (its 16 bits on top of 16 zero bits).
inline float weight_value(float w) { return w; }
inline float weight_value(uint16_t w) {
    const uint32_t bits = static_cast<uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// weight row-major [out, in]: y[m, j] = dot(x[m, :], w[j, :]) for j in [j0, j1).
template <typename W>
void rows_portable(const float* x, const W* w, float* y, int64_t m_rows, int64_t in, int64_t out,
                   int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
        const W* wj = w + j * in;
        for (int64_t m = 0; m < m_rows; ++m) {
            const float* xm = x + m * in;
            float s = 0.f;
            for (int64_t i = 0; i < in; ++i) {
                s += xm[i] * weight_value(wj[i]);
            }
            y[m * out + j] = s;
        }
    }
}

// weight input-major [in, out] (row-major): y[m, j] = sum_i x[m, i] * w[i, j], j in [j0, j1).
void cols_portable(const float* x, const float* w, float* y, int64_t m_rows, int64_t in,
                   int64_t out, int64_t j0, int64_t j1) {
    for (int64_t m = 0; m < m_rows; ++m) {
        float* ym = y + m * out;
        std::fill(ym + j0, ym + j1, 0.f);
        const float* xm = x + m * in;
        for (int64_t i = 0; i < in; ++i) {
            const float xi = xm[i];
            const float* wi = w + i * out;
            for (int64_t j = j0; j < j1; ++j) {
                ym[j] += xi * wi[j];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA kernels, compiled for those instructions whatever the build's -march.

#ifdef GEMV_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 weights as fp32: loaded, or 8 bf16 widened (exact: each bf16's bits on top of 16 zeros).
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* w) {
    return _mm256_loadu_ps(w);
}
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* w) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// One weight row at a time, front to back (see rows_avx512), each row's sum in 8 lanes then
// its last in % 8 products.
template <typename W>
__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const W* w, float* y,
                                                   int64_t m_rows, int64_t in, int64_t out,
                                                   int64_t j0, int64_t j1) {
    const int64_t in8 = in - in % 8;
    for (int64_t j = j0; j < j1; ++j) {
        const W* wj = w + j * in;
        for (int64_t m = 0; m < m_rows; ++m) {
            const float* xm = x + m * in;
            __m256 a = _mm256_setzero_ps();
            for (int64_t i = 0; i < in8; i += 8) {
                a = _mm256_fmadd_ps(load8(wj + i), _mm256_loadu_ps(xm + i), a);
            }
            float s = hsum(a);
            for (int64_t i = in8; i < in; ++i) {  // one rounding each, whatever W
                s = std::fma(xm[i], weight_value(wj[i]), s);
            }
            y[m * out + j] = s;
        }
    }
}

__attribute__((target("avx2,fma"))) void cols_avx2(const float* x, const float* w, float* y,
                                                   int64_t m_rows, int64_t in, int64_t out,
                                                   int64_t j0, int64_t j1) {
    int64_t j = j0;
    // 32 output columns in four registers; each input row contributes one broadcast FMA each
    for (; j + kColBlock <= j1; j += kColBlock) {
        for (int64_t m = 0; m < m_rows; ++m) {
            const float* xm = x + m * in;
            __m256 a0 = _mm256_setzero_ps();
            __m256 a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps();
            __m256 a3 = _mm256_setzero_ps();
            const float* wi = w + j;
            for (int64_t i = 0; i < in; ++i, wi += out) {
                const __m256 xv = _mm256_broadcast_ss(xm + i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wi), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wi + 8), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wi + 16), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wi + 24), xv, a3);
            }
            float* ym = y + m * out + j;
            _mm256_storeu_ps(ym, a0);
            _mm256_storeu_ps(ym + 8, a1);
            _mm256_storeu_ps(ym + 16, a2);
            _mm256_storeu_ps(ym + 24, a3);
        }
    }
    if (j < j1) {
        cols_portable(x, w, y, m_rows, in, out, j, j1);
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512F kernel (row-major only: the input-major loop keeps AVX2's, whose bits it would
// repeat), compiled for those instructions whatever the build's -march.

// The sum of the 16 lanes: halves added, then as hsum. (The halves through zero-masked
// extracts: GCC 12's unmasked ones, and _mm512_reduce_add_ps, warn of an uninitialised
// register under -Wall.)
__attribute__((target("avx512f"))) inline float hsum16(__m512 v) {
    const __m512d vd = _mm512_castps_pd(v);
    const __m256 low = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, vd, 0));
    const __m256 high = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, vd, 1));
    const __m256 s8 = _mm256_add_ps(low, high);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 16 weights as fp32, and the last n < 16 of a row (the other lanes 0): loaded, or bf16
// widened (exact). The bf16 tail goes through a zeroed copy (a masked 16-bit load would need
// AVX-512BW); masked-off lanes read nothing.
__attribute__((target("avx512f"))) inline __m512 load16(const float* w) {
    return _mm512_loadu_ps(w);
}
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* w) {
    // (zero-masked forms: GCC 12's unmasked ones warn of an uninitialised register, as in hsum16)
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm512_castsi512_ps(
        _mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h), 16));
}
__attribute__((target("avx512f"))) inline __m512 load16_tail(const float* w, __mmask16 tail,
                                                             int64_t) {
    return _mm512_maskz_loadu_ps(tail, w);
}
__attribute__((target("avx512f"))) inline __m512 load16_tail(const uint16_t* w, __mmask16,
                                                             int64_t n) {
    uint16_t last[16] = {};
    std::memcpy(last, w, static_cast<size_t>(n) * sizeof(uint16_t));
    return load16(last);
}

// One weight row's partial sums: 16 lanes over the row's whole vectors, then its last in % 16
// by one masked load (`tail`; masked-off lanes add 0).
template <typename W>
__attribute__((target("avx512f"))) inline __m512 row_dot16(const float* xm, const W* wj,
                                                          int64_t in16, __mmask16 tail,
                                                          int64_t n_tail, __m512 acc) {
    for (int64_t i = 0; i < in16; i += 16) {
        acc = _mm512_fmadd_ps(load16(wj + i), _mm512_loadu_ps(xm + i), acc);
    }
    if (tail != 0) {
        acc = _mm512_fmadd_ps(load16_tail(wj + in16, tail, n_tail),
                              _mm512_maskz_loadu_ps(tail, xm + in16), acc);
    }
    return acc;
}

// One weight row at a time, front to back, so the weights stream through memory in one
// sequential pass: on a 2-vCPU AMD EPYC VM whose 32 MiB L3 does not hold a stories15M-shaped
// model's 61 MB, reading four (or two) rows side by side streamed at half the rate of one
// (docs/PERF.md, 2026-12-02, issue 21), the hardware prefetchers following one stream better
// than several short ones. x's rows (<= 4) pass over a weight row while it is in L1.
template <typename W>
__attribute__((target("avx512f"))) void rows_avx512(const float* x, const W* w, float* y,
                                                     int64_t m_rows, int64_t in, int64_t out,
                                                     int64_t j0, int64_t j1) {
    const int64_t in16 = in - in % 16;
    const __mmask16 tail = static_cast<__mmask16>((1u << (in % 16)) - 1u);
    for (int64_t j = j0; j < j1; ++j) {
        const W* wj = w + j * in;
        for (int64_t m = 0; m < m_rows; ++m) {
            y[m * out + j] = hsum16(
                row_dot16(x + m * in, wj, in16, tail, in % 16, _mm512_setzero_ps()));
        }
    }
}

bool cpu_has_avx2_fma() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}

bool cpu_has_avx512f() {
    static const bool has = __builtin_cpu_supports("avx512f");
    return has;
}
#endif

// Blocks of `block` output rows (of `in` weights each) a thread takes at least.
int64_t block_grain(int64_t block, int64_t in) {
    const int64_t bytes_per_block = block * in * static_cast<int64_t>(sizeof(float));
    return std::max<int64_t>(1, kMinBytesPerThread / bytes_per_block);
}

template <typename W>
using Kernel = void (*)(const float*, const W*, float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t);

Kernel<float> kernel_for(GemvIsa isa, bool row_major) {
#ifdef GEMV_X86
    if (isa == GemvIsa::kAvx512) {
        return row_major ? rows_avx512<float> : cols_avx2;
    }
    if (isa == GemvIsa::kAvx2) {
        return row_major ? rows_avx2<float> : cols_avx2;
    }
#endif
    return row_major ? rows_portable<float> : cols_portable;
}

// The row-major kernel of `isa` for weights stored as W (float or bf16's bits).
template <typename W>
Kernel<W> rows_kernel_for(GemvIsa isa) {
#ifdef GEMV_X86
    if (isa == GemvIsa::kAvx512) {
        return rows_avx512<W>;
    }
    if (isa == GemvIsa::kAvx2) {
        return rows_avx2<W>;
    }
#endif
    return rows_portable<W>;
}

// share `part` of `parts` of output rows [j0, j1) (gemv_fp32_cpu_share), weights stored as W
template <typename W>
void rows_share(const float* x, const W* weight, float* y, int64_t rows, int64_t in, int64_t out,
                int64_t j0, int64_t j1, int64_t part, int64_t parts) {
    // whole blocks of the row-major kernel, spread evenly over the parts
    const int64_t num_blocks = (j1 - j0 + kRowBlock - 1) / kRowBlock;
    const int64_t b0 = num_blocks * part / parts, b1 = num_blocks * (part + 1) / parts;
    const int64_t first = j0 + b0 * kRowBlock, last = std::min(j1, j0 + b1 * kRowBlock);
    if (rows == 0 || first >= last) {
        return;
    }
    if (in == 0) {
        for (int64_t m = 0; m < rows; ++m) {
            std::fill(y + m * out + first, y + m * out + last, 0.f);
        }
        return;
    }
    static const Kernel<W> kernel = rows_kernel_for<W>(cpu_gemv_best_isa());
    kernel(x, weight, y, rows, in, out, first, last);
}

// y = x @ weight^T with `kernel`, its output split over ATen's threads in blocks of `block`
// rows (a thread takes at least kMinBytesPerThread of fp32 weights: the same split whatever W).
template <typename W>
void split_over_threads(Kernel<W> kernel, int64_t block, const float* x, const W* weight,
                        float* y, int64_t rows, int64_t in, int64_t out) {
    if (rows == 0 || out == 0) {
        return;
    }
    if (in == 0) {
        std::fill(y, y + rows * out, 0.f);
        return;
    }
    const int64_t num_blocks = (out + block - 1) / block;
    at::parallel_for(0, num_blocks, block_grain(block, in), [&](int64_t b0, int64_t b1) {
        kernel(x, weight, y, rows, in, out, b0 * block, std::min(out, b1 * block));
    });
}

}  // namespace

bool cpu_gemv_supports(GemvIsa isa) {
    switch (isa) {
        case GemvIsa::kPortable:
            return true;
#ifdef GEMV_X86
        case GemvIsa::kAvx2:
            return cpu_has_avx2_fma();
        case GemvIsa::kAvx512:
            return cpu_has_avx512f() && cpu_has_avx2_fma();
#endif
        default:
            return false;
    }
}

GemvIsa cpu_gemv_best_isa() {
    static const GemvIsa best = cpu_gemv_supports(GemvIsa::kAvx512) ? GemvIsa::kAvx512
                                : cpu_gemv_supports(GemvIsa::kAvx2) ? GemvIsa::kAvx2
                                                                    : GemvIsa::kPortable;
    return best;
}

void gemv_fp32_cpu(const float* x, const float* weight, float* y, int64_t rows, int64_t in,
                   int64_t out, bool row_major) {
    gemv_fp32_cpu_isa(cpu_gemv_best_isa(), x, weight, y, rows, in, out, row_major);
}

void gemv_fp32_cpu_isa(GemvIsa isa, const float* x, const float* weight, float* y,
                       int64_t rows, int64_t in, int64_t out, bool row_major) {
    split_over_threads(kernel_for(isa, row_major), row_major ? kRowBlock : kColBlock, x, weight,
                       y, rows, in, out);
}

void gemv_fp32_cpu_isa(GemvIsa isa, const float* x, GemvWeight weight, float* y, int64_t rows,
                       int64_t in, int64_t out) {
    if (weight.bf16 != nullptr) {
        split_over_threads(rows_kernel_for<uint16_t>(isa), kRowBlock, x, weight.bf16, y, rows,
                           in, out);
    } else {
        gemv_fp32_cpu_isa(isa, x, weight.fp32, y, rows, in, out, true);
    }
}

int64_t gemv_fp32_cpu_parts(int64_t in, int64_t out, int64_t threads) {
    const int64_t num_blocks = (out + kRowBlock - 1) / kRowBlock;
    const int64_t grain = block_grain(kRowBlock, in);
    return std::max<int64_t>(1, std::min(threads, (num_blocks + grain - 1) / grain));
}

void gemv_fp32_cpu_share(const float* x, const float* weight, float* y, int64_t rows, int64_t in,
                         int64_t out, int64_t j0, int64_t j1, int64_t part, int64_t parts) {
    rows_share(x, weight, y, rows, in, out, j0, j1, part, parts);
}

void gemv_fp32_cpu_share(const float* x, GemvWeight weight, float* y, int64_t rows, int64_t in,
                         int64_t out, int64_t j0, int64_t j1, int64_t part, int64_t parts) {
    if (weight.bf16 != nullptr) {
        rows_share(x, weight.bf16, y, rows, in, out, j0, j1, part, parts);
    } else {
        rows_share(x, weight.fp32, y, rows, in, out, j0, j1, part, parts);
    }
}

}  // namespace toyllm
