"""`toyllm check`: the CPU matrix passes, the report is machine-readable, bad requests exit 2,
and every planted cache bug (wrong write position, a skipped layer, an off-by-one attention
length) makes the harness fail: a bug the harness cannot catch would be a harness bug."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import toyllm.engine.cached_attention as cached_attention
from toyllm.engine.cached_attention import DecodeStep, PrefillStep
from toyllm.engine.check.cases import LLAMA3_ROPE, default_matrix, model_config
from toyllm.engine.check.harness import CheckError, decode_steps, run_check, select_cases
from toyllm.engine.check.reference import reference_logits
from toyllm.engine.cli import app
from toyllm.engine.forward import EngineForward
from toyllm.engine.ops import cpu_step, elementwise, gemv, gemv_norm, rope_kv
from toyllm.models.llama import build_model

# Cases the planted-bug tests run: batch 1 and ragged, whole and chunked prefill, the cache's
# end, and prompts that fill the cache (decode only in the greedy run's shorter row).
PLANTED_FILTER = ["gqa-ragged", "mha-chunked", "gqa-fill-to-end", "mha-prompt-at-end"]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=160)


def run_report(tmp_path: Path, configs: list[str] | None, hf: bool = False,
               device: str = "cpu") -> tuple[int, dict[str, Any]]:
    path = tmp_path / "report.json"
    code = run_check(configs, None, device, path, quiet(), hf=hf)
    return code, json.loads(path.read_text())


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    """The whole default CPU matrix, once for this module (HF witness on when installed)."""
    return run_report(tmp_path_factory.mktemp("check"), None, hf=True)


# the matrix passes --------------------------------------------------------------------------
def test_default_cpu_matrix_passes_every_case(cpu_report: tuple[int, dict[str, Any]]) -> None:
    code, report = cpu_report
    bad = {c["name"]: c["failures"] or c["error"] for c in report["cases"]
           if c["verdict"] != "PASS"}
    assert bad == {}
    assert code == 0 and report["summary"]["verdict"] == "PASS"
    assert len(report["cases"]) == len(default_matrix("cpu")) >= 12


def test_cpu_matrix_covers_layouts_head_dims_and_cache_situations() -> None:
    cases = default_matrix("cpu")
    configs = [c.model_config() for c in cases]
    assert {(c.num_heads == c.num_kv_heads, c.num_kv_heads == 1) for c in configs} == {
        (True, False), (False, False), (False, True)}  # MHA, GQA, MQA
    assert {32, 64, 128} <= {c.head_dim for c in configs}
    # a head_dim whose fp16 K row is not a multiple of 16 bytes (RoPE needs it even)
    assert any((c.head_dim * 2) % 16 and c.head_dim % 2 == 0 for c in configs)
    assert {True, False} == {c.tie_embeddings for c in configs}
    assert any(c.rope_scaling == LLAMA3_ROPE for c in configs)
    assert any(len(c.prompt_lens) == 1 for c in cases)
    assert any(len(set(c.prompt_lens)) > 1 for c in cases)  # ragged
    assert any(c.prefill_chunk for c in cases) and any(not c.prefill_chunk for c in cases)
    assert any(c.reset_between_requests for c in cases)
    steps = {c.name: decode_steps(c.prompt_lens, c.new_tokens) for c in cases}
    # the longest row decodes into the cache's last slot
    assert any(c.fill_to_end and steps[c.name][0] > 0 for c in cases)
    # a prompt fills the cache: that row never decodes
    assert any(c.fill_to_end and 0 in steps[c.name] for c in cases)
    assert {c.dtype for c in cases} == {"fp32"}


def test_llama3_rope_scaling_changes_logits_at_the_tested_positions() -> None:
    scaled = model_config(dict(num_heads=4, num_kv_heads=2, head_dim=32,
                               rope_theta=500000.0, rope_scaling=LLAMA3_ROPE))
    plain = scaled.with_overrides(rope_scaling=None)
    ids = list(range(3, 43))  # the llama3 case's prompt length
    a = reference_logits(build_model(scaled), ids)
    b = reference_logits(build_model(plain), ids)
    assert (a - b).abs().max().item() > 1e-2


def test_report_has_cases_errors_margins_tolerances_versions_and_device(
    cpu_report: tuple[int, dict[str, Any]],
) -> None:
    _, report = cpu_report
    assert {"tool", "date", "versions", "devices", "tolerances", "cases", "summary",
            "hf_witness"} <= set(report)
    assert {"python", "torch", "transformers"} <= set(report["versions"])
    assert "cpu" in report["devices"]
    assert report["tolerances"]["dtypes"]["fp32"]["threshold"] == 1e-4
    assert report["tolerances"]["dtypes"]["fp16"]["threshold"] == 2e-3
    assert report["tolerances"]["dtypes"]["bf16"]["threshold"] == 1e-2
    assert report["tolerances"]["hf_fp32_rel"] == 1e-5
    for case in report["cases"]:
        assert {"name", "dtype", "device", "verdict", "max_abs", "rel", "argmax_agree",
                "greedy_match", "divergences", "margin", "hf_rel", "error", "failures",
                "case"} <= set(case)
        assert case["max_abs"] <= 1e-4 and case["argmax_agree"] == 1.0
    if report["hf_witness"] == "on":  # the serving cases leave the HF witness to the others
        assert all(c["hf_rel"] <= 1e-5 and c["hf_greedy_match"] for c in report["cases"]
                   if not c["name"].startswith("serving-"))


# the command line -----------------------------------------------------------------------------
def test_cli_check_on_a_filter_passes_and_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["check", "--configs", "mha-hd32", "--device", "cpu", "--no-hf", "--json",
              str(path)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "mha-hd32" in result.output
    report = json.loads(path.read_text())
    assert [c["name"] for c in report["cases"]] == ["mha-hd32"]


@pytest.mark.parametrize(("args", "message"), [
    (["--dtypes", "fp64"], "unknown dtype 'fp64'"),
    (["--device", "cpu", "--dtypes", "fp16"], "need(s) a CUDA GPU"),
    (["--device", "cpu", "--configs", "no-such-case"], "'no-such-case' match(es) no case"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_cli_check_bad_request_exits_2_with_one_clear_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["check", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_select_cases_filters_by_name_substring() -> None:
    cases = select_cases(["ragged", "tied"], ["fp32"], "cpu")
    assert {c.name for c in cases} == {"gqa-ragged", "mqa-ragged-chunked", "gqa-tied"}
    with pytest.raises(CheckError, match="bf16"):
        select_cases(None, ["bf16"], "cpu")


# planted bugs: each must make `toyllm check` fail -----------------------------------------
class _CacheProxy:
    """A KVCache stand-in that forwards everything but `update` (set by subclasses)."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


def shift_in_bounds(positions: torch.Tensor, num_tokens: int, max_seq_len: int) -> torch.Tensor:
    """positions + 1 for active rows whose tokens still fit (the bug writes in the wrong slot
    rather than tripping the bounds check: the harness must see it in the numbers)."""
    fits = (positions >= 0) & (positions + 1 + num_tokens <= max_seq_len)
    return torch.where(fits, positions + 1, positions)


def plant_prefill_write_shifted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill writes its K/V one position too far (start+1)."""
    real_attend = PrefillStep.attend
    real_update = cached_attention.kv_update

    class Shifted(_CacheProxy):
        def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                   seq: int | None = None) -> None:
            rows = slice(0, k.shape[0]) if seq is None else slice(seq, seq + 1)
            keys, values = self._cache.keys(layer)[rows], self._cache.values(layer)[rows]
            real_update(keys, values, k, v,
                        shift_in_bounds(self._cache.device_positions()[rows], k.shape[1],
                                        keys.shape[1]))

    def attend(self: PrefillStep, layer: int, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        return real_attend(replace(self, cache=Shifted(self.cache)), layer, q, k, v)

    monkeypatch.setattr(PrefillStep, "attend", attend)


def plant_decode_write_shifted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode writes the new token's K/V at position p+1 instead of p (through kv_update, or
    rope_kv_update where the engine hands over the fused projection)."""
    real_update = cached_attention.kv_update
    real_rope_kv = rope_kv.rope_kv_update

    def shifted(k_cache: torch.Tensor, v_cache: torch.Tensor, new_k: torch.Tensor,
                new_v: torch.Tensor, positions: torch.Tensor) -> None:
        real_update(k_cache, v_cache, new_k, new_v,
                    shift_in_bounds(positions, new_k.shape[1], k_cache.shape[1]))

    def shifted_rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                        num_q_heads: int) -> torch.Tensor:
        return real_rope_kv(qkv, cos, sin, k_cache, v_cache,
                            shift_in_bounds(positions, 1, k_cache.shape[1]), num_q_heads)

    monkeypatch.setattr(cached_attention, "kv_update", shifted)
    monkeypatch.setattr(rope_kv, "rope_kv_update", shifted_rope_kv)


def plant_skipped_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer 1's K/V are never written (prefill or decode); it attends over zeros."""
    real_prefill, real_attend = PrefillStep.attend, EngineForward._attend
    real_update = cached_attention.kv_update
    real_rope_kv = rope_kv.rope_kv_update
    layer_now = [0]

    class NoLayer1(_CacheProxy):
        def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                   seq: int | None = None) -> None:
            if layer != 1:
                self._cache.update(layer, k, v, seq=seq)

    def prefill(self: PrefillStep, layer: int, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        return real_prefill(replace(self, cache=NoLayer1(self.cache)), layer, q, k, v)

    def attend(self: EngineForward, i: int, *args: Any) -> torch.Tensor:
        layer_now[0] = i  # the layer whose K/V the step writes next
        return real_attend(self, i, *args)

    def update(*args: torch.Tensor) -> None:
        if layer_now[0] != 1:
            real_update(*args)

    def skip_rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     num_q_heads: int) -> torch.Tensor:
        if layer_now[0] == 1:  # every row finished: q is still rotated, nothing is written
            positions = torch.full_like(positions, -1)
        return real_rope_kv(qkv, cos, sin, k_cache, v_cache, positions, num_q_heads)

    monkeypatch.setattr(PrefillStep, "attend", prefill)
    monkeypatch.setattr(EngineForward, "_attend", attend)
    monkeypatch.setattr(cached_attention, "kv_update", update)
    monkeypatch.setattr(rope_kv, "rope_kv_update", skip_rope_kv)


def plant_attention_length(monkeypatch: pytest.MonkeyPatch, delta: int) -> None:
    """Decode attends over p_b + 1 + delta keys instead of p_b + 1 (reading all positions,
    so one key more reaches an unwritten slot)."""
    real_attend_cached = DecodeStep.attend_cached
    real_attention = cached_attention.grouped_attention
    in_decode = [False]

    def attend_cached(self: DecodeStep, layer: int, q: torch.Tensor) -> torch.Tensor:
        in_decode[0] = True
        try:
            return real_attend_cached(replace(self, span=None, use_kernel=False), layer, q)
        finally:
            in_decode[0] = False

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  allowed: torch.Tensor | None) -> torch.Tensor:
        if in_decode[0] and allowed is not None:  # allowed: [rows, 1, keys]
            lens = allowed.sum(-1, keepdim=True) + delta
            allowed = torch.arange(allowed.shape[-1], device=allowed.device) < lens
        return real_attention(q, k, v, allowed)

    monkeypatch.setattr(DecodeStep, "attend_cached", attend_cached)
    monkeypatch.setattr(cached_attention, "grouped_attention", attention)


def plant_wrong_fused_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fused op of the engine returns values 1% off: the elementwise kernels (CUDA) and
    CPU loops, the GEMVs, the norm-fused products and decode attention."""

    def off(t: torch.Tensor) -> torch.Tensor:
        return t * 1.01

    for name in ("rms_norm", "rope", "silu_mul"):
        real = getattr(elementwise, name)
        monkeypatch.setattr(elementwise, name, lambda *a, _real=real: off(_real(*a)))
    real_add = elementwise.add_rms_norm

    def add_rms_norm(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        s, h = real_add(*args)
        return s, off(h)

    monkeypatch.setattr(elementwise, "add_rms_norm", add_rms_norm)
    for name in ("_gemv", "_gemv_silu_mul"):
        real = getattr(gemv, name)
        monkeypatch.setattr(gemv, name, lambda *a, _real=real: off(_real(*a)))
    for name in ("_op", "_silu_op", "_rope_op"):  # (sum, product): the product goes wrong
        real = getattr(gemv_norm, name)
        monkeypatch.setattr(gemv_norm, name,
                            lambda *a, _real=real: (lambda s, y: (s, off(y)))(*_real(*a)))
    real_step = cpu_step._op  # the whole CPU decode step: logits
    monkeypatch.setattr(cpu_step, "_op", lambda *a: off(real_step(*a)))


def test_reference_is_independent_of_the_engines_fused_ops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The witness shares no kernel with what it checks: with every fused op of the engine
    made wrong, the reference's logits keep their bits and `toyllm check` fails."""
    model = build_model(model_config(dict(num_heads=4, num_kv_heads=2)))
    ids = list(range(3, 30))
    before = reference_logits(model, ids)
    plant_wrong_fused_ops(monkeypatch)
    assert torch.equal(reference_logits(model, ids), before)
    code, report = run_report(tmp_path, ["gqa-ragged", "mha-chunked"])
    assert code == 1 and report["summary"]["verdict"] == "FAIL"
    assert all(c["verdict"] == "FAIL" for c in report["cases"])


PLANTED = {
    "prefill_write_at_start_plus_1": plant_prefill_write_shifted,
    "decode_write_at_position_plus_1": plant_decode_write_shifted,
    "layer_1_kv_never_written": plant_skipped_layer,
    "decode_attends_one_key_fewer": lambda mp: plant_attention_length(mp, -1),
    "decode_attends_one_key_more": lambda mp: plant_attention_length(mp, +1),
}


def plant_cpu_step_positions(monkeypatch: pytest.MonkeyPatch, delta: int) -> None:
    """The whole CPU decode step (toyllm::cpu_decode_step) is handed positions + delta: every
    layer writes K/V one slot off and attends over one key more (+1) or fewer (-1; a row at 0
    becomes a finished row that writes nothing), and RoPE turns by the wrong angle."""
    real = cpu_step._op

    def shifted(*args: Any) -> torch.Tensor:
        args = list(args)
        positions, k_caches = args[9], args[7]
        args[9] = (shift_in_bounds(positions, 1, k_caches[0].shape[1]) if delta > 0
                   else positions - 1)
        return real(*args)

    monkeypatch.setattr(cpu_step, "_op", shifted)


PLANTED_CPU_STEP = {
    "write_and_attend_at_position_plus_1": lambda mp: plant_cpu_step_positions(mp, +1),
    "write_and_attend_at_position_minus_1": lambda mp: plant_cpu_step_positions(mp, -1),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_cache_bug_makes_check_fail(bug: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # the bugs are planted in the separate ops' Python seams (kv_update, rope_kv_update,
    # attend_cached), which a CPU decode step takes below FULL; at FULL the whole step is one
    # call (its own planted bugs: the next test)
    monkeypatch.setenv("TOYLLM_FUSION", "silu_gemv")
    PLANTED[bug](monkeypatch)
    code, report = run_report(tmp_path, PLANTED_FILTER)
    assert code == 1 and report["summary"]["verdict"] == "FAIL"
    verdicts = {c["name"]: c["verdict"] for c in report["cases"]}
    assert set(verdicts) == {"gqa-ragged", "mha-chunked", "gqa-fill-to-end",
                             "mha-prompt-at-end"}
    assert all(v == "FAIL" for v in verdicts.values()), verdicts  # a finding, not a crash
    for case in report["cases"]:  # the logits comparison itself sees it, not only greedy
        assert any(f.startswith("teacher-forced") for f in case["failures"]), case["name"]
        assert case["max_abs"] > 1e-3


@pytest.mark.parametrize("bug", sorted(PLANTED_CPU_STEP))
def test_planted_bug_in_the_cpu_decode_step_makes_check_fail(
        bug: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    PLANTED_CPU_STEP[bug](monkeypatch)
    planted = cpu_step._op
    monkeypatch.setattr(cpu_step, "_op", lambda *a: calls.append(1) or planted(*a))
    code, report = run_report(tmp_path, PLANTED_FILTER)
    assert calls  # the default (FULL) CPU decode took the whole-step op
    assert code == 1 and report["summary"]["verdict"] == "FAIL"
    for case in report["cases"]:
        assert case["verdict"] == "FAIL", case["name"]
        assert any(f.startswith("teacher-forced") for f in case["failures"]), case["name"]


# GPU ------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_default_cuda_matrix_passes_every_case(tmp_path: Path) -> None:
    code, report = run_report(tmp_path, None, hf=True, device="cuda")
    bad = {f"{c['name']}/{c['dtype']}": c["failures"] or c["error"] for c in report["cases"]
           if c["verdict"] != "PASS"}
    assert bad == {}
    assert code == 0
    assert {c["dtype"] for c in report["cases"]} == {"fp32", "fp16", "bf16"}


@pytest.mark.cuda
def test_planted_decode_write_bug_fails_the_cuda_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    plant_decode_write_shifted(monkeypatch)
    code, report = run_report(tmp_path, ["gqa-ragged", "mha-chunked"], device="cuda")
    assert code == 1
    assert {c["dtype"] for c in report["cases"]} == {"fp32", "fp16", "bf16"}
    assert all(c["verdict"] == "FAIL" for c in report["cases"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_on_cuda_is_independent_of_the_engines_fused_ops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
) -> None:
    model = build_model(model_config(dict(num_heads=4, num_kv_heads=2)), device="cuda",
                        dtype=dtype)
    ids = list(range(3, 30))
    before = reference_logits(model, ids)
    plant_wrong_fused_ops(monkeypatch)
    assert torch.equal(reference_logits(model, ids), before)
    code, report = run_report(tmp_path, ["gqa-ragged", "mha-chunked"], device="cuda")
    assert code == 1
    assert all(c["verdict"] == "FAIL" for c in report["cases"])
