// PagedKVCache host class: validation, one allocation, the block allocator, the sequences'
// block lists and lengths, and their device mirrors.
#include "cache/paged_kv_cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <sstream>

#include "cache/cache_checks.h"
#include "common/dtype_names.h"

namespace toyllm {
namespace {

constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();
constexpr CacheChecks kChecks{"PagedKVCache"};

}  // namespace

int64_t PagedKVCache::block_bytes(int64_t num_layers, int64_t block_size, int64_t num_kv_heads,
                                  int64_t head_dim, at::ScalarType dtype) {
    kChecks.check_positive("num_layers", num_layers);
    kChecks.check_positive("block_size", block_size);
    TORCH_CHECK_VALUE((block_size & (block_size - 1)) == 0,
                      "PagedKVCache: expected block_size a power of two (1, 2, 4, ..., 16, 32, "
                      "...), got ",
                      block_size);
    kChecks.check_positive("num_kv_heads", num_kv_heads);
    kChecks.check_positive("head_dim", head_dim);
    kChecks.check_dtype(dtype);
    // num_layers * 2 (K and V) * block_size * heads * head_dim * element size
    return kChecks.checked_product({num_layers, 2, block_size, num_kv_heads, head_dim,
                                    static_cast<int64_t>(c10::elementSize(dtype))});
}

at::Device PagedKVCache::validated_device(int64_t num_layers, int64_t num_blocks,
                                          int64_t block_size, int64_t num_kv_heads,
                                          int64_t head_dim, at::ScalarType dtype,
                                          at::Device device, int64_t max_seqs,
                                          int64_t max_blocks_per_seq) {
    const int64_t per_block = block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype);
    kChecks.check_positive("num_blocks", num_blocks);
    TORCH_CHECK_VALUE(num_blocks <= kMaxInt32, "PagedKVCache: expected num_blocks <= ", kMaxInt32,
                      " (block ids are int32), got ", num_blocks);
    kChecks.checked_product({per_block, num_blocks});
    kChecks.check_positive("max_seqs", max_seqs);
    kChecks.check_positive("max_blocks_per_seq", max_blocks_per_seq);
    TORCH_CHECK_VALUE(
        max_blocks_per_seq <= kMaxInt32 / block_size,
        "PagedKVCache: expected max_blocks_per_seq * block_size <= ", kMaxInt32,
        " (sequence lengths are int32 on the device), got ", max_blocks_per_seq, " * ", block_size);
    kChecks.checked_product({max_seqs, max_blocks_per_seq});
    return kChecks.normalize_device(device);
}

PagedKVCache::PagedKVCache(int64_t num_layers, int64_t num_blocks, int64_t block_size,
                           int64_t num_kv_heads, int64_t head_dim, at::ScalarType dtype,
                           at::Device device, int64_t max_seqs, int64_t max_blocks_per_seq)
    : num_layers_(num_layers),
      num_blocks_(num_blocks),
      block_size_(block_size),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      dtype_(dtype),
      max_seqs_(max_seqs),
      max_blocks_per_seq_(max_blocks_per_seq),
      device_(validated_device(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                               device, max_seqs, max_blocks_per_seq)),
      bytes_per_block_(block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)),
      ref_counts_(static_cast<size_t>(num_blocks), 0),
      seq_in_use_(static_cast<size_t>(max_seqs), false),
      seq_blocks_(static_cast<size_t>(max_seqs)),
      seq_lengths_(static_cast<size_t>(max_seqs), 0),
      table_dirty_(static_cast<size_t>(max_seqs), false) {
    storage_ = at::zeros({num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim},
                         at::TensorOptions().dtype(dtype).device(device_));
    // Stacks popped from the back: block 0 and slot 0 come out first.
    free_blocks_.reserve(static_cast<size_t>(num_blocks));
    for (int64_t i = num_blocks - 1; i >= 0; --i) {
        free_blocks_.push_back(static_cast<int32_t>(i));
    }
    free_seqs_.reserve(static_cast<size_t>(max_seqs));
    for (int64_t i = max_seqs - 1; i >= 0; --i) {
        free_seqs_.push_back(i);
    }
    const auto host_int = at::TensorOptions().dtype(at::kInt);
    host_tables_ = at::full({max_seqs, max_blocks_per_seq}, -1, host_int);
    host_lengths_ = at::zeros({max_seqs}, host_int);
    device_tables_ = at::full({max_seqs, max_blocks_per_seq}, -1, host_int.device(device_));
    device_lengths_ = at::zeros({max_seqs}, host_int.device(device_));
}

// ---------------------------------------------------------------------------------------------
// Checks

void PagedKVCache::check_layer(int64_t layer, const char* what) const {
    TORCH_CHECK_VALUE(layer >= 0 && layer < num_layers_, "PagedKVCache.", what,
                      ": expected a layer index in [0, ", num_layers_, "), got ", layer);
}

void PagedKVCache::check_block(int64_t block, const char* what) const {
    TORCH_CHECK_VALUE(block >= 0 && block < num_blocks_, "PagedKVCache.", what,
                      ": expected a block id in [0, num_blocks ", num_blocks_, "), got ", block);
}

void PagedKVCache::check_allocated(int64_t block, const char* what) const {
    check_block(block, what);
    TORCH_CHECK_VALUE(ref_counts_[block] >= 1, "PagedKVCache.", what,
                      ": expected an allocated block (reference count >= 1), got free block ",
                      block);
}

void PagedKVCache::check_sequence(int64_t seq, const char* what) const {
    TORCH_CHECK_VALUE(seq >= 0 && seq < max_seqs_, "PagedKVCache.", what,
                      ": expected a sequence slot in [0, max_seqs ", max_seqs_, "), got ", seq);
    TORCH_CHECK_VALUE(seq_in_use_[seq], "PagedKVCache.", what,
                      ": expected a sequence in use (from add_sequence or fork), got free slot ",
                      seq);
}

void PagedKVCache::throw_full(const std::string& what) const {
    std::ostringstream msg;
    msg << "paged KV cache full: " << what << " (" << num_free_blocks() << " of " << num_blocks_
        << " blocks free, block_size " << block_size_ << ")";
    throw PagedCacheFullError(msg.str());
}

// ---------------------------------------------------------------------------------------------
// Memory

at::Tensor PagedKVCache::key_pool(int64_t layer) const {
    check_layer(layer, "key_pool");
    return storage_.select(0, layer).select(0, 0);
}

at::Tensor PagedKVCache::value_pool(int64_t layer) const {
    check_layer(layer, "value_pool");
    return storage_.select(0, layer).select(0, 1);
}

int64_t PagedKVCache::bytes_allocated() const { return static_cast<int64_t>(storage_.nbytes()); }

// ---------------------------------------------------------------------------------------------
// Block allocator

int64_t PagedKVCache::allocate_block() {
    if (free_blocks_.empty()) {
        throw_full("cannot allocate a block");
    }
    const int32_t block = free_blocks_.back();
    free_blocks_.pop_back();
    ref_counts_[block] = 1;
    return block;
}

void PagedKVCache::incref(int64_t block) {
    check_allocated(block, "incref");
    TORCH_CHECK_VALUE(ref_counts_[block] < kMaxInt32, "PagedKVCache.incref: expected a reference ",
                      "count below ", kMaxInt32, ", got block ", block, " at ", ref_counts_[block]);
    ++ref_counts_[block];
}

void PagedKVCache::release_block(int64_t block) {
    ref_counts_[block] = 0;
    free_blocks_.push_back(static_cast<int32_t>(block));
}

int64_t PagedKVCache::decref(int64_t block) {
    check_allocated(block, "decref");
    if (ref_counts_[block] == 1) {
        release_block(block);
        return 0;
    }
    return --ref_counts_[block];
}

int64_t PagedKVCache::ref_count(int64_t block) const {
    check_block(block, "ref_count");
    return ref_counts_[block];
}

// ---------------------------------------------------------------------------------------------
// Sequences

void PagedKVCache::mark_dirty(int64_t seq) {
    table_dirty_[seq] = true;
    lengths_dirty_ = true;
}

void PagedKVCache::set_table_entry(int64_t seq, int64_t index, int32_t block) {
    host_tables_.data_ptr<int32_t>()[seq * max_blocks_per_seq_ + index] = block;
    table_dirty_[seq] = true;
}

int64_t PagedKVCache::add_sequence() {
    if (free_seqs_.empty()) {
        std::ostringstream msg;
        msg << "paged KV cache full: cannot add a sequence, all max_seqs " << max_seqs_
            << " slots are in use";
        throw PagedCacheFullError(msg.str());
    }
    const int64_t seq = free_seqs_.back();
    free_seqs_.pop_back();
    seq_in_use_[seq] = true;
    seq_blocks_[seq].clear();
    seq_lengths_[seq] = 0;
    host_lengths_.data_ptr<int32_t>()[seq] = 0;
    mark_dirty(seq);
    return seq;
}

void PagedKVCache::free_sequence(int64_t seq) {
    check_sequence(seq, "free_sequence");
    truncate(seq, 0);  // decrefs every block, clears the table row
    seq_in_use_[seq] = false;
    free_seqs_.push_back(seq);
}

bool PagedKVCache::is_sequence(int64_t seq) const {
    return seq >= 0 && seq < max_seqs_ && seq_in_use_[seq];
}

int64_t PagedKVCache::sequence_length(int64_t seq) const {
    check_sequence(seq, "sequence_length");
    return seq_lengths_[seq];
}

std::vector<int64_t> PagedKVCache::sequence_blocks(int64_t seq) const {
    check_sequence(seq, "sequence_blocks");
    return std::vector<int64_t>(seq_blocks_[seq].begin(), seq_blocks_[seq].end());
}

int64_t PagedKVCache::sequence_capacity(int64_t seq) const {
    check_sequence(seq, "sequence_capacity");
    return static_cast<int64_t>(seq_blocks_[seq].size()) * block_size_;
}

void PagedKVCache::append_block(int64_t seq, int64_t block) {
    check_sequence(seq, "append_block");
    check_allocated(block, "append_block");
    std::vector<int32_t>& blocks = seq_blocks_[seq];
    const int64_t capacity = static_cast<int64_t>(blocks.size()) * block_size_;
    TORCH_CHECK_VALUE(seq_lengths_[seq] == capacity,
                      "PagedKVCache.append_block: expected sequence ", seq,
                      " with every block full (length == ", capacity, ", its ", blocks.size(),
                      " blocks * block_size ", block_size_, "), got length ", seq_lengths_[seq],
                      " (an adopted block holds block_size tokens and goes after them)");
    if (static_cast<int64_t>(blocks.size()) >= max_blocks_per_seq_) {
        std::ostringstream msg;
        msg << "cannot append block " << block << " to sequence " << seq << ": it holds "
            << blocks.size() << " blocks, max_blocks_per_seq is " << max_blocks_per_seq_;
        throw_full(msg.str());
    }
    incref(block);
    set_table_entry(seq, static_cast<int64_t>(blocks.size()), static_cast<int32_t>(block));
    blocks.push_back(static_cast<int32_t>(block));
    seq_lengths_[seq] += block_size_;
    host_lengths_.data_ptr<int32_t>()[seq] = static_cast<int32_t>(seq_lengths_[seq]);
    mark_dirty(seq);
}

void PagedKVCache::reserve(int64_t seq, int64_t n) {
    check_sequence(seq, "reserve");
    TORCH_CHECK_VALUE(n >= 0, "PagedKVCache.reserve: expected n >= 0, got ", n);
    std::vector<int32_t>& blocks = seq_blocks_[seq];
    const int64_t length = seq_lengths_[seq];
    const int64_t have = static_cast<int64_t>(blocks.size());
    const int64_t longest = max_blocks_per_seq_ * block_size_;
    if (n > longest - length) {
        std::ostringstream msg;
        msg << "cannot reserve n=" << n << " tokens for sequence " << seq << " at length "
            << length << ": max_blocks_per_seq " << max_blocks_per_seq_ << " * block_size "
            << block_size_ << " = " << longest << " tokens at most";
        throw_full(msg.str());
    }
    const int64_t need = (length + n + block_size_ - 1) / block_size_;  // blocks for length + n
    if (need <= have) {
        return;
    }
    if (need - have > num_free_blocks()) {
        std::ostringstream msg;
        msg << "cannot reserve n=" << n << " tokens for sequence " << seq << " at length "
            << length << ": it needs " << need - have << " more blocks";
        throw_full(msg.str());
    }
    for (int64_t i = have; i < need; ++i) {
        const auto block = static_cast<int32_t>(allocate_block());
        set_table_entry(seq, i, block);
        blocks.push_back(block);
    }
}

void PagedKVCache::advance(int64_t seq, int64_t n) {
    check_sequence(seq, "advance");
    TORCH_CHECK_VALUE(n >= 0, "PagedKVCache.advance: expected n >= 0, got ", n);
    const int64_t capacity = static_cast<int64_t>(seq_blocks_[seq].size()) * block_size_;
    const int64_t length = seq_lengths_[seq];
    TORCH_CHECK_VALUE(n <= capacity - length, "PagedKVCache.advance: expected n <= ",
                      capacity - length, " (the room reserved for sequence ", seq, ": capacity ",
                      capacity, " - length ", length, "; call reserve first), got ", n);
    if (n == 0) {
        return;
    }
    seq_lengths_[seq] = length + n;
    host_lengths_.data_ptr<int32_t>()[seq] = static_cast<int32_t>(length + n);
    lengths_dirty_ = true;
}

void PagedKVCache::truncate(int64_t seq, int64_t length) {
    check_sequence(seq, "truncate");
    TORCH_CHECK_VALUE(length >= 0 && length <= seq_lengths_[seq],
                      "PagedKVCache.truncate: expected a length in [0, ", seq_lengths_[seq],
                      "] (sequence ", seq, "'s length), got ", length);
    std::vector<int32_t>& blocks = seq_blocks_[seq];
    const int64_t keep = (length + block_size_ - 1) / block_size_;
    for (int64_t i = static_cast<int64_t>(blocks.size()) - 1; i >= keep; --i) {
        decref(blocks[i]);
        set_table_entry(seq, i, -1);
    }
    blocks.resize(static_cast<size_t>(keep));
    seq_lengths_[seq] = length;
    host_lengths_.data_ptr<int32_t>()[seq] = static_cast<int32_t>(length);
    mark_dirty(seq);
}

int64_t PagedKVCache::fork(int64_t seq) {
    check_sequence(seq, "fork");
    const int64_t length = seq_lengths_[seq];
    const int64_t shared = (length + block_size_ - 1) / block_size_;
    for (int64_t i = 0; i < shared; ++i) {
        const int32_t block = seq_blocks_[seq][i];
        TORCH_CHECK_VALUE(ref_counts_[block] < kMaxInt32, "PagedKVCache.fork: expected reference ",
                          "counts below ", kMaxInt32, ", got block ", block, " at ",
                          ref_counts_[block]);
    }
    const int64_t child = add_sequence();  // PagedCacheFullError when no slot is free
    for (int64_t i = 0; i < shared; ++i) {
        const int32_t block = seq_blocks_[seq][i];
        ++ref_counts_[block];
        set_table_entry(child, i, block);
        seq_blocks_[child].push_back(block);
    }
    seq_lengths_[child] = length;
    host_lengths_.data_ptr<int32_t>()[child] = static_cast<int32_t>(length);
    mark_dirty(child);
    return child;
}

bool PagedKVCache::copy_on_write(int64_t seq) {
    check_sequence(seq, "copy_on_write");
    std::vector<int32_t>& blocks = seq_blocks_[seq];
    const int64_t index = seq_lengths_[seq] / block_size_;
    if (index >= static_cast<int64_t>(blocks.size()) || ref_counts_[blocks[index]] <= 1) {
        return false;
    }
    const int32_t old_block = blocks[index];
    if (free_blocks_.empty()) {
        std::ostringstream msg;
        msg << "cannot copy shared block " << old_block << " of sequence " << seq
            << " on write";
        throw_full(msg.str());
    }
    const auto fresh = static_cast<int32_t>(allocate_block());
    // [num_layers, 2, block_size, heads, head_dim]: every layer's K and V of the block.
    storage_.select(2, fresh).copy_(storage_.select(2, old_block));
    --ref_counts_[old_block];  // > 1 before: still allocated
    blocks[index] = fresh;
    set_table_entry(seq, index, fresh);
    return true;
}

std::vector<int64_t> PagedKVCache::slot_mapping(int64_t seq, int64_t start, int64_t n) const {
    check_sequence(seq, "slot_mapping");
    const std::vector<int32_t>& blocks = seq_blocks_[seq];
    const int64_t capacity = static_cast<int64_t>(blocks.size()) * block_size_;
    TORCH_CHECK_VALUE(start >= 0 && n >= 0 && start <= capacity && n <= capacity - start,
                      "PagedKVCache.slot_mapping: expected positions start .. start + n - 1 in "
                      "the reserved room [0, ",
                      capacity, ") of sequence ", seq, " (start >= 0, n >= 0), got start ", start,
                      ", n ", n);
    std::vector<int64_t> slots(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        const int64_t p = start + i;
        slots[i] = static_cast<int64_t>(blocks[p / block_size_]) * block_size_ + p % block_size_;
    }
    return slots;
}

// ---------------------------------------------------------------------------------------------
// Device mirrors

void PagedKVCache::sync_device() {
    // The changed rows' span (first to last changed row) in one copy: a decode step of many
    // sequences changes rows here and there (each crosses into a new block every block_size
    // tokens), and a copy per run of rows cost a host wait each. Unchanged rows inside the span
    // are copied too, with the values they already hold on the device (the host tables are the
    // source, the device rows written only here). A plain copy_ from pageable host memory: the
    // host buffers may change again as soon as this returns, and the copy is ordered after the
    // kernels on the stream. On CUDA the rows are staged in pinned memory first (torch's
    // caching host allocator keeps the staging buffer until the copy has run), so the copy
    // does not wait for the device: a plain copy_ from pageable memory synchronizes the stream,
    // which would stall a host that schedules the next step while this one runs
    // (ServingEngine's overlap).
    int64_t first = -1;
    int64_t last = -1;
    for (int64_t seq = 0; seq < max_seqs_; ++seq) {
        if (table_dirty_[seq]) {
            table_dirty_[seq] = false;
            if (first < 0) {
                first = seq;
            }
            last = seq;
        }
    }
    if (first >= 0) {
        const int64_t rows = last - first + 1;
        copy_to_device(device_tables_.narrow(0, first, rows), host_tables_.narrow(0, first, rows));
    }
    if (lengths_dirty_) {
        copy_to_device(device_lengths_, host_lengths_);
        lengths_dirty_ = false;
    }
}

void PagedKVCache::copy_to_device(at::Tensor dst, const at::Tensor& src) const {
    if (device_.is_cuda()) {
        // a snapshot of the host rows as they are now: they may change before the copy runs
        dst.copy_(src.pin_memory(), /*non_blocking=*/true);
    } else {
        dst.copy_(src);
    }
}

std::string PagedKVCache::repr() const {
    std::ostringstream os;
    os << "PagedKVCache(num_layers=" << num_layers_ << ", num_blocks=" << num_blocks_
       << ", block_size=" << block_size_ << ", num_kv_heads=" << num_kv_heads_
       << ", head_dim=" << head_dim_ << ", dtype=" << dtype_name(dtype_) << ", device=" << device_
       << ", max_seqs=" << max_seqs_ << ", max_blocks_per_seq=" << max_blocks_per_seq_
       << ", free_blocks=" << num_free_blocks() << ", sequences=" << num_sequences() << ")";
    return os.str();
}

}  // namespace toyllm
