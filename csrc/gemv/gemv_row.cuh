// How a group of warps computes one output row of a decode GEMV, y[m, j] = sum_i x[m, i] *
// W[j, i] for the rows m < R of x: the loads of W, the fp32 sums, the reduction over the group
// and the store. Shared by toyllm::gemv's kernel (gemv.cu) and the down product that computes
// its x = silu_mul(gate_up) itself (gemv_silu_mul.cu): the same group size, pack size, order of
// loads and order of additions give both kernels the same bits for the same x and W. The
// design (why groups of warps, 16-byte packs, kUnroll loads in flight) is described in gemv.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/float_convert.cuh"
#include "common/vector_pack.cuh"

namespace toyllm {
namespace gemv_row {

constexpr int kWarp = 32;
// Warps that share one output row at most (warps_per_row_for picks 1, 2 or 4).
constexpr int kMaxWarpsPerRow = 4;

// Loads of W each thread issues before it uses the first: 8 x 16 bytes, or 16 single elements.
template <int N>
constexpr int kUnroll = N == 1 ? 16 : 8;

// One pack of W with the streaming cache hint (ld.global.cs): W is read once per call, so its
// lines go first and x keeps its place in L1.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_weight(const Pack<T, N>* p) {
    if constexpr (sizeof(Pack<T, N>) == 16) {
        const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
        Pack<T, N> out;
        memcpy(&out, &raw, sizeof(out));
        return out;
    } else {
        return *p;
    }
}

// Asks L2 for the start of row j of W (in elements of T, rows `in` apart; nothing when
// j >= out): a 128-byte line per thread, the first group_threads lines of the row. Issued before
// a kernel waits for its inputs (the weights are no kernel's output), so that the row's first
// loads find their lines on chip.
template <typename T>
__device__ __forceinline__ void prefetch_row_to_l2(const T* weight, int64_t j, int64_t in,
                                                   int64_t out, int rank) {
    const int64_t offset = static_cast<int64_t>(rank) * 128;
    if (j < out && offset < in * static_cast<int64_t>(sizeof(T))) {
        const char* line = reinterpret_cast<const char*>(weight + j * in) + offset;
        asm volatile("prefetch.global.L2 [%0];\n" ::"l"(line));
    }
}

// acc[m] += sum_k float(w[k]) * float(x[m, k]) for the rows m < R of x, in fp32; `x` points at
// the pack of row 0, row m is `pitch` packs further.
template <typename T, int N, int R>
__device__ __forceinline__ void accumulate(float (&acc)[R], const Pack<T, N>& w,
                                           const Pack<T, N>* __restrict__ x, int64_t pitch) {
#pragma unroll
    for (int m = 0; m < R; ++m) {
        const Pack<T, N> xv = x[m * pitch];
#pragma unroll
        for (int k = 0; k < N; ++k) {
            acc[m] = fmaf(to_float(w.v[k]), to_float(xv.v[k]), acc[m]);
        }
    }
}

// acc[m] += float(W[j, i]) * float(x[m, i]) over this thread's packs p, p + G, p + 2G, ... < packs
// of a row j of W (G = group_threads), in that order: batches of U independent loads, then the
// last < U packs one at a time. `wp` and `xq` point at pack p of row j of W and of row 0 of x
// (rows of x are `packs` packs apart). The order of the fmafs depends on (p, G, packs) only.
template <typename T, int N, int R>
__device__ __forceinline__ void dot_packs(float (&acc)[R], const Pack<T, N>* __restrict__ wp,
                                          const Pack<T, N>* __restrict__ xq, int64_t p,
                                          int64_t group_threads, int64_t packs) {
    using P = Pack<T, N>;
    constexpr int U = kUnroll<N>;
#pragma unroll 1
    for (; p + (U - 1) * group_threads < packs; p += U * group_threads) {
        // U independent loads first (the HBM latency is paid once per U packs) ...
        P w[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            w[u] = load_weight(wp + u * group_threads);
        }
        // ... then y[m, j] += x[m, i] * W[j, i] over their elements, in fp32
#pragma unroll
        for (int u = 0; u < U; ++u) {
            accumulate<T, N, R>(acc, w[u], xq + u * group_threads, packs);
        }
        wp += U * group_threads;
        xq += U * group_threads;
    }
#pragma unroll 1
    for (; p < packs; p += group_threads) {  // the last < U packs, one at a time
        accumulate<T, N, R>(acc, load_weight(wp), xq, packs);
        wp += group_threads;
        xq += group_threads;
    }
}

// Writes y[m, j] (m < R) from every thread's acc of output row j, owned by `group` (its
// warps_per_row warps; `rank` = thread within the group): a butterfly sum over each warp (every
// lane ends with the same total: fp32 addition is commutative, so both lanes of a pair compute
// the same bits), then, when several warps share the row, their totals added in warp order
// through `partial` [warps of the block][R]. `barrier()` synchronises at least the group's
// threads; every thread of the group must call store_row (j >= out writes nothing). `warp` and
// `lane` are the thread's in the block, `rank` its index in the group.
template <typename T, int R, typename Barrier>
__device__ __forceinline__ void store_row(float (&acc)[R], float (*partial)[R],
                                          T* __restrict__ y,  // [R, out]
                                          int64_t j, int64_t out, int warp, int lane, int group,
                                          int rank, int warps_per_row, Barrier barrier) {
#pragma unroll
    for (int m = 0; m < R; ++m) {
#pragma unroll
        for (int offset = kWarp / 2; offset > 0; offset /= 2) {
            acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], offset);
        }
    }
    if (warps_per_row == 1) {
        if (j < out) {
#pragma unroll
            for (int m = 0; m < R; ++m) {
                if (lane == m) {
                    y[m * out + j] = from_float<T>(acc[m]);
                }
            }
        }
    } else {
        if (lane == 0) {
#pragma unroll
            for (int m = 0; m < R; ++m) {
                partial[warp][m] = acc[m];
            }
        }
        barrier();
        // thread m of the group adds row m's warp totals in warp order and writes y[m, j]
        if (rank < R && j < out) {
            float total = 0.0f;
            for (int w = 0; w < warps_per_row; ++w) {
                total += partial[group * warps_per_row + w][rank];
            }
            y[rank * out + j] = from_float<T>(total);
        }
        barrier();  // partial is free again for the next rows
    }
}

// Warps per output row: the largest of 1, 2, 4 that still gives each thread at least two
// batches of kUnroll loads (in = 2048 bf16: 1; 2048 fp32 or 4096 bf16: 2; 8192 bf16: 4).
inline int warps_per_row_for(int64_t packs, int unroll) {
    int w = 1;
    while (w < kMaxWarpsPerRow && packs >= 2 * static_cast<int64_t>(w) * kWarp * unroll) {
        w *= 2;
    }
    return w;
}

}  // namespace gemv_row
}  // namespace toyllm
