"""Decode speed of a real checkpoint (a GGUF file or a Hugging Face directory): toyllm (eager and
CUDA graphs) against transformers loading the same file, batch 1, greedy, in one run.

    python scripts/bench_real_model.py .models/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \
        --dtype bf16 [--new-tokens 128] [--json out.json]

The prompt is the chat prompt of one question, so both engines decode the same real text.
transformers dequantizes a GGUF file as toyllm does (its own loader, through the `gguf`
package); it runs with its default dynamic cache and with its static cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from toyllm.engine.device import dtype_name, resolve_device, resolve_dtype
from toyllm.engine.generate import Engine
from toyllm.engine.tools.bench import time_engine, time_hf
from toyllm.models.chat_template import chat_prompt_ids
from toyllm.models.model_source import load_model


def hf_load(path: Path, dtype: torch.dtype, device: torch.device):
    import transformers

    if path.is_file():  # a GGUF file
        kw = dict(gguf_file=path.name)
        path = path.parent
    else:
        kw = {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kw)
    return hf.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error(f"--new-tokens: expected an integer >= 2, got {args.new_tokens}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_model(args.model, device, dtype)
    ids = chat_prompt_ids(loaded.tokenizer,
                          [{"role": "user", "content": "Explain what a KV cache is."}])
    rows = []
    engines = {"toyllm eager": False}
    if device.type == "cuda":
        engines["toyllm graph"] = True
    for name, graph in engines.items():
        engine = Engine(loaded.model, loaded.tokenizer, cuda_graph=graph)
        tok_s, ms = time_engine(engine, [ids], args.new_tokens)
        rows.append(dict(engine=name, tok_per_s=tok_s, ms_per_step=ms))
        del engine
    hf = hf_load(args.model, dtype, device)
    for static in (False, True):
        tok_s, ms = time_hf(hf, [ids], args.new_tokens, static=static)
        rows.append(dict(engine=f"transformers {'static' if static else 'dynamic'}",
                         tok_per_s=tok_s, ms_per_step=ms))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model.name} on {name}, {dtype_name(dtype)}, batch 1, prompt {len(ids)} tokens, "
          f"{args.new_tokens} new ({time.strftime('%Y-%m-%d')})")
    print(f"{'engine':<22} {'tok/s':>9} {'ms/step':>9}")
    for r in rows:
        print(f"{r['engine']:<22} {r['tok_per_s']:9.1f} {r['ms_per_step']:9.3f}")
    if args.json:
        args.json.write_text(json.dumps(dict(model=args.model.name, device=name,
                                             dtype=dtype_name(dtype), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
