// KVCache host class: validation, one allocation, per-layer views, position bookkeeping.
#include "cache/kv_cache.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>

#include "cache/cache_checks.h"
#include "cache/kv_ops.h"
#include "common/op_args.h"

namespace toyllm {
namespace {

constexpr CacheChecks kChecks{"KVCache"};

}  // namespace

at::Device KVCache::validated_device(int64_t num_layers, int64_t max_seq_len, int64_t num_kv_heads,
                                     int64_t head_dim, at::ScalarType dtype, int64_t batch_size,
                                     at::Device device) {
    // Sizes and dtype first (bytes_required checks them), then the device.
    bytes_required(num_layers, max_seq_len, num_kv_heads, head_dim, dtype, batch_size);
    return kChecks.normalize_device(device);
}

KVCache::KVCache(int64_t num_layers, int64_t max_seq_len, int64_t num_kv_heads, int64_t head_dim,
                 at::ScalarType dtype, at::Device device, int64_t batch_size)
    : num_layers_(num_layers),
      max_seq_len_(max_seq_len),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      batch_size_(batch_size),
      dtype_(dtype),
      device_(validated_device(num_layers, max_seq_len, num_kv_heads, head_dim, dtype, batch_size,
                               device)),
      positions_(static_cast<size_t>(batch_size), 0),
      active_(static_cast<size_t>(batch_size), true) {
    storage_ = at::zeros({num_layers, 2, batch_size, max_seq_len, num_kv_heads, head_dim},
                         at::TensorOptions().dtype(dtype).device(device_));
    const auto int_options = at::TensorOptions().dtype(at::kInt).device(device_);
    device_positions_ = at::zeros({batch_size}, int_options);
    device_active_ = at::ones({batch_size}, int_options);
}

int64_t KVCache::bytes_required(int64_t num_layers, int64_t max_seq_len, int64_t num_kv_heads,
                                int64_t head_dim, at::ScalarType dtype, int64_t batch_size) {
    kChecks.check_positive("num_layers", num_layers);
    kChecks.check_positive("max_seq_len", max_seq_len);
    kChecks.check_positive("num_kv_heads", num_kv_heads);
    kChecks.check_positive("head_dim", head_dim);
    kChecks.check_positive("batch_size", batch_size);
    kChecks.check_dtype(dtype);
    // num_layers * 2 (K and V) * batch * max_seq_len * heads * head_dim * element size
    return kChecks.checked_product({num_layers, 2, batch_size, max_seq_len, num_kv_heads, head_dim,
                                    static_cast<int64_t>(c10::elementSize(dtype))});
}

// ---------------------------------------------------------------------------------------------
// Checks

void KVCache::check_layer(int64_t layer) const {
    TORCH_CHECK_INDEX(layer >= 0 && layer < num_layers_, "KVCache: expected a layer index in [0, ",
                      num_layers_, "), got ", layer);
}

void KVCache::check_sequence(int64_t seq, const char* what) const {
    TORCH_CHECK_INDEX(seq >= 0 && seq < batch_size_, what, ": expected a sequence index in [0, ",
                      batch_size_, "), got ", seq);
}

void KVCache::check_single_sequence(const char* what) const {
    TORCH_CHECK_VALUE(batch_size_ == 1, what,
                      ": expected a cache with batch_size 1, got batch_size ", batch_size_,
                      "; use positions(), sequence_position(b), sequence_is_full(b) "
                      "or sequence_remaining_capacity(b)");
}

void KVCache::check_new_rows(const char* name, const at::Tensor& t, int64_t expected_batch) const {
    TORCH_CHECK_VALUE(t.defined(), "KVCache.update: expected ", name, " to be a tensor, got None");
    TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == expected_batch && t.size(1) >= 1 &&
                          t.size(2) == num_kv_heads_ && t.size(3) == head_dim_,
                      "KVCache.update: expected ", name, " of shape [", expected_batch,
                      ", num_tokens >= 1, ", num_kv_heads_, ", ", head_dim_, "], got ", t.sizes());
    check_dtype("KVCache.update", name, t, dtype_, "the cache's");
    check_device("KVCache.update", name, t, device_, "the cache's device");
    TORCH_CHECK_VALUE(t.is_contiguous(), "KVCache.update: expected a contiguous ", name,
                      ", got strides ", t.strides(), " for shape ", t.sizes(),
                      " (call .contiguous() first)");
}

// ---------------------------------------------------------------------------------------------
// Spec API (batch_size == 1)

int64_t KVCache::position() const {
    check_single_sequence("position()");
    return positions_[0];
}

bool KVCache::is_full() const {
    check_single_sequence("is_full()");
    return positions_[0] == max_seq_len_;
}

int64_t KVCache::remaining_capacity() const {
    check_single_sequence("remaining_capacity()");
    return max_seq_len_ - positions_[0];
}

void KVCache::advance_position(int64_t n) {
    TORCH_CHECK_VALUE(n >= 1, "advance_position: expected n >= 1, got ", n);
    for (int64_t b = 0; b < batch_size_; ++b) {
        if (!active_[b] || n <= max_seq_len_ - positions_[b]) {
            continue;
        }
        std::ostringstream msg;
        msg << "KV cache overflow: cannot advance ";
        if (batch_size_ > 1) {
            msg << "sequence " << b << " from ";
        }
        msg << "position " << positions_[b] << " by n=" << n << " (to " << positions_[b] + n
            << "): max_seq_len is " << max_seq_len_ << ", remaining capacity "
            << max_seq_len_ - positions_[b];
        throw KVCacheOverflowError(msg.str());
    }
    for (int64_t b = 0; b < batch_size_; ++b) {
        if (active_[b]) {
            positions_[b] += n;
        }
    }
    // Device mirror: position += n * active, one device op, no host sync. On the CPU the
    // mirror is host memory, written here directly: the same values without an ATen call
    // through the dispatcher, whose code a decode step's weights have evicted from the
    // caches by the time this runs once per token.
    if (device_.is_cpu()) {
        int32_t* mirror = device_positions_.mutable_data_ptr<int32_t>();
        for (int64_t b = 0; b < batch_size_; ++b) {
            if (active_[b]) {
                mirror[b] += static_cast<int32_t>(n);
            }
        }
        return;
    }
    device_positions_.add_(device_active_, n);
}

void KVCache::reset() {
    storage_.zero_();
    std::fill(positions_.begin(), positions_.end(), 0);
    std::fill(active_.begin(), active_.end(), true);
    device_positions_.zero_();
    device_active_.fill_(1);
}

// ---------------------------------------------------------------------------------------------
// Per-sequence API

std::vector<int64_t> KVCache::positions() const { return positions_; }

int64_t KVCache::sequence_position(int64_t seq) const {
    check_sequence(seq, "sequence_position");
    return positions_[seq];
}

bool KVCache::sequence_is_full(int64_t seq) const {
    check_sequence(seq, "sequence_is_full");
    return positions_[seq] == max_seq_len_;
}

int64_t KVCache::sequence_remaining_capacity(int64_t seq) const {
    check_sequence(seq, "sequence_remaining_capacity");
    return max_seq_len_ - positions_[seq];
}

void KVCache::advance_sequence(int64_t seq, int64_t n) {
    check_sequence(seq, "advance_sequence");
    TORCH_CHECK_VALUE(n >= 1, "advance_sequence: expected n >= 1, got ", n);
    if (n > max_seq_len_ - positions_[seq]) {
        std::ostringstream msg;
        msg << "KV cache overflow: cannot advance sequence " << seq << " from position "
            << positions_[seq] << " by n=" << n << " (to " << positions_[seq] + n
            << "): max_seq_len is " << max_seq_len_ << ", remaining capacity "
            << max_seq_len_ - positions_[seq];
        throw KVCacheOverflowError(msg.str());
    }
    positions_[seq] += n;
    if (active_[seq]) {
        device_positions_.narrow(0, seq, 1).add_(n);
    }
}

void KVCache::set_device_position(int64_t seq) {
    device_positions_.narrow(0, seq, 1).fill_(active_[seq] ? positions_[seq] : -1);
    device_active_.narrow(0, seq, 1).fill_(active_[seq] ? 1 : 0);
}

void KVCache::set_active(int64_t seq, bool active) {
    check_sequence(seq, "set_active");
    active_[seq] = active;
    set_device_position(seq);
}

bool KVCache::is_active(int64_t seq) const {
    check_sequence(seq, "is_active");
    return active_[seq];
}

void KVCache::reset_sequence(int64_t seq) {
    check_sequence(seq, "reset_sequence");
    storage_.select(2, seq).zero_();  // [num_layers, 2, max_seq_len, heads, head_dim]
    positions_[seq] = 0;
    active_[seq] = true;
    set_device_position(seq);
}

// ---------------------------------------------------------------------------------------------
// Storage

at::Tensor KVCache::keys(int64_t layer) const {
    check_layer(layer);
    return storage_.select(0, layer).select(0, 0);
}

at::Tensor KVCache::values(int64_t layer) const {
    check_layer(layer);
    return storage_.select(0, layer).select(0, 1);
}

void KVCache::update(int64_t layer, const at::Tensor& new_k, const at::Tensor& new_v) {
    check_layer(layer);
    check_new_rows("new_k", new_k, batch_size_);
    check_new_rows("new_v", new_v, batch_size_);
    const int64_t n = new_k.size(1);
    TORCH_CHECK_VALUE(new_v.size(1) == n, "KVCache.update: expected new_v with new_k's ", n,
                      " tokens, got ", new_v.size(1));
    for (int64_t b = 0; b < batch_size_; ++b) {
        if (!active_[b] || n <= max_seq_len_ - positions_[b]) {
            continue;
        }
        std::ostringstream msg;
        msg << "KV cache overflow: cannot write n=" << n << " tokens at position " << positions_[b];
        if (batch_size_ > 1) {
            msg << " of sequence " << b;
        }
        msg << " (up to " << positions_[b] + n << "): max_seq_len is " << max_seq_len_
            << ", remaining capacity " << max_seq_len_ - positions_[b];
        throw KVCacheOverflowError(msg.str());
    }
    at::Tensor k_cache = keys(layer);
    at::Tensor v_cache = values(layer);
    kv_update(k_cache, v_cache, new_k, new_v, device_positions_);
}

void KVCache::update_sequence(int64_t layer, const at::Tensor& new_k, const at::Tensor& new_v,
                              int64_t seq) {
    check_layer(layer);
    check_sequence(seq, "KVCache.update");
    check_new_rows("new_k", new_k, 1);
    check_new_rows("new_v", new_v, 1);
    const int64_t n = new_k.size(1);
    TORCH_CHECK_VALUE(new_v.size(1) == n, "KVCache.update: expected new_v with new_k's ", n,
                      " tokens, got ", new_v.size(1));
    TORCH_CHECK_VALUE(active_[seq], "KVCache.update: expected an active sequence ", seq,
                      ", got an inactive one (call set_active(", seq, ", True) first)");
    if (n > max_seq_len_ - positions_[seq]) {
        std::ostringstream msg;
        msg << "KV cache overflow: cannot write n=" << n << " tokens at position "
            << positions_[seq] << " of sequence " << seq << " (up to " << positions_[seq] + n
            << "): max_seq_len is " << max_seq_len_ << ", remaining capacity "
            << max_seq_len_ - positions_[seq];
        throw KVCacheOverflowError(msg.str());
    }
    // Views of that one sequence: [1, max_seq_len, heads, head_dim] and [1] (contiguous).
    at::Tensor k_cache = keys(layer).narrow(0, seq, 1);
    at::Tensor v_cache = values(layer).narrow(0, seq, 1);
    kv_update(k_cache, v_cache, new_k, new_v, device_positions_.narrow(0, seq, 1));
}

int64_t KVCache::bytes_allocated() const { return static_cast<int64_t>(storage_.nbytes()); }

std::string KVCache::repr() const {
    std::ostringstream os;
    os << "KVCache(num_layers=" << num_layers_ << ", max_seq_len=" << max_seq_len_
       << ", num_kv_heads=" << num_kv_heads_ << ", head_dim=" << head_dim_
       << ", dtype=" << dtype_name(dtype_) << ", device=" << device_
       << ", batch_size=" << batch_size_ << ", positions=[";
    for (int64_t b = 0; b < batch_size_; ++b) {
        os << (b ? ", " : "") << positions_[b];
        if (!active_[b]) {
            os << " (inactive)";
        }
    }
    os << "])";
    return os.str();
}

}  // namespace toyllm
