"""The matrix of `toyllm check`, as data: which model shapes, batches and cache situations
the cached engine is compared against the no-cache reference on.

Every case is a small random model (2 layers, vocab 512, hidden = heads * head_dim,
weights N(0, 1/sqrt(hidden)): activations and logits at unit scale, as in a
trained model) plus a request:

* attention layouts: MHA, GQA, MQA; head dims 32, 64, 128 and two odd ones (34 with 3 K/V
  heads: a token's K row is 68 bytes in fp16 and 136 in fp32, neither a multiple of 16, so
  the KV kernel's 16-byte vector path cannot be taken blindly; 36 with one K/V head: 72-byte
  rows in fp16);
* tied and untied embeddings; llama3 RoPE scaling with original_max_position_embeddings = 16,
  so the scaled frequencies matter at the positions tested (up to ~100);
* batch 1 and ragged batches (one prompt of a single token; rows stop decoding at different
  steps, so finished rows sit inactive in the cache while the others go on);
* whole and chunked prefill (chunks that do not divide the prompt);
* a cache reset between two requests: a bigger request dirties the cache first;
* the shipped default model with its trained weights (batch of two ragged prompts);
* the cache's end: the longest row's last token lands in the cache's last slot, and prompts
  that fill the cache exactly (no decode step at all: greedy stops with "length");
* the serving engine (paged cache, continuous batching; fp32 only, where the 1e-4 bound holds):
  requests joining and leaving mid-decode, shared prefixes, forks with copy on write, and
  preemption forced by a small pool (engine/check/serving.py's workloads).

On CUDA each case runs in every dtype asked for, plus variants that leave CUDA graphs off
and the decode-attention kernel off (SDPA), so each decode path is checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from toyllm.engine.settings import Settings
from toyllm.models.config import ModelConfig, RopeScaling, load_config

# Fields every case's model shares unless it overrides them.
BASE_CONFIG: dict[str, Any] = dict(
    vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=32, max_seq_len=256,
    tie_embeddings=False, rope_theta=10000.0,
)


def weight_std(config: ModelConfig) -> float:
    """N(0, std) init for a case's random weights: std = 1/sqrt(hidden), so each projection
    keeps its input's scale (attention scores and logits with std ~1, as in a trained model).

    An earlier init with 2.26x that gain (0.2 at hidden 128) saturated the softmax (score std
    ~5) and amplified fp16/bf16 rounding: on the same engine, the fp16 reference drifted about
    3x farther from fp32 (docs/PERF.md). That is a property of the test model, not of the
    cache; the tolerances did not change."""
    return 1.0 / math.sqrt(config.hidden_size)


CPU_DTYPES = ("fp32",)
CUDA_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Case:
    """One row of the matrix: a model shape and a request, in one dtype on one device."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)  # overrides of BASE_CONFIG
    prompt_lens: tuple[int, ...] = (13,)  # one prompt per batch row (ragged when they differ)
    prefill_chunk: int | None = None  # None: whole-prompt prefill
    # teacher-forced decode steps: an int n gives row b max(1, n - 3*b) steps (0 if n == 0),
    # so ragged rows finish at different steps; a tuple gives each row's count
    new_tokens: int | tuple[int, ...] = 16
    greedy_tokens: int = 64  # free-running greedy tokens compared per row
    reset_between_requests: bool = False  # a bigger request runs on the same engine first
    fill_to_end: bool = False  # the cache holds exactly the longest row (prompt + decode)
    dtype: str = "fp32"
    device: str = "cpu"
    cuda_graph: bool | None = None  # None: the engine's default (on for CUDA)
    decode_kernel: bool = True  # the extension's decode-attention op where built
    seed: int = 0
    shipped_weights: bool = False  # the shipped default model (trained weights), not random
    serving: str | None = None  # a workload of engine/check/serving.py (WORKLOADS), run
    #                             through the ServingEngine instead of the static Engine

    def settings(self) -> Settings:
        """The environment's settings, with SDPA for decode attention where decode_kernel is
        False."""
        if self.decode_kernel:
            return Settings.from_env()
        return Settings.from_env(decode_attention="sdpa")

    @property
    def label(self) -> str:
        return f"{self.name}/{self.dtype}/{self.device}"

    def model_config(self) -> ModelConfig:
        if self.shipped_weights:
            from toyllm.models.model_source import DEFAULT_MODEL_DIR

            return load_config(DEFAULT_MODEL_DIR / "config.json")
        return model_config(self.config, name=self.name)


def model_config(overrides: dict[str, Any], name: str = "") -> ModelConfig:
    """The case's ModelConfig: BASE_CONFIG + overrides, hidden = heads * head_dim and
    intermediate = 2 * hidden unless given."""
    data = dict(BASE_CONFIG, **overrides)
    data.setdefault("hidden_size", data["num_heads"] * data["head_dim"])
    data.setdefault("intermediate_size", 2 * data["hidden_size"])
    return ModelConfig(name=name, **data)


LLAMA3_ROPE = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=16)

MHA = dict(num_heads=4, num_kv_heads=4)
GQA = dict(num_heads=4, num_kv_heads=2)
MQA = dict(num_heads=4, num_kv_heads=1)

# The cases every device runs (in each of its dtypes).
BASE_CASES: tuple[Case, ...] = (
    Case("mha-hd32", dict(MHA, head_dim=32)),
    Case("gqa-hd64", dict(GQA, head_dim=64)),
    Case("mqa-hd128", dict(MQA, head_dim=128)),
    Case("gqa-hd34-odd", dict(num_heads=6, num_kv_heads=3, head_dim=34)),
    Case("mqa-hd36-odd", dict(num_heads=2, num_kv_heads=1, head_dim=36)),
    Case("gqa-tied", dict(GQA, head_dim=32, tie_embeddings=True)),
    Case("gqa-llama3-rope", dict(GQA, head_dim=32, rope_theta=500000.0,
                                 rope_scaling=LLAMA3_ROPE), prompt_lens=(40,)),
    Case("gqa-ragged", dict(GQA, head_dim=32), prompt_lens=(5, 17, 1, 11)),
    Case("mha-chunked", dict(MHA, head_dim=32), prompt_lens=(29,), prefill_chunk=8),
    Case("mqa-ragged-chunked", dict(MQA, head_dim=64), prompt_lens=(23, 6), prefill_chunk=5),
    Case("gqa-reset", dict(GQA, head_dim=32), prompt_lens=(9, 14),
         reset_between_requests=True),
    Case("gqa-fill-to-end", dict(GQA, head_dim=32), prompt_lens=(20, 9), new_tokens=12,
         fill_to_end=True),
    # row 0's prompt fills the cache (it never decodes); row 1 decodes up to the same end
    Case("mha-prompt-at-end", dict(MHA, head_dim=32), prompt_lens=(24, 10),
         new_tokens=(0, 14), fill_to_end=True),
    # real weights: the shipped model (8 layers, GQA 8:4, head dim 32, vocab 4096, trained)
    Case("shipped-default", prompt_lens=(13, 5), shipped_weights=True),
)

# Extra CUDA cases: the decode paths the default (CUDA graph + decode kernel) does not take.
CUDA_ONLY_CASES: tuple[Case, ...] = (
    Case("gqa-ragged-eager", dict(GQA, head_dim=64), prompt_lens=(5, 17, 1, 11),
         cuda_graph=False),
    Case("gqa-ragged-sdpa", dict(GQA, head_dim=64), prompt_lens=(5, 17, 1, 11),
         cuda_graph=False, decode_kernel=False),
    Case("gqa-hd34-odd-eager", dict(num_heads=6, num_kv_heads=3, head_dim=34),
         prompt_lens=(13, 4), cuda_graph=False),
)


# The serving engine's workloads (fp32: the teacher-forced bound is max |diff| <= 1e-4).
SERVING_CASES: tuple[Case, ...] = (
    Case("serving-join-leave", dict(GQA, head_dim=32), serving="join-leave"),
    Case("serving-shared-prefix", dict(MQA, head_dim=64), serving="shared-prefix"),
    Case("serving-fork-cow", dict(GQA, head_dim=32), serving="fork-cow"),
    Case("serving-preempt", dict(MHA, head_dim=32), serving="preempt"),
)
# ... and on CUDA with every decode step eager (no graphs)
CUDA_SERVING_CASES: tuple[Case, ...] = (
    Case("serving-join-leave-eager", dict(GQA, head_dim=64), serving="join-leave",
         cuda_graph=False),
)


def default_matrix(device: str, dtypes: tuple[str, ...] | list[str] | None = None) -> list[Case]:
    """Every case for `device` ("cpu" or "cuda") in each dtype (default: fp32 on the CPU;
    fp32, fp16 and bf16 on CUDA); the serving cases in fp32."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if dtypes is None:
        dtypes = CPU_DTYPES if device == "cpu" else CUDA_DTYPES
    cases = list(BASE_CASES) + (list(CUDA_ONLY_CASES) if device == "cuda" else [])
    serving = list(SERVING_CASES) + (list(CUDA_SERVING_CASES) if device == "cuda" else [])
    return [replace(c, dtype=dt, device=device) for dt in dtypes
            for c in cases + (serving if dt == "fp32" else [])]
