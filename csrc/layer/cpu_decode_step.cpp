// The CPU implementation of `toyllm::cpu_decode_step` (schema: registration.cpp): a whole decode
// step of a Llama model (one new token per row) in one call, fp32:
//
//   x      = embedding[tokens]                                  (the rows of the token ids)
//   cos, sin = RoPE's at each row's position (models/rope.py's rope_cos_sin, finished rows at 0)
//   x, r   = layer(x, r, ...) for every layer                   (decode_layer_fp32.h; r: None
//                                                                 before the first)
//   logits = rms_norm(x + r) * final_norm @ head_weight^T
//
// Why: a small model's CPU decode step through the separate operators is hundreds of calls
// from Python a token, each with its dispatch and allocations; even with one call per layer,
// what was left beyond the products was the step around the layers: the embedding, the seven
// ops of RoPE's cos/sin, the final norm and the head's product, and the Python of the forward
// (docs/PERF.md, "CPU decode"). This runs all of it in C++, in one OpenMP parallel region a
// step: each thread runs every layer and takes its share of each stage, meeting the others at a
// barrier where a stage reads what another wrote (decode_layer_fp32.h), so a token costs one
// fork/join instead of one per product and attention (~31 for stories15M), and the norms, RoPE
// and silu no longer run on one thread while the others wait. The threads are ATen's
// (torch.set_num_threads, OMP_NUM_THREADS).
//
// The same bits as the engine's separate operators: the embedding copies rows; cos/sin are
// the same fp32 products of position and inverse frequency, then ATen's cos and sin on the same
// contiguous [rows, D] values as rope_cos_sin's (once a step, before the region); each layer is
// decode_layer_fp32 (the code of the separate operators); the final add and RMSNorm are
// add_rms_norm's loop and the head is gemv's kernel; how the work is split over the threads
// changes no result's order (tests/test_cpu_decode_step.py compares logits and caches as
// integers, on 1 and 2 threads).
//
// The caches: per layer a contiguous cache [rows, max_seq_len, Hkv, D], row r's key j at [r, j]
// (the static engine's), or with block_tables a paged pool [num_blocks, block_size, Hkv, D], row
// r's key j in block block_tables[r, j / block_size] (the serving engine's, engine/serving.py):
// the same arithmetic either way, on keys found at other addresses (CacheRows).
//
// Every argument is checked, the positions' range, the token ids and the table entries each row
// reaches included, before anything is written into a cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cos_cpu_dispatch.h>
#include <ATen/ops/sin_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <omp.h>
#include <string>
#include <vector>

#include "attention/decode_attention_args.h"
#include "common/op_args.h"
#include "elementwise/cpu_fp32_loops.h"
#include "gemv/cpu_gemv_kernels.h"
#include "layer/cpu_decode_step.h"
#include "layer/decode_layer_fp32.h"

namespace toyllm {
namespace {

constexpr const char* kOp = "cpu_decode_step";
constexpr int64_t kWeightsPerLayer = 6;  // input_norm, qkv, o, post_norm, gate_up, down

// When another process takes a core, a team of threads waits at each of a step's barriers for
// the thread that lost its core, up to a scheduler's time slice each: a token then costs tens of
// milliseconds where one thread would take a few (docs/PERF.md: both toyllm and llama2.c fell
// to 10-100 tok/s beside a busy loop). A step whose barriers waited over a millisecond
// kLongWaitsToGoSolo times or more has the next kSoloSteps steps run on the calling thread
// alone, then the team tries again. The results are the same bits on any number of threads.
constexpr int64_t kLongWaitsToGoSolo = 2;
constexpr int64_t kSoloSteps = 64;
std::atomic<int64_t> solo_steps{0};

// Checks every argument; returns each layer's shape. Nothing has been written when it throws.
std::vector<LayerShape> check_args(const at::Tensor& tokens, const at::Tensor& embedding,
                                   at::TensorList layer_weights, const at::Tensor& final_norm,
                                   const at::Tensor& head_weight, double eps,
                                   const at::Tensor& inv_freq, at::TensorList k_caches,
                                   at::TensorList v_caches, const at::Tensor& positions,
                                   int64_t num_q_heads, const at::Tensor* block_tables) {
    TORCH_CHECK_VALUE(tokens.device().is_cpu(), kOp, ": expected tokens on the CPU, got ",
                      tokens.device());
    TORCH_CHECK_VALUE(tokens.scalar_type() == at::kLong, kOp,
                      ": expected tokens of dtype torch.int64, got ",
                      dtype_name(tokens.scalar_type()));
    TORCH_CHECK_VALUE(tokens.dim() == 2 && tokens.size(1) == 1, kOp,
                      ": expected tokens of shape [rows, 1] (one new token per row), got ",
                      tokens.sizes());
    check_contiguous(kOp, "tokens", tokens);
    const int64_t rows = tokens.size(0);

    check_fp32_cpu(kOp, "embedding", embedding);
    TORCH_CHECK_VALUE(embedding.dim() == 2 && embedding.size(0) >= 1 && embedding.size(1) >= 1,
                      kOp, ": expected embedding of shape [vocab, hidden], got ",
                      embedding.sizes());
    check_contiguous(kOp, "embedding", embedding);
    const int64_t vocab = embedding.size(0);
    const int64_t hidden = embedding.size(1);
    const int64_t* ids = tokens.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
        TORCH_CHECK_VALUE(ids[r] >= 0 && ids[r] < vocab, kOp, ": expected token ids in [0, ",
                          vocab, ") (embedding's rows), got ", ids[r], " at row ", r);
    }

    check_eps(kOp, eps);
    check_positions(kOp, positions, rows, "tokens' rows", tokens.device(), "tokens' device");
    const int64_t num_layers = static_cast<int64_t>(k_caches.size());
    TORCH_CHECK_VALUE(num_layers >= 1, kOp, ": expected one k_cache per layer (>= 1), got none");
    TORCH_CHECK_VALUE(static_cast<int64_t>(v_caches.size()) == num_layers, kOp, ": expected ",
                      num_layers, " v_caches (one per k_cache), got ", v_caches.size());
    TORCH_CHECK_VALUE(static_cast<int64_t>(layer_weights.size()) == kWeightsPerLayer * num_layers,
                      kOp, ": expected ", kWeightsPerLayer * num_layers, " layer_weights (",
                      kWeightsPerLayer,
                      " a layer: input_norm, qkv, o, post_norm, gate_up, down; one layer per "
                      "k_cache), got ",
                      layer_weights.size());
    if (block_tables != nullptr) {  // each row's blocks, read through its row of the table
        const at::Tensor& t = *block_tables;
        TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, ": expected block_tables on the CPU, got ",
                          t.device());
        TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, kOp,
                          ": expected block_tables of dtype torch.int32, got ",
                          dtype_name(t.scalar_type()));
        TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) >= 1, kOp,
                          ": expected block_tables of shape [", rows,
                          ", blocks_per_row >= 1] (tokens' rows), got ", t.sizes());
        TORCH_CHECK_VALUE(t.stride(1) == 1 || t.size(1) == 1, kOp,
                          ": expected block_tables with each row contiguous (stride 1 along "
                          "dim 1), got strides ",
                          t.strides());
    }
    std::vector<LayerShape> shapes;
    shapes.reserve(static_cast<size_t>(num_layers));
    for (int64_t i = 0; i < num_layers; ++i) {
        const std::string op = std::string(kOp) + ", layer " + std::to_string(i);
        const at::Tensor* w = layer_weights.data() + kWeightsPerLayer * i;
        shapes.push_back(check_layer(op.c_str(), rows, hidden, w[0], w[1], w[2], w[3], w[4], w[5],
                                     eps, k_caches[i], v_caches[i], num_q_heads, block_tables));
        // one table addresses every layer's pool: the pools are alike
        TORCH_CHECK_VALUE(block_tables == nullptr || k_caches[i].sizes() == k_caches[0].sizes(),
                          op, ": expected k_cache of layer 0's pool shape ", k_caches[0].sizes(),
                          " (one block table for every layer), got ", k_caches[i].sizes());
        TORCH_CHECK_VALUE(shapes.back().head_dim == shapes.front().head_dim, op,
                          ": expected head_dim ", shapes.front().head_dim,
                          " (layer 0's k_cache.size(3)), got ", shapes.back().head_dim);
        check_positions_fit(op.c_str(), positions, rows, "tokens' rows", tokens.device(),
                            "tokens' device", shapes.back().max_seq_len);
    }

    if (block_tables != nullptr) {  // every block a row reaches, its key 0 for a finished row
        const int32_t* pos = positions.const_data_ptr<int32_t>();
        const int32_t* tables = block_tables->const_data_ptr<int32_t>();
        for (int64_t r = 0; r < rows; ++r) {
            const int32_t p = std::max<int32_t>(pos[r], 0);
            check_table_row(kOp, r, tables + r * block_tables->stride(0), int64_t{p} + 1,
                            k_caches[0].size(1), k_caches[0].size(0),
                            "row " + std::to_string(r) + " up to position " + std::to_string(p));
        }
    }

    check_fp32_cpu(kOp, "final_norm", final_norm);
    TORCH_CHECK_VALUE(final_norm.dim() == 1 && final_norm.size(0) == hidden, kOp,
                      ": expected final_norm of shape [", hidden, "] (embedding's hidden), got ",
                      final_norm.sizes());
    check_contiguous(kOp, "final_norm", final_norm);
    check_weight_dtype(kOp, "head_weight", head_weight);
    TORCH_CHECK_VALUE(head_weight.dim() == 2 && head_weight.size(0) >= 1 &&
                          head_weight.size(1) == hidden,
                      kOp, ": expected head_weight of shape [vocab, ", hidden,
                      "] (embedding's hidden), got ", head_weight.sizes());
    check_contiguous(kOp, "head_weight", head_weight);
    const int64_t d = shapes.front().head_dim;
    check_fp32_cpu(kOp, "inv_freq", inv_freq);
    TORCH_CHECK_VALUE(inv_freq.dim() == 1 && 2 * inv_freq.size(0) == d, kOp,
                      ": expected inv_freq of shape [", d / 2, "] (head_dim / 2), got ",
                      inv_freq.sizes());
    check_contiguous(kOp, "inv_freq", inv_freq);
    return shapes;
}

}  // namespace

at::Tensor cpu_decode_step(const at::Tensor& tokens,       // int64 [rows, 1]
                           const at::Tensor& embedding,    // [vocab, hidden]
                           at::TensorList layer_weights,   // 6 a layer (decode_layer_fp32.h)
                           const at::Tensor& final_norm,   // [hidden]
                           const at::Tensor& head_weight,  // [vocab_out, hidden]
                           double eps,
                           const at::Tensor& inv_freq,   // [D / 2]
                           at::TensorList k_caches,      // per layer, written (cpu_decode_step.h)
                           at::TensorList v_caches,      // per layer, written
                           const at::Tensor& positions,  // int32 [rows]; < 0: a finished row
                           int64_t num_q_heads,
                           const std::optional<at::Tensor>& block_tables) {  // int32 [rows, W]
    const at::Tensor* tables = block_tables.has_value() ? &*block_tables : nullptr;
    const std::vector<LayerShape> shapes =
        check_args(tokens, embedding, layer_weights, final_norm, head_weight, eps, inv_freq,
                   k_caches, v_caches, positions, num_q_heads, tables);
    const int64_t rows = tokens.size(0), hidden = embedding.size(1);
    const int64_t vocab_out = head_weight.size(0), d = shapes.front().head_dim;
    at::Tensor logits = at::empty({rows, 1, vocab_out}, embedding.options());
    if (rows == 0) {
        return logits;
    }
    const float eps_f = static_cast<float>(eps);
    const int32_t* pos = positions.const_data_ptr<int32_t>();

    // RoPE's angles, rope_cos_sin's fp32 products of the clamped position and the inverse
    // frequencies, each half twice; then ATen's cos and sin on them (the same kernel on the
    // same contiguous values as rope_cos_sin's emb.cos(), so the same bits; at::cpu:: calls
    // the CPU kernels without the dispatcher)
    at::Tensor angles = at::empty({rows, d}, embedding.options());
    float* ang = angles.mutable_data_ptr<float>();
    const float* freq = inv_freq.const_data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
        const float p = static_cast<float>(std::max<int32_t>(pos[r], 0));
        for (int64_t i = 0; i < d / 2; ++i) {
            ang[r * d + i] = ang[r * d + d / 2 + i] = p * freq[i];
        }
    }
    const at::Tensor cos = at::cpu::cos(angles);  // [rows, D]
    const at::Tensor sin = at::cpu::sin(angles);

    // the threads: ATen's (torch.set_num_threads, OMP_NUM_THREADS), as its parallel_for takes
    // them; one where the caller already runs in a parallel region
    const int64_t aten_threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    const int64_t threads = solo_steps.load(std::memory_order_relaxed) > 0
                                ? (solo_steps.fetch_sub(1, std::memory_order_relaxed), 1)
                                : std::max<int64_t>(1, aten_threads);

    // one allocation: the embedded tokens, two (stream, residual) pairs the layers alternate
    // between, each thread's final sum and norm, and the largest layer's scratch
    int64_t scratch_floats = 0;
    for (const LayerShape& s : shapes) {
        scratch_floats = std::max(scratch_floats, layer_scratch_floats(s, threads, pos));
    }
    const int64_t stream = rows * hidden;
    const int64_t head_at = 5 * stream, scratch_at = head_at + 2 * threads * stream;
    at::Tensor buffer = at::empty({scratch_at + scratch_floats}, embedding.options());
    float* x = buffer.mutable_data_ptr<float>();
    float* pair[2][2] = {{x + stream, x + 2 * stream}, {x + 3 * stream, x + 4 * stream}};
    const at::Tensor scratch = buffer.narrow(0, scratch_at, scratch_floats);

    const float* table = embedding.const_data_ptr<float>();
    const int64_t* ids = tokens.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(x + r * hidden, table + ids[r] * hidden,
                    static_cast<size_t>(hidden) * sizeof(float));
    }

    // the layers' scratch, carved again only where a layer's widths differ from the last's
    std::vector<LayerScratch> layer_scratch;
    std::vector<int64_t> scratch_of(shapes.size());
    for (size_t i = 0; i < shapes.size(); ++i) {
        if (i == 0 || !same_scratch_layout(shapes[i], shapes[i - 1])) {
            layer_scratch.push_back(carve_layer_scratch(shapes[i], threads, scratch, pos));
        }
        scratch_of[i] = static_cast<int64_t>(layer_scratch.size()) - 1;
    }
    std::vector<LayerWeightPtrs> ptrs;
    std::vector<float*> k_ptrs, v_ptrs;
    for (size_t i = 0; i < shapes.size(); ++i) {
        const at::Tensor* w = layer_weights.data() + kWeightsPerLayer * i;
        ptrs.push_back(LayerWeightPtrs{w[0].const_data_ptr<float>(), gemv_weight(w[1]),
                                       gemv_weight(w[2]), w[3].const_data_ptr<float>(),
                                       gemv_weight(w[4]), gemv_weight(w[5])});
        k_ptrs.push_back(k_caches[i].mutable_data_ptr<float>());
        v_ptrs.push_back(v_caches[i].mutable_data_ptr<float>());
    }
    CacheRows cache_rows;  // where row r's key j sits: its cache row, or its table's block
    cache_rows.max_seq_len = shapes.front().max_seq_len;
    if (tables != nullptr) {
        cache_rows.tables = tables->const_data_ptr<int32_t>();
        cache_rows.table_stride = tables->stride(0);
        cache_rows.block_shift = __builtin_ctzll(static_cast<uint64_t>(k_caches[0].size(1)));
    }
    const float* cos_p = cos.const_data_ptr<float>();
    const float* sin_p = sin.const_data_ptr<float>();
    const float* final_w = final_norm.const_data_ptr<float>();
    const GemvWeight head_w = gemv_weight(head_weight);
    float* out_logits = logits.mutable_data_ptr<float>();

    // The whole step in one parallel region: every thread runs every layer (decode_layer_fp32:
    // its shares and the barriers between them), then the final norm into its own buffer and
    // its share of the head. Nothing in it throws: every argument was checked above.
    TeamBarrier barrier;
#pragma omp parallel num_threads(static_cast<int>(threads)) if (threads > 1)
    {
        const Team team{omp_get_thread_num(), omp_get_num_threads(), aten_threads, &barrier};
        const float* in = x;
        const float* residual = nullptr;  // the first layer has none
        for (size_t i = 0; i < shapes.size(); ++i) {
            float* const* out = pair[i % 2];
            decode_layer_fp32(team, shapes[i], ptrs[i], eps_f, in, residual, cos_p, d, sin_p, d,
                              k_ptrs[i], v_ptrs[i], cache_rows, pos, out[0], out[1],
                              layer_scratch[static_cast<size_t>(scratch_of[i])]);
            in = out[0];
            residual = out[1];
        }
        // the final norm of the stream in + residual (add_rms_norm: one IEEE add per element,
        // then its loop), then the head's product
        float* sum = x + head_at + 2 * team.id * stream;
        float* h = sum + stream;
        for (int64_t i = 0; i < stream; ++i) {
            sum[i] = in[i] + residual[i];
        }
        rms_norm_fp32(sum, final_w, h, rows, hidden, eps_f);
        const int64_t parts = gemv_fp32_cpu_parts(hidden, vocab_out, team.size);
        if (team.id < parts) {
            gemv_fp32_cpu_share(h, head_w, out_logits, rows, hidden, vocab_out, 0, vocab_out,
                                team.id, parts);
        }
    }
    if (barrier.long_waits() >= kLongWaitsToGoSolo) {
        solo_steps.store(kSoloSteps, std::memory_order_relaxed);
    }
    return logits;
}

}  // namespace toyllm

TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("cpu_decode_step", &toyllm::cpu_decode_step); }

#ifdef WITH_CUDA_KERNELS
// CUDA tensors reach the same function, whose checks refuse them with a message that names the
// device, not the dispatcher's missing-kernel error.
TORCH_LIBRARY_IMPL(toyllm, CUDA, m) { m.impl("cpu_decode_step", &toyllm::cpu_decode_step); }
#endif
