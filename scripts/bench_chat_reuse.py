"""What keeping a chat in the KV cache saves: a multi-turn conversation through ChatSession, once
prefilling only each turn's new tokens (reuse) and once re-prefilling the whole conversation
every turn (the baseline, same ids), with per-turn prefill tokens and milliseconds.

Random weights of a config shape (the vocabulary cut to a byte-level BPE trained here, so
nothing is downloaded); answers run a fixed number of tokens (EOS ignored).

    python scripts/bench_chat_reuse.py --config configs/llama-1b.toml --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tokenizer_fixtures import train_byte_level_bpe, write_tokenizer_dir  # noqa: E402

from toyllm.engine.chat import ChatSession  # noqa: E402
from toyllm.engine.generate import Engine  # noqa: E402
from toyllm.engine.sampling import SamplingParams  # noqa: E402
from toyllm.models.config import load_config  # noqa: E402
from toyllm.models.llama import build_model  # noqa: E402
from toyllm.models.tokenizer_files import load_tokenizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/stories15m.toml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--message-words", type=int, default=120)
    ap.add_argument("--answer-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    tok_dir = write_tokenizer_dir(Path(tempfile.mkdtemp()), train_byte_level_bpe())
    tok = load_tokenizer(tok_dir)
    config = load_config(args.config).with_overrides(vocab_size=tok.vocab_size, bos_id=1,
                                                     eos_id=2, max_seq_len=8192)
    model = build_model(config, device=device, dtype=dtype, seed=0)
    params = SamplingParams(max_new_tokens=args.answer_tokens, temperature=0.0,
                            stop_at_eos=False)
    graphs = device.type == "cuda"
    words = "the quick brown fox jumps over a lazy dog while text wraps around".split()
    messages = [" ".join(words[(t + i) % len(words)] for i in range(args.message_words))
                for t in range(args.turns)]
    rows = []
    for reuse in (True, False):
        session = ChatSession(Engine(model, tok, cuda_graph=graphs), params, reuse_cache=reuse)
        session.ask("warm up")  # graphs, allocator, first-call costs
        session.reset()
        for t, m in enumerate(messages):
            turn = session.ask(m)
            rows.append({"reuse": reuse, "turn": t + 1, "context": turn.context_tokens,
                         "prefilled": turn.prefill_tokens, "prefill_ms": turn.prefill_s * 1e3,
                         "decode_tok_s": turn.decode_tok_per_s})
    print(f"{args.config} on {device} ({args.dtype}), {args.answer_tokens}-token answers")
    print(f"{'turn':>4} {'context':>8} | {'reuse: prefilled':>16} {'ms':>8} | "
          f"{'re-prefill: prefilled':>21} {'ms':>8} | {'speed-up':>8}")
    by = {(r["reuse"], r["turn"]): r for r in rows}
    for t in range(1, args.turns + 1):
        a, b = by[(True, t)], by[(False, t)]
        print(f"{t:>4} {a['context']:>8} | {a['prefilled']:>16} {a['prefill_ms']:>8.2f} | "
              f"{b['prefilled']:>21} {b['prefill_ms']:>8.2f} | "
              f"{b['prefill_ms'] / a['prefill_ms']:>7.1f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
