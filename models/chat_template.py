"""Chat templates: a checkpoint's Jinja template turns a list of messages into the prompt text
the model was trained on, rendered the way transformers' `apply_chat_template` renders it.

    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hi"}])

Templates come from the Hub and are untrusted code, so they run in jinja2's
ImmutableSandboxedEnvironment with transformers' settings: trim_blocks and lstrip_blocks, the
loopcontrols extension, a `tojson` that does not escape HTML, and the globals templates use
(`raise_exception`, `strftime_now`). The special token texts (bos_token, eos_token, ...) and
`add_generation_prompt` are variables of the render. The rendered text carries its own special
tokens, so it is encoded without adding BOS (as transformers does).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, Any]


class ChatTemplateError(ValueError):
    """A model without a chat template, a template that does not parse, or one that raises."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it);
    here it renders its body and nothing else."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not parse: {exc.message} (template line {exc.lineno})"
        ) from None


def render_chat(
    template: str,
    messages: list[Message],
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """The template applied to the messages. kwargs are further template variables."""
    _check_messages(messages)
    compiled = compile_template(template)
    try:
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            **(special_tokens or {}), **kwargs,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template raised: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ChatTemplateError(
            f"the chat template failed: {type(exc).__name__}: {exc}"
        ) from None


def _check_messages(messages: list[Message]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ChatTemplateError(
                f"message {i}: expected {{'role': str, 'content': ...}}, got {m!r}"
            )


def template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or a ChatTemplateError that says what to do."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        where = getattr(tokenizer, "path", None)
        raise ChatTemplateError(
            f"this model has no chat template (no chat_template.jinja, and no chat_template in "
            f"tokenizer_config.json or GGUF metadata{f' beside {where}' if where else ''}); "
            "use plain `toyllm generate` without --chat"
        )
    return template


def chat_prompt_text(tokenizer: Any, messages: list[Message],
                     add_generation_prompt: bool = True) -> str:
    return render_chat(template_of(tokenizer), messages, add_generation_prompt,
                       tokenizer.special_tokens())


def chat_prompt_ids(tokenizer: Any, messages: list[Message],
                    add_generation_prompt: bool = True) -> list[int]:
    """The rendered chat as token ids (no BOS added: the template writes its own)."""
    return tokenizer.encode(chat_prompt_text(tokenizer, messages, add_generation_prompt),
                            bos=False)
