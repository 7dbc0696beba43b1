"""Task accuracy's checkers (runtime/tasks.py) on a real SQLite database, the shipped tasks, and the
demo model's task accuracy through the Engine against stock transformers' generations."""

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from domex.errors import ConfigError
from domex.runtime.tasks import Task, database, final_answer, first_statement, read_tasks, rows, solved, task_accuracy

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "patterns" / "eval" / "tasks"
SCRIPT = ("CREATE TABLE pets (id INTEGER, name TEXT, kind TEXT, age INTEGER);\n"
          "INSERT INTO pets VALUES (1, 'Rex', 'dog', 4);\nINSERT INTO pets VALUES (2, 'Tom', 'cat', 7);\n"
          "INSERT INTO pets VALUES (3, 'Ada', 'dog', 2);\n")


def sql_task(query: str) -> Task:
    return Task("-- Question: ...", query=query, database=SCRIPT)


def test_exact_answer_is_the_first_answer_line():
    task = Task("Question: ...", answer="1234")
    assert solved(task, "Solution: 1000 + 234 = 1234.\nAnswer: 1,234\n\nQuestion: x\nAnswer: 7", {})
    assert not solved(task, "Solution: ...\nAnswer: 7\n\nQuestion: x\nAnswer: 1234", {})  # the model went on
    assert not solved(task, "Solution: 1234 is the total.", {})  # no answer line
    assert final_answer("Answer: -5") == "-5" and final_answer("nothing") is None


def test_same_rows_ignores_text_and_order_unless_the_reference_orders():
    dbs = {}
    assert solved(sql_task("SELECT name FROM pets WHERE kind = 'dog';"),
                  "select name from pets where 'dog' = kind order by age;\n\nCREATE TABLE ...", dbs)
    assert not solved(sql_task("SELECT name FROM pets WHERE kind = 'dog';"), "SELECT name FROM pets;", dbs)
    ordered = sql_task("SELECT name FROM pets ORDER BY age DESC;")
    assert solved(ordered, "SELECT name FROM pets ORDER BY age DESC;", dbs)
    assert not solved(ordered, "SELECT name FROM pets ORDER BY age;", dbs)
    assert not solved(sql_task("SELECT COUNT(*) FROM pets;"), "SELEC COUNT(*) FROM pets;", dbs)  # syntax error
    assert len(dbs) == 1  # one database per script, reused


def test_generated_sql_cannot_change_the_tables_or_run_forever():
    db = database(SCRIPT)
    assert rows(db, "DELETE FROM pets;") is None and rows(db, "DROP TABLE pets;") is None
    assert rows(db, "SELECT COUNT(*) FROM pets;") == [(3,)]
    forever = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n;"
    assert rows(db, forever) is None
    assert rows(db, "SELECT 1; SELECT 2;") is None  # one statement at a time
    assert first_statement("SELECT 1;\nSELECT 2;") == "SELECT 1;"


def test_bad_task_files_name_the_line(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"math.jsonl:2: not a JSON object"):
        read_tasks(path)
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match=r"math.jsonl:1: a task needs"):
        read_tasks(path)
    path.write_text('{"prompt": "a", "query": "SELECT 1;", "database": "missing.sql"}\n')
    with pytest.raises(ConfigError, match=r"math.jsonl:1: database script .*missing.sql does not exist"):
        read_tasks(path)


def test_shipped_tasks_are_checkable_and_not_demos():
    math, sql = read_tasks(TASKS / "math.jsonl"), read_tasks(TASKS / "sql.jsonl")
    assert len(math) >= 30 and len(sql) >= 30
    assert all(t.answer.lstrip("-").isdigit() for t in math)
    db = database(sql[0].database)
    returned = [rows(db, t.query) for t in sql]
    assert all(r is not None for r in returned)  # every reference query runs on the shipped tables
    assert sum(bool(r) for r in returned) >= 0.8 * len(sql)  # and most return rows to compare
    for domain, tasks in (("math", math), ("sql", sql)):
        demos = {json.loads(line)["prompt"] for line in (ROOT / "patterns" / f"{domain}.jsonl").read_text().splitlines()
                 if "prompt" in json.loads(line)}
        assert not demos & {t.prompt for t in tasks}, f"{domain}: a task is also a demo"


def test_demo_model_task_accuracy_through_the_engine_equals_stock_transformers(tmp_path):
    from domex.runtime.engine import Engine
    from domex.runtime.pool import build
    from domex.store.mask import Mask

    model_dir = ROOT / "models" / "tiny-moe"
    build(model_dir, tmp_path / "pool", progress=False)
    engine = Engine.open(tmp_path / "pool", budget="100%")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    full = Mask.full(engine.pool.manifest.num_layers, engine.pool.manifest.num_experts)
    for name in ("math", "sql"):
        tasks = read_tasks(TASKS / f"{name}.jsonl", 8)
        right, dbs = 0, {}
        for t in tasks:
            ids = tok.apply_chat_template([{"role": "user", "content": t.prompt}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            out = model.generate(ids, max_new_tokens=96, do_sample=False, pad_token_id=tok.pad_token_id)
            right += solved(t, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), dbs)
        engine.ensure(full)
        assert task_accuracy(engine, tasks) == right / len(tasks), name
        if name == "sql":
            assert right >= len(tasks) // 2, "the demo model no longer writes the SQL its training taught it"
    engine.close()
