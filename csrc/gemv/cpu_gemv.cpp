// The CPU implementations of `toyllm::gemv(x, weight) -> y` (schemas: registration.cpp): y =
// F.linear(x, weight) (no bias) for fp32 CPU tensors with a few rows, the matrix-vector products of
// a decode step.
//
// Why: with batch 1 every projection of a decode step is a matrix-vector product that reads
// each weight once, so decode is bound by how fast the weights stream from memory. This loop,
// split over the cores, streams about as fast as MKL's sgemv on the input-major layout, and in
// the whole decode step it is the faster of the two (docs/PERF.md, "CPU decode").
//
// x: [..., in] fp32 (packed here when it is not contiguous); weight: [out, in] fp32, either
// contiguous (nn.Linear's layout; the fastest: each output is a dot product over a contiguous
// row, so the whole matrix streams front to back) or the transposed view of a contiguous
// [in, out] matrix (engine/cpu_layout.py's input-major storage). Any number of rows works;
// the kernel is meant for few (the model uses it for <= 4 rows; prefill keeps MKL).
// Output rows are split over threads with at::parallel_for (OpenMP). The AVX2+FMA kernels are
// chosen at run time (__builtin_cpu_supports), with a portable loop as the fallback, so the
// module needs no -march flag. The fp32 sums run in another order than MKL's: results agree
// to a few ulps of the dot products, not bit for bit.
//
// Also defines `toyllm::gemv_silu_mul(gate_up, weight) -> y` = gemv(silu_mul(gate_up), weight),
// a SwiGLU MLP's down product, whose CUDA kernel computes silu(gate) * up itself (cuda_gemv.cpp);
// on the CPU it runs toyllm::silu_mul then the loop here (same checks as gemv, gate_up [..., 2 *
// in] in x's place).
// And `toyllm::gemv_add_rms_norm(x, residual, norm_weight, eps, weight, warps) -> (sum, y)` = (x +
// residual, F.linear(rms_norm(x + residual), weight)), the product after a residual add and an
// RMSNorm, whose CUDA kernel computes the norm itself; on the CPU toyllm::add_rms_norm then
// F.linear (any dtype add_rms_norm takes; warps, a CUDA launch choice, is only checked). And
// `toyllm::gemv_add_rms_norm_silu_mul`, the same with weight = [gate; up] and y = silu_mul of the
// product (SwiGLU's h). And `toyllm::gemv_add_rms_norm_rope_kv(..., cos, sin, k_cache, v_cache,
// positions, num_q_heads)
// -> (sum, q)`: the q/k/v product handed to toyllm::rope_kv_update (its epilogue on CUDA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GEMV_X86 1
#endif

#include "common/op_args.h"
#include "gemv/gemv_args.h"

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

// ---------------------------------------------------------------------------------------------
// the operator

// The CPU rules of gemv (x_name "x") and gemv_silu_mul ("gate_up"), `op` naming the operator in
// the messages; check_shapes is the operator's shape check of gemv_args.h.
void check_gemv_cpu_args(const char* op, const char* x_name, const at::Tensor& x,
                         const at::Tensor& weight,
                         void (*check_shapes)(const at::Tensor&, const at::Tensor&)) {
    TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": expected ", x_name, " on the CPU, got ",
                      x.device());
    TORCH_CHECK_VALUE(weight.device().is_cpu(), op, ": expected weight on the CPU, got ",
                      weight.device());
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, op, ": expected ", x_name,
                      " of dtype torch.float32, got ", dtype_name(x.scalar_type()));
    TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat, op,
                      ": expected weight of dtype torch.float32, got ",
                      dtype_name(weight.scalar_type()));
    check_shapes(x, weight);
    const bool row_major = weight.is_contiguous();
    const bool input_major =
        weight.stride(0) == 1 && weight.stride(1) == std::max<int64_t>(weight.size(0), 1);
    TORCH_CHECK_VALUE(row_major || input_major, op,
                      ": expected weight [out, in] contiguous (strides [in, 1]) or the "
                      "transposed view of a contiguous [in, out] matrix (strides [1, out]), got "
                      "strides ",
                      weight.strides(), " for shape ", weight.sizes());
}

// y = x @ weight^T on checked arguments.
at::Tensor gemv_cpu_checked(const at::Tensor& x, const at::Tensor& weight) {
    const int64_t out = weight.size(0);
    const int64_t in = weight.size(1);
    std::vector<int64_t> out_shape = x.sizes().vec();
    out_shape.back() = out;
    at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
    if (y.numel() == 0) {
        return y;
    }
    if (in == 0) {
        return y.zero_();
    }
    const at::Tensor xc = x.contiguous();
    const int64_t m_rows = xc.numel() / in;
    const bool row_major = weight.is_contiguous();
    const float* xp = xc.const_data_ptr<float>();
    const float* wp = weight.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();

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
        kernel(xp, wp, yp, m_rows, in, out, b0 * block, std::min(out, b1 * block));
    });
    return y;
}

at::Tensor gemv_cpu(const at::Tensor& x, const at::Tensor& weight) {
    check_gemv_cpu_args("gemv", "x", x, weight, check_gemv_shapes);
    return gemv_cpu_checked(x, weight);
}

// gemv(silu_mul(gate_up), weight): toyllm::silu_mul's CPU kernel (through the dispatcher, so the
// same bits as that operator), then the product above. Nothing is fused on the CPU, where the
// engine does not call it; it is here so that the operator runs everywhere.
at::Tensor gemv_silu_mul_cpu(const at::Tensor& gate_up, const at::Tensor& weight) {
    check_gemv_cpu_args("gemv_silu_mul", "gate_up", gate_up, weight, check_gemv_silu_mul_shapes);
    if (weight.size(1) == 0) {  // silu_mul takes no empty rows; the empty sums are 0
        std::vector<int64_t> out_shape = gate_up.sizes().vec();
        out_shape.back() = weight.size(0);
        return at::zeros(out_shape, gate_up.options().memory_format(at::MemoryFormat::Contiguous));
    }
    static const auto silu_mul = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("toyllm::silu_mul", "")
                                     .typed<at::Tensor(const at::Tensor&)>();
    return gemv_cpu_checked(silu_mul.call(gate_up.contiguous()), weight);
}

// (x + residual, F.linear(rms_norm(x + residual), weight)), and with `silu` toyllm::silu_mul of
// the product: toyllm::add_rms_norm's and silu_mul's CPU kernels (through the dispatcher, so the
// same bits as those operators) and F.linear. Nothing is fused on the CPU, where the engine does
// not call these; they are here so that the operators run everywhere, in every dtype
// add_rms_norm takes.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_product_cpu(const char* op, const at::Tensor& x,
                                                            const at::Tensor& residual,
                                                            const at::Tensor& norm_weight,
                                                            double eps, const at::Tensor& weight,
                                                            bool silu, int64_t warps) {
    check_gemv_add_rms_norm_shapes(op, x, residual, norm_weight, weight, eps, silu, warps);
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"x", x},
                                  {"residual", residual},
                                  {"norm_weight", norm_weight},
                                  {"weight", weight}}) {
        TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": expected ", name,
                          " on the CPU (x's device), got ", t.device());
        check_dtype(op, name, t, x.scalar_type(), "x's dtype");
    }
    static const auto add_rms_norm =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("toyllm::add_rms_norm", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, double)>();
    auto [sum, normed] = add_rms_norm.call(x.contiguous(), residual.contiguous(), norm_weight, eps);
    at::Tensor y = at::linear(normed, weight);
    if (silu) {
        if (weight.size(0) == 0) {  // silu_mul takes no empty rows
            return {sum, y};
        }
        static const auto silu_mul = c10::Dispatcher::singleton()
                                         .findSchemaOrThrow("toyllm::silu_mul", "")
                                         .typed<at::Tensor(const at::Tensor&)>();
        y = silu_mul.call(y);
    }
    return {sum, y};
}

std::tuple<at::Tensor, at::Tensor> gemv_add_rms_norm_cpu(const at::Tensor& x,
                                                         const at::Tensor& residual,
                                                         const at::Tensor& norm_weight, double eps,
                                                         const at::Tensor& weight, int64_t warps) {
    return add_rms_norm_product_cpu("gemv_add_rms_norm", x, residual, norm_weight, eps, weight,
                                    false, warps);
}

std::tuple<at::Tensor, at::Tensor> gemv_add_rms_norm_silu_mul_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, int64_t warps) {
    return add_rms_norm_product_cpu("gemv_add_rms_norm_silu_mul", x, residual, norm_weight, eps,
                                    weight, true, warps);
}

// gemv_add_rms_norm then toyllm::rope_kv_update on the product viewed as [rows, 1, heads,
// head_dim] (through the dispatcher: the same bits and the same checks as those operators).
std::tuple<at::Tensor, at::Tensor> gemv_add_rms_norm_rope_kv_cpu(
    const at::Tensor& x, const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
    const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
    at::Tensor& v_cache, const at::Tensor& positions, int64_t num_q_heads, int64_t warps) {
    const char* op = "gemv_add_rms_norm_rope_kv";
    check_gemv_add_rms_norm_shapes(op, x, residual, norm_weight, weight, eps, false, warps);
    const int64_t head_dim = k_cache.dim() == 4 ? k_cache.size(3) : 0;
    const int64_t out = weight.size(0);
    TORCH_CHECK_VALUE(head_dim >= 1 && out % head_dim == 0, op, ": expected weight rows (", out,
                      ") to be whole heads of k_cache's head_dim (k_cache of shape ",
                      k_cache.sizes(), ")");
    auto [sum, qkv] =
        add_rms_norm_product_cpu(op, x, residual, norm_weight, eps, weight, false, warps);
    static const auto rope_kv_update =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("toyllm::rope_kv_update", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                              at::Tensor&, const at::Tensor&, int64_t)>();
    const int64_t rows = qkv.numel() / out;
    at::Tensor q = rope_kv_update.call(qkv.reshape({rows, 1, out / head_dim, head_dim}), cos, sin,
                                       k_cache, v_cache, positions, num_q_heads);
    return {sum, q};
}

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) {
    m.impl("gemv", &toyllm::gemv_cpu);
    m.impl("gemv_silu_mul", &toyllm::gemv_silu_mul_cpu);
    m.impl("gemv_add_rms_norm", &toyllm::gemv_add_rms_norm_cpu);
    m.impl("gemv_add_rms_norm_silu_mul", &toyllm::gemv_add_rms_norm_silu_mul_cpu);
    m.impl("gemv_add_rms_norm_rope_kv", &toyllm::gemv_add_rms_norm_rope_kv_cpu);
}
