"""OpenAI-compatible request and response bodies for the HTTP server, plus domex's own fields.

Requests are validated here (pydantic), so a malformed body gets a 422/400 that names the field.
`domain` in a request forces a domain; `domex` in a response reports what the matcher decided.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(BaseModel):
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    domain: str | None = None  # force this domain instead of matching
    model: str | None = None  # accepted for compatibility; one server serves one model


class CompletionRequest(SamplingParams):
    prompt: str


class ChatCompletionRequest(SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1)

    def query_text(self) -> str:
        """What the matcher looks at: the last user message."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].content


class DomainRequest(BaseModel):
    """POST /v1/domains: register a domain from demos while serving."""

    name: str = Field(min_length=1, max_length=64)
    demos: list[dict] = Field(min_length=1)
    replace: bool = False


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
