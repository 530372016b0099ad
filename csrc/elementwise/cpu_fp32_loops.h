// The fp32 CPU loops of a Llama layer's elementwise math, on pointers: RMSNorm and RoPE. They
// are the CPU kernels of toyllm::rms_norm, add_rms_norm, rope and rope_kv_update
// (fused_ops.cpp, rope_kv_ops.cpp) and the same steps inside toyllm::cpu_decode_step
// (layer/decode_layer_fp32.cpp): one definition, so those operators give the same bits.
//
// NOTE: compiled without FMA (no -march flag, no target attribute): a * b + c rounds twice, as
// the ATen ops of models/ do. They must stay out of the AVX2+FMA functions of the GEMV, where
// the compiler would be free to contract them.
#pragma once

#include <cstdint>

namespace toyllm {

// out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps) for each of `rows` rows of `hidden`
// floats. The sum of squares is taken in double and rounded once; the mean, + eps and the
// reciprocal square root in fp32 as torch does, so the result is within a few ulps of
// models/layer_math.py's rms_norm (whose fp32 sum runs in another order).
void rms_norm_fp32(const float* x,       // [rows, hidden], contiguous
                   const float* weight,  // [hidden]
                   float* out,           // [rows, hidden], contiguous
                   int64_t rows, int64_t hidden, float eps);

// One head of rotate-half RoPE, models/rope.py's x * cos + rotate_half(x) * sin with its
// rounding (two products, then their sum): out[d] = x[d] cos[d] - x[d + D/2] sin[d] for
// d < D/2, x[d] cos[d] + x[d - D/2] sin[d] above. out may not alias x.
void rope_head_fp32(const float* x,    // [head_dim]
                    const float* cos,  // [head_dim]
                    const float* sin,  // [head_dim]
                    float* out,        // [head_dim]
                    int64_t head_dim);

}  // namespace toyllm
