// 16-byte vector accesses shared by the elementwise and GEMV kernels: a pack of N elements of T
// loaded or stored as one access, how many elements make 16 bytes, and the host-side alignment
// test that picks the packed path; for the byte copies of the cache writes, the widest copy unit
// that a set of addresses and sizes allows.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace toyllm {

// N elements loaded or stored as one access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

// Elements of T per 16-byte access.
template <typename T>
constexpr int kVec16 = static_cast<int>(16 / sizeof(T));

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// launch(Unit{}) with Unit the widest of uint4, uint2, uint32_t, uint16_t and uint8_t whose size
// divides `bits` (the OR of every base address, row size and stride a copy steps by): each row
// then starts on that boundary too.
template <typename Launch>
cudaError_t with_copy_unit(uintptr_t bits, Launch&& launch) {
    if (bits % 16 == 0) {
        return launch(uint4{});
    }
    if (bits % 8 == 0) {
        return launch(uint2{});
    }
    if (bits % 4 == 0) {
        return launch(uint32_t{});
    }
    if (bits % 2 == 0) {
        return launch(uint16_t{});
    }
    return launch(uint8_t{});
}

}  // namespace toyllm
