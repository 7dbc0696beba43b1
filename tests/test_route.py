"""`domex route`: batch routing from the CLI on a real pool and store, one JSON decision per query line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from domex.runtime.cli import main
from domex.runtime.indexer import register
from domex.runtime.match import Matcher
from domex.runtime.pool import build
from domex.store.db import Store
from domex.store.demos import Demo
from tiny import DOMAINS, QUERIES, UNRELATED, tiny_checkpoint, tiny_model, tiny_tokenizer

TEXTS = [QUERIES["cooking"], QUERIES["python"].replace("\n    ", " "), UNRELATED]  # one line each


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    model = tiny_checkpoint(root / "model")
    build(model, root / "pool", progress=False)
    for name in ("cooking", "python", "football"):
        register(root / "pool", root / "store", name, [Demo.from_json({"text": t}) for t in DOMAINS[name]], progress=False)
    return root


def route(capsys, *argv):
    rc = main(["route", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_each_line_is_the_hybrid_decision_of_the_stock_model(setup, capsys, tmp_path):
    """Blank lines are skipped but counted: `line` names the line of the file each decision is for."""
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n{TEXTS[2]}\n")
    rc, out, _ = route(capsys, "--store", str(setup / "store"), "--pool", str(setup / "pool"), "--file", str(queries), "--json")
    assert rc == 0
    got = [json.loads(line) for line in out.splitlines()]
    assert [g["line"] for g in got] == [1, 3, 4]
    stock = AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32).eval()
    expected = Matcher(Store.open(setup / "store", create=False), "hybrid", model=stock,
                       tokenizer=AutoTokenizer.from_pretrained(setup / "model")).match_many(TEXTS)
    for g, e in zip(got, expected):
        assert g["domain"] == e.domain and g["ood"] == e.ood and g["matcher"] == "hybrid"
        assert g["similarity"] == pytest.approx(e.similarity, abs=1e-5)
    assert got[0]["domain"] == "cooking" and got[1]["domain"] == "python" and got[2]["ood"]


def test_jsonl_reads_the_text_field_and_a_bad_line_names_file_and_line(setup, capsys, tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(json.dumps({"text": TEXTS[1], "id": 7}) + "\n")
    rc, out, _ = route(capsys, "--store", str(setup / "store"), "--matcher", "embedding", "--file", str(good), "--json")
    assert rc == 0 and json.loads(out)["domain"] == "python"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": TEXTS[0]}) + "\n" + json.dumps({"prompt": "no text"}) + "\n")
    rc, out, err = route(capsys, "--store", str(setup / "store"), "--matcher", "embedding", "--file", str(bad), "--json")
    assert rc == 2 and out == "" and f"{bad}:2" in err and "'text'" in err


def test_a_chat_line_is_routed_as_domex_serve_reads_a_chat(setup, capsys, tmp_path):
    """{"messages": [...]}: the user turns, the newest first, the same decision as that text on a line of its own."""
    turns = [{"role": "user", "content": TEXTS[1]}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and again?"}]
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"text": "and again?\n\n" + TEXTS[1]}) + "\n"
                     + json.dumps({"text": "and again?"}) + "\n")
    rc, out, _ = route(capsys, "--store", str(setup / "store"), "--matcher", "embedding", "--file", str(chats), "--json")
    chat, joined, alone = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and chat["domain"] == joined["domain"] == "python"
    assert chat["similarity"] == joined["similarity"] != alone["similarity"]


def test_the_default_matcher_without_a_pool_is_a_clear_error(setup, capsys):
    rc, out, err = route(capsys, "--store", str(setup / "store"), TEXTS[0])
    assert rc == 2 and out == "" and "--pool" in err


def test_each_decision_names_the_domains_the_policy_serves_it_with(setup, capsys, tmp_path):
    """The same selection as `domex serve`: an in-domain query gets its domain's mask under the budget;
    an out-of-domain one what the fallback policy gives (full: every expert)."""
    queries = tmp_path / "q.txt"
    queries.write_text(f"{TEXTS[0]}\n{TEXTS[2]}\n")
    rc, out, _ = route(capsys, "--store", str(setup / "store"), "--matcher", "embedding", "--file", str(queries), "--json",
                       "--policy", "full", "--budget", "4")
    inside, outside = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and inside["domains"] == "cooking" and inside["kept"] == pytest.approx(4 / 8)
    assert outside["ood"] and outside["domains"] == "all experts" and outside["kept"] == 1.0


def test_a_bf16_checkpoint_routes_in_float32_on_cpu_as_serve_does(tmp_path, capsys):
    """`domex route` takes serve's --dtype (auto: float32 on CPU), not the checkpoint's bfloat16: the two
    would otherwise route the same query through routing views computed at different precisions."""
    model = tiny_model("qwen3_moe", seed=3)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    build(tmp_path / "model", tmp_path / "pool", progress=False)
    for name in ("cooking", "python", "football"):
        register(tmp_path / "pool", tmp_path / "store", name, [Demo.from_json({"text": t}) for t in DOMAINS[name]],
                 progress=False)
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(TEXTS) + "\n")
    rc, out, _ = route(capsys, "--store", str(tmp_path / "store"), "--pool", str(tmp_path / "pool"), "--file", str(queries),
                       "--json")
    got = [json.loads(line)["similarity"] for line in out.splitlines()]
    store, tokenizer = Store.open(tmp_path / "store", create=False), AutoTokenizer.from_pretrained(tmp_path / "model")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    want = [m.similarity for m in Matcher(store, "hybrid", model=stock, tokenizer=tokenizer).match_many(TEXTS)]
    bf16 = [m.similarity for m in Matcher(store, "hybrid", model=stock.to(torch.bfloat16), tokenizer=tokenizer).match_many(TEXTS)]
    assert rc == 0 and got == pytest.approx(want, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(bf16, want)) > 1e-5  # bfloat16 would miss that tolerance
