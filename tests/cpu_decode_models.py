"""The small models the CPU decode step's tests run (tests/test_cpu_decode_step.py):
stories15M's proportions, GQA with a head_dim that is not a
multiple of 8, MQA with an untied head, a wide MLP; weights initialised for peaked logits."""

from __future__ import annotations

import torch

from toyllm.engine.forward import layer_weights
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIGS = {
    # stories15M's proportions, smaller: MHA, head_dim 48
    "mha": ModelConfig(vocab_size=320, hidden_size=96, num_layers=3, num_heads=2,
                       num_kv_heads=2, intermediate_size=256, max_seq_len=96),
    # GQA with head_dim 6 (not a multiple of 8), odd widths everywhere
    "gqa_hd6": ModelConfig(vocab_size=301, hidden_size=36, num_layers=2, num_heads=6,
                           num_kv_heads=2, intermediate_size=50, max_seq_len=96),
    # MQA, head_dim 10, untied head
    "mqa_hd10": ModelConfig(vocab_size=257, hidden_size=30, num_layers=2, num_heads=3,
                            num_kv_heads=1, head_dim=10, intermediate_size=33, max_seq_len=96,
                            tie_embeddings=False),
    # a wide MLP: 4 rows' silu exceeds ATen's grain (32,768 elements), which F.silu splits over
    # the threads, so the step runs it after a barrier on one thread
    "wide_mlp": ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=8, intermediate_size=8200, max_seq_len=96),
}


def model_for(name: str, seed: int = 0):
    model = build_model(CONFIGS[name], seed=seed)
    model.init_weights(seed, std=0.2)  # peaked logits: greedy ties are not a coin flip
    return model


def step_args_over_random_caches(name: str, rows: int, positions: list[int], seed: int = 0,
                                 capacity: int = 32) -> list:
    """toyllm::cpu_decode_step's arguments for model `name` (model_for(name, seed)): random
    tokens, caches [rows, capacity, Hkv, D] of random keys and values, rows at `positions`."""
    config = CONFIGS[name]
    model = model_for(name, seed=seed)
    g = torch.Generator().manual_seed(seed + rows)
    shape = (rows, capacity, config.num_kv_heads, config.head_dim)
    weights = [t.detach() for w in layer_weights(model) for t in vars(w).values()]
    return [torch.randint(0, config.vocab_size, (rows, 1), generator=g),
            model.embed_tokens.weight.detach(), weights, model.norm.weight.detach(),
            model.lm_head.weight.detach(), config.norm_eps, model.inv_freq,
            [torch.randn(shape, generator=g) for _ in range(config.num_layers)],
            [torch.randn(shape, generator=g) for _ in range(config.num_layers)],
            torch.tensor(positions, dtype=torch.int32), config.num_heads]


def prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
