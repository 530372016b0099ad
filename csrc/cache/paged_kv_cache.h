// PagedKVCache: every layer's keys and values in fixed-size blocks of one pool, a ref-counted
// block allocator, and per-sequence block lists and lengths (host) with device mirrors that the
// paged kernels and CUDA graphs read.
//
// Storage layout (one zero-initialised tensor):
//   [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
// key_pool(layer) / value_pool(layer) are views [num_blocks, block_size, num_kv_heads, head_dim];
// position p of a sequence lives in its block blocks[p / block_size] at offset p % block_size,
// i.e. at flat slot blocks[p / block_size] * block_size + p % block_size of the pool.
//
// Every call checks its arguments and the state it needs before it changes anything: a call
// that throws leaves the cache as it was.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace toyllm {

// Thrown when the pool has no free block (or a sequence would pass max_blocks_per_seq, or no
// sequence slot is free) for what was asked. Bound to Python as PagedCacheFullError (a subclass
// of RuntimeError). The message starts with "paged KV cache full: ".
class PagedCacheFullError : public std::runtime_error {
   public:
    using std::runtime_error::runtime_error;
};

class PagedKVCache {
   public:
    // Validates every argument (ValueError otherwise): positive sizes, block_size a power of
    // two, num_blocks below 2^31 (block ids are int32 on the device), dtype float32, float16 or
    // bfloat16, device cpu or cuda (with a valid index; "cuda" means the current one).
    PagedKVCache(int64_t num_layers, int64_t num_blocks, int64_t block_size, int64_t num_kv_heads,
                 int64_t head_dim, at::ScalarType dtype, at::Device device, int64_t max_seqs,
                 int64_t max_blocks_per_seq);

    // Bytes one block takes over all layers, K and V (same checks as the constructor's), so a
    // caller can size the pool from a memory budget before allocating it.
    static int64_t block_bytes(int64_t num_layers, int64_t block_size, int64_t num_kv_heads,
                               int64_t head_dim, at::ScalarType dtype);

    // --- Memory.
    at::Tensor key_pool(int64_t layer) const;    // [num_blocks, block_size, num_kv_heads, head_dim]
    at::Tensor value_pool(int64_t layer) const;  // [num_blocks, block_size, num_kv_heads, head_dim]
    // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    const at::Tensor& storage() const { return storage_; }
    int64_t num_free_blocks() const { return static_cast<int64_t>(free_blocks_.size()); }
    int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
    int64_t bytes_per_block() const { return bytes_per_block_; }
    int64_t bytes_used() const { return num_used_blocks() * bytes_per_block_; }
    int64_t bytes_free() const { return num_free_blocks() * bytes_per_block_; }
    int64_t bytes_allocated() const;

    // --- Block allocator. A block with reference count 0 is free.
    // A free block with count 1 (PagedCacheFullError when none is free). O(1).
    int64_t allocate_block();
    void incref(int64_t block);  // the block must be allocated (count >= 1)
    int64_t decref(int64_t block);  // the new count; at 0 the block is free again. O(1).
    int64_t ref_count(int64_t block) const;

    // --- Sequences: slots 0 .. max_seqs - 1, each a host block list and a length.
    int64_t add_sequence();  // a free slot, empty (PagedCacheFullError when none is free)
    void free_sequence(int64_t seq);  // decref all its blocks; the slot is free again
    bool is_sequence(int64_t seq) const;  // seq in range and in use
    int64_t num_sequences() const { return max_seqs_ - static_cast<int64_t>(free_seqs_.size()); }
    int64_t sequence_length(int64_t seq) const;
    std::vector<int64_t> sequence_blocks(int64_t seq) const;
    // Room the sequence's blocks give: len(blocks) * block_size (>= its length).
    int64_t sequence_capacity(int64_t seq) const;
    // Adopts a full block of cached tokens (prefix sharing): incref, append, length +=
    // block_size. Needs every block the sequence holds to be full (length == its capacity).
    void append_block(int64_t seq, int64_t block);
    // Room for n more tokens past the length, allocating blocks as needed: all or nothing
    // (PagedCacheFullError before any change when the pool or max_blocks_per_seq is short).
    void reserve(int64_t seq, int64_t n);
    // length += n, within the reserved room (ValueError beyond it).
    void advance(int64_t seq, int64_t n);
    // Drops the tokens past `length` (<= the current length) and decrefs the blocks no longer
    // needed, reserved room included.
    void truncate(int64_t seq, int64_t length);
    // A new slot sharing the blocks that hold seq's tokens (incref each), with seq's length.
    // Reserved room past the length is not shared.
    int64_t fork(int64_t seq);
    // If the block the next token (position = length) lands in is shared (count > 1), copies it
    // to a fresh block for this sequence (all layers, K and V, on the current stream) and decrefs
    // the old one; true when it copied. False when that block is not shared or not reserved yet.
    bool copy_on_write(int64_t seq);
    // Flat pool slots block * block_size + offset of positions start .. start + n - 1, which
    // must lie in the reserved room.
    std::vector<int64_t> slot_mapping(int64_t seq, int64_t start, int64_t n) const;

    // --- Device mirrors (int32, on the cache's device), written only by sync_device(), so
    // their addresses never change and a captured CUDA graph reads the current tables.
    // [max_seqs, max_blocks_per_seq], -1 = no block
    const at::Tensor& block_tables() const { return device_tables_; }
    const at::Tensor& sequence_lengths() const { return device_lengths_; }  // [max_seqs]
    // Copies the rows of the tables that changed since the last sync (and the lengths, when any
    // changed) to the device mirrors, on the current stream, ordered after the kernels already
    // queued there; on CUDA without waiting for them (staged in pinned memory). Call once per
    // step, before the forward (outside any graph capture).
    void sync_device();

    int64_t num_layers() const { return num_layers_; }
    int64_t num_blocks() const { return num_blocks_; }
    int64_t block_size() const { return block_size_; }
    int64_t num_kv_heads() const { return num_kv_heads_; }
    int64_t head_dim() const { return head_dim_; }
    int64_t max_seqs() const { return max_seqs_; }
    int64_t max_blocks_per_seq() const { return max_blocks_per_seq_; }
    at::ScalarType dtype() const { return dtype_; }
    at::Device device() const { return device_; }
    std::string repr() const;

   private:
    static at::Device validated_device(int64_t num_layers, int64_t num_blocks, int64_t block_size,
                                       int64_t num_kv_heads, int64_t head_dim, at::ScalarType dtype,
                                       at::Device device, int64_t max_seqs,
                                       int64_t max_blocks_per_seq);
    void check_layer(int64_t layer, const char* what) const;
    void check_block(int64_t block, const char* what) const;  // in range
    void check_allocated(int64_t block, const char* what) const;  // in range, count >= 1
    void check_sequence(int64_t seq, const char* what) const;  // in range and in use
    void release_block(int64_t block);  // count 1 -> 0, back on the free list
    void set_table_entry(int64_t seq, int64_t index, int32_t block);
    void mark_dirty(int64_t seq);
    // dst (a device mirror's rows) <- src (the host rows), without waiting for the device
    void copy_to_device(at::Tensor dst, const at::Tensor& src) const;
    [[noreturn]] void throw_full(const std::string& what) const;

    int64_t num_layers_;
    int64_t num_blocks_;
    int64_t block_size_;
    int64_t num_kv_heads_;
    int64_t head_dim_;
    at::ScalarType dtype_;
    int64_t max_seqs_;
    int64_t max_blocks_per_seq_;
    at::Device device_;
    int64_t bytes_per_block_;

    at::Tensor storage_;  // [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

    std::vector<int32_t> ref_counts_;   // [num_blocks]
    std::vector<int32_t> free_blocks_;  // a stack of the blocks with count 0

    std::vector<bool> seq_in_use_;                  // [max_seqs]
    std::vector<int64_t> free_seqs_;                // a stack of the free slots
    std::vector<std::vector<int32_t>> seq_blocks_;  // [max_seqs][blocks of the sequence]
    std::vector<int64_t> seq_lengths_;              // [max_seqs] tokens written

    at::Tensor host_tables_;         // CPU int32 [max_seqs, max_blocks_per_seq], -1 = none
    at::Tensor host_lengths_;        // CPU int32 [max_seqs]
    std::vector<bool> table_dirty_;  // [max_seqs]: the row changed since the last sync
    bool lengths_dirty_ = false;
    at::Tensor device_tables_;   // int32 [max_seqs, max_blocks_per_seq] on device_
    at::Tensor device_lengths_;  // int32 [max_seqs] on device_
};

}  // namespace toyllm
