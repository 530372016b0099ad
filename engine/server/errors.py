"""Errors as the OpenAI API returns them: a status code and a JSON body

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": null}}

`ApiError` carries them from wherever a request is found wrong to the app's handler;
`from_validation` turns pydantic's report on a request body into one that names the field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

# loc entries pydantic adds for the members of a union (("prompt", "list[int]", 0)): not fields
_UNION_LABELS = {"str", "int", "float", "bool", "none"}


class ApiError(Exception):
    """A request refused with `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(param: str, message: str) -> ApiError:
    """400 naming `param`; the message starts with it."""
    return ApiError(400, f"{param}: {message}", param=param)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def from_validation(exc: ValidationError) -> ApiError:
    """pydantic's first complaint about a body as a 400 naming its field (`messages.0.role`)."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON body: {first['msg']}")
    if first["type"] == "model_type" and not first["loc"]:
        return ApiError(400, f"expected a JSON object as the body, got {_short(first['input'])}")
    parts = [str(p) for p in first["loc"]
             if not (isinstance(p, str) and (p in _UNION_LABELS or "[" in p))]
    param = ".".join(parts) or None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"{param}: unknown field (this server does not take it)",
                        param=param)
    if first["type"] == "missing":
        return ApiError(400, f"{param}: required field missing", param=param)
    # a union reports one complaint per member: name what each member wanted
    top = first["loc"][0] if first["loc"] else None
    wanted = sorted({e["msg"].removeprefix("Input should be ") for e in errors
                     if e["loc"] and e["loc"][0] == top})
    expected = " or ".join(wanted)
    return ApiError(400, f"{param}: expected {expected}, got {_short(first['input'])}",
                    param=param)
