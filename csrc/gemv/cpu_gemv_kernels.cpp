// The fp32 CPU GEMV kernels (cpu_gemv_kernels.h): a row-major and an input-major loop, each in
// AVX2+FMA and in portable C++, and the driver that splits the output over the threads.
//
// Why: with batch 1 every projection of a decode step is a matrix-vector product that reads
// each weight once, so decode is bound by how fast the weights stream from where they are kept
// (on a small model, the last-level cache). The row-major loop reads four weight rows at a time
// front to back; the input-major loop keeps 32 outputs in registers while it walks the rows.
// The AVX2+FMA kernels are chosen at run time (__builtin_cpu_supports), so the module needs no
// -march flag.
#include "gemv/cpu_gemv_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GEMV_X86 1
#endif

namespace toyllm {
namespace {

// Each thread gets at least this many bytes of weights: below it, waking a second thread
// costs more than it saves.
constexpr int64_t kMinBytesPerThread = 64 * 1024;
constexpr int64_t kRowBlock = 4;   // output rows per step of the row-major kernel
constexpr int64_t kColBlock = 32;  // output columns per step of the input-major kernel

// ---------------------------------------------------------------------------------------------
// Portable kernels (any CPU; the compiler vectorises what it can).

// weight row-major [out, in]: y[m, j] = dot(x[m, :], w[j, :]) for j in [j0, j1).
void rows_portable(const float* x, const float* w, float* y, int64_t m_rows, int64_t in,
                   int64_t out, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
        const float* wj = w + j * in;
        for (int64_t m = 0; m < m_rows; ++m) {
            const float* xm = x + m * in;
            float s = 0.f;
            for (int64_t i = 0; i < in; ++i) {
                s += xm[i] * wj[i];
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

__attribute__((target("avx2,fma"))) void rows_avx2(const float* x, const float* w, float* y,
                                                   int64_t m_rows, int64_t in, int64_t out,
                                                   int64_t j0, int64_t j1) {
    const int64_t in8 = in - in % 8;
    int64_t j = j0;
    // four weight rows at a time: four independent FMA chains per x row; the four rows
    // (<= 4 * in floats) stay in L1 while each x row passes over them
    for (; j + kRowBlock <= j1; j += kRowBlock) {
        const float* w0 = w + j * in;
        const float* w1 = w0 + in;
        const float* w2 = w1 + in;
        const float* w3 = w2 + in;
        for (int64_t m = 0; m < m_rows; ++m) {
            const float* xm = x + m * in;
            __m256 a0 = _mm256_setzero_ps();
            __m256 a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps();
            __m256 a3 = _mm256_setzero_ps();
            for (int64_t i = 0; i < in8; i += 8) {
                const __m256 xv = _mm256_loadu_ps(xm + i);
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
            }
            float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
            for (int64_t i = in8; i < in; ++i) {
                s0 += xm[i] * w0[i];
                s1 += xm[i] * w1[i];
                s2 += xm[i] * w2[i];
                s3 += xm[i] * w3[i];
            }
            float* ym = y + m * out + j;
            ym[0] = s0;
            ym[1] = s1;
            ym[2] = s2;
            ym[3] = s3;
        }
    }
    for (; j < j1; ++j) {  // the last out % 4 rows, one at a time
        const float* wj = w + j * in;
        for (int64_t m = 0; m < m_rows; ++m) {
            const float* xm = x + m * in;
            __m256 a = _mm256_setzero_ps();
            for (int64_t i = 0; i < in8; i += 8) {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(wj + i), _mm256_loadu_ps(xm + i), a);
            }
            float s = hsum(a);
            for (int64_t i = in8; i < in; ++i) {
                s += xm[i] * wj[i];
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

bool cpu_has_avx2_fma() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}
#endif

using Kernel = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                        int64_t);

}  // namespace

void gemv_fp32_cpu(const float* x, const float* weight, float* y, int64_t rows, int64_t in,
                   int64_t out, bool row_major) {
    if (rows == 0 || out == 0) {
        return;
    }
    if (in == 0) {
        std::fill(y, y + rows * out, 0.f);
        return;
    }
    Kernel kernel = row_major ? rows_portable : cols_portable;
#ifdef GEMV_X86
    if (cpu_has_avx2_fma()) {
        kernel = row_major ? rows_avx2 : cols_avx2;
    }
#endif
    // Split the output into blocks of whole kernel steps; a thread takes at least
    // kMinBytesPerThread of weights.
    const int64_t block = row_major ? kRowBlock : kColBlock;
    const int64_t num_blocks = (out + block - 1) / block;
    const int64_t bytes_per_block = block * in * static_cast<int64_t>(sizeof(float));
    const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / bytes_per_block);
    at::parallel_for(0, num_blocks, grain, [&](int64_t b0, int64_t b1) {
        kernel(x, weight, y, rows, in, out, b0 * block, std::min(out, b1 * block));
    });
}

}  // namespace toyllm
