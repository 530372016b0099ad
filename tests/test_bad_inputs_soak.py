"""Many requests through one engine: memory stays flat and the same seed gives the same tokens,
whatever ran before and whatever shares the batch: the 2,000-request soak of issue 17, on a
model small enough that it takes about 10 s on 2 cores."""

from __future__ import annotations

import os
import random

import pytest

from toyllm.engine.generate import Engine
from toyllm.engine.sampling import SamplingParams
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2,
                     num_kv_heads=1, intermediate_size=32, max_seq_len=48)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(requests: int) -> tuple[int, int]:
    """Run `requests` random requests; every request also repeats an earlier (prompt, seed)
    in a different batch and must reproduce its tokens. Returns RSS after warm-up and at the
    end."""
    model = build_model(CONFIG, seed=0)
    model.init_weights(0, std=0.2)
    engine = Engine(model)
    rng = random.Random(0)
    seen: dict[tuple[tuple[int, ...], int, float], list[int]] = {}
    warm = end = 0
    for i in range(requests):
        batch = [tuple(rng.randrange(3, 256) for _ in range(rng.randrange(1, 12)))
                 for _ in range(rng.randrange(1, 5))]
        seed = rng.randrange(2**64) if rng.random() < 0.5 else rng.randrange(4)
        temperature = rng.choice([0.0, 0.7, 1.0])
        if seen and rng.random() < 0.5:  # an earlier request, next to new neighbours
            batch[rng.randrange(len(batch))] = rng.choice(list(seen))[0]
        params = SamplingParams(max_new_tokens=rng.randrange(1, 12), temperature=temperature,
                                seed=seed, stop_at_eos=False)
        result = engine.generate([list(p) for p in batch], params)
        for p, c in zip(batch, result.completions, strict=True):
            key = (p, seed, temperature)
            earlier = seen.setdefault(key, c.token_ids)
            n = min(len(earlier), len(c.token_ids))
            assert c.token_ids[:n] == earlier[:n], f"request {i}: same seed, other tokens"
            if len(c.token_ids) > len(earlier):
                seen[key] = c.token_ids
        if i == min(50, requests // 2):
            warm = rss_bytes()
    end = rss_bytes()
    return warm, end


@pytest.mark.slow
def test_two_thousand_requests_keep_memory_flat_and_seeds_repeatable() -> None:
    warm, end = soak(2000)
    assert end - warm < 64 * 2**20, f"RSS grew by {(end - warm) / 2**20:.1f} MiB"
