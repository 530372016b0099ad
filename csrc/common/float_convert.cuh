// Device-side conversions between fp32 and the storage dtypes (fp32, fp16, bf16), shared by the
// CUDA kernels: to_float widens exactly; from_float rounds to nearest even, as torch's casts do;
// round_to<T> is what torch does when it writes an fp32 result to a T tensor and reads it back.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace toyllm {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ float round_to(float x) {
    return to_float(from_float<T>(x));
}

}  // namespace toyllm
