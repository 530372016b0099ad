// The `toyllm::paged_kv_write` operator (schema: registration.cpp): its argument checks, its CPU
// implementation and the CUDA launch. Token t's K and V rows go to pool slot slots[t] (block
// slots[t] / block_size, offset slots[t] % block_size); slots[t] < 0 is a padding token.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/op_args.h"

#ifdef WITH_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cache/paged_kv_write.cuh"
#endif

namespace toyllm {
namespace {

constexpr const char* kOp = "paged_kv_write";

// Each token's [num_kv_heads, head_dim] row is contiguous (the tokens themselves may be apart:
// k and v may be views of a fused qkv product).
void check_token_rows(const char* name, const at::Tensor& t) {
    const bool rows = (t.size(2) <= 1 || t.stride(2) == 1) &&
                      (t.size(1) <= 1 || t.stride(1) == t.size(2)) && t.stride(0) >= 0;
    TORCH_CHECK_VALUE(rows, "paged_kv_write: expected ", name,
                      " with each token's [num_kv_heads, head_dim] row contiguous (strides [any, ",
                      t.size(2), ", 1]), got strides ", t.strides(), " for shape ", t.sizes());
}

// Checks every argument of paged_kv_write; nothing has been written when this throws.
void check_paged_kv_write_args(const at::Tensor& k_pool, const at::Tensor& v_pool,
                               const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& slots) {
    check_kv_pair(kOp, "k_pool", k_pool, "v_pool", v_pool,
                  "[num_blocks, block_size, num_kv_heads, head_dim]");
    const int64_t num_kv_heads = k_pool.size(2);
    const int64_t head_dim = k_pool.size(3);
    TORCH_CHECK_VALUE(k.dim() == 3 && k.size(1) == num_kv_heads && k.size(2) == head_dim,
                      "paged_kv_write: expected k of shape [num_tokens, ", num_kv_heads, ", ",
                      head_dim, "] (the pool's heads and head_dim), got ", k.sizes());
    TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "paged_kv_write: expected v of k's shape ",
                      k.sizes(), ", got ", v.sizes());
    const int64_t num_tokens = k.size(0);

    const at::ScalarType dtype = k_pool.scalar_type();
    check_float_dtype(kOp, "k_pool", dtype);
    check_dtype(kOp, "v_pool", v_pool, dtype, "k_pool's");
    check_dtype(kOp, "k", k, dtype, "the pool's");
    check_dtype(kOp, "v", v, dtype, "the pool's");
    TORCH_CHECK_VALUE(slots.scalar_type() == at::kLong,
                      "paged_kv_write: expected slots of dtype torch.int64, got ",
                      dtype_name(slots.scalar_type()));
    TORCH_CHECK_VALUE(slots.dim() == 1 && slots.size(0) == num_tokens,
                      "paged_kv_write: expected slots of shape [", num_tokens,
                      "] (k's num_tokens), got ", slots.sizes());

    const at::Device device = k_pool.device();
    check_device(kOp, "v_pool", v_pool, device, "k_pool's device");
    check_device(kOp, "k", k, device, "the pool's device");
    check_device(kOp, "v", v, device, "the pool's device");
    check_device(kOp, "slots", slots, device, "the pool's device");

    check_contiguous(kOp, "k_pool", k_pool);
    check_contiguous(kOp, "v_pool", v_pool);
    check_token_rows("k", k);
    check_token_rows("v", v);
    check_contiguous(kOp, "slots", slots);
}

void paged_kv_write_cpu(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& slots) {
    check_paged_kv_write_args(k_pool, v_pool, k, v, slots);
    // On the CPU the slots can be read for free, so their range is checked before any write (the
    // CUDA kernel cannot report without a host sync; it skips out-of-range slots instead).
    const int64_t num_tokens = k.size(0);
    const int64_t num_slots = k_pool.size(0) * k_pool.size(1);
    const int64_t* slot = slots.const_data_ptr<int64_t>();
    for (int64_t t = 0; t < num_tokens; ++t) {
        TORCH_CHECK_VALUE(slot[t] < num_slots, "paged_kv_write: expected slots[", t,
                          "] < num_blocks * block_size = ", num_slots,
                          " (or negative for a padding token), got ", slot[t]);
    }
    const int64_t elem = k_pool.element_size();
    const int64_t row_bytes = k_pool.size(2) * k_pool.size(3) * elem;
    char* const pools[2] = {static_cast<char*>(k_pool.data_ptr()),
                            static_cast<char*>(v_pool.data_ptr())};
    const char* const news[2] = {static_cast<const char*>(k.const_data_ptr()),
                                 static_cast<const char*>(v.const_data_ptr())};
    const int64_t strides[2] = {k.stride(0) * elem, v.stride(0) * elem};
    // Work items are rows (token, K or V); big writes (a prefill) are split over threads.
    const int64_t grain =
        std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(row_bytes, 1));
    at::parallel_for(0, 2 * num_tokens, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const int64_t t = i >> 1;
            const int64_t which = i & 1;
            if (slot[t] < 0) {
                continue;  // NOTE: a padding token: nothing written
            }
            std::memcpy(pools[which] + slot[t] * row_bytes, news[which] + t * strides[which],
                        static_cast<size_t>(row_bytes));
        }
    });
}

#ifdef WITH_CUDA_KERNELS
void paged_kv_write_cuda(at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& slots) {
    check_paged_kv_write_args(k_pool, v_pool, k, v, slots);
    // NOTE: slots live on the device; checking their range here would need a host sync (and
    // break CUDA-graph capture). The kernel skips a slot past the pool.
    const c10::cuda::CUDAGuard guard(k_pool.device());
    const cudaError_t err = launch_paged_kv_write(
        k_pool.data_ptr(), v_pool.data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
        slots.const_data_ptr<int64_t>(), k.size(0), k_pool.size(0) * k_pool.size(1),
        k_pool.size(2) * k_pool.size(3), k.size(0) > 1 ? k.stride(0) : 0,
        v.size(0) > 1 ? v.stride(0) : 0, k_pool.element_size(),
        at::cuda::getCurrentCUDAStream().stream());
    check_cuda_launch("paged_kv_write", err);
}
#endif

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("paged_kv_write", &toyllm::paged_kv_write_cpu); }

#ifdef WITH_CUDA_KERNELS
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("paged_kv_write", &toyllm::paged_kv_write_cuda); }
#endif
