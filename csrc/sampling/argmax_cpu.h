// toyllm::argmax's CPU function (argmax_ops.cpp; the schema: registration.cpp): what the
// operator runs on the CPU, and what bindings.cpp hands Python directly as
// toyllm.engine.ops._C.argmax_cpu. The engine's greedy pick calls it once a decode step
// (engine/ops/argmax.py) without the dispatcher, whose path from Python costs tens of
// microseconds a call once a decode step has streamed the weights through the caches
// (docs/PERF.md, "CPU decode").
#pragma once

#include <ATen/ATen.h>

namespace toyllm {

// torch.argmax(logits, dim=-1) of CPU logits [rows, vocab] (fp32, fp16 or bf16, checked), int64
// [rows]; flag_nonfinite: -1 for a row holding a NaN or an inf.
at::Tensor argmax_cpu(const at::Tensor& logits, bool flag_nonfinite);

}  // namespace toyllm
