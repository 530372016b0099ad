// The checks and math of one CPU decode layer in fp32 (decode_layer_fp32.h).
#include "layer/decode_layer_fp32.h"

#include <ATen/ops/silu_cpu_dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "attention/decode_attention_cpu.h"
#include "common/op_args.h"
#include "elementwise/cpu_fp32_loops.h"
#include "gemv/cpu_gemv_kernels.h"

namespace toyllm {
namespace {

// A weight [out, in] in nn.Linear's layout, contiguous (the layout the GEMV streams fastest).
void check_weight(const char* op, const char* name, const at::Tensor& w, int64_t out, int64_t in,
                  const char* shape_why) {
    check_fp32_cpu(op, name, w);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == out && w.size(1) == in, op, ": expected ",
                      name, " of shape [", out, ", ", in, "] (", shape_why, "), got ", w.sizes());
    TORCH_CHECK_VALUE(w.is_contiguous(), op, ": expected a contiguous ", name,
                      " [out, in] (nn.Linear's layout), got strides ", w.strides(),
                      " for shape ", w.sizes());
}

// silu(gate) * up into scratch.act for scratch.gate_up [rows, 2 * I] (gate, then up): ATen's
// silu on the gate view, as models/layer_math.py's F.silu(gate) * up computes it (the same
// bits: ATen's vectorised exp rounds otherwise than a scalar one would; at::cpu:: calls the
// CPU kernel without the dispatcher), then the products (exact, as at::mul's).
void silu_mul_rows(const LayerScratch& scratch, int64_t rows, int64_t inter) {
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

// The scratch's parts, in order: s, h, qkv, q, attention out, gate_up, silu(gate) * up.
constexpr int kParts = 7;
void scratch_sizes(const LayerShape& s, int64_t (&sizes)[kParts]) {
    const int64_t qkv_width = (s.num_q_heads + 2 * s.num_kv_heads) * s.head_dim;
    const int64_t q_width = s.num_q_heads * s.head_dim;
    const int64_t parts[kParts] = {s.hidden,  s.hidden,         qkv_width,     q_width,
                                   q_width,   2 * s.intermediate, s.intermediate};
    for (int i = 0; i < kParts; ++i) {
        sizes[i] = s.rows * parts[i];
    }
}

}  // namespace

void check_fp32_cpu(const char* op, const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": expected ", name, " on the CPU, got ",
                      t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": expected ", name,
                      " of dtype torch.float32, got ", dtype_name(t.scalar_type()));
}

LayerShape check_layer(const char* op, int64_t rows, int64_t hidden, const at::Tensor& input_norm,
                       const at::Tensor& qkv_weight, const at::Tensor& o_weight,
                       const at::Tensor& post_norm, const at::Tensor& gate_up_weight,
                       const at::Tensor& down_weight, double eps, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, int64_t num_q_heads) {
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
    TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(0) == rows, op,
                      ": expected k_cache of shape [", rows,
                      ", max_seq_len, num_kv_heads, head_dim] (x's rows), got ", k_cache.sizes());
    TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op,
                      ": expected v_cache of k_cache's shape ", k_cache.sizes(), ", got ",
                      v_cache.sizes());
    check_contiguous(op, "k_cache", k_cache);
    check_contiguous(op, "v_cache", v_cache);
    s.max_seq_len = k_cache.size(1);
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
    check_fp32_cpu(op, "down_weight", down_weight);
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

int64_t layer_scratch_floats(const LayerShape& s) {
    int64_t sizes[kParts];
    scratch_sizes(s, sizes);
    int64_t total = 0;
    for (const int64_t n : sizes) {
        total += n;
    }
    return total;
}

LayerScratch carve_layer_scratch(const LayerShape& s, const at::Tensor& scratch,
                                 const int32_t* positions) {
    // s, h, qkv, q, attention out, gate_up, silu(gate) * up
    int64_t sizes[kParts];
    scratch_sizes(s, sizes);
    int64_t offset[kParts + 1] = {0};
    for (int i = 0; i < kParts; ++i) {
        offset[i + 1] = offset[i] + sizes[i];
    }
    float* const base = scratch.mutable_data_ptr<float>();
    LayerScratch out;
    out.sum_in = base + offset[0];
    out.h = base + offset[1];
    out.qkv = base + offset[2];
    out.q = base + offset[3];
    out.attn = base + offset[4];
    out.gate_up = base + offset[5];
    out.act = base + offset[6];
    const int64_t rows = s.rows, inter = s.intermediate;
    out.gate_view = scratch.narrow(0, offset[5], rows * 2 * inter)
                        .view({rows, 2 * inter})
                        .narrow(1, 0, inter);
    out.act_view = scratch.narrow(0, offset[6], rows * inter).view({rows, inter});
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

void decode_layer_fp32(const LayerShape& s, const LayerWeightPtrs& w, float eps, const float* x,
                       const float* residual, const float* cos, int64_t cos_row_stride,
                       const float* sin, int64_t sin_row_stride, float* k_cache, float* v_cache,
                       const int32_t* positions, float* out_sum, float* out_down,
                       const LayerScratch& scratch) {
    const int64_t rows = s.rows, hidden = s.hidden, hq = s.num_q_heads, hkv = s.num_kv_heads;
    const int64_t d = s.head_dim, inter = s.intermediate;
    const int64_t qkv_width = (hq + 2 * hkv) * d;
    if (rows == 0) {
        return;
    }
    float* sum_in = scratch.sum_in;
    float* hp = scratch.h;
    float* qkvp = scratch.qkv;
    float* qp = scratch.q;
    float* ap = scratch.attn;
    float* gate_up = scratch.gate_up;
    float* act = scratch.act;

    // s = x + residual (the add of add_rms_norm: one IEEE add per element, as at::add)
    const float* sp = x;
    if (residual != nullptr) {
        for (int64_t i = 0; i < rows * hidden; ++i) {
            sum_in[i] = x[i] + residual[i];
        }
        sp = sum_in;
    }
    rms_norm_fp32(sp, w.input_norm, hp, rows, hidden, eps);
    gemv_fp32_cpu(hp, w.qkv, qkvp, rows, hidden, qkv_width, true);

    // RoPE on q and k, k and v into the cache at each row's position (rope_kv_update)
    const int64_t slot = hkv * d;  // one position of one cache row
    for (int64_t r = 0; r < rows; ++r) {
        const float* c = cos + r * cos_row_stride;
        const float* sn = sin + r * sin_row_stride;
        const float* row = qkvp + r * qkv_width;
        for (int64_t head = 0; head < hq; ++head) {
            rope_head_fp32(row + head * d, c, sn, qp + (r * hq + head) * d, d);
        }
        if (positions[r] < 0) {
            continue;  // a finished row: nothing written
        }
        const int64_t at_pos = (r * s.max_seq_len + positions[r]) * slot;
        for (int64_t head = 0; head < hkv; ++head) {
            rope_head_fp32(row + (hq + head) * d, c, sn, k_cache + at_pos + head * d, d);
        }
        std::memcpy(v_cache + at_pos, row + (hq + hkv) * d,
                    static_cast<size_t>(slot) * sizeof(float));
    }

    // the scale as Python computes head_dim ** -0.5, rounded to fp32 as decode_attention does
    const float scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));
    decode_attention_fp32_cpu(qp, k_cache, v_cache, scratch.lens.data(), ap, rows, hq, hkv, d,
                              s.max_seq_len, scratch.longest, scale);

    // s2 = s + attn @ o^T (out_down holds the product for a moment), h = rms_norm(s2)
    gemv_fp32_cpu(ap, w.o, out_down, rows, hq * d, hidden, true);
    for (int64_t i = 0; i < rows * hidden; ++i) {
        out_sum[i] = sp[i] + out_down[i];
    }
    rms_norm_fp32(out_sum, w.post_norm, hp, rows, hidden, eps);

    // the MLP: gate/up, silu(gate) * up, down
    gemv_fp32_cpu(hp, w.gate_up, gate_up, rows, hidden, 2 * inter, true);
    silu_mul_rows(scratch, rows, inter);
    gemv_fp32_cpu(act, w.down, out_down, rows, inter, hidden, true);
}

}  // namespace toyllm
