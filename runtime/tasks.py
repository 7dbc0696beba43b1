"""Task accuracy: does a greedy generation under a mask solve tasks whose answers can be checked?

Next-token accuracy says how well a mask keeps the model's text; the pruning papers also ask
whether it still gets answers right. `<eval-dir>/tasks/<domain>.jsonl` holds one task a line:

    {"prompt": ..., "answer": "42"}                exact answer: the first `Answer: X` of the
                                                   generation has X == answer
    {"prompt": ..., "query": ..., "database": f}   same rows: the generation's first SQL statement
                                                   returns the rows the reference query returns, on
                                                   the SQLite database the script f (beside the task
                                                   file) builds; in order only where the reference
                                                   has ORDER BY

The prompt is sent as one user turn of the chat template, as `POST /v1/chat/completions` does.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from domex.errors import ConfigError

ANSWER = re.compile(r"Answer:\s*(-?\d[\d,]*(?:\.\d+)?)")
MAX_SQL_STEPS = 2_000  # progress-handler calls (x 1,000 SQLite VM steps) before a generated query is stopped


@dataclass(frozen=True)
class Task:
    prompt: str
    answer: str | None = None  # exact-answer tasks
    query: str | None = None  # same-rows tasks: the reference query ...
    database: str | None = None  # ... and the SQL script that builds the tables it runs on


def read_tasks(path: Path, limit: int | None = None) -> list[Task]:
    """The first `limit` tasks of a tasks file; a malformed line is reported as file:line."""
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{n}: not a JSON object with a \"prompt\" field") from None
        if "answer" in row:
            tasks.append(Task(prompt, answer=str(row["answer"])))
        elif "query" in row and "database" in row:
            script = path.parent / row["database"]
            if not script.is_file():
                raise ConfigError(f"{path}:{n}: database script {script} does not exist")
            tasks.append(Task(prompt, query=row["query"], database=script.read_text(encoding="utf-8")))
        else:
            raise ConfigError(f"{path}:{n}: a task needs \"answer\" (exact answer) or \"query\" and \"database\" (same rows)")
        if limit is not None and len(tasks) >= limit:
            break
    if not tasks:
        raise ConfigError(f"{path} holds no tasks")
    return tasks


def read_all(eval_dir: Path, domains: list[str], limit: int | None = None) -> dict[str, list[Task]]:
    """domain -> its tasks, for the domains that have a tasks file."""
    return {d: read_tasks(eval_dir / "tasks" / f"{d}.jsonl", limit) for d in domains
            if (eval_dir / "tasks" / f"{d}.jsonl").is_file()}


def final_answer(text: str) -> str | None:
    m = ANSWER.search(text)
    return m.group(1).replace(",", "") if m else None


def first_statement(text: str) -> str:
    """The generated SQL up to its first semicolon (the model goes on with the next item after it)."""
    head, semi, _ = text.strip().partition(";")
    return head + semi


def rows(db: sqlite3.Connection, sql: str) -> list[tuple] | None:
    """The rows `sql` returns, or None if it fails or runs too long."""
    steps = iter(range(MAX_SQL_STEPS))
    db.set_progress_handler(lambda: next(steps, None) is None, 1_000)
    try:
        return db.execute(sql).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        db.set_progress_handler(None, 0)


def database(script: str) -> sqlite3.Connection:
    """An in-memory database built by `script`, then made read-only so no generated query can change it."""
    db = sqlite3.connect(":memory:")
    db.executescript(script)
    db.execute("PRAGMA query_only = ON")
    return db


def solved(task: Task, completion: str, databases: dict[str, sqlite3.Connection]) -> bool:
    if task.answer is not None:
        return final_answer(completion) == task.answer
    db = databases.get(task.database)
    if db is None:
        db = databases[task.database] = database(task.database)
    want, got = rows(db, task.query), rows(db, first_statement(completion))
    if got is None:
        return False
    return got == want if "ORDER BY" in task.query.upper() else sorted(map(repr, got)) == sorted(map(repr, want))


def task_accuracy(engine, tasks: list[Task], max_new_tokens: int = 96, batch_size: int = 32) -> float:
    """Share of `tasks` a greedy generation with the engine's resident experts (its last `ensure`) solves."""
    databases: dict[str, sqlite3.Connection] = {}
    right = 0
    for s in range(0, len(tasks), batch_size):
        chunk = tasks[s:s + batch_size]
        completions = engine.generate([t.prompt for t in chunk], chat_template=True, max_new_tokens=max_new_tokens,
                                      do_sample=False)
        right += sum(solved(t, c, databases) for t, c in zip(chunk, completions))
    for db in databases.values():
        db.close()
    return right / len(tasks)
