// One Llama decoder layer of a CPU decode step (one new token per row), fp32, on pointers: the
// checks of a layer's weights and caches and the layer's math, which toyllm::cpu_decode_step
// (the whole step, cpu_decode_step.cpp) runs for every layer:
//
//   s   = x + residual                  (x alone for the first layer: residual null)
//   h   = rms_norm(s) * input_norm
//   q, k, v = h @ qkv_weight^T          (one product for the three)
//   q, k = RoPE(q, k) at each row's position; k, v written to k_cache / v_cache at row r's key
//          positions[r] (a cache row [r, positions[r]], or a paged pool's slot through row r's
//          block table: CacheRows, attention/decode_attention_cpu.h)
//   a   = softmax(q . K[r, :p_r + 1] / sqrt(D)) @ V[r, :p_r + 1]     (GQA: a group shares K/V)
//   s2  = s + a @ o_weight^T
//   g, u = rms_norm(s2) * post_norm @ gate_up_weight^T
//   out = (silu(g) * u) @ down_weight^T
//   the residual stream after the layer is s2 + out, which the next layer (or the final norm)
//   adds, as the engine's unfused layer leaves it.
//
// Each step runs the very code of the operator the unfused layer calls (add_rms_norm's add and
// RMSNorm loop, gemv's kernels, rope_kv_update's RoPE and copy, decode_attention's fp32 loop,
// ATen's silu repeated by elementwise/cpu_silu_fp32.h, or ATen's own where that does not
// apply), on the same values in the same order (tests/test_cpu_decode_step.py compares them as
// integers).
//
// Threads: the whole step runs in one OpenMP parallel region (cpu_decode_step.cpp), every
// thread through every layer. Each thread computes the norms itself into its own buffers (a few
// hundred floats: cheaper than a barrier), takes a share of each product, of RoPE and the K/V
// write and of attention, and meets the others at a barrier where a stage reads what another
// thread wrote: five a layer (after q/k/v, attention, o with its residual add, gate/up with
// silu(gate) * up, down), where the separate regions were five fork/joins with the norms, RoPE
// and silu on one thread between them.
//
// Rows at a negative position (finished) write nothing into the caches; like the unfused step,
// they attend over key 0 and their outputs are to be ignored.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "attention/decode_attention_cpu.h"
#include "gemv/cpu_gemv_kernels.h"

namespace toyllm {

// The shapes a layer reads off its arguments.
struct LayerShape {
    int64_t rows;          // new tokens, one per cache row
    int64_t hidden;        // the residual stream's width
    int64_t num_q_heads;   // Hq
    int64_t num_kv_heads;  // Hkv, k_cache.size(2)
    int64_t head_dim;      // D, k_cache.size(3)
    int64_t max_seq_len;   // keys a row can hold: k_cache.size(1), times the table's width
                           // for a paged pool
    int64_t intermediate;  // down_weight.size(1)
};

// One layer's weights, each contiguous, [out, in] for the products: the norms fp32, the
// products' weights fp32 or bf16 (read as fp32 values: gemv/cpu_gemv_kernels.h).
struct LayerWeightPtrs {
    const float* input_norm;  // [hidden]
    GemvWeight qkv;           // [(Hq + 2 Hkv) D, hidden]
    GemvWeight o;             // [hidden, Hq D]
    const float* post_norm;   // [hidden]
    GemvWeight gate_up;       // [2 I, hidden]
    GemvWeight down;          // [hidden, I]
};

// t is an fp32 CPU tensor; messages start with `op` and name t `name`.
void check_fp32_cpu(const char* op, const char* name, const at::Tensor& t);

// t is a product's weight the step reads: fp32 or bf16, on the CPU.
void check_weight_dtype(const char* op, const char* name, const at::Tensor& t);

// A checked product weight's pointer (fp32 or bf16).
GemvWeight gemv_weight(const at::Tensor& t);

// Checks a layer's norms, eps, caches, num_q_heads and weights against `rows` new tokens of
// width `hidden`, in that order, and returns the layer's shape. Messages start with `op`.
// block_tables null: contiguous caches [rows, max_seq_len, Hkv, D]; else paged pools
// [num_blocks, block_size (a power of two), Hkv, D] that the table (checked by the caller:
// int32 [rows, width]) addresses.
LayerShape check_layer(const char* op, int64_t rows, int64_t hidden,
                       const at::Tensor& input_norm,      // [hidden]
                       const at::Tensor& qkv_weight,      // [(Hq + 2 Hkv) D, hidden]
                       const at::Tensor& o_weight,        // [hidden, Hq D]
                       const at::Tensor& post_norm,       // [hidden]
                       const at::Tensor& gate_up_weight,  // [2 I, hidden]
                       const at::Tensor& down_weight,     // [hidden, I]
                       double eps,
                       const at::Tensor& k_cache,  // [rows, max_seq_len, Hkv, D] or a pool
                       const at::Tensor& v_cache,  // k_cache's shape
                       int64_t num_q_heads, const at::Tensor* block_tables);

// positions int32 [rows] on `device` (the CPU), each < max_seq_len (negative: a finished row).
// On the CPU they can be read for free, so their range is checked, as rope_kv_update does, before
// anything is written.
void check_positions_fit(const char* op, const at::Tensor& positions, int64_t rows,
                         const char* rows_why, const at::Device& device, const char* device_why,
                         int64_t max_seq_len);

// The barrier of a step's team (OpenMP's, which every thread of the region meets), counting
// the waits that lasted over a millisecond: a thread of the team was off its core (a stage's
// imbalance on a quiet machine is tens of microseconds), which cpu_decode_step.cpp answers by
// running the next steps on one thread.
class TeamBarrier {
  public:
    void wait();
    int64_t long_waits() const { return long_waits_.load(std::memory_order_relaxed); }

  private:
    std::atomic<int64_t> long_waits_{0};
};

// The threads of the parallel region a step runs in: this thread's id, the team's size, the
// threads ATen's own ops would use in the caller (at::get_num_threads(), outside the region),
// which its silu's split depends on, and the team's barrier (null for a team of one).
struct Team {
    int64_t id;
    int64_t size;
    int64_t aten_threads;
    TeamBarrier* barrier;
    void sync() const {
        if (size > 1) {
            barrier->wait();
        }
    }
};

// Floats of scratch one layer call needs with up to `threads` threads, for rows at `positions`
// (int32 [s.rows]; carve_layer_scratch).
int64_t layer_scratch_floats(const LayerShape& s, int64_t threads, const int32_t* positions);

// A layer call's scratch: pointers into one fp32 tensor, shared by the team (q/k/v, q after
// RoPE, attention's output, gate/up, silu(gate) * up) and each thread's own (x + residual, a
// norm's output, attention's scores and sums), and the keys each row attends over. Carved once
// a step and reused by every layer of the same shape.
struct LayerScratch {
    float* qkv;                 // [rows, (Hq + 2 Hkv) D]
    float* q;                   // [rows, Hq D]: q after RoPE
    float* attn;                // [rows, Hq D]: attention's output
    float* gate_up;             // [rows, 2 I]
    float* act;                 // [rows, I]: silu(gate) * up
    float* own;                 // thread t's part at own + t * own_floats:
    int64_t own_floats;         //   sum_in [rows, hidden], h [rows, hidden], attention's
                                //   scratch (decode_attention_scratch_floats of Hq heads)
    at::Tensor gate_view;       // [rows, I] view of gate_up's gate half (ATen's silu: only
    at::Tensor act_view;        // [rows, I] view of act                  where it runs it)
    std::vector<int32_t> lens;  // [rows]: max(position, 0) + 1
    int64_t longest;            // the largest of lens
    float* sum_in(int64_t t) const { return own + t * own_floats; }
    float* h(int64_t t, int64_t stream) const { return sum_in(t) + stream; }
    float* attention(int64_t t, int64_t stream) const { return sum_in(t) + 2 * stream; }
};

// The scratch of a layer of shape s for up to `threads` threads in `scratch` (an fp32 CPU
// tensor of at least layer_scratch_floats(s, threads) elements), for rows at `positions`
// (int32 [s.rows]).
LayerScratch carve_layer_scratch(const LayerShape& s, int64_t threads, const at::Tensor& scratch,
                                 const int32_t* positions);

// Whether two layers' scratch is carved alike (the same widths and rows).
bool same_scratch_layout(const LayerShape& a, const LayerShape& b);

// The layer (see the top of this file) on a checked shape, this thread's part of it: every
// thread of the team calls it with the same arguments. x, residual, out_sum and out_down are
// [rows, hidden] each and must not alias one another; residual may be null (the first layer).
// scratch: carve_layer_scratch of this shape and these positions. Returns when out_sum and
// out_down are complete (the last barrier).
void decode_layer_fp32(const Team& team, const LayerShape& s, const LayerWeightPtrs& w, float eps,
                       const float* x,         // [rows, hidden]
                       const float* residual,  // [rows, hidden], or null
                       const float* cos,       // [rows][cos_row_stride], D used per row
                       int64_t cos_row_stride,
                       const float* sin,  // [rows][sin_row_stride], D used per row
                       int64_t sin_row_stride,
                       float* k_cache,  // written at cache_rows.slot(r, positions[r])
                       float* v_cache,  // the same
                       const CacheRows& cache_rows,  // where row r's key j sits
                       const int32_t* positions,     // [rows]; < 0: a finished row
                       float* out_sum,          // [rows, hidden]: s2
                       float* out_down,         // [rows, hidden]: the MLP's output
                       const LayerScratch& scratch);

}  // namespace toyllm
