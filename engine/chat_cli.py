"""`toyllm chat`: an interactive session over engine/chat.py's ChatSession, or one answer to
`--prompt` (or to stdin when it is not a terminal).

Commands at the prompt: /reset (forget the conversation), /quit (or Ctrl-D). Ctrl-C during an
answer stops that answer and keeps the session; Ctrl-C at the prompt quits.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.markup import escape

from toyllm.engine.chat import ChatSession, ChatTurn

HELP = "commands: /reset forgets the conversation, /quit ends (also Ctrl-D); Ctrl-C stops an answer"


def _stats_line(turn: ChatTurn) -> str:
    return (f"[{turn.finish_reason}; prefill {turn.prefill_tokens} of {turn.context_tokens} "
            f"context tokens in {turn.prefill_s * 1e3:.1f} ms, {len(turn.token_ids)} tokens at "
            f"{turn.decode_tok_per_s:.1f} tok/s]")


def write_piece(out: Console, piece: str) -> None:
    """A streamed piece of the model's text, as it wrote it, straight to `out`'s stream:
    rich's print would render each piece (~0.2 ms a token, a sixth of a small model's CPU step)
    and replace emoji codes such as ":smile:" in it."""
    stream = out.file
    stream.write(piece)
    stream.flush()


def answer(session: ChatSession, text: str, out: Console, err: Console, stats: bool) -> ChatTurn:
    turn = session.ask(text, on_text=lambda piece: write_piece(out, piece))
    out.print()
    if turn.finish_reason == "interrupted":
        err.print("[dim](stopped)[/]")
    if stats:
        err.print(f"[dim]{escape(_stats_line(turn))}[/]", markup=True)
    return turn


def run_chat(session: ChatSession, prompt: str | None, out: Console, err: Console,
             stats: bool, stdin: TextIO | None = None) -> int:
    """One-shot when a prompt is given or stdin is not a terminal; interactive otherwise."""
    from toyllm.engine.generate import GenerationError
    from toyllm.models.chat_template import ChatTemplateError

    stdin = stdin or sys.stdin
    if prompt is None and not stdin.isatty():
        prompt = stdin.read()
    if prompt is not None:
        answer(session, prompt, out, err, stats)
        return 0
    err.print(f"[dim]{HELP}[/]", markup=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.print()
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/reset":
            session.reset()
            err.print("[dim](conversation reset)[/]", markup=True)
            continue
        if command in ("/help", "/?"):
            err.print(f"[dim]{HELP}[/]", markup=True)
            continue
        try:
            answer(session, line, out, err, stats)
        except (GenerationError, ChatTemplateError) as exc:  # the session goes on
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
