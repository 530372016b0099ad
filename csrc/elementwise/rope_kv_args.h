// The argument checks of toyllm::rope_kv_update (rope_kv_ops.cpp), shared with the q/k/v product
// that does its work in its epilogue (toyllm::gemv_add_rms_norm_rope_kv, cuda_gemv.cpp), which
// checks the rope arguments against the qkv it would produce: QkvShape describes a qkv
// without needing one.
#pragma once

#include <ATen/ATen.h>

#include "common/op_args.h"

namespace toyllm {

// What the checks read of qkv: its shape, strides, dtype and device.
struct QkvShape {
    at::IntArrayRef sizes;
    at::IntArrayRef strides;
    at::ScalarType dtype;
    at::Device device;
};

inline QkvShape qkv_shape_of(const at::Tensor& qkv) {
    return {qkv.sizes(), qkv.strides(), qkv.scalar_type(), qkv.device()};
}

// `t` (named `name`) has qkv's dtype and device.
inline void check_like_qkv(const char* name, const at::Tensor& t, const QkvShape& qkv) {
    check_dtype("rope_kv_update", name, t, qkv.dtype, "qkv's");
    check_device("rope_kv_update", name, t, qkv.device, "qkv's device");
}

// Checks every argument; nothing has been written when this throws. The cache gives rows,
// max_seq_len, num_kv_heads and head_dim; qkv must be [rows, 1, num_q_heads + 2 * num_kv_heads,
// head_dim].
inline void check_rope_kv_update_args(const QkvShape& qkv, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& k_cache,
                                      const at::Tensor& v_cache, const at::Tensor& positions,
                                      int64_t num_q_heads) {
    check_kv_pair("rope_kv_update", "k_cache", k_cache, "v_cache", v_cache,
                  "[rows, max_seq_len, num_kv_heads, head_dim]");
    const int64_t rows = k_cache.size(0);
    const int64_t max_seq_len = k_cache.size(1);
    const int64_t num_kv_heads = k_cache.size(2);
    const int64_t head_dim = k_cache.size(3);
    TORCH_CHECK_VALUE(max_seq_len >= 1,
                      "rope_kv_update: expected max_seq_len (k_cache.size(1)) >= 1, got ",
                      max_seq_len);
    TORCH_CHECK_VALUE(num_kv_heads >= 1,
                      "rope_kv_update: expected num_kv_heads (k_cache.size(2)) >= 1, got ",
                      num_kv_heads);
    TORCH_CHECK_VALUE(head_dim >= 2 && head_dim % 2 == 0,
                      "rope_kv_update: expected an even head_dim >= 2 (k_cache.size(3)), got ",
                      head_dim);
    TORCH_CHECK_VALUE(num_q_heads >= 1, "rope_kv_update: expected num_q_heads >= 1, got ",
                      num_q_heads);
    const int64_t width = num_q_heads + 2 * num_kv_heads;
    TORCH_CHECK_VALUE(qkv.sizes.size() == 4 && qkv.sizes[0] == rows && qkv.sizes[1] == 1 &&
                          qkv.sizes[2] == width && qkv.sizes[3] == head_dim,
                      "rope_kv_update: expected qkv of shape [", rows, ", 1, ", width, ", ",
                      head_dim, "] (the cache's rows, one token, num_q_heads ", num_q_heads,
                      " + 2 * num_kv_heads ", num_kv_heads, " heads of the cache's head_dim), got ",
                      qkv.sizes);
    TORCH_CHECK_VALUE(cos.dim() == 4 && cos.size(0) == rows && cos.size(1) == 1 &&
                          cos.size(2) == 1 && cos.size(3) == head_dim,
                      "rope_kv_update: expected cos of shape [", rows, ", 1, 1, ", head_dim,
                      "] (qkv's rows, token and head_dim), got ", cos.sizes());
    TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), "rope_kv_update: expected sin of cos's shape ",
                      cos.sizes(), ", got ", sin.sizes());

    const char* op = "rope_kv_update";
    check_float_dtype(op, "qkv", qkv.dtype);
    check_like_qkv("cos", cos, qkv);
    check_like_qkv("sin", sin, qkv);
    check_like_qkv("k_cache", k_cache, qkv);
    check_like_qkv("v_cache", v_cache, qkv);

    check_last_dim_contiguous(op, "qkv", qkv.sizes, qkv.strides);
    check_last_dim_contiguous(op, "cos", cos);
    check_last_dim_contiguous(op, "sin", sin);
    check_contiguous(op, "k_cache", k_cache);
    check_contiguous(op, "v_cache", v_cache);

    check_positions(op, positions, rows, "the cache's rows", qkv.device, "qkv's device");
}

}  // namespace toyllm
