// The checks and math of one CPU decode layer in fp32 (decode_layer_fp32.h).
#include "layer/decode_layer_fp32.h"

#include <ATen/ops/silu_cpu_dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <chrono>
#include <utility>
#include <vector>

#include "attention/decode_attention_cpu.h"
#include "common/op_args.h"
#include "elementwise/cpu_fp32_loops.h"
#include "elementwise/cpu_silu_fp32.h"
#include "gemv/cpu_gemv_kernels.h"

namespace toyllm {
namespace {

// A weight [out, in] in nn.Linear's layout, contiguous (the layout the GEMV streams fastest).
void check_weight(const char* op, const char* name, const at::Tensor& w, int64_t out, int64_t in,
                  const char* shape_why) {
    check_weight_dtype(op, name, w);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == out && w.size(1) == in, op, ": expected ",
                      name, " of shape [", out, ", ", in, "] (", shape_why, "), got ", w.sizes());
    TORCH_CHECK_VALUE(w.is_contiguous(), op, ": expected a contiguous ", name,
                      " [out, in] (nn.Linear's layout), got strides ", w.strides(),
                      " for shape ", w.sizes());
}

// [begin, end) of `units` split evenly into `parts` shares: share `part`'s.
struct Share {
    int64_t begin, end;
};
Share share_of(int64_t units, int64_t part, int64_t parts) {
    return Share{units * part / parts, units * (part + 1) / parts};
}

// silu(gate) * up into scratch.act for scratch.gate_up [rows, 2 * I] (gate, then up) on one
// thread, with the bits of models/layer_math.py's F.silu(gate) * up in the caller's ATen:
// cpu_silu_fp32.h's loop where it repeats ATen's, else ATen's silu on the gate view
// (at::cpu:: calls the CPU kernel without the dispatcher; in the region its parallel_for runs
// inline, so only where F.silu would not split either), then the products (exact, as at::mul's).
void silu_mul_rows(const LayerScratch& scratch, int64_t rows, int64_t inter,
                   int64_t aten_threads) {
    if (silu_fp32_available()) {
        silu_mul_fp32(scratch.gate_up, 2 * inter, scratch.gate_up + inter, 2 * inter, scratch.act,
                      inter, rows, inter, aten_threads);
        return;
    }
    at::Tensor act = scratch.act_view;
    at::cpu::silu_out(act, scratch.gate_view);
    const float* up = scratch.gate_up + inter;
    float* ap = scratch.act;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < inter; ++i) {
            ap[r * inter + i] *= up[r * 2 * inter + i];
        }
    }
}

// Floats of the shared scratch (qkv, q, attention out, gate_up, silu(gate) * up) and of one
// thread's own (sum_in, h, attention's scratch).
int64_t shared_floats(const LayerShape& s) {
    const int64_t qkv_width = (s.num_q_heads + 2 * s.num_kv_heads) * s.head_dim;
    const int64_t q_width = s.num_q_heads * s.head_dim;
    return s.rows * (qkv_width + 2 * q_width + 3 * s.intermediate);
}
int64_t own_floats(const LayerShape& s, int64_t longest) {
    return 2 * s.rows * s.hidden +
           decode_attention_scratch_floats(s.num_q_heads, longest, s.head_dim);
}

}  // namespace

void check_fp32_cpu(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ",
                      t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": expected ", name,
                      " of dtype torch.float32, got ", dtype_name(t.scalar_type()));
}

void check_weight_dtype(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ",
                      t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op,
                      ": expected ", name, " of dtype torch.float32 or torch.bfloat16, got ",
                      dtype_name(t.scalar_type()));
}

GemvWeight gemv_weight(const at::Tensor& t) {
    GemvWeight w;
    if (t.scalar_type() == at::kBFloat16) {
        w.bf16 = reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
    } else {
        w.fp32 = t.const_data_ptr<float>();
    }
    return w;
}

LayerShape check_layer(const char* op, int64_t rows, int64_t hidden, const at::Tensor& input_norm,
                       const at::Tensor& qkv_weight, const at::Tensor& o_weight,
                       const at::Tensor& post_norm, const at::Tensor& gate_up_weight,
                       const at::Tensor& down_weight, double eps, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, int64_t num_q_heads,
                       const at::Tensor* block_tables) {
    LayerShape s{};
    s.rows = rows;
    s.hidden = hidden;
    for (const auto& [name, norm] : {std::pair<const char*, const at::Tensor&>{"input_norm",
                                                                               input_norm},
                                     {"post_norm", post_norm}}) {
        check_fp32_cpu(op, name, norm);
        TORCH_CHECK_VALUE(norm.dim() == 1 && norm.size(0) == hidden, op, ": expected ", name,
                          " of shape [", hidden, "] (x's hidden size), got ", norm.sizes());
        check_contiguous(op, name, norm);
    }
    check_eps(op, eps);

    // the cache gives the heads' layout
    check_fp32_cpu(op, "k_cache", k_cache);
    check_fp32_cpu(op, "v_cache", v_cache);
    if (block_tables == nullptr) {
        TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(0) == rows, op,
                          ": expected k_cache of shape [", rows,
                          ", max_seq_len, num_kv_heads, head_dim] (x's rows), got ",
                          k_cache.sizes());
    } else {
        TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(0) >= 1, op,
                          ": expected k_cache of shape [num_blocks >= 1, block_size, "
                          "num_kv_heads, head_dim] (a paged pool: block_tables given), got ",
                          k_cache.sizes());
        const int64_t block_size = k_cache.size(1);
        TORCH_CHECK_VALUE(block_size >= 1 && (block_size & (block_size - 1)) == 0, op,
                          ": expected a power-of-two block_size (k_cache.size(1)), got ",
                          block_size);
    }
    TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op,
                      ": expected v_cache of k_cache's shape ", k_cache.sizes(), ", got ",
                      v_cache.sizes());
    check_contiguous(op, "k_cache", k_cache);
    check_contiguous(op, "v_cache", v_cache);
    // a row's keys: its cache row's length, or its table's blocks
    s.max_seq_len = k_cache.size(1) * (block_tables == nullptr ? 1 : block_tables->size(1));
    s.num_kv_heads = k_cache.size(2);
    s.head_dim = k_cache.size(3);
    TORCH_CHECK_VALUE(s.max_seq_len >= 1, op, ": expected max_seq_len (k_cache.size(1)) >= 1, got ",
                      s.max_seq_len);
    TORCH_CHECK_VALUE(s.num_kv_heads >= 1, op,
                      ": expected num_kv_heads (k_cache.size(2)) >= 1, got ", s.num_kv_heads);
    TORCH_CHECK_VALUE(s.head_dim >= 2 && s.head_dim % 2 == 0, op,
                      ": expected an even head_dim >= 2 (k_cache.size(3)), got ", s.head_dim);
    TORCH_CHECK_VALUE(num_q_heads >= 1 && num_q_heads % s.num_kv_heads == 0, op,
                      ": expected num_q_heads to be a positive multiple of num_kv_heads ",
                      s.num_kv_heads, " (k_cache.size(2)), got ", num_q_heads);
    s.num_q_heads = num_q_heads;

    const int64_t qkv_rows = (num_q_heads + 2 * s.num_kv_heads) * s.head_dim;
    check_weight(op, "qkv_weight", qkv_weight, qkv_rows, hidden,
                 "(num_q_heads + 2 * num_kv_heads) * head_dim, hidden");
    check_weight(op, "o_weight", o_weight, hidden, num_q_heads * s.head_dim,
                 "hidden, num_q_heads * head_dim");
    check_weight_dtype(op, "down_weight", down_weight);
    TORCH_CHECK_VALUE(down_weight.dim() == 2 && down_weight.size(0) == hidden &&
                          down_weight.size(1) >= 1,
                      op, ": expected down_weight of shape [", hidden,
                      ", intermediate] (hidden, intermediate >= 1), got ", down_weight.sizes());
    s.intermediate = down_weight.size(1);
    check_weight(op, "down_weight", down_weight, hidden, s.intermediate, "hidden, intermediate");
    check_weight(op, "gate_up_weight", gate_up_weight, 2 * s.intermediate, hidden,
                 "2 * intermediate (gate, then up), hidden");
    return s;
}

void check_positions_fit(const char* op, const at::Tensor& positions, int64_t rows,
                         const char* rows_why, const at::Device& device, const char* device_why,
                         int64_t max_seq_len) {
    check_positions(op, positions, rows, rows_why, device, device_why);
    const int32_t* pos = positions.const_data_ptr<int32_t>();
    for (int64_t r = 0; r < rows; ++r) {
        TORCH_CHECK_VALUE(pos[r] < max_seq_len, op, ": expected positions[", r,
                          "] + 1 <= max_seq_len ", max_seq_len,
                          " (or a negative position for a finished row), got ", pos[r], " + 1");
    }
}

void TeamBarrier::wait() {
    const auto start = std::chrono::steady_clock::now();
#pragma omp barrier
    if (std::chrono::steady_clock::now() - start > std::chrono::milliseconds(1)) {
        long_waits_.fetch_add(1, std::memory_order_relaxed);
    }
}

static int64_t longest_keys(const int32_t* positions, int64_t rows) {
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; ++r) {
        longest = std::max<int64_t>(longest, std::max<int32_t>(positions[r], 0) + 1);
    }
    return longest;
}

int64_t layer_scratch_floats(const LayerShape& s, int64_t threads, const int32_t* positions) {
    return shared_floats(s) + threads * own_floats(s, longest_keys(positions, s.rows));
}

LayerScratch carve_layer_scratch(const LayerShape& s, int64_t threads, const at::Tensor& scratch,
                                 const int32_t* positions) {
    const int64_t rows = s.rows, inter = s.intermediate;
    const int64_t qkv_width = (s.num_q_heads + 2 * s.num_kv_heads) * s.head_dim;
    const int64_t q_width = s.num_q_heads * s.head_dim;
    float* const base = scratch.mutable_data_ptr<float>();
    LayerScratch out;
    out.qkv = base;
    out.q = out.qkv + rows * qkv_width;
    out.attn = out.q + rows * q_width;
    out.gate_up = out.attn + rows * q_width;
    out.act = out.gate_up + rows * 2 * inter;
    out.own = out.act + rows * inter;
    out.own_floats = own_floats(s, longest_keys(positions, rows));
    TORCH_CHECK(scratch.numel() >= (out.own - base) + threads * out.own_floats,
                "carve_layer_scratch: scratch too small");
    if (!silu_fp32_available()) {  // ATen's silu reads and writes these
        const int64_t gate_at = out.gate_up - base, act_at = out.act - base;
        out.gate_view = scratch.narrow(0, gate_at, rows * 2 * inter)
                            .view({rows, 2 * inter})
                            .narrow(1, 0, inter);
        out.act_view = scratch.narrow(0, act_at, rows * inter).view({rows, inter});
    }
    // each row attends over its keys 0..max(p, 0), as DecodeStep.attend_cached's seq_lens
    out.lens.resize(static_cast<size_t>(rows));
    out.longest = 0;
    for (int64_t r = 0; r < rows; ++r) {
        out.lens[r] = std::max<int32_t>(positions[r], 0) + 1;
        out.longest = std::max<int64_t>(out.longest, out.lens[r]);
    }
    return out;
}

bool same_scratch_layout(const LayerShape& a, const LayerShape& b) {
    return a.rows == b.rows && a.hidden == b.hidden && a.num_q_heads == b.num_q_heads &&
           a.num_kv_heads == b.num_kv_heads && a.head_dim == b.head_dim &&
           a.intermediate == b.intermediate;
}

void decode_layer_fp32(const Team& team, const LayerShape& s, const LayerWeightPtrs& w, float eps,
                       const float* x, const float* residual, const float* cos,
                       int64_t cos_row_stride, const float* sin, int64_t sin_row_stride,
                       float* k_cache, float* v_cache, const CacheRows& cache_rows,
                       const int32_t* positions, float* out_sum, float* out_down,
                       const LayerScratch& scratch) {
    const int64_t rows = s.rows, hidden = s.hidden, hq = s.num_q_heads, hkv = s.num_kv_heads;
    const int64_t d = s.head_dim, inter = s.intermediate;
    const int64_t qkv_width = (hq + 2 * hkv) * d, group = hq / hkv;
    const int64_t stream = rows * hidden;
    if (rows == 0) {
        return;
    }
    const int64_t t = team.id, n = team.size;
    float* sum_in = scratch.sum_in(t);
    float* hp = scratch.h(t, stream);
    float* qkvp = scratch.qkv;
    float* qp = scratch.q;
    float* ap = scratch.attn;
    float* gate_up = scratch.gate_up;
    float* act = scratch.act;

    // s = x + residual (the add of add_rms_norm: one IEEE add per element, as at::add) and
    // h = rms_norm(s), each thread into its own buffers
    const float* sp = x;
    if (residual != nullptr) {
        for (int64_t i = 0; i < stream; ++i) {
            sum_in[i] = x[i] + residual[i];
        }
        sp = sum_in;
    }
    rms_norm_fp32(sp, w.input_norm, hp, rows, hidden, eps);
    const int64_t qkv_parts = gemv_fp32_cpu_parts(hidden, qkv_width, n);
    if (t < qkv_parts) {
        gemv_fp32_cpu_share(hp, w.qkv, qkvp, rows, hidden, qkv_width, 0, qkv_width, t, qkv_parts);
    }
    team.sync();

    // RoPE on q and k, k and v into the cache at each row's position (rope_kv_update), then
    // attention: a thread takes whole KV heads of rows, with their query heads, where there are
    // enough of them for the team (no barrier between the write and the reads), else RoPE and
    // the writes by heads, a barrier, and attention by (row, query head) pairs
    const int64_t slot = hkv * d;  // one key's row of the cache (all its KV heads)
    // the scale as Python computes head_dim ** -0.5, rounded to fp32 as decode_attention does
    const float scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));
    auto rope_q = [&](int64_t r, int64_t head) {
        rope_head_fp32(qkvp + r * qkv_width + head * d, cos + r * cos_row_stride,
                       sin + r * sin_row_stride, qp + (r * hq + head) * d, d);
    };
    auto write_kv = [&](int64_t r, int64_t head) {  // nothing for a finished row
        if (positions[r] < 0) {
            return;
        }
        const float* row = qkvp + r * qkv_width;
        const int64_t at_pos = cache_rows.slot(r, positions[r]) * slot + head * d;
        rope_head_fp32(row + (hq + head) * d, cos + r * cos_row_stride, sin + r * sin_row_stride,
                       k_cache + at_pos, d);
        std::memcpy(v_cache + at_pos, row + (hq + hkv + head) * d,
                    static_cast<size_t>(d) * sizeof(float));
    };
    float* attention_scratch = scratch.attention(t, stream);
    if (rows * hkv >= n) {
        const Share mine = share_of(rows * hkv, t, n);  // units r * Hkv + KV head
        for (int64_t u = mine.begin; u < mine.end; ++u) {
            const int64_t r = u / hkv, g = u % hkv;
            write_kv(r, g);
            for (int64_t head = g * group; head < (g + 1) * group; ++head) {
                rope_q(r, head);
            }
        }
        // pairs r * Hq + query head: the units' query heads, in order
        decode_attention_fp32_cpu_pairs(qp, k_cache, v_cache, cache_rows, scratch.lens.data(), ap,
                                        hq, hkv, d, scratch.longest, scale, mine.begin * group,
                                        mine.end * group, attention_scratch);
    } else {
        const Share heads = share_of(rows * (hq + hkv), t, n);  // r * (Hq + Hkv) + head
        for (int64_t u = heads.begin; u < heads.end; ++u) {
            const int64_t r = u / (hq + hkv), head = u % (hq + hkv);
            if (head < hq) {
                rope_q(r, head);
            } else {
                write_kv(r, head - hq);
            }
        }
        team.sync();
        const Share pairs = share_of(rows * hq, t, n);
        decode_attention_fp32_cpu_pairs(qp, k_cache, v_cache, cache_rows, scratch.lens.data(), ap,
                                        hq, hkv, d, scratch.longest, scale, pairs.begin, pairs.end,
                                        attention_scratch);
    }
    team.sync();

    // s2 = s + attn @ o^T on each thread's share of the outputs (out_down holds the product
    // for a moment), then h = rms_norm(s2) on each thread
    const int64_t o_parts = gemv_fp32_cpu_parts(hq * d, hidden, n);
    if (t < o_parts) {
        gemv_fp32_cpu_share(ap, w.o, out_down, rows, hq * d, hidden, 0, hidden, t, o_parts);
        const Share blocks = share_of((hidden + 3) / 4, t, o_parts);  // the share's outputs
        const int64_t j0 = blocks.begin * 4, j1 = std::min(hidden, blocks.end * 4);
        for (int64_t r = 0; r < rows; ++r) {
            for (int64_t j = j0; j < j1; ++j) {
                out_sum[r * hidden + j] = sp[r * hidden + j] + out_down[r * hidden + j];
            }
        }
    }
    team.sync();
    rms_norm_fp32(out_sum, w.post_norm, hp, rows, hidden, eps);

    // the MLP: gate/up, silu(gate) * up, down. Where F.silu runs a row as one run, a thread
    // takes the same columns of gate and up (split at silu_fp32_split) and its silu(gate) * up:
    // no barrier between them
    const int64_t gate_up_parts = gemv_fp32_cpu_parts(hidden, 2 * inter, n);
    if (silu_fp32_available() && silu_fp32_rows_are_runs(rows, inter, team.aten_threads)) {
        const int64_t pieces = (inter + silu_fp32_split - 1) / silu_fp32_split;
        const int64_t parts = std::min(gate_up_parts, pieces);
        if (t < parts) {
            const Share mine = share_of(pieces, t, parts);
            const int64_t c0 = mine.begin * silu_fp32_split;
            const int64_t c1 = std::min(inter, mine.end * silu_fp32_split);
            gemv_fp32_cpu_share(hp, w.gate_up, gate_up, rows, hidden, 2 * inter, c0, c1, 0, 1);
            gemv_fp32_cpu_share(hp, w.gate_up, gate_up, rows, hidden, 2 * inter, inter + c0,
                                inter + c1, 0, 1);
            for (int64_t r = 0; r < rows; ++r) {
                const float* g = gate_up + r * 2 * inter;
                silu_mul_fp32_run(g + c0, g + inter + c0, act + r * inter + c0, c1 - c0);
            }
        }
    } else {
        if (t < gate_up_parts) {
            gemv_fp32_cpu_share(hp, w.gate_up, gate_up, rows, hidden, 2 * inter, 0, 2 * inter, t,
                                gate_up_parts);
        }
        team.sync();
        if (t == 0) {
            silu_mul_rows(scratch, rows, inter, team.aten_threads);
        }
    }
    team.sync();
    const int64_t down_parts = gemv_fp32_cpu_parts(inter, hidden, n);
    if (t < down_parts) {
        gemv_fp32_cpu_share(act, w.down, out_down, rows, inter, hidden, 0, hidden, t, down_parts);
    }
    team.sync();
}

}  // namespace toyllm
