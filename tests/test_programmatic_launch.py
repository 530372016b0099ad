"""Programmatic dependent launch (csrc/programmatic_launch.cuh): the extension's kernels may
start before the kernel ahead of them in the stream has finished, and wait on the device for
their inputs. These tests check that this changes no result: a chain of dependent extension
kernels (each reading what the previous one wrote) gives the same bits with the launch
attribute on and off, eagerly and replayed from a CUDA graph, and a whole model's decode too."""

from __future__ import annotations

import pytest
import torch

from toyllm.engine.ops.kv_cache import _C, decode_attention, kv_update, set_programmatic_launch


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
