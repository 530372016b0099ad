// CUDA argmax over the last dim of [rows, vocab] logits, the greedy pick of a decode step
// (contract in argmax.cuh).
//
// A decode step's argmax reads little (128,256 fp32 logits are 0.5 MB, ~0.1 us of HBM time)
// but torch's reduction gives one row to few blocks and takes ~27 us on an H200 (docs/PERF.md).
// Here the time is one memory round trip plus a cross-block step:
//   - each row is cut into `parts` chunks of whole 16-byte packs, one block each: about two
//     blocks per SM over all rows, but no fewer than ~2 packs per thread (so 128,256 fp32
//     logits take 63 blocks, bf16 32);
//   - a thread loads its packs (4 in flight), keeps its best (value, index) in registers, then a
//     warp-shuffle and a shared-memory step give the block's best;
//   - thread 0 writes it to the scratch, fences, and counts the row's finished blocks with an
//     atomic; the block that finishes last reduces the row's `parts` partials and writes the
//     index. No block waits for another, so any grid size is safe.
// Comparisons are torch's (see `beats`), on the fp32 widening of the value, with the index as the
// tie-break: the result does not depend on how the row is cut.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/float_convert.cuh"
#include "common/vector_pack.cuh"
#include "sampling/argmax.cuh"

namespace toyllm {
namespace {

constexpr int kWarp = 32;
constexpr int kWarps = 8;  // warps per block
constexpr int kThreads = kWarps * kWarp;
constexpr int64_t kBlocksPerSm = 2;             // blocks of all rows together, per SM
constexpr int64_t kMinPacksPerThread = 2;       // a row is cut no finer than this
constexpr int64_t kMaxGrid = int64_t{1} << 20;  // blocks per launch (grid-stride past that)
constexpr int64_t kNoIndex = INT64_MAX;         // "no element yet": loses to every element
// A row's counter (`done`) counts its finished blocks in the low 16 bits and the blocks that
// saw a NaN or an inf in the high 16 (one atomicAdd says both); parts <= kBlocksPerSm * SMs.
constexpr unsigned kCountMask = 0xffffu;
constexpr unsigned kNonfiniteUnit = 1u << 16;

// Loads each thread issues before it looks at the first: 4 x 16 bytes, or 8 single elements.
template <int N>
constexpr int kUnroll = N == 1 ? 8 : 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t element_bytes(ArgmaxDtype dtype) { return dtype == ArgmaxDtype::kFloat32 ? 4 : 2; }

int64_t align16(int64_t bytes) { return ceil_div(bytes, 16) * 16; }

// How a row is cut: `parts` chunks of `chunk` elements (the last one shorter), chunk a whole
// number of 16-byte packs, every chunk non-empty.
struct Plan {
    int64_t parts;
    int64_t chunk;
};

Plan plan_for(ArgmaxDtype dtype, int64_t rows, int64_t vocab, int sm_count) {
    const int64_t vec = 16 / element_bytes(dtype);  // elements per 16-byte pack
    const int64_t target = kBlocksPerSm * std::max(sm_count, 1);
    const int64_t finest = ceil_div(vocab, kThreads * kMinPacksPerThread * vec);
    // (never above kCountMask: a row's counter holds its count in 16 bits)
    const int64_t parts = std::max<int64_t>(
        1, std::min({ceil_div(target, std::max<int64_t>(rows, 1)), finest,
                     static_cast<int64_t>(kCountMask)}));
    const int64_t chunk = ceil_div(ceil_div(vocab, parts), vec) * vec;
    return {ceil_div(vocab, chunk), chunk};
}

// Scratch layout: done [rows] uint32 | value [rows, parts] fp32 | index [rows, parts] int64,
// each 16-byte aligned.
struct Scratch {
    int64_t value_offset;
    int64_t index_offset;
    int64_t bytes;
};

Scratch scratch_for(int64_t rows, int64_t parts) {
    if (parts <= 1) {
        return {0, 0, 0};
    }
    const int64_t value_offset = align16(rows * static_cast<int64_t>(sizeof(unsigned)));
    const int64_t index_offset =
        align16(value_offset + rows * parts * static_cast<int64_t>(sizeof(float)));
    return {value_offset, index_offset,
            index_offset + rows * parts * static_cast<int64_t>(sizeof(int64_t))};
}

struct Best {
    float value;
    int64_t index;
};

// Does (a, ia) come before (b, ib) in torch.argmax's order? NaN first (the smaller index among
// NaNs), then the larger value, then, for equal values (-0.0 == +0.0 too), the smaller index.
// A strict order on distinct indices, so the winner of any grouping is the same element.
__device__ __forceinline__ bool beats(float a, int64_t ia, float b, int64_t ib) {
    if (isnan(a)) {
        return !isnan(b) || ia < ib;
    }
    return a > b || (a == b && ia < ib);
}

__device__ __forceinline__ void take(Best& best, float value, int64_t index) {
    if (beats(value, index, best.value, best.index)) {
        best = {value, index};
    }
}

// Butterfly over the warp: every lane ends with the warp's best.
__device__ __forceinline__ Best warp_best(Best best) {
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        const float value = __shfl_xor_sync(0xffffffffu, best.value, offset);
        const int64_t index = __shfl_xor_sync(0xffffffffu, best.index, offset);
        take(best, value, index);
    }
    return best;
}

// The block's best, valid in warp 0. Every thread must call it (two barriers); `shared` is free
// again when it returns.
__device__ __forceinline__ Best block_best(Best best, Best (&shared)[kWarps]) {
    const int warp = threadIdx.x / kWarp;
    const int lane = threadIdx.x % kWarp;
    best = warp_best(best);
    if (lane == 0) {
        shared[warp] = best;
    }
    __syncthreads();
    if (warp == 0) {
        best = lane < kWarps ? shared[lane] : Best{-INFINITY, kNoIndex};
        best = warp_best(best);
    }
    __syncthreads();
    return best;
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const Pack<T, N>* p) {
    if constexpr (sizeof(Pack<T, N>) == 16) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
        Pack<T, N> out;
        memcpy(&out, &raw, sizeof(out));
        return out;
    } else {
        return *p;
    }
}

// One (row, part) item per block and grid-stride step; N elements per load. The loop over items
// is block-uniform, so every thread reaches the barriers.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    argmax_kernel(const T* __restrict__ logits,  // [rows, vocab], rows row_stride apart
                  int64_t row_stride,
                  int64_t* __restrict__ out,         // [rows]
                  unsigned* __restrict__ done,       // [rows], zero at launch (parts > 1)
                  float* __restrict__ part_value,    // [rows, parts]      (parts > 1)
                  int64_t* __restrict__ part_index,  // [rows, parts]      (parts > 1)
                  int64_t rows, int64_t vocab, int64_t parts, int64_t chunk,
                  bool flag_nonfinite) {  // a row holding NaN or +-inf gets -1
    using P = Pack<T, N>;
    constexpr int U = kUnroll<N>;
    __shared__ Best shared[kWarps];
    __shared__ bool last;
    const int tid = threadIdx.x;

    for (int64_t item = blockIdx.x; item < rows * parts; item += gridDim.x) {
        const int64_t r = item / parts;
        const int64_t lo = (item % parts) * chunk;  // this block's elements: [lo, hi)
        const int64_t hi = lo + chunk < vocab ? lo + chunk : vocab;
        const T* __restrict__ row = logits + r * row_stride;
        const P* __restrict__ packs = reinterpret_cast<const P*>(row);
        Best best{-INFINITY, kNoIndex};
        bool nonfinite = false;  // this thread saw a NaN or an inf

        // whole packs [lo / N, hi / N): this thread's are lo / N + tid, + kThreads, ...
        const int64_t end = hi / N;
#pragma unroll 1
        for (int64_t q = lo / N + tid; q < end; q += U * kThreads) {
            P v[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {  // U loads in flight before the first compare
                if (q + u * kThreads < end) {
                    v[u] = load_pack(packs + q + u * kThreads);
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (q + u * kThreads < end) {
#pragma unroll
                    for (int k = 0; k < N; ++k) {
                        const float x = to_float(v[u].v[k]);
                        nonfinite |= !isfinite(x);
                        take(best, x, (q + u * kThreads) * N + k);
                    }
                }
            }
        }
        // the < N elements after the last whole pack (only the row's last chunk has any)
        if (end * N + tid < hi) {
            const float x = to_float(row[end * N + tid]);
            nonfinite |= !isfinite(x);
            take(best, x, end * N + tid);
        }
        // block-uniform: every thread reaches it (the barrier also orders `shared` below)
        nonfinite = flag_nonfinite && __syncthreads_or(nonfinite);
        best = block_best(best, shared);

        if (parts == 1) {
            if (tid == 0) {
                out[r] = nonfinite ? -1 : best.index;
            }
            continue;
        }
        bool row_nonfinite = false;  // thread 0 of the row's last block: any block saw one
        if (tid == 0) {
            part_value[item] = best.value;  // item == r * parts + part
            part_index[item] = best.index;
            __threadfence();  // the partial reaches L2 before the count says it is there
            const unsigned before = atomicAdd(done + r, 1u + (nonfinite ? kNonfiniteUnit : 0u));
            last = (before & kCountMask) == static_cast<unsigned>(parts - 1);
            // every other block of the row added before this last one: their flags are in it
            row_nonfinite = nonfinite || before >= kNonfiniteUnit;
        }
        __syncthreads();
        // `last` is block-uniform. In the last block every other block of row r has written its
        // partial; this fence pairs with theirs, so the partials are visible.
        if (last) {
            __threadfence();
            Best row_best{-INFINITY, kNoIndex};
            for (int64_t q = tid; q < parts; q += kThreads) {
                // through L2 (.cg): never a line this SM cached before the other blocks wrote
                take(row_best, __ldcg(part_value + r * parts + q),
                     __ldcg(part_index + r * parts + q));
            }
            row_best = block_best(row_best, shared);
            if (tid == 0) {
                out[r] = row_nonfinite ? -1 : row_best.index;
            }
        }
        __syncthreads();  // `last` is read by every thread before the next item writes it
    }
}

template <typename T>
cudaError_t argmax_for(const void* logits, int64_t row_stride, int64_t* out, void* scratch,
                       const Plan& plan, int64_t rows, int64_t vocab, bool flag_nonfinite,
                       cudaStream_t stream) {
    constexpr int kVec = kVec16<T>;
    const T* x = static_cast<const T*>(logits);
    const Scratch layout = scratch_for(rows, plan.parts);
    char* base = static_cast<char*>(scratch);
    unsigned* done = plan.parts > 1 ? reinterpret_cast<unsigned*>(base) : nullptr;
    float* value = plan.parts > 1 ? reinterpret_cast<float*>(base + layout.value_offset) : nullptr;
    int64_t* index =
        plan.parts > 1 ? reinterpret_cast<int64_t*>(base + layout.index_offset) : nullptr;
    const int64_t blocks = std::min(rows * plan.parts, kMaxGrid);
    // every row starts on a 16-byte boundary when the first does and the pitch is whole packs
    const bool vec = aligned16(x) && (rows == 1 || row_stride % kVec == 0);
    if (vec) {
        argmax_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            x, row_stride, out, done, value, index, rows, vocab, plan.parts, plan.chunk,
            flag_nonfinite);
    } else {
        argmax_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            x, row_stride, out, done, value, index, rows, vocab, plan.parts, plan.chunk,
            flag_nonfinite);
    }
    return cudaGetLastError();
}

}  // namespace

int64_t argmax_parts(ArgmaxDtype dtype, int64_t rows, int64_t vocab, int sm_count) {
    if (rows < 1 || vocab < 1) {
        return 1;
    }
    return plan_for(dtype, rows, vocab, sm_count).parts;
}

int64_t argmax_scratch_bytes(ArgmaxDtype dtype, int64_t rows, int64_t vocab, int sm_count) {
    return scratch_for(rows, argmax_parts(dtype, rows, vocab, sm_count)).bytes;
}

cudaError_t launch_argmax(const void* logits, int64_t row_stride, int64_t* out, void* scratch,
                          int64_t scratch_bytes, ArgmaxDtype dtype, int64_t rows, int64_t vocab,
                          int sm_count, bool flag_nonfinite, cudaStream_t stream) {
    if (rows < 0 || vocab < 1) {
        return cudaErrorInvalidValue;
    }
    if (rows == 0) {
        return cudaSuccess;
    }
    const Plan plan = plan_for(dtype, rows, vocab, sm_count);
    if (plan.parts > 1) {
        if (scratch == nullptr || !aligned16(scratch) ||
            scratch_bytes < scratch_for(rows, plan.parts).bytes) {
            return cudaErrorInvalidValue;
        }
        // the per-row counters start at zero: a memset node when captured in a graph
        const cudaError_t err =
            cudaMemsetAsync(scratch, 0, static_cast<size_t>(rows) * sizeof(unsigned), stream);
        if (err != cudaSuccess) {
            return err;
        }
    }
    switch (dtype) {
        case ArgmaxDtype::kFloat16:
            return argmax_for<__half>(logits, row_stride, out, scratch, plan, rows, vocab,
                                      flag_nonfinite, stream);
        case ArgmaxDtype::kBFloat16:
            return argmax_for<__nv_bfloat16>(logits, row_stride, out, scratch, plan, rows, vocab,
                                             flag_nonfinite, stream);
        case ArgmaxDtype::kFloat32:
            return argmax_for<float>(logits, row_stride, out, scratch, plan, rows, vocab,
                                     flag_nonfinite, stream);
    }
    return cudaErrorInvalidValue;
}

}  // namespace toyllm
