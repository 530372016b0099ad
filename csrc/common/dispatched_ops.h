// Calls of toyllm operators from C++ through the dispatcher, one definition each: an operator
// built from other operators (the CPU norm-fused products of cpu_gemv.cpp, the CUDA ones'
// multi-row fallback in cuda_gemv.cpp) calls them here, so it runs the very kernels, checks and
// bits of those operators on whatever device its arguments are. Each looks its schema up once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace toyllm {

// toyllm::silu_mul(gate_up [..., 2 * I]) -> silu(gate) * up [..., I]
inline at::Tensor call_silu_mul(const at::Tensor& gate_up) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("toyllm::silu_mul", "")
                               .typed<at::Tensor(const at::Tensor&)>();
    return op.call(gate_up);
}

// toyllm::add_rms_norm(x, residual, weight, eps) -> (x + residual, rms_norm of that sum)
inline std::tuple<at::Tensor, at::Tensor> call_add_rms_norm(const at::Tensor& x,
                                                            const at::Tensor& residual,
                                                            const at::Tensor& weight, double eps) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("toyllm::add_rms_norm", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, double)>();
    return op.call(x, residual, weight, eps);
}

// toyllm::rope_kv_update(qkv [rows, 1, Hq + 2 Hkv, D], cos, sin, k_cache, v_cache, positions,
// num_q_heads) -> rotated q [rows, 1, Hq, D]; rotated k and v written into the caches
inline at::Tensor call_rope_kv_update(const at::Tensor& qkv, const at::Tensor& cos,
                                      const at::Tensor& sin, at::Tensor& k_cache,
                                      at::Tensor& v_cache, const at::Tensor& positions,
                                      int64_t num_q_heads) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("toyllm::rope_kv_update", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                              at::Tensor&, const at::Tensor&, int64_t)>();
    return op.call(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads);
}

}  // namespace toyllm
