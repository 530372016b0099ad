"""Programmatic dependent launch (csrc/programmatic_launch.cuh): the extension's kernels may
start before the kernel ahead of them in the stream has finished, and wait on the device for
their inputs. These tests check that this changes no result: a chain of dependent extension
kernels (each reading what the previous one wrote) gives the same bits with the launch
attribute on and off, eagerly and replayed from a CUDA graph, and a whole model's decode too
(an Engine sets the switch from Settings.programmatic_launch)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import collect_dead_graphs

from toyllm.engine.generate import Engine
from toyllm.engine.ops.kv_cache import _C, decode_attention, kv_update, set_programmatic_launch
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.settings import Settings
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

CONFIG = ModelConfig(vocab_size=300, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=200, max_seq_len=64)


@pytest.fixture(autouse=True)
def _no_dead_graphs_left(request):
    """CUDA tests leave no dropped engine for the collector to find during a later capture."""
    yield
    if request.node.get_closest_marker("cuda") is not None:
        collect_dead_graphs()


@pytest.fixture
def restore_switch():
    yield
    set_programmatic_launch(True)


def test_the_switch_is_on_by_default_and_turns_off(restore_switch) -> None:
    assert _C.programmatic_launch_enabled()
    set_programmatic_launch(False)
    assert not _C.programmatic_launch_enabled()
    set_programmatic_launch(True)
    assert _C.programmatic_launch_enabled()


def _chain(k_cache, v_cache, new_k, new_v, q, positions, steps: int) -> list[torch.Tensor]:
    """steps rounds of: write K/V at positions (kv_update), attend (decode_attention), feed the
    output back as the next q and the next new K/V; each kernel reads the last one's output."""
    outs = []
    for _ in range(steps):
        kv_update(k_cache, v_cache, new_k, new_v, positions)
        seq_lens = (positions + 1).to(torch.int32)
        out = decode_attention(q, k_cache, v_cache, seq_lens)
        outs.append(out)
        q = out
        new_k = out[:, : new_k.shape[2]].unsqueeze(1).contiguous()
        new_v = (out[:, : new_v.shape[2]] * 0.5).unsqueeze(1).contiguous()
        positions = positions + 1
    return outs


def _inputs(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    batch, max_seq_len, hq, hkv, d = 4, 512, 32, 8, 64
    kc = torch.randn(batch, max_seq_len, hkv, d, device="cuda", generator=g).bfloat16()
    vc = torch.randn(batch, max_seq_len, hkv, d, device="cuda", generator=g).bfloat16()
    nk = torch.randn(batch, 1, hkv, d, device="cuda", generator=g).bfloat16()
    nv = torch.randn(batch, 1, hkv, d, device="cuda", generator=g).bfloat16()
    q = torch.randn(batch, hq, d, device="cuda", generator=g).bfloat16()
    positions = torch.tensor([3, 100, 0, 300], dtype=torch.int32, device="cuda")
    return kc, vc, nk, nv, q, positions


@pytest.mark.cuda
def test_a_chain_of_dependent_kernels_gives_the_same_bits_on_and_off(restore_switch) -> None:
    results = []
    for enabled in (False, True):
        set_programmatic_launch(enabled)
        kc, vc, nk, nv, q, pos = _inputs(0)
        outs = _chain(kc, vc, nk, nv, q, pos, steps=20)
        torch.cuda.synchronize()
        results.append((outs, kc, vc))
    (off, kc_off, vc_off), (on, kc_on, vc_on) = results
    assert all(torch.equal(a, b) for a, b in zip(off, on, strict=True))
    assert torch.equal(kc_off, kc_on) and torch.equal(vc_off, vc_on)


@pytest.mark.cuda
def test_a_chain_replayed_from_a_cuda_graph_gives_the_same_bits_on_and_off(restore_switch) -> None:
    results = []
    for enabled in (False, True):
        set_programmatic_launch(enabled)
        kc, vc, nk, nv, q, pos = _inputs(1)
        static_pos = pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _chain(kc.clone(), vc.clone(), nk, nv, q, static_pos, steps=2)  # warm-up
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _chain(kc, vc, nk, nv, q, static_pos, steps=8)
        replays = []
        for shift in range(3):
            static_pos.copy_(pos + 8 * shift)
            graph.replay()
            replays.append([o.clone() for o in outs])
        torch.cuda.synchronize()
        results.append((replays, kc.clone()))
    (off, kc_off), (on, kc_on) = results
    for a, b in zip(off, on, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(kc_off, kc_on)


def test_a_cpu_engine_leaves_the_switch_alone(restore_switch) -> None:
    Engine(build_model(CONFIG, seed=1), settings=Settings(programmatic_launch=False))
    assert _C.programmatic_launch_enabled()  # process-wide, and only CUDA engines set it


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "cuda_graph"])
def test_an_engine_sets_the_switch_and_decodes_the_same_bits_on_and_off(restore_switch,
                                                                        cuda_graph) -> None:
    model = build_model(CONFIG, seed=1, device="cuda", dtype=torch.bfloat16)
    model.init_weights(1, std=0.2)  # peaked logits
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    params = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    results = {}
    for enabled in (False, True):
        engine = None
        collect_dead_graphs()  # the first engine, before the second captures
        engine = Engine(model, cuda_graph=cuda_graph,
                        settings=Settings(programmatic_launch=enabled))
        assert _C.programmatic_launch_enabled() == enabled  # the last engine built sets it
        cache = engine.prepare_cache(2, 32)
        with torch.inference_mode():
            last = torch.stack([engine.prefill(cache, r, p) for r, p in enumerate(prompts)])
            tokens = last.argmax(-1)
            steps = [last]
            for _ in range(6):
                logits = engine.decode_step(cache, 2, tokens)
                steps.append(logits.clone())
                tokens = logits.argmax(-1)
        torch.cuda.synchronize()
        storage = cache.storage().clone()
        done = engine.generate(prompts, params)
        results[enabled] = (steps, storage, [c.token_ids for c in done.completions])
    (off, kc_off, ids_off), (on, kc_on, ids_on) = results[False], results[True]
    assert all(torch.equal(a, b) for a, b in zip(off, on, strict=True))
    assert torch.equal(kc_off, kc_on)
    assert ids_off == ids_on
