"""The engine's settings: one dataclass, one reader of the environment, refusals that name the
variable and the value, and the kernel choices they make in engine/forward.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from toyllm.engine.cached_attention import PrefillStep
from toyllm.engine.forward import EngineForward, decode_attention_kernel, decode_kernel_max_rows
from toyllm.engine.generate import Engine
from toyllm.engine.ops import elementwise
from toyllm.engine.ops.kv_cache import KVCache
from toyllm.engine.sampling import SamplingParams
from toyllm.engine.settings import Fusion, Settings, SettingsError
from toyllm.models.config import ModelConfig
from toyllm.models.llama import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_fastest_paths() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.fusion is Fusion.FULL and s.cpu_gemv and s.cuda_gemv and s.cuda_argmax
    assert s.decode_attention == "kernel" and s.decode_kernel_max_rows is None
    assert s.programmatic_launch and s.cuda_gemv_max_bytes == 128 * 2**20


@pytest.mark.parametrize("env, field, value", [
    ({"TOYLLM_FUSION": "none"}, "fusion", Fusion.NONE),
    ({"TOYLLM_FUSION": "ELEMENTWISE"}, "fusion", Fusion.ELEMENTWISE),
    ({"TOYLLM_FUSION": "3"}, "fusion", Fusion.SILU_GEMV),
    ({"TOYLLM_CPU_GEMV": "0"}, "cpu_gemv", False),
    ({"TOYLLM_CUDA_GEMV": "false"}, "cuda_gemv", False),
    ({"TOYLLM_CUDA_GEMV_MAX_MIB": "64"}, "cuda_gemv_max_mib", 64),
    ({"TOYLLM_CUDA_ARGMAX": "0"}, "cuda_argmax", False),
    ({"TOYLLM_DECODE_ATTENTION": "sdpa"}, "decode_attention", "sdpa"),
    ({"TOYLLM_DECODE_KERNEL_MAX_ROWS": "4"}, "decode_kernel_max_rows", 4),
    ({"TOYLLM_PDL": "0"}, "programmatic_launch", False),
    ({"TOYLLM_PDL": ""}, "programmatic_launch", True),  # empty: the default
])
def test_each_variable_sets_its_field(env: dict[str, str], field: str, value: object) -> None:
    assert getattr(Settings.from_env(env), field) == value


@pytest.mark.parametrize("name, value", [
    ("TOYLLM_FUSION", "most"), ("TOYLLM_FUSION", "7"), ("TOYLLM_CPU_GEMV", "yes"),
    ("TOYLLM_CUDA_GEMV", "2"), ("TOYLLM_CUDA_ARGMAX", "on"), ("TOYLLM_PDL", "off"),
    ("TOYLLM_DECODE_ATTENTION", "flash"), ("TOYLLM_DECODE_KERNEL_MAX_ROWS", "lots"),
    ("TOYLLM_DECODE_KERNEL_MAX_ROWS", "-1"), ("TOYLLM_DECODE_KERNEL_MAX_ROWS", "1.5"),
    ("TOYLLM_CUDA_GEMV_MAX_MIB", "lots"), ("TOYLLM_CUDA_GEMV_MAX_MIB", "1e99"),
    ("TOYLLM_CUDA_GEMV_MAX_MIB", "9" * 40),
])
def test_a_bad_value_names_the_variable_and_the_value(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{name}: expected .*, got '{re.escape(value)}'$"):
        Settings.from_env({name: value})


@pytest.mark.parametrize("name", ["TOYLLM_FUSED_OPS",
                                  "TOYLLM_FUSED_NORM_GEMV", "TOYLLM_DECODE_MMA",
                                  "TOYLLM_STAGED_WARPS", "TOYLLM_CPU_DECODE_ATTENTION"])
def test_a_switch_of_earlier_versions_is_refused_with_what_replaced_it(name: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{name} is no longer read: use "):
        Settings.from_env({name: "0"})


@pytest.mark.parametrize("kwargs, message", [
    (dict(fusion=9), r"^fusion: expected one of none, elementwise"),
    (dict(cpu_gemv=1), r"^cpu_gemv: expected True or False, got 1$"),
    (dict(decode_attention="flash"), r"^decode_attention: expected 'kernel' or 'sdpa'"),
    (dict(cuda_gemv_max_mib=-1), r"^cuda_gemv_max_mib: expected a whole number >= 0, got -1$"),
    (dict(decode_kernel_max_rows=2.5), r"^decode_kernel_max_rows: expected a whole number"),
])
def test_bad_arguments_are_refused_with_the_field_named(kwargs: dict, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**kwargs)


def test_overrides_win_over_the_environment() -> None:
    s = Settings.from_env({"TOYLLM_FUSION": "none"}, fusion=Fusion.FULL, cpu_gemv=False)
    assert s.fusion is Fusion.FULL and not s.cpu_gemv


def test_the_environment_is_read_in_one_function_of_one_module() -> None:
    readers = []
    for folder in ("engine", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "os.environ" in line or "getenv(" in line:
                    readers.append(f"{path.relative_to(ROOT)}:{n}")
    assert readers == [f"engine/settings.py:{_line_of('engine/settings.py', 'os.environ')}"]


def test_csrc_reads_no_environment_variable() -> None:
    hits = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*"))
            if p.is_file() and ("TOYLLM_" in p.read_text() or "getenv" in p.read_text())]
    assert hits == []


def test_models_import_nothing_from_the_engine() -> None:
    for path in sorted((ROOT / "models").rglob("*.py")):
        text = path.read_text()
        assert "toyllm.engine" not in text and "from engine" not in text, path


def _line_of(relative: str, needle: str) -> int:
    lines = (ROOT / relative).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if needle in line)


# the choices they make --------------------------------------------------------------------
def test_decode_attention_choice_follows_the_settings() -> None:
    cpu, f32, bf16 = torch.device("cpu"), torch.float32, torch.bfloat16
    assert decode_attention_kernel(Settings(), cpu, 8, f32, 32)
    assert not decode_attention_kernel(Settings(), cpu, 9, f32, 32)
    assert not decode_attention_kernel(Settings(), cpu, 1, bf16, 32)  # fp32 loop only
    assert not decode_attention_kernel(Settings(decode_attention="sdpa"), cpu, 1, f32, 32)
    assert decode_attention_kernel(Settings(decode_kernel_max_rows=16), cpu, 16, f32, 32)
    assert decode_kernel_max_rows(Settings(), bf16, 64) is None  # tensor cores: any rows
    assert decode_kernel_max_rows(Settings(), f32, 64) == 8
    assert decode_kernel_max_rows(Settings(), bf16, 32) == 8
    assert decode_kernel_max_rows(Settings(decode_kernel_max_rows=2), bf16, 64) == 2


def _tiny() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=48, max_seq_len=32)


@pytest.mark.parametrize("fusion", list(Fusion))
def test_every_fusion_level_gives_the_same_tokens_on_the_cpu(fusion: Fusion) -> None:
    model = build_model(_tiny(), seed=3)
    ref = Engine(build_model(_tiny(), seed=3), settings=Settings(fusion=Fusion.NONE))
    eng = Engine(model, settings=Settings(fusion=fusion))
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    a = ref.generate([[1, 2, 3, 4, 5]], params).completions[0].token_ids
    b = eng.generate([[1, 2, 3, 4, 5]], params).completions[0].token_ids
    assert a == b


def test_engine_forward_at_fusion_none_runs_no_elementwise_operator(monkeypatch) -> None:
    calls = []
    for name in ("rms_norm", "add_rms_norm", "rope", "silu_mul"):
        real = getattr(elementwise, name)
        monkeypatch.setattr(elementwise, name,
                            lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    model = build_model(_tiny())
    tokens = torch.tensor([[1, 2, 3]])
    positions = torch.arange(3).unsqueeze(0)
    def cache() -> KVCache:
        return KVCache(num_layers=2, max_seq_len=8, num_kv_heads=2, head_dim=8,
                       dtype=torch.float32, device="cpu")

    EngineForward(model, Settings(fusion=Fusion.NONE))(tokens, positions, PrefillStep(cache(), 0))
    assert calls == []
    EngineForward(model, Settings())(tokens, positions, PrefillStep(cache(), 0))
    assert {"rms_norm", "add_rms_norm", "rope", "silu_mul"} <= set(calls)
