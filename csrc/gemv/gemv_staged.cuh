// The one-row decode GEMV whose x a block computes itself into shared memory before the product:
// y[j] = sum_i x[i] * W[j, i] with x = stage(inputs). Shared by the SwiGLU down product (x =
// silu(gate) * up, gemv_silu_mul.cu) and the product after a residual add and RMSNorm (x =
// rms_norm(a + b), gemv_add_rms_norm.cu), so that each of those is one kernel where it was two.
//
// Every output row needs all of x, so every block computes it, once, and the grid is small: at
// most 16 warps per SM (blocks of 4, 8 or 16 warps: staged_launch's `warps`), each looping over
// output rows:
//   - before it waits for its inputs (programmatic launch) and stages x, each group of warps
//     issues the loads of its first row's first batch of W (W is no kernel's output), so the
//     weight stream starts at once and the staging runs while those loads are under way;
//   - the rows themselves are gemv.cu's (gemv_row.cuh): the same warps per row (1, 2 or 4,
//     from `in` alone), pack size and unroll, so the same order of fp32 additions and the same
//     bits as toyllm::gemv of the x the unfused kernels write. A group of warps takes rows
//     j, j + (groups in the grid), ... on its own; when a row has several warps they wait for
//     each other at the group's named barrier (bar.sync id, threads), not the whole block's;
//   - two rows on the way per group: while a row's batch is in registers, the group's next row
//     is asked into L2 (prefetch.global.L2, no registers held), so its register loads find it
//     on chip. Register double buffering (the next row's batch loaded before this row's is
//     used) would need ~64 registers more a thread and made ptxas spill at 128; one batch in
//     flight alone left the down product at 67% of the copy bandwidth (the HBM latency under
//     load was paid once per row).
// x is staged in the dtype (the unfused kernels round it to the dtype too): in * sizeof(T) bytes
// of shared memory per block; past 48 KB the launcher opts in to more (staged_launch).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>

#include "common/float_convert.cuh"
#include "common/programmatic_launch.cuh"
#include "common/vector_pack.cuh"
#include "gemv/gemv_row.cuh"

namespace toyllm {
namespace gemv_staged {

using gemv_row::accumulate;
using gemv_row::dot_packs;
using gemv_row::kMaxWarpsPerRow;
using gemv_row::kUnroll;
using gemv_row::kWarp;
using gemv_row::load_weight;
using gemv_row::store_row;
using gemv_row::warps_per_row_for;

constexpr int kWarps = 16;  // warps per block, at most (a launch takes 4, 8 or 16 warps)
constexpr int kThreads = kWarps * kWarp;
// Groups of 2 or 4 warps take named barriers 1 .. kWarps / 2 (0 is __syncthreads's; 15 at most).
static_assert(kWarps % kMaxWarpsPerRow == 0 && kWarps / 2 <= 15, "named barrier ids");

// Warps per block of a launch: 4, 8 or 16 (the operators' `warps` argument; default 8). A block
// takes up to 128 registers a thread, so 16 warps fill an SM's register file and no block of
// the kernel before or after can share the SM; 8 or 4 warps give 2 or 4 blocks per SM (each
// staging x itself), which can start as the kernel ahead drains. Llama-1B at batch 1 on an H200
// was within noise of the best at 8 (docs/PERF.md). The bits do not depend on it: a row's sums
// are its group's (warps_per_row_for), whatever the block's size.
constexpr int kDefaultBlockWarps = 8;
inline bool valid_block_warps(int warps) { return warps == 4 || warps == 8 || warps == 16; }
// Shared memory a launch gets without opting in, static and dynamic together.
constexpr size_t kDefaultSharedBytes = 48 * 1024;
// Static shared memory a kernel may take besides x (the per-warp sums, a stage's scratch), and
// slack: x may take up to kDefaultSharedBytes minus this without opting in.
constexpr size_t kStaticAllowance = 1024;

// Named barrier `id` (1 to 15) over `threads` threads (a multiple of 32): the warps of one
// output row's group wait for each other only.
__device__ __forceinline__ void group_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
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

// Row `row` of W times x into acc: dot_packs's first batch from `first` when `prefetched` (as
// load_first_batch loaded it), then the rest of the row; the same sums in the same order as
// dot_packs over the whole row.
template <typename T, int N, int R>
__device__ __forceinline__ void sum_row(float (&acc)[R], const Pack<T, N> (&first)[kUnroll<N>],
                                        bool prefetched, const T* __restrict__ weight,  // [out, in]
                                        int64_t row, int64_t in,
                                        const Pack<T, N>* __restrict__ xp,  // [in / N], shared
                                        int rank, int64_t group_threads, int64_t packs) {
    using P = Pack<T, N>;
    constexpr int U = kUnroll<N>;
    const P* __restrict__ wp = reinterpret_cast<const P*>(weight + row * in) + rank;
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
    dot_packs<T, N, R>(acc, wp, xq, p, group_threads, packs);
}

// Asks L2 for all of row j of W (nothing when j >= out): the group's threads take its 128-byte
// lines rank, rank + G, ... (G = group_threads). No registers wait for these loads, so a group
// has its next row on the way from HBM while its registers hold the current one.
template <typename T>
__device__ __forceinline__ void prefetch_row(const T* __restrict__ weight, int64_t j, int64_t out,
                                             int64_t in, int rank, int64_t group_threads) {
    if (j >= out) {
        return;
    }
    const char* row = reinterpret_cast<const char*>(weight + j * in);
    const int64_t bytes = in * static_cast<int64_t>(sizeof(T));
    for (int64_t offset = static_cast<int64_t>(rank) * 128; offset < bytes;
         offset += group_threads * 128) {
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(row + offset));
    }
}

// The body of a staged kernel (N = elements per load of W): every thread calls it with `x`, the
// block's dynamic shared memory for [in] of T, and `stage`, a callable that every thread of the
// block calls once to write x (it may use __syncthreads; its reads of other kernels' outputs
// come after wait_for_inputs, which this function runs first). Then the group of warps_per_row
// warps takes output rows j = blockIdx.x * groups + group, then every (gridDim.x * groups)-th
// row after it. One row of x: gemv_row's R is 1.
template <typename T, int N, typename Stage>
__device__ __forceinline__ void staged_rows(const T* __restrict__ weight,  // [out, in]
                                            T* __restrict__ y,             // [out]
                                            int64_t in, int64_t out, int warps_per_row,
                                            T* x,  // [in], shared
                                            Stage&& stage) {
    constexpr int R = 1;
    using P = Pack<T, N>;
    constexpr int U = kUnroll<N>;
    __shared__ float partial[kWarps][R];  // per-warp sums when several warps share a row
    const int warps = blockDim.x / kWarp;
    static_assert(sizeof(partial) <= kStaticAllowance / 2, "the per-warp sums fit the allowance");

    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int group = warp / warps_per_row;                  // output row within the block
    const int rank = (warp % warps_per_row) * kWarp + lane;  // thread within the group
    const int64_t group_threads = static_cast<int64_t>(warps_per_row) * kWarp;
    const int groups = warps / warps_per_row;  // output rows the block works on at a time
    const int64_t grid_groups = static_cast<int64_t>(gridDim.x) * groups;
    const int64_t packs = in / N;                                   // packs per row of x and of W
    int64_t j = static_cast<int64_t>(blockIdx.x) * groups + group;  // the group's first row

    // dot_packs's first batch of row j, loaded before x exists, even before the inputs are known
    // to be written (W is no kernel's output); row j + grid_groups starts into L2.
    P first[U];
    bool prefetched = load_first_batch(first, weight, j, out, in, rank, group_threads, packs);
    prefetch_row(weight, j + grid_groups, out, in, rank, group_threads);
    wait_for_inputs();
    stage();
    __syncthreads();  // all of x is written

    const P* __restrict__ xp = reinterpret_cast<const P*>(x);
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
        sum_row<T, N, R>(acc, first, prefetched, weight, j, in, xp, rank, group_threads, packs);
        // the next row's first batch (in L2 by now, or on its way) is loaded while this row is
        // reduced and stored, and the row after it starts into L2
        prefetched =
            load_first_batch(first, weight, j + grid_groups, out, in, rank, group_threads, packs);
        prefetch_row(weight, j + 2 * grid_groups, out, in, rank, group_threads);
        store_row<T, R>(acc, partial, y, j, out, warp, lane, group, rank, warps_per_row, barrier);
    }
}

// Row j's fp32 total, summed over its group as store_row does (butterfly per warp, then the
// warps' totals in warp order through `partial`), returned to the group's first thread
// (rank 0), which holds store_row's value for y[j] before rounding; other threads get 0. Every
// thread of the group must call it.
template <typename Barrier>
__device__ __forceinline__ float row_total(float acc, float (*partial)[1], int warp, int lane,
                                           int group, int rank, int warps_per_row,
                                           Barrier barrier) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    }
    if (warps_per_row == 1) {
        return acc;
    }
    if (lane == 0) {
        partial[warp][0] = acc;
    }
    barrier();
    float total = 0.0f;
    if (rank == 0) {
        for (int w = 0; w < warps_per_row; ++w) {
            total += partial[group * warps_per_row + w][0];
        }
    }
    barrier();  // partial is free again
    return total;
}

// staged_rows for a product whose rows come in pairs, combined by `epilogue(p, a, b)`, called by
// one thread of the group with the two rows' values rounded to T as toyllm::gemv would write
// them. Pair p (< out / 2) is rows (a, a + span) with a = (p / span) * 2 * span + p % span:
// span = out / 2 pairs row j with j + out / 2 (a SwiGLU gate/up product, whose output is
// silu(gate) * up: gemv_add_rms_norm.cu); span = head_dim / 2 pairs the rows that RoPE rotates
// together within each head (the q/k/v product: gemv_norm_rope_kv.cu). out is a multiple of
// 2 * span. The group of warps takes pairs p = blockIdx.x * groups + group, then every
// (gridDim.x * groups)-th pair after it; each row is summed exactly as in staged_rows (same
// bits). One row's first batch is in registers while the other row is summed, the next pair's
// rows start into L2.
template <typename T, int N, typename Stage, typename Epilogue>
__device__ __forceinline__ void staged_row_pairs(const T* __restrict__ weight,  // [out, in]
                                                 int64_t in, int64_t out, int64_t span,
                                                 int warps_per_row,
                                                 T* x,  // [in], shared
                                                 Stage&& stage, Epilogue&& epilogue) {
    using P = Pack<T, N>;
    constexpr int U = kUnroll<N>;
    __shared__ float partial[kWarps][1];
    const int warps = blockDim.x / kWarp;

    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    const int group = warp / warps_per_row;
    const int rank = (warp % warps_per_row) * kWarp + lane;
    const int64_t group_threads = static_cast<int64_t>(warps_per_row) * kWarp;
    const int groups = warps / warps_per_row;
    const int64_t grid_groups = static_cast<int64_t>(gridDim.x) * groups;
    const int64_t packs = in / N;
    const int64_t pairs = out / 2;
    // pair p's first row (pairs past the last: out, which nothing loads)
    const auto first_row = [span, pairs, out](int64_t p) {
        return p < pairs ? (p / span) * 2 * span + p % span : out;
    };
    int64_t p = static_cast<int64_t>(blockIdx.x) * groups + group;  // the group's first pair

    P first[U];
    int64_t a = first_row(p);
    bool prefetched = load_first_batch(first, weight, a, out, in, rank, group_threads, packs);
    if (a < out) {
        prefetch_row(weight, a + span, out, in, rank, group_threads);
    }
    wait_for_inputs();
    stage();
    __syncthreads();  // all of x is written

    const P* __restrict__ xp = reinterpret_cast<const P*>(x);
    const auto barrier = [group, group_threads] {
        group_barrier(1 + group, static_cast<int>(group_threads));
    };
    // one row: its sum from the batch in `first` (when prefetched) and the rest of the row
    const auto row_sum = [&](int64_t row) {
        float acc[1] = {0.0f};
        sum_row<T, N, 1>(acc, first, prefetched, weight, row, in, xp, rank, group_threads, packs);
        return acc[0];
    };
#pragma unroll 1
    for (; p < pairs; p += grid_groups) {
        const float a_acc = row_sum(a);
        // row a + span's first batch (asked into L2 earlier) while row a is reduced
        prefetched = load_first_batch(first, weight, a + span, out, in, rank, group_threads, packs);
        const int64_t next = first_row(p + grid_groups);
        prefetch_row(weight, next, out, in, rank, group_threads);
        const float va = row_total(a_acc, partial, warp, lane, group, rank, warps_per_row, barrier);
        const float b_acc = row_sum(a + span);
        prefetched = load_first_batch(first, weight, next, out, in, rank, group_threads, packs);
        if (next < out) {
            prefetch_row(weight, next + span, out, in, rank, group_threads);
        }
        const float vb = row_total(b_acc, partial, warp, lane, group, rank, warps_per_row, barrier);
        if (rank == 0) {
            epilogue(p, from_float<T>(va), from_float<T>(vb));
        }
        a = next;
    }
}

// Launches `kernel` (a __global__ that calls staged_rows<T, N> or staged_row_pairs<T, N>; 1-D
// grid of `warps` warps a block: 4, 8 or 16, else cudaErrorInvalidValue) for `out` rows of `in`
// with x's [in] of T as its dynamic shared memory: at most kWarps / warps blocks per SM, fewer
// when out has fewer row groups. Opts in to more than 48 KB of shared memory where x needs it
// (the error of cudaFuncSetAttribute past the device's limit).
template <typename T, int N, typename Kernel, typename... Args>
cudaError_t staged_launch(Kernel kernel, int64_t in, int64_t out, int num_sms, int warps,
                          cudaStream_t stream, Args... args) {
    if (!valid_block_warps(warps)) {
        return cudaErrorInvalidValue;
    }
    const int warps_per_row = warps_per_row_for(in / N, kUnroll<N>);  // as gemv.cu's launch
    const int64_t groups = warps / warps_per_row;
    const int64_t most = static_cast<int64_t>(num_sms) * (kWarps / warps);
    const int64_t blocks = std::min((out + groups - 1) / groups, most);
    const size_t dynamic = static_cast<size_t>(in) * sizeof(T);
    if (dynamic > static_cast<size_t>(INT_MAX)) {
        return cudaErrorInvalidValue;
    }
    if (dynamic > kDefaultSharedBytes - kStaticAllowance) {
        const cudaError_t err = cudaFuncSetAttribute(
            kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dynamic));
        if (err != cudaSuccess) {
            (void)cudaGetLastError();  // returned here, not left for the next check
            return err;
        }
    }
    return launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), dim3(warps * kWarp), dynamic,
                         stream, args..., in, out, warps_per_row);
}

// Shared memory one block takes for this `in`: x, plus the static allowance.
template <typename T>
size_t shared_bytes_for(int64_t in) {
    return static_cast<size_t>(in) * sizeof(T) + kStaticAllowance;
}

}  // namespace gemv_staged
}  // namespace toyllm
