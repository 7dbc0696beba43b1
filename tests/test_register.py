"""Registering domains through `register()` and the `domex register | domains | mask` commands.

A tiny random Qwen3-MoE checkpoint with the demo tokenizer (models/tiny-moe, which has a chat
template) is saved once per session; bad input is driven through the real CLI and the message
text is asserted; a `domex register` subprocess killed at seeded moments must leave the store
with either the old or the new domain.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from domex.runtime.cli import main
from domex.runtime.indexer import register, tokenize
from domex.runtime.observer import observe
from domex.store.db import Store
from domex.store.demos import read_demos
from domex.store.mask import Mask
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "models" / "tiny-moe"
CONTEXT = 64  # max_position_embeddings of the test model: long demos get truncated


def save_model(path: Path, family: str = "qwen3_moe", seed: int = 0) -> Path:
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.vocab_size, cfg.max_position_embeddings = len(tok), CONTEXT
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def pool_dir(model_dir, tmp_path_factory):
    from domex.runtime.pool import build

    path = tmp_path_factory.mktemp("pool") / "tiny"
    build(model_dir, path, progress=False)
    return path


def write_demos(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


SQL = [{"prompt": "List the ids of orders.", "response": "SELECT id FROM orders;"},
       {"prompt": "How many students?", "response": "SELECT COUNT(*) FROM students;"},
       {"text": "SELECT name FROM users WHERE age > 3;"}]
PY = [{"prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b"},
      {"text": "for i in range(3):\n    print(i)"}]


def cli(*argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- register() --------------------------------------------------------------------------------


def test_register_scores_equal_observer_on_templated_tokens(model_dir, tmp_path):
    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    pattern = register(model_dir, tmp_path / "store", "sql", demos, progress=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = tokenize(tok, read_demos(demos), CONTEXT)
    assert "<|user|>" in tok.decode(seqs[0]) and "<|assistant|>" in tok.decode(seqs[0])  # chat template applied
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    want = observe(model, seqs)
    stored = Store.open(tmp_path / "store", create=False).get("sql")
    np.testing.assert_allclose(stored.score("easyep"), want.easyep_sum.astype(np.float32), rtol=1e-6)
    assert stored.tokens == pattern.tokens == want.tokens
    np.testing.assert_allclose(stored.score("frequency"), want.count.astype(np.float32))
    assert stored.tokens == want.tokens == sum(len(s) for s in seqs)
    s = stored.settings
    assert (s["top_k"], s["num_experts"], s["num_layers"], s["family"], s["max_len"]) == (2, 8, 2, "qwen3_moe", CONTEXT)
    assert s["chat_template"] and s["criteria"] == ["easyep", "frequency", "gate_sum", "reap", "tcess", "random"]
    assert s["expert_bytes"] == 3 * 16 * 32 * 4  # gate, up, down of 16 x 32 in fp32
    assert stored.embeddings.shape == (3, 384) and stored.demos[2] == {"text": SQL[2]["text"]}


def test_pool_full_streaming_and_model_dir_agree(model_dir, pool_dir, tmp_path):
    from domex.runtime.checkpoint import fingerprint

    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    by_model = register(model_dir, tmp_path / "a", "sql", demos, criteria="easyep,reap,tcess", progress=False)
    by_pool = register(pool_dir, tmp_path / "b", "sql", demos, criteria="easyep,reap,tcess", progress=False)
    streamed = register(pool_dir, tmp_path / "c", "sql", demos, criteria="easyep,reap,tcess", streaming=True, progress=False)
    assert by_model.fingerprint == by_pool.fingerprint == streamed.fingerprint == fingerprint(model_dir)
    for c in ("easyep", "reap", "tcess"):
        np.testing.assert_allclose(by_pool.score(c), by_model.score(c), rtol=1e-6)
        np.testing.assert_allclose(streamed.score(c), by_pool.score(c), rtol=1e-6)
    assert streamed.settings["expert_bytes"] == by_pool.settings["expert_bytes"]


# -- bad input, through the CLI ----------------------------------------------------------------


def test_invalid_json_names_file_and_line(model_dir, tmp_path, capsys):
    demos = write_demos(tmp_path / "bad.jsonl", [SQL[0], '{"prompt": "x", "response": '])
    code, _, err = cli("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "d", demos, capsys=capsys)
    assert code == 2
    assert f"{demos}:2: invalid JSON" in err


def test_missing_field_names_file_line_and_field(model_dir, tmp_path, capsys):
    demos = write_demos(tmp_path / "bad.jsonl", [SQL[0], SQL[1], {"prompt": "only a prompt"}])
    code, _, err = cli("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "d", demos, capsys=capsys)
    assert code == 2 and f"{demos}:3: missing field 'response'" in err


def test_empty_demo_file(model_dir, tmp_path, capsys):
    demos = tmp_path / "empty.jsonl"
    demos.write_text("\n\n")
    code, _, err = cli("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "d", demos, capsys=capsys)
    assert code == 2 and f"{demos}: no demos (the file is empty)" in err


def test_long_demos_truncated_with_one_warning(model_dir, tmp_path, capsys):
    long_text = " ".join(["SELECT id FROM orders WHERE quantity > 3;"] * 30)
    demos = write_demos(tmp_path / "long.jsonl", [SQL[0], {"text": long_text}, {"prompt": "q", "response": long_text}])
    with pytest.warns(UserWarning) as caught:
        code, out, _ = cli("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "d", demos, capsys=capsys)
    assert code == 0, out
    msgs = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(msgs) == 1 and f"2 of 3 demos are longer than the model's context of {CONTEXT} tokens" in msgs[0]
    pattern = Store.open(tmp_path / "s", create=False).get("d")
    assert pattern.tokens <= 3 * CONTEXT and pattern.settings["max_len"] == CONTEXT


def test_duplicate_domain_needs_replace(model_dir, tmp_path, capsys):
    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    args = ("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "sql", "--criteria", "frequency", demos)
    assert cli(*args, capsys=capsys)[0] == 0
    code, _, err = cli(*args, capsys=capsys)
    assert code == 2 and "domain 'sql' is already registered" in err and "--replace" in err
    assert cli(*args, "--replace", capsys=capsys)[0] == 0


def test_store_of_another_model_is_refused(model_dir, tmp_path, capsys):
    from domex.runtime.checkpoint import fingerprint

    other = save_model(tmp_path / "other", seed=1)
    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    assert cli("register", "--model", other, "--store", tmp_path / "s", "--domain", "sql", demos, capsys=capsys)[0] == 0
    code, _, err = cli("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "py", demos, capsys=capsys)
    assert code == 2
    assert fingerprint(other) in err and fingerprint(model_dir) in err and "another --store" in err


def test_unknown_criterion_lists_known(model_dir, tmp_path, capsys):
    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    code, _, err = cli("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "sql",
                       "--criteria", "easyep,magic", demos, capsys=capsys)
    assert code == 2
    assert "unknown criterion 'magic'; known criteria: easyep, frequency, gate_sum, reap, tcess, random" in err


def test_streaming_needs_a_pool(model_dir, tmp_path, capsys):
    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    code, _, err = cli("register", "--model", model_dir, "--store", tmp_path / "s", "--domain", "sql", "--streaming",
                       demos, capsys=capsys)
    assert code == 2 and "streaming mode reads weights layer by layer from an expert pool" in err


# -- domains and mask --------------------------------------------------------------------------


def test_domains_list_show_delete_and_masks(pool_dir, tmp_path, capsys):
    store = tmp_path / "s"
    for name, rows in (("sql", SQL), ("py", PY)):
        demos = write_demos(tmp_path / f"{name}.jsonl", rows)
        assert cli("register", "--pool", pool_dir, "--store", store, "--domain", name, demos, capsys=capsys)[0] == 0

    code, out, _ = cli("domains", "list", "--store", store, "--json", capsys=capsys)
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["py", "sql"]

    png = tmp_path / "sql.png"
    code, out, _ = cli("domains", "show", "sql", "--store", store, "--budget", "0.5", "--json", "--png", png, capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["kept_per_layer"] == [4, 4] and set(report["overlap"]) == {"py"}
    assert 0.0 <= report["overlap"]["py"] <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("domains", "show", "sql", "--store", store, "--rule", "coverage", capsys=capsys)
    assert code == 0 and "kept per layer at budget 0.5 (easyep, coverage):" in out and "overlap (Jaccard of masks): py" in out

    code, _, _ = cli("mask", "--store", store, "--domain", "sql", "--budget", "0.5", "-o", tmp_path / "m.json", capsys=capsys)
    mask = Mask.load(tmp_path / "m.json")
    assert code == 0 and mask.kept_counts() == [4, 4]
    sql = Store.open(store, create=False).get("sql")
    want = np.argsort(-sql.score("easyep"), axis=1, kind="stable")[:, :4]
    assert [set(ids) for ids in mask.layers] == [set(r.tolist()) for r in want]

    code, out, _ = cli("mask", "--store", store, "--domain", "sql", "--domain", "py", "--budget", "3", "--criterion", "frequency",
                       "-o", tmp_path / "mix.json", capsys=capsys)
    assert code == 0 and Mask.load(tmp_path / "mix.json").kept_counts() == [3, 3] and "sql+py" in out

    code, _, err = cli("mask", "--store", store, "--domain", "sql", "--budget", "1", "-o", tmp_path / "x.json", capsys=capsys)
    assert code == 2 and "fewer than the router's top_k=2" in err

    assert cli("domains", "delete", "py", "--store", store, capsys=capsys)[0] == 0
    code, out, _ = cli("domains", "list", "--store", store, capsys=capsys)
    assert out.startswith("sql\t") and "py" not in out
    code, _, err = cli("domains", "show", "py", "--store", store, capsys=capsys)
    assert code == 2 and "no domain 'py'" in err


# -- crash safety ------------------------------------------------------------------------------


def test_register_killed_at_random_moments_leaves_old_or_new(model_dir, tmp_path):
    """SIGKILL a real `domex register --replace` at seeded delays: the domain is always whole, old or new."""
    store = tmp_path / "s"
    old_demos, new_demos = SQL, PY
    register(model_dir, store, "d", write_demos(tmp_path / "old.jsonl", old_demos), progress=False)
    new = write_demos(tmp_path / "new.jsonl", new_demos)
    cmd = [sys.executable, "-m", "domex.runtime.cli", "register", "--model", str(model_dir), "--store", str(store),
           "--domain", "d", "--replace", str(new)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.monotonic()
    full = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # one clean run: how long it takes
    duration = time.monotonic() - started
    assert full.returncode == 0, full.stderr
    register(model_dir, store, "d", write_demos(tmp_path / "old.jsonl", old_demos), replace=True, progress=False)

    rng = random.Random(1234)
    seen = set()
    for run in range(10):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.1) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        pattern = Store.open(store, create=False).get("d")  # readable, whole
        assert pattern.demos in (old_demos, new_demos)
        version = "old" if pattern.demos == old_demos else "new"
        assert len(pattern.embeddings) == len(pattern.demos) and set(pattern.criteria) == {
            "easyep", "frequency", "gate_sum", "reap", "tcess", "random"}
        seen.add(version)
        if version == "new":  # put the old one back so the next kill can interrupt a real replacement
            register(model_dir, store, "d", write_demos(tmp_path / "old.jsonl", old_demos), replace=True, progress=False)
    assert Store.open(store, create=False).names() == ["d"]


def test_in_memory_model_full_and_streaming(tmp_path):
    from domex.runtime.indexer import in_memory

    model = AutoModelForCausalLM.from_pretrained(save_model(tmp_path / "m")).eval()
    subject = in_memory(model, AutoTokenizer.from_pretrained(TOKENIZER), fingerprint="f" * 64)
    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    full = register(subject, tmp_path / "s", "full", demos, criteria="easyep,tcess", progress=False)
    stream = register(subject, tmp_path / "s", "stream", demos, criteria="easyep,tcess", streaming=True, progress=False)
    for c in ("easyep", "tcess"):
        np.testing.assert_allclose(stream.score(c), full.score(c), rtol=1e-6)
    assert Store.open(tmp_path / "s", create=False).fingerprint() == "f" * 64


def test_model_without_tokenizer_is_refused(tmp_path, capsys):
    from tiny import tiny_model

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "bare")
    demos = write_demos(tmp_path / "sql.jsonl", SQL)
    code, _, err = cli("register", "--model", tmp_path / "bare", "--store", tmp_path / "s", "--domain", "d", demos,
                       capsys=capsys)
    assert code == 2 and f"{tmp_path / 'bare'}: no usable tokenizer" in err and "next to the model's config.json" in err
