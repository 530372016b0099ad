// toyllm::cpu_decode_step's CPU function (cpu_decode_step.cpp; the schema: registration.cpp):
// what the operator runs, and what bindings.cpp hands Python directly as
// toyllm.engine.ops._C.cpu_decode_step. The engine calls it once a token (engine/ops/cpu_step.py)
// without the dispatcher, whose path from Python costs tens of microseconds a call once a decode
// step has streamed the weights through the caches (docs/PERF.md, "CPU decode").
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace toyllm {

// One decode step of a whole Llama model in fp32 on the CPU (see cpu_decode_step.cpp): checks
// every argument, writes each row's K/V at its position, returns logits [rows, 1, vocab].
at::Tensor cpu_decode_step(const at::Tensor& tokens,       // int64 [rows, 1]
                           const at::Tensor& embedding,    // [vocab, hidden]
                           at::TensorList layer_weights,   // 6 a layer (decode_layer_fp32.h)
                           const at::Tensor& final_norm,   // [hidden]
                           const at::Tensor& head_weight,  // [vocab_out, hidden]
                           double eps,
                           const at::Tensor& inv_freq,   // [D / 2]
                           at::TensorList k_caches,      // per layer [rows, S, Hkv, D], or
                                                         // with block_tables a pool
                                                         // [blocks, block_size, Hkv, D]; written
                           at::TensorList v_caches,      // per layer, k_caches' shapes; written
                           const at::Tensor& positions,  // int32 [rows]; < 0: a finished row
                           int64_t num_q_heads,
                           const std::optional<at::Tensor>& block_tables);  // int32 [rows, W]

}  // namespace toyllm
