"""The shipped demo model and its domain packs: intact, well-shaped, loadable, generating, routing by domain.

Uses only files in the repo (models/tiny-moe, patterns/); no corpus, no network.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "tiny-moe"
PATTERNS = ROOT / "patterns"
DOMAINS = ["python", "c", "math", "sql", "english", "german", "spanish", "unix"]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL)


def test_checksums_match_shipped_files():
    lines = (MODEL / "checksums.sha256").read_text().splitlines()
    names = {line.split("  ", 1)[1] for line in lines}
    for need in ["models/tiny-moe/model.safetensors", "models/tiny-moe/config.json",
                 "models/tiny-moe/tokenizer.json", "patterns/eval/ood.jsonl.gz",
                 *[f"patterns/{d}.jsonl" for d in DOMAINS], *[f"patterns/eval/{d}.jsonl.gz" for d in DOMAINS]]:
        assert need in names, f"{need} missing from checksums.sha256"
    card = (MODEL / "README.md").read_text()
    packs = {f"patterns/{d}.jsonl" for d in DOMAINS}
    for line in lines:
        digest, name = line.split("  ", 1)
        data = (ROOT / name).read_bytes()
        if name in packs:  # demo packs may grow: the lines the card saw must still open the file, unchanged
            assert digest in _line_prefix_digests(data), f"{name}: the demos the card was made with were changed or moved"
        else:
            assert hashlib.sha256(data).hexdigest() == digest, f"{name} changed since the card was made"
        assert digest in card, f"{name}'s checksum is not in the model card"


def _line_prefix_digests(data: bytes) -> set[str]:
    """sha256 of every prefix of `data` that ends at a line end (and of the whole of it)."""
    ends = [i + 1 for i, b in enumerate(data) if b == 0x0A]
    return {hashlib.sha256(data[:e]).hexdigest() for e in [*ends, len(data)]}


def test_config_and_weights_shapes():
    cfg = AutoConfig.from_pretrained(MODEL)
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4 and cfg.norm_topk_prob is True
    assert cfg.num_hidden_layers >= 6 and cfg.decoder_sparse_step == 1 and not cfg.mlp_only_layers
    assert cfg.tie_word_embeddings is True
    assert (MODEL / "model.safetensors").stat().st_size <= 40 * 2**20
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    with safe_open(MODEL / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        for layer in range(cfg.num_hidden_layers):
            pre = f"model.layers.{layer}.mlp"
            assert f.get_slice(f"{pre}.gate.weight").get_shape() == [cfg.num_experts, H]
            for e in range(cfg.num_experts):  # original per-expert on-disk layout
                assert f.get_slice(f"{pre}.experts.{e}.gate_proj.weight").get_shape() == [I, H]
                assert f.get_slice(f"{pre}.experts.{e}.up_proj.weight").get_shape() == [I, H]
                assert f.get_slice(f"{pre}.experts.{e}.down_proj.weight").get_shape() == [H, I]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    assert "lm_head.weight" not in keys


def test_patterns_and_eval_splits():
    for d in DOMAINS:
        demos = [json.loads(l) for l in (PATTERNS / f"{d}.jsonl").read_text().splitlines()]
        assert len(demos) >= 8, f"{d}: {len(demos)} demos"
        assert all(set(x) in ({"text"}, {"prompt", "response"}) for x in demos)
        with gzip.open(PATTERNS / "eval" / f"{d}.jsonl.gz", "rt") as fh:
            ev = [json.loads(l)["text"] for l in fh]
        assert len(ev) >= 200
        demo_texts = {x.get("text") or x["prompt"] for x in demos}
        assert not demo_texts & set(ev), f"{d}: demos overlap eval"
    with gzip.open(PATTERNS / "eval" / "ood.jsonl.gz", "rt") as fh:
        assert sum(1 for _ in fh) >= 200



def test_packs_share_no_text_with_the_query_and_ood_sets():
    """Matching figures on patterns/eval and patterns/dev mean nothing if a demo says the same thing word for word."""
    def norm(s):
        return " ".join(s.lower().split())

    held = {norm(json.loads(l)["text"]): p.relative_to(PATTERNS) for folder in ("eval", "dev") for sub in ("queries", "ood")
            for p in sorted((PATTERNS / folder / sub).glob("*.jsonl")) for l in p.read_text().splitlines()}
    chats = PATTERNS / "dev" / "conversations.jsonl"
    held |= {norm(m["content"]): chats.relative_to(PATTERNS) for l in chats.read_text().splitlines()
             for m in json.loads(l)["messages"] if m["role"] == "user"}
    assert len(held) > 500
    for d in DOMAINS:
        for number, line in enumerate((PATTERNS / f"{d}.jsonl").read_text().splitlines(), start=1):
            for field, text in json.loads(line).items():
                assert norm(text) not in held, f"patterns/{d}.jsonl:{number} {field} equals an item of {held[norm(text)]}"

def test_tokenizer(tok):
    assert len(tok) == json.loads((MODEL / "config.json").read_text())["vocab_size"]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tok.decode(tok("def f(x):\n    return x").input_ids) == "def f(x):\n    return x"


def test_generates_domain_text(model, tok):
    ids = tok("import os\n\n\ndef", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    text = tok.decode(out[0, ids.shape[1]:])
    assert text.strip(), "generated nothing"


def _usage(model, tok, texts):
    """Top-half expert set per layer by routing frequency over the given texts."""
    k = model.config.num_experts_per_tok
    counts = torch.zeros(model.config.num_hidden_layers, model.config.num_experts)
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids[:, :128]
            out = model(input_ids=ids, output_router_logits=True)
            for layer, rl in enumerate(out.router_logits):
                counts[layer] += torch.bincount(rl.topk(k, -1).indices.reshape(-1), minlength=counts.shape[1])
    half = counts.shape[1] // 2
    return [set(c.topk(half).indices.tolist()) for c in counts]


def test_routing_differs_between_domains(model, tok):
    sets = {}
    for d in ["python", "german", "sql"]:
        with gzip.open(PATTERNS / "eval" / f"{d}.jsonl.gz", "rt") as fh:
            texts = [json.loads(l)["text"] for _, l in zip(range(6), fh)]
        sets[d] = _usage(model, tok, texts)
    for a, b in itertools.combinations(sets, 2):
        jac = [len(x & y) / len(x | y) for x, y in zip(sets[a], sets[b])]
        assert sum(jac) / len(jac) < 0.8, f"{a} and {b} route to nearly the same experts: {jac}"


def test_request_style_training_items_name_what_the_passage_defines_and_skip_held_out_queries():
    import random
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from train_demo_model import held_out_queries, requests_of

    code = "import os\n\ndef parse_header(buf):\n    return buf[:4]\n"
    [item] = requests_of("python", code, random.Random(0), set())
    request, response = item.split("<|end|>\n<|assistant|>\n")
    assert request.startswith("<|user|>\n") and "parse_header" in request and response.startswith(code.strip())
    assert requests_of("python", "x = 1\n", random.Random(0), set()) == []  # nothing defined, nothing asked
    held_out = held_out_queries(PATTERNS)
    assert held_out and all(q == q.lower() for q in held_out)
    prose = "A friend in need is a friend indeed."
    asked = {requests_of("english", prose, random.Random(s), set())[0].split("<|end|>")[0][len("<|user|>\n"):].lower()
             for s in range(20)}
    assert requests_of("english", prose, random.Random(0), asked) == []  # a request equal to a held-out query is dropped


# v1's next-token accuracy on the first 8 held-out passages of each domain (fp32, the model's context),
# measured once with the function below before v2 replaced it: (correct, scored tokens)
V1_FIRST_8 = {"python": (428, 2036), "c": (394, 2136), "math": (1169, 1529), "sql": (1055, 1231),
              "english": (282, 1923), "german": (246, 2012), "spanish": (407, 1864), "unix": (191, 1494)}


def first_8_accuracy(model, tok, domain: str) -> tuple[int, int]:
    from domex.runtime.evaluate import batches, load_split, next_token_stats

    split = load_split(tok, PATTERNS / "eval", domain, 8, model.config.max_position_embeddings)
    correct = scored = 0
    with torch.no_grad():
        for ids, lengths in batches(split, 8, tok.pad_token_id):
            c, _, n = next_token_stats(model(input_ids=ids).logits, ids, lengths)
            correct, scored = correct + c, scored + n
    return correct, scored


def test_next_token_accuracy_beats_v1_on_every_domain(model, tok):
    for d in DOMAINS:
        correct, scored = first_8_accuracy(model, tok, d)
        v1_correct, v1_scored = V1_FIRST_8[d]
        assert scored == v1_scored, f"{d}: the first 8 held-out passages changed"
        assert correct > v1_correct, f"{d}: {correct}/{scored} correct, v1 had {v1_correct}"
