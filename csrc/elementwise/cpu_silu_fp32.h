// silu(gate) * up in fp32 on the CPU with the bits of ATen's `F.silu(gate) * up`, as a plain
// loop on pointers: toyllm::silu_mul on fp32 CPU tensors (fused_ops.cpp) and the MLP of
// toyllm::cpu_decode_step (layer/decode_layer_fp32.cpp) call it, so both give the bits of the
// torch code they replace without ATen's dispatch and TensorIterator on every call (a few
// microseconds each, a decode step of a small model calls it once a layer).
//
// How the bits are kept: ATen's silu kernel computes x / (1 + exp(-x)) in its vector form
// (Vectorized<float>: SLEEF's exp, which libtorch_cpu exports) over the whole vectors of two
// registers at a time from the start of each contiguous run of the gate, and in its scalar form
// (std::exp) on the run's last n % (2 * lanes) elements; ATen picks the lanes from the CPU at run
// time (at::get_cpu_capability(): 16 under AVX512, 8 under AVX2; DEFAULT's vector form is the
// scalar one lane by lane). Each lane of SLEEF's exp is computed on its own, so an element's
// result depends only on which of the two forms computes it. The products with up are one IEEE
// multiply each, as at::mul's. tests/test_fused_ops.py compares them with F.silu(gate) * up as
// integers.
#pragma once

#include <cstdint>

namespace toyllm {

// Whether this build can repeat ATen's silu on this CPU (x86-64 with ATen at DEFAULT, AVX2 or
// AVX512); elsewhere callers run ATen's.
bool silu_fp32_available();

// The elements of a run ATen computes two vector registers at a time (32 under AVX512, 16 under
// AVX2, 1 where its vector form is the scalar one): a run [c0, c1) is vectorised over its
// first (c1 - c0) - (c1 - c0) % silu_fp32_chunk() elements. Split points at multiples of 64
// (silu_fp32_split) keep every element in the form it has in the whole run.
int64_t silu_fp32_chunk();
constexpr int64_t silu_fp32_split = 64;

// out[i] = silu(gate[i]) * up[i] for i < n, for the run of n elements gate[0, n) in ATen's
// order (vector over the whole chunks from gate[0], scalar for the rest). silu_fp32_available().
void silu_mul_fp32_run(const float* gate, const float* up, float* out, int64_t n);

// out[r, i] = silu(gate[r, i]) * up[r, i] for r < rows, i < inter (rows at the given strides, in
// floats), with the bits ATen gives F.silu on the [rows, inter] gate view and then the product
// when it runs with `threads` threads outside a parallel region: above ATen's grain
// (at::internal::GRAIN_SIZE elements) its TensorIterator splits the elements into one chunk a
// thread, and each chunk starts its runs where it starts. silu_fp32_available().
void silu_mul_fp32(const float* gate, int64_t gate_stride, const float* up, int64_t up_stride,
                   float* out, int64_t out_stride, int64_t rows, int64_t inter, int64_t threads);

// Whether F.silu on rows x inter elements runs as one piece in ATen (at or below its grain, or
// one thread): its runs are then the rows, which a caller may split at multiples of
// silu_fp32_split and hand to silu_mul_fp32_run piece by piece.
bool silu_fp32_rows_are_runs(int64_t rows, int64_t inter, int64_t threads);

}  // namespace toyllm
