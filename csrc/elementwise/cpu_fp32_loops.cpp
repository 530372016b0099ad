// The fp32 CPU loops of RMSNorm and RoPE (cpu_fp32_loops.h).
#include "elementwise/cpu_fp32_loops.h"

#include <cmath>

namespace toyllm {

void rms_norm_fp32(const float* x, const float* weight, float* out, int64_t rows, int64_t hidden,
                   float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * hidden;
        float* orow = out + r * hidden;
        double sum = 0.0;
        for (int64_t i = 0; i < hidden; ++i) {
            sum += static_cast<double>(xr[i]) * xr[i];
        }
        // as torch: mean in fp32, + eps in fp32, rsqrt in fp32
        const float mean = static_cast<float>(sum / static_cast<double>(hidden));
        const float inv = 1.0f / std::sqrt(mean + eps);
        for (int64_t i = 0; i < hidden; ++i) {
            const float h = xr[i] * inv;
            orow[i] = weight[i] * h;
        }
    }
}

void rope_head_fp32(const float* x, const float* cos, const float* sin, float* out,
                    int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t d = 0; d < half; ++d) {
        const float a = x[d] * cos[d];
        const float r = -x[d + half] * sin[d];
        out[d] = a + r;
    }
    for (int64_t d = half; d < head_dim; ++d) {
        const float a = x[d] * cos[d];
        const float r = x[d - half] * sin[d];
        out[d] = a + r;
    }
}

}  // namespace toyllm
