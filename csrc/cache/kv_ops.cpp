// The `toyllm::kv_update` operator (schema: registration.cpp): its argument checks, its CPU and
// CUDA implementations, and kv_update() for the C++ callers (KVCache).
#include "cache/kv_ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cache/kv_update_cpu.h"
#include "common/op_args.h"

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cache/kv_update.cuh"
#endif

namespace toyllm {
namespace {

constexpr const char* kOp = "kv_update";

// Checks every argument of kv_update; nothing has been written when this throws.
void check_kv_update_args(const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& new_k, const at::Tensor& new_v,
                          const at::Tensor& positions) {
    check_kv_pair(kOp, "k_cache", k_cache, "v_cache", v_cache,
                  "[batch, max_seq_len, num_kv_heads, head_dim]");
    const int64_t batch = k_cache.size(0);
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_kv_heads = k_cache.size(2);
    const int64_t head_dim = k_cache.size(3);

    TORCH_CHECK_VALUE(new_k.dim() == 4,
                      "kv_update: expected new_k of 4 dims [batch, num_tokens, num_kv_heads, "
                      "head_dim], got shape ",
                      new_k.sizes());
    TORCH_CHECK_VALUE(
        new_k.size(0) == batch && new_k.size(2) == num_kv_heads && new_k.size(3) == head_dim,
        "kv_update: expected new_k of shape [", batch, ", num_tokens, ", num_kv_heads, ", ",
        head_dim, "] (batch, heads and head_dim of the cache), got ", new_k.sizes());
    TORCH_CHECK_VALUE(new_v.sizes() == new_k.sizes(), "kv_update: expected new_v of new_k's shape ",
                      new_k.sizes(), ", got ", new_v.sizes());
    const int64_t num_tokens = new_k.size(1);
    TORCH_CHECK_VALUE(num_tokens >= 1, "kv_update: expected num_tokens (new_k.size(1)) >= 1, got ",
                      num_tokens);
    TORCH_CHECK_VALUE(num_tokens <= max_seq_len, "kv_update: expected num_tokens <= max_seq_len ",
                      max_seq_len, ", got ", num_tokens);

    const at::ScalarType dtype = k_cache.scalar_type();
    const int64_t element_size = k_cache.element_size();
    TORCH_CHECK_VALUE(
        element_size == 1 || element_size == 2 || element_size == 4 || element_size == 8,
        "kv_update: expected a cache dtype of 1, 2, 4 or 8 bytes, got ", dtype_name(dtype), " (",
        element_size, " bytes)");
    check_dtype(kOp, "v_cache", v_cache, dtype, "k_cache's");
    check_dtype(kOp, "new_k", new_k, dtype, "the cache's");
    check_dtype(kOp, "new_v", new_v, dtype, "the cache's");

    const at::Device device = k_cache.device();
    check_device(kOp, "v_cache", v_cache, device, "k_cache's device");
    check_device(kOp, "new_k", new_k, device, "the cache's device");
    check_device(kOp, "new_v", new_v, device, "the cache's device");

    check_contiguous(kOp, "k_cache", k_cache);
    check_contiguous(kOp, "v_cache", v_cache);
    check_contiguous(kOp, "new_k", new_k);
    check_contiguous(kOp, "new_v", new_v);

    check_positions(kOp, positions, batch, "the cache's batch", device, "the cache's device");
}

void kv_update_cpu_impl(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& new_k,
                        const at::Tensor& new_v, const at::Tensor& positions) {
    check_kv_update_args(k_cache, v_cache, new_k, new_v, positions);
    // On the CPU the positions can be read for free, so their range is checked too (the CUDA
    // kernel cannot report without a host sync; it skips out-of-range sequences instead).
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_tokens = new_k.size(1);
    const int32_t* pos = positions.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < positions.size(0); ++b) {
        TORCH_CHECK_VALUE(pos[b] < 0 || pos[b] + num_tokens <= max_seq_len,
                          "kv_update: expected positions[", b, "] + num_tokens <= max_seq_len ",
                          max_seq_len, " (or a negative position for an inactive sequence), got ",
                          pos[b], " + ", num_tokens, " = ", pos[b] + num_tokens);
    }
    kv_update_cpu(k_cache, v_cache, new_k, new_v, positions);
}

#ifdef WITH_CUDA_KERNELS
void kv_update_cuda_impl(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& new_k,
                         const at::Tensor& new_v, const at::Tensor& positions) {
    check_kv_update_args(k_cache, v_cache, new_k, new_v, positions);
    // NOTE: positions live on the device; checking their range here would need a host sync
    // (and break CUDA-graph capture). The kernel skips a sequence whose rows would pass
    // max_seq_len; KVCache checks its host-side positions before it launches.
    const c10::cuda::CUDAGuard guard(k_cache.device());
    const cudaError_t err = launch_kv_update(
        k_cache.data_ptr(), v_cache.data_ptr(), new_k.const_data_ptr(), new_v.const_data_ptr(),
        positions.const_data_ptr<int32_t>(), k_cache.size(0), k_cache.size(1), new_k.size(1),
        k_cache.size(2), k_cache.size(3), k_cache.element_size(),
        at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("kv_update", err);
}
#endif

}  // namespace

void kv_update(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& new_k,
               const at::Tensor& new_v, const at::Tensor& positions) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("toyllm::kv_update", "")
                               .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const at::Tensor&)>();
    op.call(k_cache, v_cache, new_k, new_v, positions);
}

}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("kv_update", &toyllm::kv_update_cpu_impl); }

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("kv_update", &toyllm::kv_update_cuda_impl); }
#endif
