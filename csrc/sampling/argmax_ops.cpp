// The CPU and CUDA implementations of `toyllm::argmax(logits, flag_nonfinite) -> index` (schema:
// registration.cpp): torch.argmax(logits, dim=-1) for the greedy pick of a decode step, and with
// flag_nonfinite -1 for each row that holds a NaN or an inf (the engine stops that request).
//
// logits: [rows, vocab], vocab >= 1, fp32, fp16 or bf16 (the same rules on every device);
// index: int64 [rows], torch's answer bit for bit: the first index of the row's maximum, NaN
// counting as the maximum (the first NaN wins). CPU: fp32 rows of finite values in two passes
// of a plain loop (the maximum and the row's finiteness, then its first index), anything else
// at::argmax (the passes in AVX2 where the CPU has it). CUDA: the kernel of argmax.cu, which splits a row over many blocks (torch's reduction takes ~27 us for one row of
// 128,256 logits on an H200). A row-strided view (last dim contiguous, e.g. the last position
// of [rows, tokens, vocab] logits) is read in place; any other layout is packed first. Only the
// index and a small scratch are allocated (through torch's caching allocator), so a call can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/op_args.h"
#include "sampling/argmax_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ARGMAX_X86 1
#endif

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "sampling/argmax.cuh"
#endif

namespace toyllm {
namespace {

void check_argmax_args(const at::Tensor& logits) {
    TORCH_CHECK_VALUE(logits.dim() == 2,
                      "argmax: expected logits of 2 dims [rows, vocab], got shape ",
                      logits.sizes());
    check_float_dtype("argmax", "logits", logits.scalar_type());
    TORCH_CHECK_VALUE(logits.size(1) >= 1,
                      "argmax: expected a non-empty vocab (logits.size(1) >= 1), got shape ",
                      logits.sizes());
}

// The maximum of a row of n >= 1 fp32 values, and whether every value is finite. The maximum
// is exact only when they all are (a NaN may be passed over).
struct RowMax {
    float max;
    bool finite;
};

// In 8 interleaved lanes that the compiler keeps in SIMD registers (one running maximum would be
// a chain of dependent compares), then the lanes' maximum and the last n % 8 values. x - x is 0
// for a finite x and NaN for an inf or a NaN, so a sum of them is 0 exactly when all are finite.
RowMax row_max_fp32(const float* __restrict__ x, int64_t n) {
    float lane[8], bad[8];
    for (int l = 0; l < 8; ++l) {
        lane[l] = x[0];
        bad[l] = 0.f;
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int l = 0; l < 8; ++l) {
            const float v = x[i + l];
            lane[l] = v > lane[l] ? v : lane[l];
            bad[l] += v - v;
        }
    }
    float best = lane[0], nonfinite = bad[0];
    for (int l = 1; l < 8; ++l) {
        best = lane[l] > best ? lane[l] : best;
        nonfinite += bad[l];
    }
    for (; i < n; ++i) {
        best = x[i] > best ? x[i] : best;
        nonfinite += x[i] - x[i];
    }
    return {best, nonfinite == 0.f};
}

// The first index i with x[i] == value, for a value the row holds.
int64_t first_index_fp32(const float* x, float value) {
    int64_t i = 0;
    while (x[i] != value) {  // -0.0 == 0.0, as torch's compare
        ++i;
    }
    return i;
}

#ifdef ARGMAX_X86
// row_max_fp32 in AVX2: the same eight lanes, each v > lane ? v : lane (_mm256_max_ps(v, lane)
// returns lane when either is NaN, as the compare does) and bad += v - v, 32 values a step in
// four such sets folded together at the end. The maximum of finite values is exact in any
// order, so the result is row_max_fp32's whenever the row is finite (otherwise only `finite`
// counts).
__attribute__((target("avx2"))) RowMax row_max_fp32_avx2(const float* x, int64_t n) {
    if (n < 32) {
        return row_max_fp32(x, n);
    }
    __m256 lane[4], bad[4];
    for (int s = 0; s < 4; ++s) {
        lane[s] = _mm256_set1_ps(x[0]);
        bad[s] = _mm256_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        for (int s = 0; s < 4; ++s) {
            const __m256 v = _mm256_loadu_ps(x + i + 8 * s);
            lane[s] = _mm256_max_ps(v, lane[s]);
            bad[s] = _mm256_add_ps(bad[s], _mm256_sub_ps(v, v));
        }
    }
    float lanes[8], bads[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(lane[0], lane[1]),
                                          _mm256_max_ps(lane[2], lane[3])));
    _mm256_storeu_ps(bads, _mm256_add_ps(_mm256_add_ps(bad[0], bad[1]),
                                         _mm256_add_ps(bad[2], bad[3])));
    float best = lanes[0], nonfinite = bads[0];
    for (int l = 1; l < 8; ++l) {
        best = lanes[l] > best ? lanes[l] : best;
        nonfinite += bads[l];
    }
    for (; i < n; ++i) {
        best = x[i] > best ? x[i] : best;
        nonfinite += x[i] - x[i];
    }
    return {best, nonfinite == 0.f};
}

// first_index_fp32 eight values a compare (ordered equality: -0.0 == 0.0, as above).
__attribute__((target("avx2"))) int64_t first_index_fp32_avx2(const float* x, int64_t n,
                                                               float value) {
    const __m256 want = _mm256_set1_ps(value);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const int hits =
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), want, _CMP_EQ_OQ));
        if (hits != 0) {
            return i + __builtin_ctz(static_cast<unsigned>(hits));
        }
    }
    return i + first_index_fp32(x + i, value);
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2");
    return has;
}
#endif

// The two passes, in AVX2 where the CPU has it (the same answers).
RowMax row_max(const float* x, int64_t n) {
#ifdef ARGMAX_X86
    if (cpu_has_avx2()) {
        return row_max_fp32_avx2(x, n);
    }
#endif
    return row_max_fp32(x, n);
}

int64_t first_index(const float* x, int64_t n, float value) {
#ifdef ARGMAX_X86
    if (cpu_has_avx2()) {
        return first_index_fp32_avx2(x, n, value);
    }
#endif
    return first_index_fp32(x, value);
}

// torch.argmax of fp32 rows of finite values in two passes (the maximum, then its first
// index): a small part of the time at::argmax and at::isfinite take together (docs/PERF.md,
// "CPU decode"). Rows with a NaN or an inf take at::argmax, whose NaN rule (the first NaN is
// the maximum) the passes do not follow.
at::Tensor argmax_cpu_fp32(const at::Tensor& logits, bool flag_nonfinite) {
    const int64_t rows = logits.size(0), vocab = logits.size(1);
    // each row read in place at a fixed pitch from a contiguous last dim
    const at::Tensor x = logits.stride(1) == 1 || vocab == 1 ? logits : logits.contiguous();
    at::Tensor index = at::empty({rows}, logits.options().dtype(at::kLong));
    int64_t* out = index.mutable_data_ptr<int64_t>();
    const float* base = x.const_data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = base + r * x.stride(0);
        const RowMax m = row_max(row, vocab);
        if (!m.finite) {
            out[r] = flag_nonfinite ? -1 : at::argmax(x.select(0, r)).item<int64_t>();
            continue;
        }
        out[r] = first_index(row, vocab, m.max);
    }
    return index;
}

}  // namespace

at::Tensor argmax_cpu(const at::Tensor& logits, bool flag_nonfinite) {
    check_argmax_args(logits);
    if (logits.scalar_type() == at::kFloat) {
        return argmax_cpu_fp32(logits, flag_nonfinite);
    }
    at::Tensor index = at::argmax(logits, 1);
    if (flag_nonfinite) {
        index.masked_fill_(at::isfinite(logits).all(1).logical_not(), -1);
    }
    return index;
}

namespace {

#ifdef WITH_CUDA_KERNELS
at::Tensor argmax_cuda(const at::Tensor& logits, bool flag_nonfinite) {
    check_argmax_args(logits);
    TORCH_CHECK_VALUE(logits.is_cuda(), "argmax: expected logits on a CUDA device, got ",
                      logits.device());
    const c10::cuda::CUDAGuard guard(logits.device());  // launch on the logits' GPU
    const int64_t rows = logits.size(0);
    const int64_t vocab = logits.size(1);
    at::Tensor index = at::empty({rows}, logits.options().dtype(at::kLong));
    if (rows == 0) {
        return index;
    }
    // the kernel reads each row at a fixed pitch from a contiguous last dim
    const at::Tensor x = logits.stride(1) == 1 || vocab == 1 ? logits : logits.contiguous();
    const ArgmaxDtype dtype = kernel_dtype<ArgmaxDtype>(x.scalar_type());
    const int sm_count = at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;
    const int64_t scratch_bytes = argmax_scratch_bytes(dtype, rows, vocab, sm_count);
    at::Tensor scratch;
    if (scratch_bytes > 0) {
        scratch = at::empty({scratch_bytes}, x.options().dtype(at::kByte));
    }
    const cudaError_t err =
        launch_argmax(x.const_data_ptr(), x.stride(0), index.mutable_data_ptr<int64_t>(),
                      scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr, scratch_bytes,
                      dtype, rows, vocab, sm_count, flag_nonfinite,
                      at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("argmax", err);
    return index;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("argmax", &toyllm::argmax_cpu); }

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("argmax", &toyllm::argmax_cuda); }
#endif
