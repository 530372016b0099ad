// KVCache: the per-layer key/value cache of a decoder, one allocation, with host-side position
// tracking per sequence and a device mirror of the positions that the update kernel reads.
//
// Storage layout (one zero-initialised tensor):
//   [num_layers, 2 (K, V), batch_size, max_seq_len, num_kv_heads, head_dim]
// keys(layer) / values(layer) are views [batch_size, max_seq_len, num_kv_heads, head_dim].
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace toyllm {

// Thrown when an advance or an update would move a sequence past max_seq_len.
// Bound to Python as KVCacheOverflowError (a subclass of OverflowError).
// The message starts with "KV cache overflow: ".
class KVCacheOverflowError : public std::overflow_error {
   public:
    using std::overflow_error::overflow_error;
};

class KVCache {
   public:
    // Validates every argument (ValueError otherwise): positive sizes, dtype one of float32,
    // float16, bfloat16, device cpu or cuda (with a valid index; "cuda" means the current one).
    KVCache(int64_t num_layers, int64_t max_seq_len, int64_t num_kv_heads, int64_t head_dim,
            at::ScalarType dtype, at::Device device, int64_t batch_size = 1);

    // Bytes one cache of this shape allocates (same validation as the constructor, except for
    // the device).
    static int64_t bytes_required(int64_t num_layers, int64_t max_seq_len, int64_t num_kv_heads,
                                  int64_t head_dim, at::ScalarType dtype, int64_t batch_size = 1);

    // --- Spec API (batch_size == 1; ValueError otherwise, pointing to the per-sequence calls).
    int64_t position() const;
    bool is_full() const;
    int64_t remaining_capacity() const;
    // Advances every active sequence by n (n >= 1). Everything is checked before anything
    // moves: ValueError for n <= 0, KVCacheOverflowError if a sequence would pass max_seq_len.
    void advance_position(int64_t n = 1);
    // All positions 0, all sequences active, memory zeroed.
    void reset();

    // --- Per-sequence API.
    std::vector<int64_t> positions() const;
    int64_t sequence_position(int64_t seq) const;
    bool sequence_is_full(int64_t seq) const;
    int64_t sequence_remaining_capacity(int64_t seq) const;
    void advance_sequence(int64_t seq, int64_t n = 1);
    // NOTE: an inactive sequence keeps its host position but holds -1 in device_positions(),
    // so batched updates skip it and advance_position() leaves it where it is.
    void set_active(int64_t seq, bool active);
    bool is_active(int64_t seq) const;
    // Position 0, that sequence's rows zeroed in every layer, active again.
    void reset_sequence(int64_t seq);

    // --- Storage.
    at::Tensor keys(int64_t layer) const;    // [batch_size, max_seq_len, num_kv_heads, head_dim]
    at::Tensor values(int64_t layer) const;  // [batch_size, max_seq_len, num_kv_heads, head_dim]
    // Writes new_k/new_v at the current positions of every active sequence, without advancing.
    // Everything (layer, dtype, device, shape, contiguity, room left) is checked before anything
    // is launched.
    void update(int64_t layer,
                const at::Tensor& new_k,   // [batch_size, num_tokens, num_kv_heads, head_dim]
                const at::Tensor& new_v);  // [batch_size, num_tokens, num_kv_heads, head_dim]
    // Writes only sequence `seq` (which must be active) at its current position.
    void update_sequence(int64_t layer,
                         const at::Tensor& new_k,  // [1, num_tokens, num_kv_heads, head_dim]
                         const at::Tensor& new_v,  // [1, num_tokens, num_kv_heads, head_dim]
                         int64_t seq);
    // int32 [batch_size] on the cache's device: the position of each active sequence, -1 for an
    // inactive one. Updated in place by device-side ops (no host sync), so its address never
    // changes and a captured CUDA graph reads the current values.
    const at::Tensor& device_positions() const { return device_positions_; }
    // The whole storage tensor [num_layers, 2, batch_size, max_seq_len, num_kv_heads, head_dim].
    const at::Tensor& storage() const { return storage_; }
    int64_t bytes_allocated() const;

    int64_t num_layers() const { return num_layers_; }
    int64_t max_seq_len() const { return max_seq_len_; }
    int64_t num_kv_heads() const { return num_kv_heads_; }
    int64_t head_dim() const { return head_dim_; }
    int64_t batch_size() const { return batch_size_; }
    at::ScalarType dtype() const { return dtype_; }
    at::Device device() const { return device_; }
    std::string repr() const;

   private:
    // Validates the constructor's arguments; returns the device with its index filled in.
    static at::Device validated_device(int64_t num_layers, int64_t max_seq_len,
                                       int64_t num_kv_heads, int64_t head_dim, at::ScalarType dtype,
                                       int64_t batch_size, at::Device device);
    void check_layer(int64_t layer) const;
    void check_sequence(int64_t seq, const char* what) const;
    void check_single_sequence(const char* what) const;
    void check_new_rows(const char* name, const at::Tensor& t, int64_t expected_batch) const;
    void set_device_position(int64_t seq);

    int64_t num_layers_;
    int64_t max_seq_len_;
    int64_t num_kv_heads_;
    int64_t head_dim_;
    int64_t batch_size_;
    at::ScalarType dtype_;
    at::Device device_;

    at::Tensor storage_;              // [num_layers, 2, batch_size, max_seq_len, heads, head_dim]
    at::Tensor device_positions_;     // [batch_size] int32: position, or -1 when inactive
    at::Tensor device_active_;        // [batch_size] int32: 1 active, 0 inactive
    std::vector<int64_t> positions_;  // host positions, one per sequence
    std::vector<bool> active_;
};

}  // namespace toyllm
