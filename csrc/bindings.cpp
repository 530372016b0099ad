// Python bindings of toyllm.engine.ops._C (pybind11): the KVCache and PagedKVCache classes,
// KVCacheOverflowError, PagedCacheFullError and the programmatic-launch switch. (The operators
// are registered with the dispatcher, registration.cpp, and reached from Python as
// torch.ops.toyllm.*; the CPU functions of two of them, which a CPU decode step calls once a
// token, are also bound here directly: cpu_decode_step and argmax_cpu.)
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "cache/kv_cache.h"
#include "cache/paged_kv_cache.h"
#include "common/programmatic_launch.h"
#include "gemv/cpu_gemv_isa.h"
#include "layer/cpu_decode_step.h"
#include "sampling/argmax_cpu.h"

namespace py = pybind11;

namespace {

// Accepts a torch.device or a string such as "cpu", "cuda", "cuda:1"; `cls` names the class
// in the error.
at::Device device_from_python(const py::handle& obj, const char* cls = "KVCache") {
    if (THPDevice_Check(obj.ptr())) {
        return reinterpret_cast<THPDevice*>(obj.ptr())->device;
    }
    if (py::isinstance<py::str>(obj)) {
        const auto text = obj.cast<std::string>();
        try {
            return at::Device(text);
        } catch (const c10::Error&) {
            throw py::value_error(std::string(cls) +
                                  ": expected device 'cpu', 'cuda' or 'cuda:<index>', got '" +
                                  text + "'");
        }
    }
    throw py::type_error(std::string(cls) +
                         ": expected device as a torch.device or a string, got " +
                         py::str(py::type::of(obj)).cast<std::string>());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "toyllm KV-cache extension: KVCache (host class) and the toyllm::kv_update op";

    m.def("set_programmatic_launch", &toyllm::set_programmatic_launch, py::arg("enabled"),
          "Whether the extension's CUDA kernels are launched with programmatic stream "
          "serialization (Hopper; default on). Kernels captured in a CUDA graph keep the "
          "setting they were captured with.");
    m.def("programmatic_launch_enabled", &toyllm::programmatic_launch_enabled);

    // The CPU functions of toyllm::cpu_decode_step and toyllm::argmax without the dispatcher
    // (cpu_decode_step.h, argmax_cpu.h): the same code, checks and messages as the operators.
    // The step releases the GIL while it runs, as the dispatcher's path does.
    m.def(
        "cpu_decode_step",
        [](const at::Tensor& tokens, const at::Tensor& embedding,
           const std::vector<at::Tensor>& layer_weights, const at::Tensor& final_norm,
           const at::Tensor& head_weight, double eps, const at::Tensor& inv_freq,
           const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
           const at::Tensor& positions, int64_t num_q_heads,
           const std::optional<at::Tensor>& block_tables) {
            return toyllm::cpu_decode_step(tokens, embedding, layer_weights, final_norm,
                                           head_weight, eps, inv_freq, k_caches, v_caches,
                                           positions, num_q_heads, block_tables);
        },
        py::arg("tokens"), py::arg("embedding"), py::arg("layer_weights"), py::arg("final_norm"),
        py::arg("head_weight"), py::arg("eps"), py::arg("inv_freq"), py::arg("k_caches"),
        py::arg("v_caches"), py::arg("positions"), py::arg("num_q_heads"),
        py::arg("block_tables") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "toyllm::cpu_decode_step's CPU function, called without the dispatcher.");
    m.def("argmax_cpu", &toyllm::argmax_cpu, py::arg("logits"), py::arg("flag_nonfinite"),
          "toyllm::argmax's CPU function, called without the dispatcher.");

    // For the tests only (cpu_gemv_isa.h): the CPU GEMV's kernels of one instruction set.
    m.def("_cpu_gemv_isas", &toyllm::cpu_gemv_isa_names,
          "The instruction sets whose CPU GEMV kernels this CPU runs, portable first.");
    m.def("_cpu_gemv_with_isa", &toyllm::gemv_cpu_with_isa, py::arg("x"), py::arg("weight"),
          py::arg("isa"),
          "toyllm::gemv on the CPU with the kernels of one instruction set (tests only).");

#ifdef WITH_CUDA_KERNELS
    m.attr("with_cuda") = true;
#else
    m.attr("with_cuda") = false;
#endif

    py::register_exception<toyllm::KVCacheOverflowError>(m, "KVCacheOverflowError",
                                                         PyExc_OverflowError);
    py::register_exception<toyllm::PagedCacheFullError>(m, "PagedCacheFullError",
                                                        PyExc_RuntimeError);

    // Errors from TORCH_CHECK_VALUE / TORCH_CHECK_INDEX map to ValueError / IndexError; this
    // translator makes that explicit for this module (without the C++ backtrace).
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) {
                std::rethrow_exception(p);
            }
        } catch (const c10::ValueError& e) {
            PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
        } catch (const c10::IndexError& e) {
            PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
        } catch (const c10::TypeError& e) {
            PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
        }
    });

    using toyllm::KVCache;
    py::class_<KVCache>(m, "KVCache", R"doc(
Per-layer key/value cache in one zero-initialised allocation
[num_layers, 2, batch_size, max_seq_len, num_kv_heads, head_dim], with a position per sequence.

keys(layer) / values(layer) are views [batch_size, max_seq_len, num_kv_heads, head_dim].
update() writes new rows at the current positions (it does not advance);
advance_position() moves the positions. device_positions() is an int32 tensor on the cache's
device (-1 for an inactive sequence) that the update kernel reads, so updates can be captured
in a CUDA graph.
)doc")
        .def(py::init([](int64_t num_layers, int64_t max_seq_len, int64_t num_kv_heads,
                         int64_t head_dim, at::ScalarType dtype, const py::object& device,
                         int64_t batch_size) {
                 return KVCache(num_layers, max_seq_len, num_kv_heads, head_dim, dtype,
                                device_from_python(device), batch_size);
             }),
             py::arg("num_layers"), py::arg("max_seq_len"), py::arg("num_kv_heads"),
             py::arg("head_dim"), py::arg("dtype"), py::arg("device"), py::arg("batch_size") = 1)
        .def_static("bytes_required", &KVCache::bytes_required, py::arg("num_layers"),
                    py::arg("max_seq_len"), py::arg("num_kv_heads"), py::arg("head_dim"),
                    py::arg("dtype"), py::arg("batch_size") = 1,
                    "Bytes a cache of this shape allocates.")
        // Spec API (batch_size == 1).
        .def("position", &KVCache::position, "Current position (batch_size == 1 only).")
        .def("is_full", &KVCache::is_full, "position() == max_seq_len (batch_size == 1 only).")
        .def("remaining_capacity", &KVCache::remaining_capacity,
             "max_seq_len - position() (batch_size == 1 only).")
        .def("advance_position", &KVCache::advance_position, py::arg("n") = 1,
             "Advance every active sequence by n >= 1 (KVCacheOverflowError past max_seq_len).")
        .def("reset", &KVCache::reset, "All positions 0, all sequences active, memory zeroed.")
        // Per-sequence API.
        .def("positions", &KVCache::positions, "Host positions of all sequences (a list).")
        .def("sequence_position", &KVCache::sequence_position, py::arg("seq"))
        .def("sequence_is_full", &KVCache::sequence_is_full, py::arg("seq"))
        .def("sequence_remaining_capacity", &KVCache::sequence_remaining_capacity, py::arg("seq"))
        .def("advance_sequence", &KVCache::advance_sequence, py::arg("seq"), py::arg("n") = 1)
        .def("set_active", &KVCache::set_active, py::arg("seq"), py::arg("active"))
        .def("is_active", &KVCache::is_active, py::arg("seq"))
        .def("reset_sequence", &KVCache::reset_sequence, py::arg("seq"),
             "Position 0, that sequence's rows zeroed in every layer, active again.")
        // Storage.
        .def("keys", &KVCache::keys, py::arg("layer"),
             "View [batch_size, max_seq_len, num_kv_heads, head_dim] of a layer's keys.")
        .def("values", &KVCache::values, py::arg("layer"),
             "View [batch_size, max_seq_len, num_kv_heads, head_dim] of a layer's values.")
        .def(
            "update",
            [](KVCache& self, int64_t layer, const at::Tensor& new_k, const at::Tensor& new_v,
               std::optional<int64_t> seq) {
                if (seq.has_value()) {
                    self.update_sequence(layer, new_k, new_v, *seq);
                } else {
                    self.update(layer, new_k, new_v);
                }
            },
            py::arg("layer"), py::arg("new_k"), py::arg("new_v"), py::arg("seq") = py::none(),
            R"doc(
Write new_k/new_v [batch_size, num_tokens, num_kv_heads, head_dim] at the current positions of
the active sequences, without advancing. With seq=b, new_k/new_v are [1, num_tokens, ...] and
only sequence b is written. Everything is checked before anything is written.
)doc")
        .def("device_positions", &KVCache::device_positions,
             "int32 [batch_size] on the cache's device: positions, -1 for inactive sequences.")
        .def("storage", &KVCache::storage,
             "The whole allocation [num_layers, 2, batch_size, max_seq_len, heads, head_dim].")
        .def("bytes_allocated", &KVCache::bytes_allocated)
        .def_property_readonly("num_layers", &KVCache::num_layers)
        .def_property_readonly("max_seq_len", &KVCache::max_seq_len)
        .def_property_readonly("num_kv_heads", &KVCache::num_kv_heads)
        .def_property_readonly("head_dim", &KVCache::head_dim)
        .def_property_readonly("batch_size", &KVCache::batch_size)
        .def_property_readonly("dtype", &KVCache::dtype)
        .def_property_readonly("device", &KVCache::device)
        .def("__repr__", &KVCache::repr);

    using toyllm::PagedKVCache;
    py::class_<PagedKVCache>(m, "PagedKVCache", R"doc(
Paged key/value cache: one zero-initialised allocation
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] of fixed-size blocks, a
ref-counted block allocator, and sequences (slots 0..max_seqs-1) that each hold a list of blocks
and a length. key_pool(layer) / value_pool(layer) are views [num_blocks, block_size,
num_kv_heads, head_dim]; block_tables() / sequence_lengths() are int32 device mirrors of the
sequences' blocks and lengths, refreshed by sync_device(), whose addresses never change (CUDA
graphs read them). Every call checks its arguments before it changes anything.
)doc")
        .def(py::init([](int64_t num_layers, int64_t num_blocks, int64_t block_size,
                         int64_t num_kv_heads, int64_t head_dim, at::ScalarType dtype,
                         const py::object& device, int64_t max_seqs, int64_t max_blocks_per_seq) {
                 return PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                                     dtype, device_from_python(device, "PagedKVCache"), max_seqs,
                                     max_blocks_per_seq);
             }),
             py::arg("num_layers"), py::arg("num_blocks"), py::arg("block_size"),
             py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("dtype"), py::arg("device"),
             py::arg("max_seqs"), py::arg("max_blocks_per_seq"))
        .def_static("block_bytes", &PagedKVCache::block_bytes, py::arg("num_layers"),
                    py::arg("block_size"), py::arg("num_kv_heads"), py::arg("head_dim"),
                    py::arg("dtype"),
                    "Bytes one block takes over all layers, K and V (to size a pool from a "
                    "memory budget before allocating it).")
        // Memory.
        .def("key_pool", &PagedKVCache::key_pool, py::arg("layer"),
             "View [num_blocks, block_size, num_kv_heads, head_dim] of a layer's keys.")
        .def("value_pool", &PagedKVCache::value_pool, py::arg("layer"),
             "View [num_blocks, block_size, num_kv_heads, head_dim] of a layer's values.")
        .def("storage", &PagedKVCache::storage,
             "The whole allocation [num_layers, 2, num_blocks, block_size, heads, head_dim].")
        .def("num_free_blocks", &PagedKVCache::num_free_blocks)
        .def("num_used_blocks", &PagedKVCache::num_used_blocks)
        .def("bytes_per_block", &PagedKVCache::bytes_per_block)
        .def("bytes_used", &PagedKVCache::bytes_used)
        .def("bytes_free", &PagedKVCache::bytes_free)
        .def("bytes_allocated", &PagedKVCache::bytes_allocated)
        // Block allocator.
        .def("allocate_block", &PagedKVCache::allocate_block,
             "A free block, now with reference count 1 (PagedCacheFullError when none is free).")
        .def("incref", &PagedKVCache::incref, py::arg("block"))
        .def("decref", &PagedKVCache::decref, py::arg("block"),
             "The block's new reference count; at 0 it is free again.")
        .def("ref_count", &PagedKVCache::ref_count, py::arg("block"))
        // Sequences.
        .def("add_sequence", &PagedKVCache::add_sequence,
             "A free sequence slot, empty (PagedCacheFullError when all are taken).")
        .def("free_sequence", &PagedKVCache::free_sequence, py::arg("seq"),
             "Decref all the sequence's blocks; its slot is free again.")
        .def("is_sequence", &PagedKVCache::is_sequence, py::arg("seq"),
             "seq is a slot in use.")
        .def("num_sequences", &PagedKVCache::num_sequences)
        .def("sequence_length", &PagedKVCache::sequence_length, py::arg("seq"))
        .def("sequence_blocks", &PagedKVCache::sequence_blocks, py::arg("seq"))
        .def("sequence_capacity", &PagedKVCache::sequence_capacity, py::arg("seq"),
             "Tokens its blocks hold room for: len(sequence_blocks(seq)) * block_size.")
        .def("append_block", &PagedKVCache::append_block, py::arg("seq"), py::arg("block"),
             "Adopt a full block of cached tokens (incref it; length += block_size). Every "
             "block the sequence holds must be full.")
        .def("reserve", &PagedKVCache::reserve, py::arg("seq"), py::arg("n"),
             "Room for n more tokens, allocating blocks as needed: all or nothing "
             "(PagedCacheFullError before any change).")
        .def("advance", &PagedKVCache::advance, py::arg("seq"), py::arg("n"),
             "length += n, within the reserved room.")
        .def("truncate", &PagedKVCache::truncate, py::arg("seq"), py::arg("length"),
             "Drop the tokens past length; decref the blocks no longer needed.")
        .def("fork", &PagedKVCache::fork, py::arg("seq"),
             "A new sequence sharing the blocks that hold seq's tokens, with its length.")
        .def("copy_on_write", &PagedKVCache::copy_on_write, py::arg("seq"),
             "Copy the shared block the next token lands in to a fresh one (all layers, K and "
             "V); True when it copied.")
        .def("slot_mapping", &PagedKVCache::slot_mapping, py::arg("seq"), py::arg("start"),
             py::arg("n"),
             "Flat pool slots block * block_size + offset of positions start..start+n-1.")
        // Device mirrors.
        .def("block_tables", &PagedKVCache::block_tables,
             "int32 [max_seqs, max_blocks_per_seq] on the cache's device, -1 = no block.")
        .def("sequence_lengths", &PagedKVCache::sequence_lengths,
             "int32 [max_seqs] on the cache's device: tokens written per sequence.")
        .def("sync_device", &PagedKVCache::sync_device,
             "Copy the host tables and lengths that changed to the device mirrors.")
        .def_property_readonly("num_layers", &PagedKVCache::num_layers)
        .def_property_readonly("num_blocks", &PagedKVCache::num_blocks)
        .def_property_readonly("block_size", &PagedKVCache::block_size)
        .def_property_readonly("num_kv_heads", &PagedKVCache::num_kv_heads)
        .def_property_readonly("head_dim", &PagedKVCache::head_dim)
        .def_property_readonly("max_seqs", &PagedKVCache::max_seqs)
        .def_property_readonly("max_blocks_per_seq", &PagedKVCache::max_blocks_per_seq)
        .def_property_readonly("dtype", &PagedKVCache::dtype)
        .def_property_readonly("device", &PagedKVCache::device)
        .def("__repr__", &PagedKVCache::repr);
}
