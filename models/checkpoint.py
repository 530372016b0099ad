"""Checkpoints in Hugging Face layout: config.json + model.safetensors (or a sharded set with
model.safetensors.index.json) + tokenizer.model. Safetensors only: nothing is unpickled.

Weight names map both ways by one rule: Hugging Face's name is ours with a "model." prefix,
except the output head (`lm_head.weight`, absent when embeddings are tied).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toyllm.models import validate
from toyllm.models.config import ConfigError, ModelConfig, config_to_hf, load_config
from toyllm.models.llama import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or does not fit its config."""


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for this config (the tied head is not listed)."""
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, each a regular file that resolves inside it."""
    index = directory / INDEX_FILE
    if index.exists() or index.is_symlink():
        text = validate.read_text(inside_checkpoint(directory, INDEX_FILE, str(directory)),
                                  "safetensors index", CheckpointError)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{index}: not valid JSON ({str(exc)[:200]})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(
                f"{index}: expected an object with a non-empty \"weight_map\" mapping tensor "
                f"names to file names, got {validate.describe(weight_map)}")
        bad = [k for k, v in weight_map.items() if not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"{index}: weight_map[{bad[0]!r}]: expected a file name, "
                                  f"got {validate.describe(weight_map[bad[0]])}")
        names = sorted(set(weight_map.values()))
        return [inside_checkpoint(directory, name, f"{index}: weight_map") for name in names]
    single = directory / SINGLE_FILE
    if single.exists() or single.is_symlink():
        return [inside_checkpoint(directory, SINGLE_FILE, str(directory))]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: holds only pickled weights (.bin/.pt); toyllm loads safetensors "
            "only (convert with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")


def inside_checkpoint(directory: Path, name: str, what: str) -> Path:
    """directory / name as a regular file that resolves inside the checkpoint directory. A
    Hugging Face hub snapshot (<repo>/snapshots/<rev>/) links its files to <repo>/blobs/, so
    there the repository folder counts as inside."""
    root = directory.resolve()
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        root = root.parent.parent
    return validate.inside(directory, name, what, CheckpointError, root=root)


def check_tensor(where: str, name: str, t: torch.Tensor) -> None:
    """A weight must be floating point (an int32 tensor cast to float is garbage, not a
    model) and finite (one NaN turns every logit into NaN a few layers later)."""
    if not t.dtype.is_floating_point:
        raise CheckpointError(f"{where}: weight {name} is {str(t.dtype).removeprefix('torch.')}; "
                              "expected a floating-point dtype (fp32, fp16 or bf16)")
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{where}: weight {name} holds {bad} non-finite value(s) "
                              "(NaN or inf); refused")


def load_checkpoint(
    directory: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Load a Hugging Face-layout Llama checkpoint. dtype None keeps the stored dtype."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"expected a checkpoint directory, got a file: {directory}")
    config_file = directory / "config.json"
    if not config_file.exists() and not config_file.is_symlink():
        raise CheckpointError(f"{directory}: not a checkpoint (no config.json)")
    inside_checkpoint(directory, "config.json", str(directory))  # a regular file, inside
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    shapes = expected_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}  # where each tensor came from, for error messages
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for hf_name in f.keys():
                    tensors[from_hf_name(hf_name)] = f.get_tensor(hf_name)
                    files[from_hf_name(hf_name)] = file
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from None
    for name in shapes:
        if name in tensors:
            check_tensor(str(files[name]), to_hf_name(name), tensors[name])
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exporters write the tied copy anyway
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing:
        raise CheckpointError(
            f"{directory}: missing weights {[to_hf_name(n) for n in missing][:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
    if unexpected:
        raise CheckpointError(
            f"{directory}: unexpected weights {[to_hf_name(n) for n in unexpected][:8]}"
        )
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(
                f"{directory}: weight {to_hf_name(name)} has shape {list(got)}, expected "
                f"{list(shape)} from config.json"
            )
    stored = {t.dtype for t in tensors.values()}
    target = dtype or (stored.pop() if len(stored) == 1 else torch.float32)
    if not target.is_floating_point:
        raise CheckpointError(f"{directory}: weights must be floating point, got {target}")
    with torch.device("meta"):
        model = Transformer(config)
    # hand the loaded tensors to the model as its parameters (no copy, no meta-tensor
    # materialisation, which costs a second of torch._refs machinery on first use)
    state = {name: tensors[name].to(device=device, dtype=target) for name in shapes}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = model.inv_freq.to(device)
    return model.eval(), config


def save_checkpoint(
    model: Transformer,
    directory: str | Path,
    tokenizer_path: str | Path | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    metadata: dict[str, str] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json + safetensors (sharded past max_shard_bytes) + tokenizer.model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {}
    for name, p in model.named_parameters():
        if config.tie_embeddings and name == "lm_head.weight":
            continue
        t = p.detach()
        state[to_hf_name(name)] = (t.to(dtype) if dtype else t).contiguous().cpu()
    hf = config_to_hf(config)
    hf["torch_dtype"] = str(dtype or model.dtype).removeprefix("torch.")
    meta = {"format": "pt", **(metadata or {})}
    stale = [directory / SINGLE_FILE, directory / INDEX_FILE]
    for old in stale + list(directory.glob("model-*.safetensors")):
        old.unlink(missing_ok=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(directory / SINGLE_FILE), metadata=meta)
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer_path is not None:
        src = Path(tokenizer_path)
        if src.resolve() != (directory / TOKENIZER_FILE).resolve():
            shutil.copyfile(src, directory / TOKENIZER_FILE)
    return directory


def read_metadata(directory: str | Path) -> dict[str, str]:
    """The string metadata stored in the (first) safetensors file of a checkpoint."""
    files = _weight_files(Path(directory))
    with safe_open(str(files[0]), framework="pt") as f:
        return dict(f.metadata() or {})
