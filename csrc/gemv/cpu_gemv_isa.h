// The CPU GEMV with a chosen instruction set, for the tests only: they compare the AVX-512,
// AVX2 and portable kernels of cpu_gemv_kernels.cpp on one machine, which the product never
// does (it takes the best one the CPU runs). Bound in bindings.cpp as
// toyllm.engine.ops._C._cpu_gemv_isas() and _cpu_gemv_with_isa(x, weight, isa).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace toyllm {

// The names of the instruction sets this CPU runs, portable first: "portable", "avx2",
// "avx512".
std::vector<std::string> cpu_gemv_isa_names();

// toyllm::gemv's CPU product (the same checks) with the kernels named `isa`, one of
// cpu_gemv_isa_names(); any other name, or one this CPU does not run, is a ValueError.
at::Tensor gemv_cpu_with_isa(const at::Tensor& x,       // [..., in] fp32
                             const at::Tensor& weight,  // [out, in] fp32
                             const std::string& isa);

}  // namespace toyllm
