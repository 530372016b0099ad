// 16-byte vector accesses shared by the elementwise and GEMV kernels: a pack of N elements of T
// loaded or stored as one access, how many elements make 16 bytes, and the host-side alignment
// test that picks the packed path.
#pragma once

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

}  // namespace toyllm
