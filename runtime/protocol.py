"""OpenAI-compatible request and response bodies for the HTTP server, plus domex's own fields.

Requests are validated here (pydantic), so a malformed body gets a 400 that names the field: a
prompt is non-empty, domain names pass `check_name` (the server refuses prompts holding lone
surrogates). `domain` in a request forces a domain; `domex` in a response reports what the matcher
decided. Every error, of the server and of the gateway, has OpenAI's shape
`{"error": {"message", "type", "code"}}` (`error_response`, `install_error_handlers`).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from domex.store.pattern import check_name

from .query import message_text, query_text

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}


def error_body(status: int, message: str, code: str) -> dict:
    """OpenAI's error object; `type` follows the status, `code` names the case (snake_case)."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def error_code(exc: Exception) -> str:
    """snake_case of the exception's class: UnknownDomain -> unknown_domain."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content):  # OpenAI content parts -> their text
        return message_text(content) if isinstance(content, list) else content


class StreamOptions(BaseModel):
    include_usage: bool = False  # OpenAI's: one more chunk before [DONE], with no choices and the usage


class SamplingParams(BaseModel):
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    domain: str | None = None  # force this domain instead of matching
    model: str | None = None  # accepted for compatibility; one server serves one model

    @field_validator("domain")
    @classmethod
    def _domain_name(cls, name: str | None) -> str | None:
        return None if name is None else check_name(name)


class CompletionRequest(SamplingParams):
    prompt: str = Field(min_length=1)


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)

    def query_text(self) -> str:
        """What the matcher looks at: the user turns, the newest first."""
        return query_text(self.model_dump(), chat=True)


class DomainRequest(BaseModel):
    """POST /v1/domains: register a domain from demos while serving."""

    name: str
    demos: list[dict] = Field(min_length=1)
    replace: bool = False

    _name = field_validator("name")(check_name)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_body(rid: str, model: str, text: str, finish: str | None, domex: dict, usage: dict | None,
                    chat: bool) -> dict:
    """One response object (or one stream chunk when `usage` is None and `finish` may be None)."""
    if chat:
        key = "message" if usage is not None else "delta"
        choice = {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion" if usage is not None else "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice], "domex": domex}
    if usage is not None:
        body["usage"] = usage
    return body


def invalid_request_message(errors) -> str:
    """pydantic's errors as one line: 'field.sub: what is wrong; ...'."""
    return "invalid request: " + "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)


HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_shape(exc: Exception) -> tuple[int, str, str]:
    """(status, message, code) of any exception; an unexpected one says only its type (details go to the log)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from domex.errors import DomexError

    if isinstance(exc, DomexError):
        return exc.http_status, str(exc), error_code(exc)
    if isinstance(exc, RequestValidationError):
        return 400, invalid_request_message(exc.errors()), "invalid_request"
    if isinstance(exc, HTTPException):
        return exc.status_code, str(exc.detail), HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return 500, f"internal error ({type(exc).__name__}); the server log has the details", "internal_error"


def install_error_handlers(app, rewrite=lambda message: message, record=None) -> None:
    """Every error reply of `app` in the one shape: DomexError, validation, routing (404/405), body, unexpected.

    rewrite(message) edits messages (the server takes absolute paths out); record(request, status) is
    told of every error reply (the server's metrics).
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from domex.errors import DomexError

    async def handle(request, exc: Exception):
        status, message, code = error_shape(exc)
        if record is not None:
            record(request, status)
        retry = getattr(exc, "retry_after", None)  # Overloaded (429): when to come back
        return error_response(status, rewrite(message), code, {"Retry-After": str(retry)} if retry else None)

    for kind in (DomexError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, handle)
