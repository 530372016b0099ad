// Programmatic dependent launch (Hopper and later): the kernels of a decode step are launched so
// that each may start before the one before it has finished, its blocks waiting on the device
// until their inputs are written. That hides a kernel's launch and ramp-up behind the previous
// kernel's run, which at batch 1 is a good part of each of the ~130 small kernels of a step.
//
// The contract, for every kernel launched through launch_kernel:
//   * its first statement is wait_for_inputs(): nothing is read or written before it, so the
//     kernel sees memory exactly as it would after an ordinary launch in stream order;
//   * wait_for_inputs() then lets the next kernel in the stream be launched (its blocks in turn
//     wait for this kernel's completion and memory before they touch anything).
// Kernels launched any other way (torch's) simply run in stream order; the attribute also
// survives CUDA-graph capture. Before sm_90 the device calls compile to nothing and the
// attribute is not set.
//
// launch_kernel sets the attribute when programmatic_launch_enabled() (default: on; from Python
// engine._C.set_programmatic_launch(False) turns it off, to compare) and the current device has
// compute capability 9.0 or more.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "common/programmatic_launch.h"

namespace toyllm {

// The first statement of every kernel launched through launch_kernel (see above).
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether the current device can take programmatic launches (compute capability >= 9.0); asked
// once per device (index < 64).
inline bool device_takes_programmatic_launch() {
    static std::atomic<int> known[64] = {};  // 0: not asked yet, 1: no, 2: yes
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess) {
        return false;
    }
    if (device >= 0 && device < 64 && known[device].load(std::memory_order_relaxed) != 0) {
        return known[device].load(std::memory_order_relaxed) == 2;
    }
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
        return false;
    }
    if (device >= 0 && device < 64) {
        known[device].store(major >= 9 ? 2 : 1, std::memory_order_relaxed);
    }
    return major >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization when
// enabled. Returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args... args) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attribute = {};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    if (programmatic_launch_enabled() && device_takes_programmatic_launch()) {
        config.attrs = &attribute;
        config.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

}  // namespace toyllm
