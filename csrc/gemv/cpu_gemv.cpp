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
// [in, out] matrix (engine/cpu_layout.py's input-major storage); or bf16 and contiguous, each
// value widened to its fp32 as it is read (the fp32 product's bits on those values from half
// the bytes: cpu_gemv_kernels.h). Any number of rows works;
// the kernel is meant for few (the model uses it for <= 4 rows; prefill keeps MKL).
// The loops are those of cpu_gemv_kernels.cpp (output rows split over threads with
// at::parallel_for, AVX2+FMA chosen at run time). The fp32 sums run in another order than
// MKL's: results agree to a few ulps of the dot products, not bit for bit.
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
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/dispatched_ops.h"
#include "common/op_args.h"
#include "gemv/cpu_gemv_isa.h"
#include "gemv/cpu_gemv_kernels.h"
#include "gemv/gemv_args.h"

namespace toyllm {
namespace {

// ---------------------------------------------------------------------------------------------
// the operator

// The CPU rules of gemv (x_name "x") and gemv_silu_mul ("gate_up"), `op` naming the operator in
// the messages; check_shapes is the operator's shape check of gemv_args.h.
// `bf16_weight`: the weight may also be bf16 (contiguous), read as the fp32 of its values.
void check_gemv_cpu_args(const char* op, const char* x_name, const at::Tensor& x,
                         const at::Tensor& weight,
                         void (*check_shapes)(const at::Tensor&, const at::Tensor&),
                         bool bf16_weight) {
    TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": expected ", x_name, " on the CPU, got ",
                      x.device());
    TORCH_CHECK_VALUE(weight.device().is_cpu(), op, ": expected weight on the CPU, got ",
                      weight.device());
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, op, ": expected ", x_name,
                      " of dtype torch.float32, got ", dtype_name(x.scalar_type()));
    if (bf16_weight) {
        TORCH_CHECK_VALUE(
            weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16, op,
            ": expected weight of dtype torch.float32 (or torch.bfloat16, read as fp32 values), "
            "got ", dtype_name(weight.scalar_type()));
    } else {
        TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat, op,
                          ": expected weight of dtype torch.float32, got ",
                          dtype_name(weight.scalar_type()));
    }
    check_shapes(x, weight);
    TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat || weight.is_contiguous(), op,
                      ": expected a bf16 weight [out, in] contiguous (strides [in, 1]), got "
                      "strides ", weight.strides(), " for shape ", weight.sizes());
    const bool row_major = weight.is_contiguous();
    const bool input_major =
        weight.stride(0) == 1 && weight.stride(1) == std::max<int64_t>(weight.size(0), 1);
    TORCH_CHECK_VALUE(row_major || input_major, op,
                      ": expected weight [out, in] contiguous (strides [in, 1]) or the "
                      "transposed view of a contiguous [in, out] matrix (strides [1, out]), got "
                      "strides ",
                      weight.strides(), " for shape ", weight.sizes());
}

// y = x @ weight^T on checked arguments, with the kernels of `isa`.
at::Tensor gemv_cpu_checked(const at::Tensor& x, const at::Tensor& weight,
                            GemvIsa isa = cpu_gemv_best_isa()) {
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
    if (weight.scalar_type() == at::kBFloat16) {  // row-major (checked)
        GemvWeight w;
        w.bf16 = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<at::BFloat16>());
        gemv_fp32_cpu_isa(isa, xc.const_data_ptr<float>(), w, y.mutable_data_ptr<float>(),
                          xc.numel() / in, in, out);
        return y;
    }
    gemv_fp32_cpu_isa(isa, xc.const_data_ptr<float>(), weight.const_data_ptr<float>(),
                      y.mutable_data_ptr<float>(), xc.numel() / in, in, out,
                      weight.is_contiguous());
    return y;
}

at::Tensor gemv_cpu(const at::Tensor& x, const at::Tensor& weight) {
    check_gemv_cpu_args("gemv", "x", x, weight, check_gemv_shapes, true);
    return gemv_cpu_checked(x, weight);
}

// gemv(silu_mul(gate_up), weight): toyllm::silu_mul's CPU kernel (through the dispatcher, so the
// same bits as that operator), then the product above. Nothing is fused on the CPU, where the
// engine does not call it; it is here so that the operator runs everywhere.
at::Tensor gemv_silu_mul_cpu(const at::Tensor& gate_up, const at::Tensor& weight) {
    check_gemv_cpu_args("gemv_silu_mul", "gate_up", gate_up, weight, check_gemv_silu_mul_shapes,
                        false);
    if (weight.size(1) == 0) {  // silu_mul takes no empty rows; the empty sums are 0
        std::vector<int64_t> out_shape = gate_up.sizes().vec();
        out_shape.back() = weight.size(0);
        return at::zeros(out_shape, gate_up.options().memory_format(at::MemoryFormat::Contiguous));
    }
    return gemv_cpu_checked(call_silu_mul(gate_up.contiguous()), weight);
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
    auto [sum, normed] =
        call_add_rms_norm(x.contiguous(), residual.contiguous(), norm_weight, eps);
    at::Tensor y = at::linear(normed, weight);
    if (silu) {
        if (weight.size(0) == 0) {  // silu_mul takes no empty rows
            return {sum, y};
        }
        y = call_silu_mul(y);
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
    const int64_t rows = qkv.numel() / out;
    at::Tensor q = call_rope_kv_update(qkv.reshape({rows, 1, out / head_dim, head_dim}), cos, sin,
                                       k_cache, v_cache, positions, num_q_heads);
    return {sum, q};
}

constexpr std::pair<GemvIsa, const char*> kIsaNames[] = {
    {GemvIsa::kPortable, "portable"}, {GemvIsa::kAvx2, "avx2"}, {GemvIsa::kAvx512, "avx512"}};

}  // namespace

std::vector<std::string> cpu_gemv_isa_names() {
    std::vector<std::string> names;
    for (const auto& [isa, name] : kIsaNames) {
        if (cpu_gemv_supports(isa)) {
            names.emplace_back(name);
        }
    }
    return names;
}

at::Tensor gemv_cpu_with_isa(const at::Tensor& x, const at::Tensor& weight,
                             const std::string& isa) {
    check_gemv_cpu_args("gemv", "x", x, weight, check_gemv_shapes, true);
    const auto* found = std::find_if(std::begin(kIsaNames), std::end(kIsaNames),
                                     [&isa](const auto& entry) { return isa == entry.second; });
    TORCH_CHECK_VALUE(found != std::end(kIsaNames) && cpu_gemv_supports(found->first),
                      "gemv: expected an instruction set this CPU runs (",
                      c10::Join(", ", cpu_gemv_isa_names()), "), got '", isa, "'");
    return gemv_cpu_checked(x, weight, found->first);
}

}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) {
    m.impl("gemv", &toyllm::gemv_cpu);
    m.impl("gemv_silu_mul", &toyllm::gemv_silu_mul_cpu);
    m.impl("gemv_add_rms_norm", &toyllm::gemv_add_rms_norm_cpu);
    m.impl("gemv_add_rms_norm_silu_mul", &toyllm::gemv_add_rms_norm_silu_mul_cpu);
    m.impl("gemv_add_rms_norm_rope_kv", &toyllm::gemv_add_rms_norm_rope_kv_cpu);
}
