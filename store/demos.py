"""Demos: the few example texts of a domain, read from JSONL (DESIGN §3).

Each non-blank line is `{"prompt": ..., "response": ...}` (a chat turn; the runtime applies the
tokenizer's chat template) or `{"text": ...}` (plain text, fed as is). Other fields are ignored.
Nothing here touches a tokenizer or a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from domex.errors import DemoError

_FORMS = '{"prompt": ..., "response": ...} or {"text": ...}'


@dataclass(frozen=True)
class Demo:
    """One demonstration: a prompt/response pair, or plain text (prompt is None)."""

    prompt: str | None
    response: str  # the whole text for a plain-text demo

    @property
    def is_chat(self) -> bool:
        return self.prompt is not None

    @property
    def text(self) -> str:
        """Prompt and response as one string, for embedding and for models without a chat template."""
        return self.response if self.prompt is None else f"{self.prompt}\n\n{self.response}"

    def to_json(self) -> dict:
        return {"text": self.response} if self.prompt is None else {"prompt": self.prompt, "response": self.response}

    @classmethod
    def from_json(cls, data, where: str = "demo") -> "Demo":
        """Build from one decoded JSON line; `where` ("file:line") starts every error message."""
        if not isinstance(data, dict):
            raise DemoError(f"{where}: expected a JSON object {_FORMS}, got {type(data).__name__}")
        if "prompt" in data or "response" in data:
            fields = ("prompt", "response")
        elif "text" in data:
            fields = ("text",)
        else:
            keys = ", ".join(repr(k) for k in data) or "none"
            raise DemoError(f"{where}: missing field 'text' (or 'prompt' and 'response'); fields present: {keys}; each line must be {_FORMS}")
        for field in fields:
            if field not in data:
                raise DemoError(f"{where}: missing field {field!r}; each line must be {_FORMS}")
            if not isinstance(data[field], str) or not data[field].strip():
                raise DemoError(f"{where}: field {field!r} must be a non-empty string, got {data[field]!r:.60}")
        if fields == ("text",):
            return cls(None, data["text"])
        return cls(data["prompt"], data["response"])


def parse_demos(lines, source: str) -> list[Demo]:
    """Demos from JSONL lines; `source` names the file in messages. Blank lines are skipped."""
    demos = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise DemoError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be {_FORMS}") from None
        demos.append(Demo.from_json(data, where))
    if not demos:
        raise DemoError(f"{source}: no demos (the file is empty); give at least one line {_FORMS}")
    return demos


def read_demos(path: str | Path) -> list[Demo]:
    """Every demo of a JSONL file; DemoError naming the file, the line and the field on bad input."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DemoError(f"{path}: demo file not found; give a JSONL file with one demo per line") from None
    except UnicodeDecodeError as e:
        raise DemoError(f"{path}: not UTF-8 text (byte {e.start}); save the demos as UTF-8 JSONL") from None
    return parse_demos(text.splitlines(), str(path))
