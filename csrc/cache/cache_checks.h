// The checks the two cache classes (KVCache, PagedKVCache) make of their sizes, dtype and device
// before they allocate: one definition, each message opening with the class's name
// ("KVCache: expected head_dim >= 1, got 0").
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

#include "common/dtype_names.h"

#ifdef WITH_CUDA_KERNELS
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace toyllm {

struct CacheChecks {
    const char* owner;  // "KVCache", "PagedKVCache"

    void check_positive(const char* name, int64_t value) const {
        TORCH_CHECK_VALUE(value >= 1, owner, ": expected ", name, " >= 1, got ", value);
    }

    void check_dtype(at::ScalarType dtype) const {
        TORCH_CHECK_VALUE(is_supported_dtype(dtype), owner,
                          ": expected dtype torch.float32, torch.float16 or torch.bfloat16, got ",
                          dtype_name(dtype));
    }

    // The product of `factors` from left to right, or ValueError at the first step that does
    // not fit in int64.
    int64_t checked_product(std::initializer_list<int64_t> factors) const {
        int64_t out = 1;
        for (const int64_t f : factors) {
            const int64_t a = out;
            TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, f, &out), owner,
                              ": expected a cache size that fits in 64 bits, got a product of ", a,
                              " and ", f);
        }
        return out;
    }

    // cpu -> cpu; cuda -> cuda:<current>; cuda:i -> cuda:i if i is a valid index.
    at::Device normalize_device(at::Device device) const {
        if (device.is_cpu()) {
            return at::Device(at::kCPU);
        }
        TORCH_CHECK_VALUE(device.is_cuda(), owner, ": expected device cpu or cuda, got ", device);
#ifdef WITH_CUDA_KERNELS
        const int64_t count = c10::cuda::device_count();
        TORCH_CHECK_VALUE(count > 0, owner, ": expected a visible CUDA device for device ", device,
                          ", got none (torch.cuda.device_count() == 0)");
        const int64_t index = device.has_index() ? device.index() : c10::cuda::current_device();
        TORCH_CHECK_VALUE(index >= 0 && index < count, owner,
                          ": expected a CUDA device index in [0, ", count, "), got ", index);
        return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index));
#else
        TORCH_CHECK_VALUE(false, owner,
                          ": expected device cpu (this build of engine._C has no CUDA), got ",
                          device,
                          "; rebuild with a CUDA-enabled torch and nvcc: "
                          "pip install --no-build-isolation -e .");
        return device;  // not reached
#endif
    }
};

}  // namespace toyllm
