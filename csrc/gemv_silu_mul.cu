// CUDA down product of a SwiGLU MLP at decode, y = silu_mul(gate_up) @ W^T for one row of
// gate_up, with silu(gate) * up computed in the kernel (contract in gemv_silu_mul.cuh): one
// kernel where toyllm::silu_mul and toyllm::gemv took two, so a decode step has one launch (and
// one gap between kernels) fewer per layer.
//
// Each output row is a dot product over all of h = silu_mul(gate_up), so every block needs all
// of h. Each block computes it into shared memory once, then streams its rows of W:
//   - h is computed once per block, so the grid is small: at most one block of 16 warps per SM,
//     each looping over output rows. (gemv.cu launches ~2,000 blocks of 4 warps for Llama-1B's
//     down product; h's 8192 expf and fp32 divides in each block would cost more than the
//     product.) A thread has as many loads of W in flight as in gemv.cu (kUnroll packs): 16
//     warps x 4 KB = 64 KB per SM, where ~30 KB cover the HBM latency;
//   - before it computes h, each thread issues the loads of its first batch of W (they do not
//     depend on h), so the weight stream starts at once and the silu work (~1 us per block for
//     in = 8192) runs while those loads are under way; likewise each row's reduction runs while
//     the first batch of the group's next row is under way;
//   - the rows themselves are gemv.cu's (gemv_row.cuh): the same warps per row (1, 2 or 4,
//     from `in` alone), pack size and unroll, so the same order of fp32 additions and the same
//     bits as toyllm::gemv of the h that toyllm::silu_mul writes. A group of warps takes rows
//     j, j + (groups in the grid), ... on its own; when a row has several warps they wait for
//     each other at the group's named barrier (bar.sync id, threads), not the whole block's.
// h is staged in the dtype (silu_mul's output is rounded to it): 16 KB per block for in = 8192
// bf16. Past 48 KB per block the kernel opts in to more shared memory; past the device's limit,
// and for 2 to 4 rows (not a decode step's shape: there cuBLAS takes the product), the operator
// runs silu_mul and gemv instead (cuda_gemv.cpp). One row also keeps the kernel within 128
// registers a thread without spills (at 3 and 4 rows the prefetched batch made ptxas spill).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>

#include "gemv.cuh"
#include "gemv_row.cuh"
#include "gemv_silu_mul.cuh"
#include "silu_mul.cuh"
#include "vector_pack.cuh"
#include "programmatic_launch.cuh"

namespace toyllm {
namespace {

using gemv_row::accumulate;
using gemv_row::dot_packs;
using gemv_row::kMaxWarpsPerRow;
using gemv_row::kUnroll;
using gemv_row::kWarp;
using gemv_row::load_weight;
using gemv_row::store_row;
using gemv_row::warps_per_row_for;

constexpr int kWarps = 16;  // warps per block
constexpr int kThreads = kWarps * kWarp;
// Groups of 2 or 4 warps take named barriers 1 .. kWarps / 2 (0 is __syncthreads's; 15 at most).
static_assert(kWarps % kMaxWarpsPerRow == 0 && kWarps / 2 <= 15, "named barrier ids");
// Shared memory a launch gets without opting in, static and dynamic together.
constexpr size_t kDefaultSharedBytes = 48 * 1024;
// The per-warp sums of store_row: the kernel's static shared memory.
constexpr size_t kPartialBytes = sizeof(float) * kWarps;
// h may take up to kDefaultSharedBytes minus this without opting in (static memory and slack).
constexpr size_t kStaticAllowance = 1024;
static_assert(kPartialBytes <= kStaticAllowance, "the per-warp sums fit the allowance");

// Named barrier `id` (1 to 15) over `threads` threads (a multiple of 32): the warps of one
// output row's group wait for each other only.
__device__ __forceinline__ void group_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// h[i] = silu_mul_element(gate_up[i], gate_up[in + i]) for i < in, by all the threads of the
// block, N elements per access.
template <typename T, int N>
__device__ __forceinline__ void stage_silu_mul(T* __restrict__ h,              // [in], shared
                                               const T* __restrict__ gate_up,  // [2 * in]
                                               int64_t in) {
    using P = Pack<T, N>;
    const int64_t packs = in / N;
    const P* __restrict__ gate = reinterpret_cast<const P*>(gate_up);
    const P* __restrict__ up = reinterpret_cast<const P*>(gate_up + in);
    P* __restrict__ hp = reinterpret_cast<P*>(h);
    for (int64_t p = threadIdx.x; p < packs; p += kThreads) {
        const P g = gate[p];
        const P u = up[p];
        P o;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            o.v[k] = silu_mul_element(g.v[k], u.v[k]);
        }
        hp[p] = o;
    }
}

// Loads dot_packs's first batch of row j of W (packs rank, rank + G, ..., rank + (U - 1) G,
// G = group_threads) into w and returns true; false, loading nothing, where dot_packs would not
// run a batch for this thread (j >= out, or the row has too few packs).
template <typename T, int N>
__device__ __forceinline__ bool load_first_batch(Pack<T, N> (&w)[kUnroll<N>],
                                                 const T* __restrict__ weight,  // [out, in]
                                                 int64_t j, int64_t out, int64_t in, int rank,
                                                 int64_t group_threads, int64_t packs) {
    constexpr int U = kUnroll<N>;
    if (j >= out || rank + (U - 1) * group_threads >= packs) {
        return false;
    }
    const Pack<T, N>* __restrict__ wp = reinterpret_cast<const Pack<T, N>*>(weight + j * in) + rank;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        w[u] = load_weight(wp + u * group_threads);
    }
    return true;
}

// N = elements per load of W. Every thread computes part of h, then its group (warps_per_row
// warps) takes output rows j = blockIdx.x * groups + group, then every (gridDim.x * groups)-th
// row after it. pack_gate_up: gate_up is read in 16-byte packs (in a multiple of them, base
// aligned). One row of gate_up: gemv_row's R is 1.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads, 1)
    gemv_silu_mul_kernel(const T* __restrict__ gate_up,  // [2 * in]
                         const T* __restrict__ weight,   // [out, in]
                         T* __restrict__ y,              // [out]
                         int64_t in, int64_t out, int warps_per_row, bool pack_gate_up) {
    constexpr int R = 1;
    using P = Pack<T, N>;
    constexpr int U = kUnroll<N>;
    extern __shared__ __align__(16) unsigned char staged[];  // h: [in] of T
    __shared__ float partial[kWarps][R];  // per-warp sums when several warps share a row

    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int group = warp / warps_per_row;                  // output row within the block
    const int rank = (warp % warps_per_row) * kWarp + lane;  // thread within the group
    const int64_t group_threads = static_cast<int64_t>(warps_per_row) * kWarp;
    const int groups = kWarps / warps_per_row;  // output rows the block works on at a time
    const int64_t grid_groups = static_cast<int64_t>(gridDim.x) * groups;
    const int64_t packs = in / N;                                   // packs per row of h and of W
    int64_t j = static_cast<int64_t>(blockIdx.x) * groups + group;  // the group's first row

    // dot_packs's first batch of row j, loaded before h exists, even before gate_up is known to
    // be written (W is no kernel's output).
    P first[U];
    bool prefetched = load_first_batch(first, weight, j, out, in, rank, group_threads, packs);
    wait_for_inputs();

    T* h = reinterpret_cast<T*>(staged);
    if (pack_gate_up) {
        stage_silu_mul<T, kVec16<T>>(h, gate_up, in);
    } else {
        stage_silu_mul<T, 1>(h, gate_up, in);
    }
    __syncthreads();  // all of h is written

    const P* __restrict__ xp = reinterpret_cast<const P*>(h);
    const auto barrier = [group, group_threads] {
        group_barrier(1 + group, static_cast<int>(group_threads));
    };
    // j is the group's, so all its threads take the same rows and meet at barrier().
#pragma unroll 1
    for (; j < out; j += grid_groups) {
        float acc[R];
#pragma unroll
        for (int m = 0; m < R; ++m) {
            acc[m] = 0.0f;
        }
        const P* __restrict__ wp = reinterpret_cast<const P*>(weight + j * in) + rank;
        const P* __restrict__ xq = xp + rank;
        int64_t p = rank;
        if (prefetched) {  // dot_packs's first iteration, on the loads issued earlier
#pragma unroll
            for (int u = 0; u < U; ++u) {
                accumulate<T, N, R>(acc, first[u], xq + u * group_threads, packs);
            }
            wp += U * group_threads;
            xq += U * group_threads;
            p += U * group_threads;
        }
        dot_packs<T, N, R>(acc, wp, xq, p, group_threads, packs);  // the rest of row j
        // the next row's first batch streams in while this row is reduced and stored
        prefetched =
            load_first_batch(first, weight, j + grid_groups, out, in, rank, group_threads, packs);
        store_row<T, R>(acc, partial, y, j, out, warp, lane, group, rank, warps_per_row, barrier);
    }
}

template <typename T>
size_t shared_bytes_for(int64_t in) {
    return static_cast<size_t>(in) * sizeof(T) + kPartialBytes;
}

template <typename T, int N>
cudaError_t launch_packs(const T* gate_up, const T* weight, T* y, int64_t in, int64_t out,
                         int num_sms, cudaStream_t stream) {
    const int warps_per_row = warps_per_row_for(in / N, kUnroll<N>);  // as gemv.cu's launch
    const int64_t groups = kWarps / warps_per_row;
    const int64_t blocks = std::min((out + groups - 1) / groups, static_cast<int64_t>(num_sms));
    const size_t dynamic = static_cast<size_t>(in) * sizeof(T);
    if (dynamic > static_cast<size_t>(INT_MAX)) {
        return cudaErrorInvalidValue;
    }
    if (dynamic > kDefaultSharedBytes - kStaticAllowance) {
        const cudaError_t err = cudaFuncSetAttribute(gemv_silu_mul_kernel<T, N>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(dynamic));
        if (err != cudaSuccess) {
            (void)cudaGetLastError();  // returned here, not left for the next check
            return err;
        }
    }
    const bool pack_gate_up = in % kVec16<T> == 0 && aligned16(gate_up);
    return launch_kernel(gemv_silu_mul_kernel<T, N>, dim3(static_cast<unsigned>(blocks)),
                         dim3(kThreads), dynamic, stream, gate_up, weight, y, in, out,
                         warps_per_row, pack_gate_up);
}

template <typename T>
cudaError_t gemv_silu_mul_for(const void* gate_up, const void* weight, void* y, int64_t in,
                              int64_t out, int num_sms, cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    // gemv.cu's choice for an aligned x (h in shared memory is aligned): 16-byte loads of W
    // when every row of W starts 16-byte aligned
    const bool vec = in % kVec == 0 && aligned16(weight);
    const T* gt = static_cast<const T*>(gate_up);
    const T* wt = static_cast<const T*>(weight);
    T* yt = static_cast<T*>(y);
    if (vec) {
        return launch_packs<T, kVec>(gt, wt, yt, in, out, num_sms, stream);
    }
    return launch_packs<T, 1>(gt, wt, yt, in, out, num_sms, stream);
}

}  // namespace

size_t gemv_silu_mul_shared_bytes(GemvDtype dtype, int64_t in) {
    switch (dtype) {
        case GemvDtype::kFloat16:
            return shared_bytes_for<__half>(in);
        case GemvDtype::kBFloat16:
            return shared_bytes_for<__nv_bfloat16>(in);
        case GemvDtype::kFloat32:
            break;
    }
    return shared_bytes_for<float>(in);
}

cudaError_t launch_gemv_silu_mul(const void* gate_up, const void* weight, void* y, GemvDtype dtype,
                                 int64_t in, int64_t out, int num_sms, cudaStream_t stream) {
    if (in < 0 || out < 0 || num_sms < 1) {
        return cudaErrorInvalidValue;
    }
    if (out == 0) {
        return cudaSuccess;
    }
    switch (dtype) {
        case GemvDtype::kFloat16:
            return gemv_silu_mul_for<__half>(gate_up, weight, y, in, out, num_sms, stream);
        case GemvDtype::kBFloat16:
            return gemv_silu_mul_for<__nv_bfloat16>(gate_up, weight, y, in, out, num_sms, stream);
        case GemvDtype::kFloat32:
            return gemv_silu_mul_for<float>(gate_up, weight, y, in, out, num_sms, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
