// Registers the `toyllm::rope_kv_update` operator: a decode step's RoPE on q and k and its K/V
// write, from the fused q/k/v projection of one new token per row:
//   q = rope_kv_update(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads)
// returns rope(q heads) as a new contiguous [rows, 1, Hq, D] tensor and writes rope(k heads) and
// the v heads as they are to k_cache / v_cache[r, positions[r]] (rows at a negative position,
// finished, are skipped). The bits are those of toyllm::rope over the q and k heads followed by
// toyllm::kv_update. CPU: exactly that composition (toyllm::rope's CPU code, kv_update's copy).
// CUDA: one kernel (rope_kv_update.cu) that rotates with toyllm::rope's device code. The fake
// (meta) implementation is registered from Python (engine/rope_kv_update.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "dtype_names.h"
#include "kv_update_cpu.h"

#ifdef TOYLLM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "rope_kv_update.cuh"
#endif

namespace toyllm {
namespace {

// `t` (named `name`) has qkv's dtype and device.
void check_like_qkv(const char* name, const at::Tensor& t, const at::Tensor& qkv) {
    TORCH_CHECK_VALUE(t.scalar_type() == qkv.scalar_type(), "rope_kv_update: expected ", name,
                      " of dtype ", dtype_name(qkv.scalar_type()), " (qkv's), got ",
                      dtype_name(t.scalar_type()));
    TORCH_CHECK_VALUE(t.device() == qkv.device(), "rope_kv_update: expected ", name, " on ",
                      qkv.device(), " (qkv's device), got ", t.device());
}

void check_last_dim_contiguous(const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, "rope_kv_update: expected ", name,
                      " with a contiguous last dim (stride 1), got strides ", t.strides(),
                      " for shape ", t.sizes());
}

// Checks every argument; nothing has been written when this throws. The cache gives rows,
// max_seq_len, num_kv_heads and head_dim; qkv must be [rows, 1, num_q_heads + 2 * num_kv_heads,
// head_dim].
void check_rope_kv_update_args(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& positions, int64_t num_q_heads) {
    TORCH_CHECK_VALUE(k_cache.dim() == 4,
                      "rope_kv_update: expected k_cache of 4 dims [rows, max_seq_len, "
                      "num_kv_heads, head_dim], got shape ",
                      k_cache.sizes());
    TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(),
                      "rope_kv_update: expected v_cache of k_cache's shape ", k_cache.sizes(),
                      ", got ", v_cache.sizes());
    const int64_t rows = k_cache.size(0);
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_kv_heads = k_cache.size(2);
    const int64_t head_dim = k_cache.size(3);
    TORCH_CHECK_VALUE(max_seq_len >= 1,
                      "rope_kv_update: expected max_seq_len (k_cache.size(1)) >= 1, got ",
                      max_seq_len);
    TORCH_CHECK_VALUE(num_kv_heads >= 1,
                      "rope_kv_update: expected num_kv_heads (k_cache.size(2)) >= 1, got ",
                      num_kv_heads);
    TORCH_CHECK_VALUE(head_dim >= 2 && head_dim % 2 == 0,
                      "rope_kv_update: expected an even head_dim >= 2 (k_cache.size(3)), got ",
                      head_dim);
    TORCH_CHECK_VALUE(num_q_heads >= 1, "rope_kv_update: expected num_q_heads >= 1, got ",
                      num_q_heads);
    const int64_t width = num_q_heads + 2 * num_kv_heads;
    TORCH_CHECK_VALUE(qkv.dim() == 4 && qkv.size(0) == rows && qkv.size(1) == 1 &&
                          qkv.size(2) == width && qkv.size(3) == head_dim,
                      "rope_kv_update: expected qkv of shape [", rows, ", 1, ", width, ", ",
                      head_dim, "] (the cache's rows, one token, num_q_heads ", num_q_heads,
                      " + 2 * num_kv_heads ", num_kv_heads, " heads of the cache's head_dim), got ",
                      qkv.sizes());
    TORCH_CHECK_VALUE(cos.dim() == 4 && cos.size(0) == rows && cos.size(1) == 1 &&
                          cos.size(2) == 1 && cos.size(3) == head_dim,
                      "rope_kv_update: expected cos of shape [", rows, ", 1, 1, ", head_dim,
                      "] (qkv's rows, token and head_dim), got ", cos.sizes());
    TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "rope_kv_update: expected sin of cos's shape ",
                      cos.sizes(), ", got ", sin.sizes());

    TORCH_CHECK_VALUE(is_supported_dtype(qkv.scalar_type()),
                      "rope_kv_update: expected qkv of dtype torch.float32, torch.float16 or "
                      "torch.bfloat16, got ",
                      dtype_name(qkv.scalar_type()));
    check_like_qkv("cos", cos, qkv);
    check_like_qkv("sin", sin, qkv);
    check_like_qkv("k_cache", k_cache, qkv);
    check_like_qkv("v_cache", v_cache, qkv);

    check_last_dim_contiguous("qkv", qkv);
    check_last_dim_contiguous("cos", cos);
    check_last_dim_contiguous("sin", sin);
    TORCH_CHECK_VALUE(k_cache.is_contiguous(),
                      "rope_kv_update: expected a contiguous k_cache, got strides ",
                      k_cache.strides(), " for shape ", k_cache.sizes());
    TORCH_CHECK_VALUE(v_cache.is_contiguous(),
                      "rope_kv_update: expected a contiguous v_cache, got strides ",
                      v_cache.strides(), " for shape ", v_cache.sizes());

    TORCH_CHECK_VALUE(positions.scalar_type() == at::kInt,
                      "rope_kv_update: expected positions of dtype torch.int32, got ",
                      dtype_name(positions.scalar_type()));
    TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == rows,
                      "rope_kv_update: expected positions of shape [", rows,
                      "] (the cache's rows), got ", positions.sizes());
    TORCH_CHECK_VALUE(positions.device() == qkv.device(), "rope_kv_update: expected positions on ",
                      qkv.device(), " (qkv's device), got ", positions.device());
    TORCH_CHECK_VALUE(positions.is_contiguous(),
                      "rope_kv_update: expected contiguous positions, got strides ",
                      positions.strides());
}

at::Tensor rope_kv_update_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                              at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& positions,
                              int64_t num_q_heads) {
    check_rope_kv_update_args(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads);
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

#ifdef TOYLLM_WITH_CUDA
FusedDtype fused_dtype(at::ScalarType t) {
    if (t == at::kHalf) {
        return FusedDtype::kFloat16;
    }
    if (t == at::kBFloat16) {
        return FusedDtype::kBFloat16;
    }
    return FusedDtype::kFloat32;
}

at::Tensor rope_kv_update_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                               at::Tensor& k_cache, at::Tensor& v_cache,
                               const at::Tensor& positions, int64_t num_q_heads) {
    check_rope_kv_update_args(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads);
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
        fused_dtype(qkv.scalar_type()), rows, k_cache.size(1), num_q_heads, k_cache.size(2),
        head_dim, qkv.stride(0), qkv.stride(2), c.stride(0),
        at::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess,
                "rope_kv_update: CUDA kernel launch failed: ", cudaGetErrorString(err));
    return q;
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_FRAGMENT(toyllm, m) {
    m.def(
        "rope_kv_update(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor positions, int num_q_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("rope_kv_update", &toyllm::rope_kv_update_cpu); }

#ifdef TOYLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("rope_kv_update", &toyllm::rope_kv_update_cuda); }
#endif
