// CUDA matrix-vector product of a decode step, y = x @ W^T for <= 4 rows of x (contract in
// gemv.cuh).
//
// A decode GEMV reads each weight byte once and does 2 flops per weight element and row, so
// it is bound by how fast W streams from HBM (~4.2-4.4 TB/s read on an H100/H200). The kernel
// is built for that stream:
//   - each output row j is owned by a group of 1, 2 or 4 warps, which reads row j of W front
//     to back: thread `rank` of the group takes packs rank, rank + G, rank + 2G, ... (G threads
//     in the group), so one warp-wide load covers 32 consecutive 16-byte packs (512 bytes);
//   - each thread issues kUnroll independent 16-byte loads of W before it uses the first, so
//     ~4 KB per warp are in flight; W is loaded with the streaming hint (__ldcs: evict first),
//     it is read once per call;
//   - x is read from global memory through L1 (ld.global.nc): every block of an SM reads the
//     same few KB, which stay in L1 (W's lines are evicted first). Not staged in shared memory:
//     4 rows x 8192 fp32 would be 128 KB per block (over the 48 KB a launch gets without
//     opting in, and one block per SM), and each small block would copy all of x from L2;
//   - fp32 accumulators per thread (one per row of x), a warp-shuffle sum, then, when several
//     warps share a row, a sum of the per-warp totals through shared memory in warp order; one
//     kernel, no atomics, no split-K second pass, a fixed order of additions (same bits on
//     every call);
//   - 4 warps per block, so even out = 2048 at one warp per row gives 512 blocks (~4 per SM of
//     an H100's 132). Long rows get several warps per row (in = 8192 bf16: 4), so such a
//     product still has ~4x more warps in flight.
// When `in` or a pointer does not allow 16-byte packs, the same kernel runs on single elements.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "common/programmatic_launch.cuh"
#include "common/vector_pack.cuh"
#include "gemv/gemv.cuh"
#include "gemv/gemv_row.cuh"

namespace toyllm {
namespace {

using gemv_row::dot_packs;
using gemv_row::kMaxWarpsPerRow;
using gemv_row::kUnroll;
using gemv_row::kWarp;
using gemv_row::prefetch_row_to_l2;
using gemv_row::store_row;
using gemv_row::warps_per_row_for;

constexpr int kWarps = kMaxWarpsPerRow;  // warps per block: 4 rows' groups or fewer
constexpr int kThreads = kWarps * kWarp;
// Blocks per SM the register budget must allow: 5 x 128 threads -> <= 96 registers a thread
// (at 80, fp32 with 4 rows spilled), 20 warps per SM, ~80 KB of W in flight per SM where
// ~30 KB cover the HBM latency (4.4 TB/s x ~1 us / 132 SMs).
constexpr int kMinBlocksPerSm = 5;
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // blocks per launch (grid-stride past that)

// Rows [first, first + kWarps / warps_per_row) of W per block and grid-stride step, one per
// group of warps_per_row warps. R = rows of x (a register accumulator each), N = elements per
// load. The loop over output rows is block-uniform, so every thread reaches the barriers.
template <typename T, int N, int R>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    gemv_kernel(const T* __restrict__ x,       // [R, in]
                const T* __restrict__ weight,  // [out, in]
                T* __restrict__ y,             // [R, out]
                int64_t in, int64_t out, int warps_per_row) {
    using P = Pack<T, N>;
    __shared__ float partial[kWarps][R];  // per-warp sums when several warps share a row

    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int group = warp / warps_per_row;                  // output row within the block
    const int rank = (warp % warps_per_row) * kWarp + lane;  // thread within the group
    const int64_t group_threads = static_cast<int64_t>(warps_per_row) * kWarp;
    const int rows_per_block = kWarps / warps_per_row;
    const int64_t packs = in / N;  // packs per row of x and of W
    const P* __restrict__ xp = reinterpret_cast<const P*>(x);

    // W is no kernel's output: its first row here starts into L2 before the wait for x (at one
    // row of x, the decode step's; at 2 rows in fp32 the extra registers made ptxas spill).
    if constexpr (R == 1) {
        prefetch_row_to_l2(weight, static_cast<int64_t>(blockIdx.x) * rows_per_block + group, in,
                           out, rank);
    }
    wait_for_inputs();
    for (int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block; first < out;
         first += static_cast<int64_t>(gridDim.x) * rows_per_block) {
        const int64_t j = first + group;  // the output row of this group
        float acc[R];
#pragma unroll
        for (int m = 0; m < R; ++m) {
            acc[m] = 0.0f;
        }
        if (j < out) {
            // this thread's packs of row j: p = rank, rank + G, rank + 2G, ... < packs
            dot_packs<T, N, R>(acc, reinterpret_cast<const P*>(weight + j * in) + rank, xp + rank,
                               rank, group_threads, packs);
        }
        store_row<T, R>(acc, partial, y, j, out, warp, lane, group, rank, warps_per_row,
                        [] { __syncthreads(); });
    }
}

template <typename T, int N, int R>
void launch_rows(const T* x, const T* weight, T* y, int64_t in, int64_t out, cudaStream_t stream) {
    const int warps_per_row = warps_per_row_for(in / N, kUnroll<N>);
    const int64_t rows_per_block = kWarps / warps_per_row;
    const int64_t blocks = std::min((out + rows_per_block - 1) / rows_per_block, kMaxGrid);
    (void)launch_kernel(gemv_kernel<T, N, R>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                        0, stream, x, weight, y, in, out, warps_per_row);  // checked by the caller
}

template <typename T, int N>
void launch_packs(const T* x, const T* weight, T* y, int64_t rows, int64_t in, int64_t out,
                  cudaStream_t stream) {
    switch (rows) {
        case 1:
            launch_rows<T, N, 1>(x, weight, y, in, out, stream);
            break;
        case 2:
            launch_rows<T, N, 2>(x, weight, y, in, out, stream);
            break;
        case 3:
            launch_rows<T, N, 3>(x, weight, y, in, out, stream);
            break;
        default:
            launch_rows<T, N, 4>(x, weight, y, in, out, stream);
            break;
    }
}

template <typename T>
cudaError_t gemv_for(const void* x, const void* weight, void* y, int64_t rows, int64_t in,
                     int64_t out, cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    // every row of x and W starts 16-byte aligned when the bases are and in is a whole number
    // of packs
    const bool vec = in % kVec == 0 && aligned16(x) && aligned16(weight);
    const T* xt = static_cast<const T*>(x);
    const T* wt = static_cast<const T*>(weight);
    T* yt = static_cast<T*>(y);
    if (vec) {
        launch_packs<T, kVec>(xt, wt, yt, rows, in, out, stream);
    } else {
        launch_packs<T, 1>(xt, wt, yt, rows, in, out, stream);
    }
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemv(const void* x, const void* weight, void* y, GemvDtype dtype, int64_t rows,
                        int64_t in, int64_t out, cudaStream_t stream) {
    if (rows < 0 || in < 0 || out < 0 || rows > kGemvMaxRows) {
        return cudaErrorInvalidValue;
    }
    if (rows == 0 || out == 0) {
        return cudaSuccess;
    }
    switch (dtype) {
        case GemvDtype::kFloat16:
            return gemv_for<__half>(x, weight, y, rows, in, out, stream);
        case GemvDtype::kBFloat16:
            return gemv_for<__nv_bfloat16>(x, weight, y, rows, in, out, stream);
        case GemvDtype::kFloat32:
            return gemv_for<float>(x, weight, y, rows, in, out, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
