"""`domex eval` on a tiny random Qwen3-MoE with two made-up domains: report structure, and the
full-model row against next-token accuracy and NLL computed by hand with stock transformers."""

import gzip
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from domex.runtime.cli import main
from domex.runtime.indexer import register
from domex.runtime.pool import build
from domex.store.demos import Demo
from tiny import DOMAINS, UNRELATED, tiny_checkpoint

BUDGETS = ["0.25", "0.5", "0.75"]  # 2, 4 and 6 of the tiny model's 8 experts (top-2)
CRITERIA = ["easyep", "frequency", "gate_sum", "reap", "tcess", "random"]
HELD_OUT = {  # not the demos
    "cooking": ["Peel the potatoes, boil them in salted water and mash them with milk.",
                "Marinate the fish in lemon juice and grill it for five minutes on each side.",
                "Melt the chocolate over a water bath and stir in the cream. " * 4],  # longer than the context: truncated
    "python": ["def greet(name):\n    return 'hello ' + name",
               "for i, item in enumerate(items):\n    print(i, item)",
               "import json\nwith open('a.json') as f:\n    data = json.load(f)"],
}
QUERIES = {"cooking": ["how long do I boil an egg", "what goes in a pancake batter?"],
           "python": ["how do I reverse a list in python", "why does my for loop print None"]}
GROUPS = ["asked first", "asked later"]  # each query file's lines in turn: the `group` field
CHATS = [  # the domain of each chat's last user turn; the second leans on the turn before it, the third changes domain
    {"messages": [{"role": "user", "content": "how do I boil pasta"}, {"role": "assistant", "content": "In salted water."},
                  {"role": "user", "content": "how long should I simmer the tomato sauce?"}], "domain": "cooking"},
    {"messages": [{"role": "user", "content": "def area(r):\n    return 3.14 * r * r"}, {"role": "assistant", "content": "ok"},
                  {"role": "user", "content": "and for a list of them?"}], "domain": "python"},
    {"messages": [{"role": "user", "content": "how do I whisk egg whites"}, {"role": "assistant", "content": "Until stiff."},
                  {"role": "user", "content": "import os\nprint(os.getcwd())"}], "domain": "python"},
]
TASKS = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 * 3?", "answer": "9"}]  # python only
OOD = {"prose": [UNRELATED, "The tides rise twice a day near the coast."],
       "protein": ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEK"]}


def write_split(path, texts, groups=None):
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt", encoding="utf-8") as f:
        for t, g in zip(texts, groups or [None] * len(texts)):
            f.write(json.dumps({"text": t} | ({"group": g} if g else {})) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin, and on shared cores cost 10x
    try:
        yield make_run(tmp_path_factory.mktemp("eval"))
    finally:
        torch.set_num_threads(threads)


def make_run(root):
    model = tiny_checkpoint(root / "model")
    build(model, root / "pool", tiers="int8,int4", progress=False)
    for name in HELD_OUT:
        register(root / "pool", root / "store", name, [Demo.from_json({"text": t}) for t in DOMAINS[name]], progress=False)
    (root / "eval").mkdir()
    for name, texts in HELD_OUT.items():
        write_split(root / "eval" / f"{name}.jsonl.gz", texts)
    for folder, files in (("queries", QUERIES), ("ood", OOD)):
        (root / "eval" / folder).mkdir()
        for name, texts in files.items():
            write_split(root / "eval" / folder / f"{name}.jsonl", texts, GROUPS if folder == "queries" else None)
    (root / "eval" / "conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    (root / "eval" / "tasks").mkdir()
    (root / "eval" / "tasks" / "python.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    out, docs = root / "out", root / "docs"
    rc = main(["eval", "--pool", str(root / "pool"), "--store", str(root / "store"), "--budgets", ",".join(BUDGETS),
               "--criteria", ",".join(CRITERIA), "--eval-dir", str(root / "eval"), "--batch-size", "2", "--quiet",
               "--memory", "50%,75%", "--skip-ratio", "0.5",
               "--publish", str(docs / "RESULTS.md"), "--out", str(out)])
    assert rc == 0
    return model, out, docs, json.loads((out / "results.json").read_text())


def test_every_criterion_budget_and_domain_is_reported(run):
    _, out, _, res = run
    assert set(res) >= {"command", "machine", "setup", "quality", "routing", "overlap", "targets"}
    assert set(res["machine"]) >= {"arch", "cores", "ram_gib", "torch", "transformers"}
    rows = res["quality"]
    for domain in HELD_OUT:
        for budget in (0.25, 0.5, 0.75):
            for kind in ("domain", "agnostic"):
                got = {r["criterion"] for r in rows if r["domain"] == domain and r["kind"] == kind and r["budget"] == budget}
                assert got == set(CRITERIA), (domain, budget, kind)
            rand = [r for r in rows if r["domain"] == domain and r["kind"] == "random" and r["budget"] == budget]
            assert len(rand) == 1
        assert len([r for r in rows if r["domain"] == domain and r["kind"] == "full"]) == 1
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0 and r["experts_used"] <= r["experts_kept"]
        assert r["experts_kept"] == r["experts_per_layer"] * 2  # two MoE layers
    matchers = {"embedding", "signature", "hybrid"}
    data = ("passages", "queries", "chats, last turn", "chats")
    assert {(r["matcher"], r["data"]) for r in res["routing"]} == {(m, d) for m in matchers for d in data}
    for r in res["routing"]:
        count = {"passages": sum(map(len, HELD_OUT.values())), "queries": sum(map(len, QUERIES.values()))}.get(r["data"], len(CHATS))
        assert len(r["confusion"]) == 2 and sum(map(sum, r["confusion"])) == count
        assert 0.0 <= r["false_alarms"] <= 1.0
    assert res["setup"]["chats"] == {"cooking": 1, "python": 2}
    assert not [t for t in res["targets"] if "chats" in t["name"]]  # the targets are stated for passages and queries
    assert {d["matcher"] for d in res["detection"]} == matchers
    for d in res["detection"]:
        assert set(d["per_kind"]) == set(OOD) and set(d["thresholds"]) == set(d["views"])
        assert d["views"] == (["routing"] if d["matcher"] == "signature" else ["text", "chars"])
        assert all(set(t) == set(HELD_OUT) for t in d["thresholds"].values())
        assert d["caught"] == pytest.approx(sum(d["per_kind"].values()) / len(OOD))
    assert res["overlap"]["labels"] == sorted(HELD_OUT) and res["overlap"]["jaccard"][0][0] == 1.0
    assert any(t["name"].startswith("easyep retention") for t in res["targets"])
    assert res["setup"]["tasks"] == {"python": len(TASKS)}
    for r in rows:  # task accuracy where the domain has tasks, none elsewhere
        assert (r["task_accuracy"] is None) == (r["domain"] != "python")


def test_task_accuracy_equals_checking_stock_transformers_generations(run):
    """The full model's task row recomputed: stock generate on the chat prompts, checked by runtime/tasks."""
    from domex.runtime.tasks import Task, solved

    model_dir, _, _, res = run
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for t in TASKS:
        ids = tok.apply_chat_template([{"role": "user", "content": t["prompt"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=96, do_sample=False, pad_token_id=tok.pad_token_id)
        right += solved(Task(t["prompt"], answer=t["answer"]), tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), {})
    full = next(r for r in res["quality"] if r["domain"] == "python" and r["kind"] == "full")
    assert full["task_accuracy"] == right / len(TASKS)
    assert full["task_retention"] == (1.0 if right else None)


def test_report_and_plots_are_written(run):
    _, out, docs, res = run
    text = (out / "report.md").read_text()
    for heading in ("## Targets", "## Pruning quality", "## Task accuracy", "## Accuracy per resident byte", "## Routing",
                    "## Mask overlap", "## Method"):
        assert heading in text
    assert res["command"].startswith("domex eval --pool") and res["command"] in text
    for name in ("accuracy_vs_budget.png", "confusion.png", "ood_by_kind.png", "mask_overlap.png", "memory_frontier.png"):
        for folder in (out, docs / "results"):
            data = (folder / name).read_bytes()
            assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", folder / name
    assert "](results/accuracy_vs_budget.png)" in (docs / "RESULTS.md").read_text()
    for r in res["routing"]:  # the queries' groups have rows of their own
        for group, x in (r["groups"] or {}).items():
            assert f"| {r['matcher']} | {r['data']} | {group} | {x['texts']} | {x['accuracy']:.1%} |" in text


def test_full_model_row_equals_stock_transformers(run):
    model_dir, _, _, res = run
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    context = model.config.max_position_embeddings
    for domain, texts in HELD_OUT.items():
        correct, nll, n = 0, 0.0, 0
        for text in texts:
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:context]])  # [1, T]
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]  # [T-1, V]
            target = ids[0, 1:]
            correct += int((logits.argmax(-1) == target).sum())
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            n += len(target)
        full = next(r for r in res["quality"] if r["domain"] == domain and r["kind"] == "full")
        assert full["tokens"] == n
        assert full["accuracy"] == pytest.approx(correct / n, abs=1e-12)
        assert full["nll"] == pytest.approx(nll / n, rel=1e-5)
        assert full["retention"] == 1.0


def test_embedding_figures_equal_matching_each_text_directly(run):
    """The routing and detection rows recomputed from Matcher.match_many one text at a time, and the
    queries' figures per group (the i-th line of each query file is in GROUPS[i]) from that group's texts."""
    from domex.runtime.match import Matcher
    from domex.store.db import Store

    _, _, _, res = run
    matcher = Matcher(Store.open(res["setup"]["store"], create=False), "embedding")
    for data, texts in (("passages", HELD_OUT), ("queries", QUERIES)):
        got = [(d, i, matcher.match_many([t])[0]) for d, ts in texts.items() for i, t in enumerate(ts)]
        row = next(r for r in res["routing"] if r["matcher"] == "embedding" and r["data"] == data)
        assert row["accuracy"] == pytest.approx(sum(m.domain == d for d, _, m in got) / len(got))
        assert row["false_alarms"] == pytest.approx(sum(m.ood for _, _, m in got) / len(got))
        for view in ("text", "chars"):  # the share of texts each view flagged; together they make the false alarms
            assert row["flagged"][view] == pytest.approx(
                sum(any(not c.passed for c in m.checks if c.view == view) for _, _, m in got) / len(got))
        assert row["false_alarms"] <= sum(row["flagged"].values()) + 1e-9
        if data == "passages":  # their lines name no group
            assert row["groups"] is None
            continue
        assert list(row["groups"]) == GROUPS
        for i, group in enumerate(GROUPS):
            mine = [(d, m) for d, j, m in got if j == i]
            figures = row["groups"][group]
            assert figures["texts"] == len(mine) == len(QUERIES)
            assert figures["accuracy"] == pytest.approx(sum(m.domain == d for d, m in mine) / len(mine))
            assert figures["false_alarms"] == pytest.approx(sum(m.ood for _, m in mine) / len(mine))
            assert figures["flagged"]["chars"] == pytest.approx(
                sum(any(not c.passed for c in m.checks if c.view == "chars") for _, m in mine) / len(mine))
    for data, turns in (("chats, last turn", lambda c: c["messages"][-1:]), ("chats", lambda c: c["messages"])):
        users = [[m["content"] for m in turns(c) if m["role"] == "user"] for c in CHATS]  # as domex serve reads a chat:
        got = [(c["domain"], matcher.match_many(["\n\n".join(u[::-1])])[0]) for c, u in zip(CHATS, users)]  # newest first
        row = next(r for r in res["routing"] if r["matcher"] == "embedding" and r["data"] == data)
        assert row["accuracy"] == pytest.approx(sum(m.domain == d for d, m in got) / len(got))
        assert row["false_alarms"] == pytest.approx(sum(m.ood for _, m in got) / len(got))
    detection = next(d for d in res["detection"] if d["matcher"] == "embedding")
    for kind, texts in OOD.items():
        assert detection["per_kind"][kind] == pytest.approx(sum(matcher.match_many([t])[0].ood for t in texts) / len(texts))


def test_a_bad_line_in_a_held_out_file_is_a_clear_error_naming_it(tmp_path):
    from domex.errors import ConfigError
    from domex.runtime.evaluate import read_lines

    path = tmp_path / "python.jsonl"
    good = '{"text": "how do I sort a dict", "group": "first"}\n\n'
    for bad, message in (('{"text": "what is a generator", "group": 2}', 'line 3: field "group" must be a string.*got 2'),
                         ('["what is a generator"]', 'line 3 is not a JSON object with a "text" string'),
                         ('{"prompt": "what is a generator"}', 'line 3 is not a JSON object with a "text" string'),
                         ('{"text": 3}', 'line 3 is not a JSON object with a "text" string'),
                         ('{"text": "what is a gen', 'line 3 is not JSON')):
        path.write_text(good + bad + "\n")
        with pytest.raises(ConfigError, match=rf"{path}: {message}"):
            read_lines(path, None)
        assert [x.get("group") for x in read_lines(path, 1)] == ["first"]  # the lines before it read as they are


def test_a_bad_chat_is_a_clear_error_naming_its_line(tmp_path):
    from domex.errors import ConfigError
    from domex.runtime.evaluate import read_chats

    path = tmp_path / "conversations.jsonl"
    assert read_chats(path, ["python"]) == {}  # no file, no chats
    good = json.dumps(CHATS[1]) + "\n\n"
    for bad, message in ((json.dumps({"messages": "hi", "domain": "python"}), 'field "messages" must be a list'),
                         (json.dumps({"messages": CHATS[1]["messages"][:2], "domain": "python"}), "ending with a user turn"),
                         (json.dumps({**CHATS[1], "domain": "rust"}), 'field "domain" must name.*one of python; got \'rust\''),
                         ("{not json", "line 3 is not JSON")):
        path.write_text(good + bad + "\n")
        with pytest.raises(ConfigError, match=rf"{path}: line 3"):
            read_chats(path, ["python"])
        with pytest.raises(ConfigError, match=message):
            read_chats(path, ["python"])
    path.write_text(good)
    assert read_chats(path, ["python", "cooking"]) == {"chats, last turn": {"python": ["and for a list of them?"]},
                                                       "chats": {"python": ["and for a list of them?\n\n" + CHATS[1]["messages"][0]["content"]]}}


def test_missing_ood_folder_is_a_clear_error(tmp_path):
    from domex.runtime.evaluate import read_ood
    from domex.errors import ConfigError

    with pytest.raises(ConfigError, match=str(tmp_path / "ood")):
        read_ood(tmp_path)


def test_memory_axis_plans_fit_and_agree_with_the_masks(run):
    _, _, docs, res = run
    methods = {"prune", "prune+novices", "mixed", "mixed+novices"}
    methods |= {m + "+skip" for m in methods}
    rows = res["memory"]
    assert {(r["method"], r["memory"], r["domain"]) for r in rows} == \
        {(m, share, d) for m in methods for share in ("50%", "75%") for d in HELD_OUT}
    for r in rows:
        assert r["bytes_share"] <= float(r["memory"].rstrip("%")) / 100 + 1e-9
        assert (r["skipped"] > 0) == r["method"].endswith("+skip")
        assert (r["task_accuracy"] is None) == (r["domain"] != "python")
    for share in (0.5, 0.75):  # one tier, no novices: the plan is EASY-EP's uniform mask, so the same accuracy
        for d in HELD_OUT:
            prune = next(r for r in rows if r["method"] == "prune" and r["memory"] == f"{share:.0%}" and r["domain"] == d)
            mask = next(r for r in res["quality"] if r["kind"] == "domain" and r["criterion"] == "easyep"
                        and r["budget"] == share and r["domain"] == d)
            assert prune["accuracy"] == mask["accuracy"] and prune["tiers"] == {"float32": mask["experts_kept"]}
    mixed = [r for r in rows if r["method"] == "mixed" and r["memory"] == "50%"]
    assert any(set(r["tiers"]) & {"int8", "int4"} for r in mixed)
    published = json.loads((docs / "results" / "results.json").read_text())
    assert set(published["frontier"]) == methods
    assert published["frontier"]["prune"]["50%"] == pytest.approx(
        sum(r["retention"] for r in rows if r["method"] == "prune" and r["memory"] == "50%") / len(HELD_OUT))
    assert set(res["speed"]) == {"float32", "int8", "int4"} and min(res["speed"].values()) > 0


def test_dev_passages_are_items_150_to_199_and_eval_reads_none_of_them(tmp_path):
    """Settings are chosen on them (tools/dev_*.py): `domex eval` as published (first 100) must not see them."""
    from domex.runtime.evaluate import DEV_PASSAGES, dev_passages, read_split, split_path

    texts = [f"passage {i}" for i in range(250)]
    write_split(tmp_path / "python.jsonl.gz", texts)
    dev = dev_passages(tmp_path, "python")
    assert dev == texts[150:200] and DEV_PASSAGES.start >= 100
    assert not set(dev) & set(read_split(split_path(tmp_path, "python"), 100))
