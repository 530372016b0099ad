// The CPU and CUDA implementations of `toyllm::rope_kv_update` (schema: registration.cpp): a decode
// step's RoPE on q and k and its K/V write, from the fused q/k/v projection of one new token per
// row:
//   q = rope_kv_update(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads)
// returns rope(q heads) as a new contiguous [rows, 1, Hq, D] tensor and writes rope(k heads) and
// the v heads as they are to k_cache / v_cache[r, positions[r]] (rows at a negative position,
// finished, are skipped). The bits are those of toyllm::rope over the q and k heads followed by
// toyllm::kv_update. CPU: exactly that composition (toyllm::rope's CPU code, kv_update's copy).
// CUDA: one kernel (rope_kv_update.cu) that rotates with toyllm::rope's device code.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cache/kv_update_cpu.h"
#include "common/op_args.h"
#include "elementwise/rope_kv_args.h"

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "elementwise/rope_kv_update.cuh"
#endif

namespace toyllm {
namespace {

at::Tensor rope_kv_update_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                              at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions,
                              int64_t num_q_heads) {
    check_rope_kv_update_args(qkv_shape_of(qkv), cos, sin, k_cache, v_cache, positions,
                              num_q_heads);
    // On the CPU the positions can be read for free, so their range is checked too, as
    // kv_update does (the CUDA kernel cannot report without a host sync; it skips such a row).
    const int64_t max_seq_len = k_cache.size(1);
    const int32_t* pos = positions.const_data_ptr<int32_t>();
    for (int64_t r = 0; r < positions.size(0); ++r) {
        TORCH_CHECK_VALUE(pos[r] < max_seq_len, "rope_kv_update: expected positions[", r,
                          "] + 1 <= max_seq_len ", max_seq_len,
                          " (or a negative position for a finished row), got ", pos[r], " + 1");
    }
    // The decode path this op replaces, op for op, so the same bits: one toyllm::rope over the
    // q and k heads (side by side in qkv), then kv_update's copy of k and v.
    static const auto rope =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("toyllm::rope", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
    const int64_t num_kv_heads = k_cache.size(2);
    const at::Tensor qk = rope.call(qkv.narrow(2, 0, num_q_heads + num_kv_heads), cos, sin);
    kv_update_cpu(k_cache, v_cache, qk.narrow(2, num_q_heads, num_kv_heads).contiguous(),
                  qkv.narrow(2, num_q_heads + num_kv_heads, num_kv_heads).contiguous(), positions);
    return qk.narrow(2, 0, num_q_heads).contiguous();
}

#ifdef WITH_CUDA_KERNELS
at::Tensor rope_kv_update_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               at::Tensor& k_cache, at::Tensor& v_cache,
                               const at::Tensor& positions, int64_t num_q_heads) {
    check_rope_kv_update_args(qkv_shape_of(qkv), cos, sin, k_cache, v_cache, positions,
                              num_q_heads);
    // NOTE: positions live on the device; checking their range here would need a host sync
    // (and break CUDA-graph capture). The kernel skips a row whose position is past the cache's
    // end; KVCache keeps positions in range.
    const c10::cuda::CUDAGuard guard(qkv.device());
    // qkv keeps its strides (the kernel takes them); cos and sin share one row stride, so they
    // are packed when theirs differ (in the model both are contiguous: no copy).
    at::Tensor c = cos;
    at::Tensor s = sin;
    if (c.stride(0) != s.stride(0)) {
        c = c.contiguous();
        s = s.contiguous();
    }
    const int64_t rows = k_cache.size(0);
    const int64_t head_dim = k_cache.size(3);
    at::Tensor q = at::empty({rows, 1, num_q_heads, head_dim}, qkv.options());
    const cudaError_t err = launch_rope_kv_update(
        qkv.const_data_ptr(), c.const_data_ptr(), s.const_data_ptr(),
        positions.const_data_ptr<int32_t>(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        kernel_dtype<FusedDtype>(qkv.scalar_type()), rows, k_cache.size(1), num_q_heads,
        k_cache.size(2), head_dim, qkv.stride(0), qkv.stride(2), c.stride(0),
        at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("rope_kv_update", err);
    return q;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("rope_kv_update", &toyllm::rope_kv_update_cpu); }

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("rope_kv_update", &toyllm::rope_kv_update_cuda); }
#endif
