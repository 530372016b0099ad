// The CPU implementation of `toyllm::cpu_decode_layer` (schema: registration.cpp): one whole
// Llama decoder layer of a decode step (one new token per row) in one call, fp32; the layer's
// math is decode_layer_fp32.h's, which toyllm::cpu_decode_step (cpu_decode_step.cpp) runs for
// every layer of a step:
//
//   (x, residual) -> (s2, out): the residual stream x + residual before the layer (residual
//   None for the first layer), s2 + out after it, as the engine's unfused layer leaves it.
//
// Why: a CPU decode step of a small model took ~400 calls from Python a token (each op a few
// us of dispatch, allocation and thread wake-up); a layer's work is 4 products that read ~1-4
// MB of weights each and a little elementwise math (docs/PERF.md, "CPU decode").
//
// A position past the cache's end is refused before anything is written.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "common/op_args.h"
#include "layer/decode_layer_fp32.h"

namespace toyllm {
namespace {

constexpr const char* kOp = "cpu_decode_layer";

// Checks every argument; nothing has been written when this throws.
LayerShape check_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      const at::Tensor& input_norm, const at::Tensor& qkv_weight,
                      const at::Tensor& o_weight, const at::Tensor& post_norm,
                      const at::Tensor& gate_up_weight, const at::Tensor& down_weight,
                      double eps, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& positions, int64_t num_q_heads) {
    check_fp32_cpu(kOp, "x", x);
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(1) == 1 && x.size(2) >= 1, kOp,
                      ": expected x of shape [rows, 1, hidden] (one new token per row, hidden >= "
                      "1), got ",
                      x.sizes());
    check_contiguous(kOp, "x", x);
    if (residual.has_value()) {
        check_fp32_cpu(kOp, "residual", *residual);
        TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), kOp, ": expected residual of x's shape ",
                          x.sizes(), ", got ", residual->sizes());
        check_contiguous(kOp, "residual", *residual);
    }
    const LayerShape s = check_layer(kOp, x.size(0), x.size(2), input_norm, qkv_weight, o_weight,
                                     post_norm, gate_up_weight, down_weight, eps, k_cache,
                                     v_cache, num_q_heads);
    for (const auto& [name, t] :
         {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
        check_fp32_cpu(kOp, name, t);
        TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == s.rows && t.size(1) == 1 &&
                              t.size(2) == 1 && t.size(3) == s.head_dim,
                          kOp, ": expected ", name, " of shape [", s.rows, ", 1, 1, ", s.head_dim,
                          "] (x's rows, the cache's head_dim), got ", t.sizes());
        check_last_dim_contiguous(kOp, name, t);
    }
    check_positions_fit(kOp, positions, s.rows, "x's rows", x.device(), "x's device",
                        s.max_seq_len);
    return s;
}

std::tuple<at::Tensor, at::Tensor> cpu_decode_layer(
    const at::Tensor& x,                        // [rows, 1, hidden]
    const std::optional<at::Tensor>& residual,  // [rows, 1, hidden], or None
    const at::Tensor& input_norm,               // [hidden]
    const at::Tensor& qkv_weight,               // [(Hq + 2 Hkv) D, hidden]
    const at::Tensor& o_weight,                 // [hidden, Hq D]
    const at::Tensor& post_norm,                // [hidden]
    const at::Tensor& gate_up_weight,           // [2 I, hidden]
    const at::Tensor& down_weight,              // [hidden, I]
    double eps,
    const at::Tensor& cos,        // [rows, 1, 1, D]
    const at::Tensor& sin,        // [rows, 1, 1, D]
    at::Tensor& k_cache,          // [rows, max_seq_len, Hkv, D], written in place
    at::Tensor& v_cache,          // [rows, max_seq_len, Hkv, D], written in place
    const at::Tensor& positions,  // int32 [rows]; < 0: a finished row
    int64_t num_q_heads) {
    const LayerShape s =
        check_args(x, residual, input_norm, qkv_weight, o_weight, post_norm, gate_up_weight,
                   down_weight, eps, cos, sin, k_cache, v_cache, positions, num_q_heads);
    at::Tensor out_sum = at::empty_like(x);   // s2
    at::Tensor out_down = at::empty_like(x);  // the MLP's output
    if (s.rows == 0) {
        return {out_sum, out_down};
    }
    const at::Tensor scratch = at::empty({layer_scratch_floats(s)}, x.options());
    const LayerWeightPtrs w{input_norm.const_data_ptr<float>(), qkv_weight.const_data_ptr<float>(),
                            o_weight.const_data_ptr<float>(),   post_norm.const_data_ptr<float>(),
                            gate_up_weight.const_data_ptr<float>(),
                            down_weight.const_data_ptr<float>()};
    decode_layer_fp32(s, w, static_cast<float>(eps), x.const_data_ptr<float>(),
                      residual.has_value() ? residual->const_data_ptr<float>() : nullptr,
                      cos.const_data_ptr<float>(), cos.stride(0), sin.const_data_ptr<float>(),
                      sin.stride(0), k_cache.mutable_data_ptr<float>(),
                      v_cache.mutable_data_ptr<float>(), positions.const_data_ptr<int32_t>(),
                      out_sum.mutable_data_ptr<float>(), out_down.mutable_data_ptr<float>(),
                      carve_layer_scratch(s, scratch, positions.const_data_ptr<int32_t>()));
    return {out_sum, out_down};
}

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("cpu_decode_layer", &toyllm::cpu_decode_layer); }

#ifdef WITH_CUDA_KERNELS
// CUDA tensors reach the same function, whose first check refuses them with a message that
// names the device ("cpu_decode_layer: expected x on the CPU, got cuda:0"), not the
// dispatcher's missing-kernel error.
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("cpu_decode_layer", &toyllm::cpu_decode_layer); }
#endif
