"""Request bodies of the OpenAI API as this server takes them, and OpenAI-style errors.

Bodies are validated strictly before anything reaches the engine: unknown fields,
wrong types and out-of-range values are an `ApiError` naming the field
(`param`). Fields of the OpenAI API that this server does not implement are
accepted only at their neutral value (e.g. `presence_penalty=0`, `echo=false`) and
refused otherwise, rather than silently ignored.

Extensions (documented in the README): `top_k` (0: off), `ignore_eos`, `priority`
(larger is more important; for the priority policies), `return_token_ids` (each
choice also carries its token ids; always on for a model without a tokenizer).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

MAX_STOPS = 4  # OpenAI's limit


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


NonNegInt = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**31)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    logit_bias: dict[str, float] | None = None
    # extensions
    top_k: NonNegInt = 0
    ignore_eos: bool = False
    priority: int = 0
    return_token_ids: bool = False

    @pydantic.field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=1)] | None = None
    echo: Literal[False] = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: None = None

    @pydantic.field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @pydantic.field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info: pydantic.ValidationInfo):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of is not supported (only best_of == n)")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict:
        content = self.content
        if not isinstance(content, str):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Literal[0] | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """The body as `model`, or an ApiError (400) saying what is wrong and where."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
        err = errors[0]
        param = _field(err["loc"])
        kind = err["type"]
        inside = [x for x in errors if (_field(x["loc"]) or "").startswith(param or "")]
        members = [_member(x["loc"]) for x in inside]
        if kind == "missing":
            msg = f"missing required field '{param}'"
        elif kind == "extra_forbidden":
            msg = f"unknown or unsupported field '{param}'"
        elif len(members) > 1 and all(members):  # no member of a union matched
            msg = f"invalid '{param}': expected one of {', '.join(dict.fromkeys(members))}"
        else:
            msg = f"invalid '{param}': {err['msg']}"
        if kind not in ("missing", "extra_forbidden"):
            msg += f" (got {_short(err.get('input'))})"
        raise ApiError(400, msg, param=param) from None


def _is_type_name(p) -> bool:
    """A union member or validator in an error location (e.g. "list[int]"), not a field."""
    return isinstance(p, str) and (
        p in ("str", "int", "float", "bool", "none") or "[" in p or p.startswith("function-")
    )


def _field(loc: tuple) -> str | None:
    return ".".join(str(p) for p in loc if not _is_type_name(p)) or None


def _member(loc: tuple) -> str | None:
    names = [p for p in loc if _is_type_name(p) and not p.startswith("function-")]
    return names[0] if names else None


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
