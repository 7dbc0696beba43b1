"""A request's query: the text the matcher reads (DESIGN §3 online 1).

A completion's query is its prompt; a chat's is its user turns, the newest first; `domex route`
reads one query per line of a file (plain text, or JSONL with a text or a chat).
"""

from __future__ import annotations

import json
from pathlib import Path

from domex.errors import ConfigError


def message_text(content) -> str:
    """A chat message's text: the string, or the text of OpenAI content parts joined."""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def query_text(body: dict, chat: bool) -> str:
    """What the matcher reads: a completion's prompt, or a chat's user turns, the newest first.

    A follow-up ("and the perimeter?", "now make it skip empty lines") says little about its domain
    on its own; the turns before it do. Newest first, so the turn being answered leads, and when the
    embedder or the routing view cuts a long conversation short, the oldest turns go. Of the 48 dev
    chats (patterns/dev/conversations.jsonl) the last turn alone routes 38 right and flags 10; the user
    turns newest first route 44 and flag 1, but keep 3 of the 8 whose last turn changes domain with the
    earlier domain (alone: all 8 right).
    """
    if chat:
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        users = [m for m in messages if m.get("role") == "user"] or messages
        return "\n\n".join(message_text(m.get("content", "")) for m in reversed(users))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def read_queries(path: str | Path) -> list[tuple[int, str]]:
    """(line number, query) of each non-blank line: plain text, or for a .jsonl file a JSON object's 'text'
    or a chat's query_text (an object with 'messages', as `domex serve` reads a chat)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read queries from {path}: {e}") from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append((number, line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not JSON ({e.msg}); a .jsonl file holds one {{\"text\": ...}} per line") from None
        chat = isinstance(record, dict) and "text" not in record and isinstance(record.get("messages"), list)
        text = query_text(record, chat=True) if chat else record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{path}:{number}: field 'text' must be a non-empty string; a .jsonl file holds one "
                              "{\"text\": ...} or one chat {\"messages\": [...]} per line (other files: one "
                              "plain-text query per line)")
        out.append((number, text))
    if not out:
        raise ConfigError(f"{path} holds no queries")
    return out
