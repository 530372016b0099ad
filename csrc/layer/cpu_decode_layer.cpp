// The CPU implementation of `toyllm::cpu_decode_layer` (schema: registration.cpp): one whole
// Llama decoder layer of a decode step (one new token per row) in one call, fp32:
//
//   s   = x + residual                  (x alone for the first layer: residual None)
//   h   = rms_norm(s) * input_norm
//   q, k, v = h @ qkv_weight^T          (one product for the three)
//   q, k = RoPE(q, k) at each row's position; k, v written to k_cache / v_cache[r, positions[r]]
//   a   = softmax(q . K[r, :p_r + 1] / sqrt(D)) @ V[r, :p_r + 1]     (GQA: a group shares K/V)
//   s2  = s + a @ o_weight^T
//   g, u = rms_norm(s2) * post_norm @ gate_up_weight^T
//   out = (silu(g) * u) @ down_weight^T
//   returns (s2, out): the residual stream after the layer is s2 + out, which the next layer
//   (or the final norm) adds, as the engine's unfused layer leaves it.
//
// Why: a CPU decode step of a small model took ~400 calls from Python a token (each op a few
// us of dispatch, allocation and thread wake-up); a layer's work is 4 products that read ~1-4
// MB of weights each and a little elementwise math. One call per layer leaves the products as
// the cost (docs/PERF.md, "CPU decode").
//
// Same numerics as the ops it replaces, bit for bit: each step runs the very code of the
// operator the unfused layer calls (add_rms_norm's add and RMSNorm loop, gemv's kernels,
// rope_kv_update's RoPE and copy, decode_attention's fp32 loop, ATen's silu), on the same
// values in the same order (tests/test_cpu_decode_layer.py compares them as integers).
//
// Rows at a negative position (finished) write nothing into the caches; like the unfused step,
// they attend over key 0 and their outputs are to be ignored. A position past the cache's end
// is refused before anything is written.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "attention/decode_attention_cpu.h"
#include "common/op_args.h"
#include "elementwise/cpu_fp32_loops.h"
#include "gemv/cpu_gemv_kernels.h"

namespace toyllm {
namespace {

constexpr const char* kOp = "cpu_decode_layer";

// t is an fp32 CPU tensor (named `name` in the messages).
void check_fp32_cpu(const char* name, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, ": expected ", name, " on the CPU, got ",
                      t.device());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, kOp, ": expected ", name,
                      " of dtype torch.float32, got ", dtype_name(t.scalar_type()));
}

// A weight [out, in] in nn.Linear's layout, contiguous (the layout the GEMV streams fastest).
void check_weight(const char* name, const at::Tensor& w, int64_t out, int64_t in,
                  const char* shape_why) {
    check_fp32_cpu(name, w);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == out && w.size(1) == in, kOp, ": expected ",
                      name, " of shape [", out, ", ", in, "] (", shape_why, "), got ", w.sizes());
    TORCH_CHECK_VALUE(w.is_contiguous(), kOp, ": expected a contiguous ", name,
                      " [out, in] (nn.Linear's layout), got strides ", w.strides(),
                      " for shape ", w.sizes());
}

// The shapes the layer reads off its arguments.
struct LayerShape {
    int64_t rows;          // x.size(0)
    int64_t hidden;        // x.size(2)
    int64_t num_q_heads;   // Hq
    int64_t num_kv_heads;  // Hkv, k_cache.size(2)
    int64_t head_dim;      // D, k_cache.size(3)
    int64_t max_seq_len;   // k_cache.size(1)
    int64_t intermediate;  // down_weight.size(1)
};

// Checks every argument; nothing has been written when this throws.
LayerShape check_args(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      const at::Tensor& input_norm, const at::Tensor& qkv_weight,
                      const at::Tensor& o_weight, const at::Tensor& post_norm,
                      const at::Tensor& gate_up_weight, const at::Tensor& down_weight,
                      double eps, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& positions, int64_t num_q_heads) {
    check_fp32_cpu("x", x);
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(1) == 1 && x.size(2) >= 1, kOp,
                      ": expected x of shape [rows, 1, hidden] (one new token per row, hidden >= "
                      "1), got ",
                      x.sizes());
    check_contiguous(kOp, "x", x);
    LayerShape s{};
    s.rows = x.size(0);
    s.hidden = x.size(2);
    if (residual.has_value()) {
        check_fp32_cpu("residual", *residual);
        TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), kOp, ": expected residual of x's shape ",
                          x.sizes(), ", got ", residual->sizes());
        check_contiguous(kOp, "residual", *residual);
    }
    for (const auto& [name, norm] : {std::pair<const char*, const at::Tensor&>{"input_norm",
                                                                               input_norm},
                                     {"post_norm", post_norm}}) {
        check_fp32_cpu(name, norm);
        TORCH_CHECK_VALUE(norm.dim() == 1 && norm.size(0) == s.hidden, kOp, ": expected ", name,
                          " of shape [", s.hidden, "] (x's hidden size), got ", norm.sizes());
        check_contiguous(kOp, name, norm);
    }
    check_eps(kOp, eps);

    // the cache gives the heads' layout
    check_fp32_cpu("k_cache", k_cache);
    check_fp32_cpu("v_cache", v_cache);
    TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.size(0) == s.rows, kOp,
                      ": expected k_cache of shape [", s.rows,
                      ", max_seq_len, num_kv_heads, head_dim] (x's rows), got ", k_cache.sizes());
    TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), kOp,
                      ": expected v_cache of k_cache's shape ", k_cache.sizes(), ", got ",
                      v_cache.sizes());
    check_contiguous(kOp, "k_cache", k_cache);
    check_contiguous(kOp, "v_cache", v_cache);
    s.max_seq_len = k_cache.size(1);
    s.num_kv_heads = k_cache.size(2);
    s.head_dim = k_cache.size(3);
    TORCH_CHECK_VALUE(s.max_seq_len >= 1, kOp,
                      ": expected max_seq_len (k_cache.size(1)) >= 1, got ", s.max_seq_len);
    TORCH_CHECK_VALUE(s.num_kv_heads >= 1, kOp,
                      ": expected num_kv_heads (k_cache.size(2)) >= 1, got ", s.num_kv_heads);
    TORCH_CHECK_VALUE(s.head_dim >= 2 && s.head_dim % 2 == 0, kOp,
                      ": expected an even head_dim >= 2 (k_cache.size(3)), got ", s.head_dim);
    TORCH_CHECK_VALUE(num_q_heads >= 1 && num_q_heads % s.num_kv_heads == 0, kOp,
                      ": expected num_q_heads to be a positive multiple of num_kv_heads ",
                      s.num_kv_heads, " (k_cache.size(2)), got ", num_q_heads);
    s.num_q_heads = num_q_heads;

    const int64_t qkv_rows = (num_q_heads + 2 * s.num_kv_heads) * s.head_dim;
    check_weight("qkv_weight", qkv_weight, qkv_rows, s.hidden,
                 "(num_q_heads + 2 * num_kv_heads) * head_dim, hidden");
    check_weight("o_weight", o_weight, s.hidden, num_q_heads * s.head_dim,
                 "hidden, num_q_heads * head_dim");
    check_fp32_cpu("down_weight", down_weight);
    TORCH_CHECK_VALUE(down_weight.dim() == 2 && down_weight.size(0) == s.hidden &&
                          down_weight.size(1) >= 1,
                      kOp, ": expected down_weight of shape [", s.hidden,
                      ", intermediate] (hidden, intermediate >= 1), got ", down_weight.sizes());
    s.intermediate = down_weight.size(1);
    check_weight("down_weight", down_weight, s.hidden, s.intermediate, "hidden, intermediate");
    check_weight("gate_up_weight", gate_up_weight, 2 * s.intermediate, s.hidden,
                 "2 * intermediate (gate, then up), hidden");

    for (const auto& [name, t] :
         {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
        check_fp32_cpu(name, t);
        TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == s.rows && t.size(1) == 1 &&
                              t.size(2) == 1 && t.size(3) == s.head_dim,
                          kOp, ": expected ", name, " of shape [", s.rows, ", 1, 1, ", s.head_dim,
                          "] (x's rows, the cache's head_dim), got ", t.sizes());
        check_last_dim_contiguous(kOp, name, t);
    }
    check_positions(kOp, positions, s.rows, "x's rows", x.device(), "x's device");
    // On the CPU the positions can be read for free, so their range is checked, as
    // rope_kv_update does, before anything is written.
    const int32_t* pos = positions.const_data_ptr<int32_t>();
    for (int64_t r = 0; r < s.rows; ++r) {
        TORCH_CHECK_VALUE(pos[r] < s.max_seq_len, kOp, ": expected positions[", r,
                          "] + 1 <= max_seq_len ", s.max_seq_len,
                          " (or a negative position for a finished row), got ", pos[r], " + 1");
    }
    return s;
}

// silu(gate) * up for gate_up [rows, 2 * I] (gate, then up) at `offset` floats into scratch,
// written to the [rows, I] that follow it: ATen's silu on the gate view, as
// models/layer_math.py's F.silu(gate) * up computes it (the same bits: ATen's vectorised exp
// rounds otherwise than a scalar one would), then the products (exact, as at::mul's).
void silu_mul_rows(const at::Tensor& scratch, int64_t offset, int64_t rows, int64_t inter) {
    const at::Tensor gate_up = scratch.narrow(0, offset, rows * 2 * inter).view({rows, 2 * inter});
    at::Tensor act = scratch.narrow(0, offset + rows * 2 * inter, rows * inter).view({rows, inter});
    at::silu_out(act, gate_up.narrow(1, 0, inter));
    const float* up = gate_up.const_data_ptr<float>() + inter;
    float* ap = act.mutable_data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < inter; ++i) {
            ap[r * inter + i] *= up[r * 2 * inter + i];
        }
    }
}

std::tuple<at::Tensor, at::Tensor> cpu_decode_layer(
    const at::Tensor& x,                       // [rows, 1, hidden]
    const std::optional<at::Tensor>& residual,  // [rows, 1, hidden], or None
    const at::Tensor& input_norm,              // [hidden]
    const at::Tensor& qkv_weight,              // [(Hq + 2 Hkv) D, hidden]
    const at::Tensor& o_weight,                // [hidden, Hq D]
    const at::Tensor& post_norm,               // [hidden]
    const at::Tensor& gate_up_weight,          // [2 I, hidden]
    const at::Tensor& down_weight,             // [hidden, I]
    double eps,
    const at::Tensor& cos,        // [rows, 1, 1, D]
    const at::Tensor& sin,        // [rows, 1, 1, D]
    at::Tensor& k_cache,          // [rows, max_seq_len, Hkv, D], written in place
    at::Tensor& v_cache,          // [rows, max_seq_len, Hkv, D], written in place
    const at::Tensor& positions,  // int32 [rows]; < 0: a finished row
    int64_t num_q_heads) {
    const LayerShape s =
        check_args(x, residual, input_norm, qkv_weight, o_weight, post_norm, gate_up_weight,
                   down_weight, eps, cos, sin, k_cache, v_cache, positions, num_q_heads);
    const int64_t rows = s.rows, hidden = s.hidden, hq = s.num_q_heads, hkv = s.num_kv_heads;
    const int64_t d = s.head_dim, inter = s.intermediate;
    const int64_t qkv_width = (hq + 2 * hkv) * d;
    const float eps_f = static_cast<float>(eps);

    at::Tensor out_sum = at::empty_like(x);   // s2
    at::Tensor out_down = at::empty_like(x);  // the MLP's output
    if (rows == 0) {
        return {out_sum, out_down};
    }
    // one scratch allocation, carved: s, h, qkv, q, attention out, gate_up, silu(gate) * up
    const int64_t sizes[] = {rows * hidden, rows * hidden, rows * qkv_width, rows * hq * d,
                             rows * hq * d, rows * 2 * inter, rows * inter};
    int64_t total = 0;
    for (const int64_t n : sizes) {
        total += n;
    }
    at::Tensor scratch = at::empty({total}, x.options());
    float* next = scratch.mutable_data_ptr<float>();
    auto take = [&next](int64_t n) {
        float* p = next;
        next += n;
        return p;
    };
    float* sum_in = take(sizes[0]);
    float* hp = take(sizes[1]);
    float* qkvp = take(sizes[2]);
    float* qp = take(sizes[3]);
    float* ap = take(sizes[4]);
    const int64_t gate_up_offset = next - scratch.const_data_ptr<float>();
    float* gate_up = take(sizes[5]);
    float* act = take(sizes[6]);

    // s = x + residual (the add of add_rms_norm: one IEEE add per element, as at::add)
    const float* sp = x.const_data_ptr<float>();
    if (residual.has_value()) {
        const float* rp = residual->const_data_ptr<float>();
        for (int64_t i = 0; i < rows * hidden; ++i) {
            sum_in[i] = sp[i] + rp[i];
        }
        sp = sum_in;
    }
    rms_norm_fp32(sp, input_norm.const_data_ptr<float>(), hp, rows, hidden, eps_f);
    gemv_fp32_cpu(hp, qkv_weight.const_data_ptr<float>(), qkvp, rows, hidden, qkv_width, true);

    // RoPE on q and k, k and v into the cache at each row's position (rope_kv_update)
    const int32_t* pos = positions.const_data_ptr<int32_t>();
    float* kc = k_cache.mutable_data_ptr<float>();
    float* vc = v_cache.mutable_data_ptr<float>();
    const int64_t slot = hkv * d;  // one position of one cache row
    for (int64_t r = 0; r < rows; ++r) {
        const float* c = cos.const_data_ptr<float>() + r * cos.stride(0);
        const float* sn = sin.const_data_ptr<float>() + r * sin.stride(0);
        const float* row = qkvp + r * qkv_width;
        for (int64_t head = 0; head < hq; ++head) {
            rope_head_fp32(row + head * d, c, sn, qp + (r * hq + head) * d, d);
        }
        if (pos[r] < 0) {
            continue;  // a finished row: nothing written
        }
        const int64_t at_pos = (r * s.max_seq_len + pos[r]) * slot;
        for (int64_t head = 0; head < hkv; ++head) {
            rope_head_fp32(row + (hq + head) * d, c, sn, kc + at_pos + head * d, d);
        }
        std::memcpy(vc + at_pos, row + (hq + hkv) * d, static_cast<size_t>(slot) * sizeof(float));
    }

    // each row attends over its keys 0..max(p, 0), as DecodeStep.attend_cached's seq_lens
    std::vector<int32_t> lens(static_cast<size_t>(rows));
    int64_t longest = 0;
    for (int64_t r = 0; r < rows; ++r) {
        lens[r] = std::max<int32_t>(pos[r], 0) + 1;
        longest = std::max<int64_t>(longest, lens[r]);
    }
    // the scale as Python computes head_dim ** -0.5, rounded to fp32 as decode_attention does
    const float scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));
    decode_attention_fp32_cpu(qp, kc, vc, lens.data(), ap, rows, hq, hkv, d, s.max_seq_len,
                              longest, scale);

    // s2 = s + attn @ o^T (out_down holds the product for a moment), h = rms_norm(s2)
    float* s2 = out_sum.mutable_data_ptr<float>();
    float* down = out_down.mutable_data_ptr<float>();
    gemv_fp32_cpu(ap, o_weight.const_data_ptr<float>(), down, rows, hq * d, hidden, true);
    for (int64_t i = 0; i < rows * hidden; ++i) {
        s2[i] = sp[i] + down[i];
    }
    rms_norm_fp32(s2, post_norm.const_data_ptr<float>(), hp, rows, hidden, eps_f);

    // the MLP: gate/up, silu(gate) * up, down
    gemv_fp32_cpu(hp, gate_up_weight.const_data_ptr<float>(), gate_up, rows, hidden, 2 * inter,
                  true);
    silu_mul_rows(scratch, gate_up_offset, rows, inter);
    gemv_fp32_cpu(act, down_weight.const_data_ptr<float>(), down, rows, inter, hidden, true);
    return {out_sum, out_down};
}

}  // namespace
}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("cpu_decode_layer", &toyllm::cpu_decode_layer); }

#ifdef WITH_CUDA_KERNELS
// CUDA tensors reach the same function, whose first check refuses them with a message that
// names the device ("cpu_decode_layer: expected x on the CPU, got cuda:0"), not the
// dispatcher's missing-kernel error.
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("cpu_decode_layer", &toyllm::cpu_decode_layer); }
#endif
