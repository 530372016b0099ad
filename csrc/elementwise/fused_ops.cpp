// The fused elementwise operators of a Llama layer, one CUDA kernel each (schemas:
// registration.cpp):
//   toyllm::rms_norm(x, weight, eps)  RMSNorm: normalise in fp32, scale in x's dtype
//   toyllm::add_rms_norm(x, residual, weight, eps) -> (x + residual, rms_norm of that sum):
//                                     a layer's residual add and the RMSNorm after it
//   toyllm::rope(x, cos, sin)         rotate-half RoPE, out of place (x may be strided)
//   toyllm::silu_mul(gate_up)         SwiGLU's silu(gate) * up on a fused [gate; up] product
// CPU: the plain torch math of models/layer_math.py and models/rope.py in ATen ops (the same
// ops, so the same bits), except in fp32, where rms_norm, rope and silu_mul are plain C++ loops
// (rope and silu_mul the same bits; rms_norm within a few ulps). CUDA: the kernels of fused_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "common/op_args.h"
#include "elementwise/cpu_fp32_loops.h"
#include "elementwise/cpu_silu_fp32.h"

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "elementwise/fused_kernels.cuh"
#endif

namespace toyllm {
namespace {

// `t` must match x in dtype and device (the messages call x "x").
void check_like_x(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
    check_dtype(op, name, t, x.scalar_type(), "x's");
    check_device(op, name, t, x.device(), "x's device");
}

#ifdef WITH_CUDA_KERNELS
FusedDtype fused_dtype(at::ScalarType t) { return kernel_dtype<FusedDtype>(t); }
#endif

// ---------------------------------------------------------------------------------------------
// rms_norm

// x [..., hidden] and weight [hidden] of rms_norm and add_rms_norm (`op` names which).
void check_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": expected x of at least 1 dim [..., hidden], got ",
                      "shape ", x.sizes());
    const int64_t hidden = x.size(-1);
    TORCH_CHECK_VALUE(hidden >= 1, op, ": expected hidden size x.size(-1) >= 1, got ", hidden);
    TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == hidden, op,
                      ": expected weight of shape [", hidden, "] (x's last dim), got ",
                      weight.sizes());
    check_float_dtype(op, "x", x.scalar_type());
    check_like_x(op, "weight", weight, x);
    check_last_dim_contiguous(op, "x", x);
    TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": expected a contiguous weight, got strides ",
                      weight.strides());
    check_eps(op, eps);
}

void check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_norm_args("rms_norm", x, weight, eps);
}

// fp32: one pass per row in plain C++ (cpu_fp32_loops.h; a decode step's norms of one row each
// cost ~40 us apiece as the 8 ATen ops below), within a few ulps of the ATen ops'.
at::Tensor rms_norm_cpu_fp32(const at::Tensor& x, const at::Tensor& weight, double eps) {
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty_like(xc);
    const int64_t hidden = x.size(-1);
    const int64_t rows = hidden == 0 ? 0 : xc.numel() / hidden;
    rms_norm_fp32(xc.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                  out.mutable_data_ptr<float>(), rows, hidden, static_cast<float>(eps));
    return out;
}

// models/layer_math.py's rms_norm, op for op (fp32: the loop above), on checked arguments.
at::Tensor rms_norm_cpu_math(const at::Tensor& x, const at::Tensor& weight, double eps) {
    if (x.scalar_type() == at::kFloat) {
        return rms_norm_cpu_fp32(x, weight, eps);
    }
    at::Tensor h = x.to(at::kFloat);
    h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
    return (weight * h.to(x.scalar_type())).contiguous();
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_rms_norm_args(x, weight, eps);
    return rms_norm_cpu_math(x, weight, eps);
}

#ifdef WITH_CUDA_KERNELS
at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_rms_norm_args(x, weight, eps);
    const c10::cuda::CUDAGuard guard(x.device());
    // The kernel reads rows at a fixed pitch: a view strided in its leading dims (the last token
    // of a batch, say) is packed first.
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty_like(xc);
    const int64_t hidden = x.size(-1);
    const cudaError_t err =
        launch_rms_norm(xc.const_data_ptr(), weight.const_data_ptr(), out.data_ptr(),
                        fused_dtype(x.scalar_type()), xc.numel() / hidden, hidden,
                        static_cast<float>(eps), at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("rms_norm", err);
    return out;
}
#endif

// ---------------------------------------------------------------------------------------------
// add_rms_norm

// residual: x's shape exactly (no broadcasting: the kernel reads both at one row pitch), dtype
// and device, a contiguous last dim.
void check_add_rms_norm_args(const at::Tensor& x, const at::Tensor& residual,
                             const at::Tensor& weight, double eps) {
    check_norm_args("add_rms_norm", x, weight, eps);
    TORCH_CHECK_VALUE(residual.sizes() == x.sizes(),
                      "add_rms_norm: expected residual of x's shape ", x.sizes(), ", got ",
                      residual.sizes());
    check_like_x("add_rms_norm", "residual", residual, x);
    check_last_dim_contiguous("add_rms_norm", "residual", residual);
}

// models/layer_math.py's add_rms_norm: s = x + residual, the very ATen op torch's `+` runs (so
// the same bits), then rms_norm_cpu's math on s (fp32: its C++ loop, so the same bits as
// rms_norm(s)). Both results contiguous.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
    check_add_rms_norm_args(x, residual, weight, eps);
    at::Tensor sum = at::add(x, residual).contiguous();
    at::Tensor normed = rms_norm_cpu_math(sum, weight, eps);
    return {std::move(sum), std::move(normed)};
}

#ifdef WITH_CUDA_KERNELS
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x,
                                                     const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
    check_add_rms_norm_args(x, residual, weight, eps);
    const c10::cuda::CUDAGuard guard(x.device());
    // rows at a fixed pitch, as in rms_norm_cuda (no copy for the model's tensors)
    const at::Tensor xc = x.contiguous();
    const at::Tensor rc = residual.contiguous();
    at::Tensor sum = at::empty_like(xc);
    at::Tensor out = at::empty_like(xc);
    const int64_t hidden = x.size(-1);
    const cudaError_t err = launch_add_rms_norm(
        xc.const_data_ptr(), rc.const_data_ptr(), weight.const_data_ptr(), sum.data_ptr(),
        out.data_ptr(), fused_dtype(x.scalar_type()), xc.numel() / hidden, hidden,
        static_cast<float>(eps), at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("add_rms_norm", err);
    return {sum, out};
}
#endif

// ---------------------------------------------------------------------------------------------
// rope

void check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK_VALUE(x.dim() == 4,
                      "rope: expected x of 4 dims [batch, tokens, heads, head_dim], got shape ",
                      x.sizes());
    const int64_t batch = x.size(0);
    const int64_t tokens = x.size(1);
    const int64_t head_dim = x.size(3);
    TORCH_CHECK_VALUE(head_dim % 2 == 0, "rope: expected an even head_dim (x.size(3)), got ",
                      head_dim);
    TORCH_CHECK_VALUE(cos.dim() == 4 && cos.size(0) == batch && cos.size(1) == tokens &&
                          cos.size(2) == 1 && cos.size(3) == head_dim,
                      "rope: expected cos of shape [", batch, ", ", tokens, ", 1, ", head_dim,
                      "] (x's batch, tokens and head_dim), got ", cos.sizes());
    TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "rope: expected sin of cos's shape ", cos.sizes(),
                      ", got ", sin.sizes());
    check_float_dtype("rope", "x", x.scalar_type());
    check_like_x("rope", "cos", cos, x);
    check_like_x("rope", "sin", sin, x);
    check_last_dim_contiguous("rope", "x", x);
    check_last_dim_contiguous("rope", "cos", cos);
    check_last_dim_contiguous("rope", "sin", sin);
}

// fp32: models/rope.py's x * cos + rotate_half(x) * sin, head by head (cpu_fp32_loops.h),
// rounding as the ATen ops do: the same bits, a few us instead of ~30 for a decode step's q, k.
at::Tensor rope_cpu_fp32(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
    const float* xp = x.const_data_ptr<float>();
    const float* cp = cos.const_data_ptr<float>();
    const float* sp = sin.const_data_ptr<float>();
    float* op = out.mutable_data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const float* c = cp + b * cos.stride(0) + t * cos.stride(1);
            const float* s = sp + b * sin.stride(0) + t * sin.stride(1);
            for (int64_t h = 0; h < H; ++h) {
                rope_head_fp32(xp + b * x.stride(0) + t * x.stride(1) + h * x.stride(2), c, s,
                               op + ((b * T + t) * H + h) * D, D);
            }
        }
    }
    return out;
}

// models/rope.py's apply_rope, op for op; the result is always a new contiguous tensor.
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    check_rope_args(x, cos, sin);
    if (x.scalar_type() == at::kFloat) {
        return rope_cpu_fp32(x, cos, sin);
    }
    const int64_t half = x.size(3) / 2;
    const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
    return (x * cos + rotated * sin).contiguous();
}

#ifdef WITH_CUDA_KERNELS
at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    check_rope_args(x, cos, sin);
    const c10::cuda::CUDAGuard guard(x.device());
    // x keeps its strides (the kernel takes them); cos and sin share one pair of strides, so
    // they are packed when they differ (in the model both are contiguous: no copy).
    at::Tensor c = cos;
    at::Tensor s = sin;
    if (c.stride(0) != s.stride(0) || c.stride(1) != s.stride(1)) {
        c = c.contiguous();
        s = s.contiguous();
    }
    at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    const cudaError_t err =
        launch_rope(x.const_data_ptr(), c.const_data_ptr(), s.const_data_ptr(), out.data_ptr(),
                    fused_dtype(x.scalar_type()), x.size(0), x.size(1), x.size(2), x.size(3),
                    x.stride(0), x.stride(1), x.stride(2), c.stride(0), c.stride(1),
                    at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("rope", err);
    return out;
}
#endif

// ---------------------------------------------------------------------------------------------
// silu_mul

void check_silu_mul_args(const at::Tensor& gate_up) {
    TORCH_CHECK_VALUE(gate_up.dim() >= 1,
                      "silu_mul: expected gate_up of at least 1 dim [..., 2 * intermediate], got "
                      "shape ",
                      gate_up.sizes());
    const int64_t width = gate_up.size(-1);
    TORCH_CHECK_VALUE(width >= 2 && width % 2 == 0,
                      "silu_mul: expected an even last dim >= 2 (gate and up side by side), got ",
                      width);
    check_float_dtype("silu_mul", "gate_up", gate_up.scalar_type());
    check_last_dim_contiguous("silu_mul", "gate_up", gate_up);
}

// models/layer_math.py's silu_mul: in fp32 on a contiguous gate_up one loop with its bits
// (elementwise/cpu_silu_fp32.h, the loop toyllm::cpu_decode_step's MLP runs), else op for op.
at::Tensor silu_mul_cpu(const at::Tensor& gate_up) {
    check_silu_mul_args(gate_up);
    const int64_t inter = gate_up.size(-1) / 2;
    if (gate_up.scalar_type() == at::kFloat && gate_up.is_contiguous() && silu_fp32_available()) {
        std::vector<int64_t> shape = gate_up.sizes().vec();
        shape.back() = inter;
        at::Tensor out = at::empty(shape, gate_up.options());
        const float* g = gate_up.const_data_ptr<float>();
        const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
        silu_mul_fp32(g, 2 * inter, g + inter, 2 * inter, out.mutable_data_ptr<float>(), inter,
                      gate_up.numel() / (2 * inter), inter, threads);
        return out;
    }
    return (at::silu(gate_up.narrow(-1, 0, inter)) * gate_up.narrow(-1, inter, inter)).contiguous();
}

#ifdef WITH_CUDA_KERNELS
at::Tensor silu_mul_cuda(const at::Tensor& gate_up) {
    check_silu_mul_args(gate_up);
    const c10::cuda::CUDAGuard guard(gate_up.device());
    const at::Tensor gu = gate_up.contiguous();  // rows at a fixed pitch (a no-op in the model)
    const int64_t inter = gu.size(-1) / 2;
    std::vector<int64_t> out_shape = gu.sizes().vec();
    out_shape.back() = inter;
    at::Tensor out = at::empty(out_shape, gu.options());
    const cudaError_t err =
        launch_silu_mul(gu.const_data_ptr(), out.data_ptr(), fused_dtype(gu.scalar_type()),
                        gu.numel() / (2 * inter), inter, at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("silu_mul", err);
    return out;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) {
    m.impl("rms_norm", &toyllm::rms_norm_cpu);
    m.impl("add_rms_norm", &toyllm::add_rms_norm_cpu);
    m.impl("rope", &toyllm::rope_cpu);
    m.impl("silu_mul", &toyllm::silu_mul_cpu);
}

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) {
    m.impl("rms_norm", &toyllm::rms_norm_cuda);
    m.impl("add_rms_norm", &toyllm::add_rms_norm_cuda);
    m.impl("rope", &toyllm::rope_cuda);
    m.impl("silu_mul", &toyllm::silu_mul_cuda);
}
#endif
