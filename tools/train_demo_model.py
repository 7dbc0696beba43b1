"""Train domex's demo model: a tiny Qwen3-MoE (stock transformers classes) on the 8-domain corpus.

CPU, one thread (the machine is shared), fp32 master weights, AdamW with warmup + cosine LR,
router load-balancing loss on. Every batch holds the same number of sequences from every domain,
so no domain dominates the routers. Math and SQL items are wrapped in the chat template half of
the time, so `{"prompt","response"}` demos rendered with it are in distribution.

Logs one JSON line per log interval (train loss, aux loss, lr, tokens, per-domain held-out loss
and accuracy every --eval-every steps) to <work>/log.jsonl, checkpoints to <work>/ckpt (model and
AdamW state as safetensors, no pickle) and resumes from there with --resume. The final weights are
written in bf16 with `save_pretrained` next to the tokenizer in --out.

    RAYON_NUM_THREADS=1 python tools/train_demo_model.py --corpus /work/scratch/corpus \
        --work /work/scratch/train --out models/tiny-moe --steps 3000
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

DOMAINS = ["python", "c", "math", "sql", "english", "german", "spanish", "unix"]


@dataclass
class TrainConfig:
    steps: int = 1500
    seqs_per_domain: int = 4  # v1 trained with 1: 4 sequences per domain fill both cores' matmuls better
    threads: int = 2  # v1 trained on 1
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_frac: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 25
    eval_every: int = 250
    eval_passages: int = 32
    ckpt_every: int = 250
    seed: int = 0


def model_config(tok) -> Qwen3MoeConfig:
    """The demo architecture: every layer MoE, 32 routed experts, top-4 with renormalisation."""
    return Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, intermediate_size=512,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], output_router_logits=True, router_aux_loss_coef=0.01,
        max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
    )


# ---------------------------------------------------------------- data

def chatify(domain: str, passage: str) -> str:
    """Render a math/sql passage's items as chat turns (prompt/response split as in the demos)."""
    turns = []
    for item in passage.split("\n\n"):
        if domain == "math":
            p, _, r = item.partition("\nSolution:")
            r = "Solution:" + r
        else:
            p, _, r = item.rpartition("\n")
        turns.append(f"<|user|>\n{p}<|end|>\n<|assistant|>\n{r}<|end|>\n")
    return "".join(turns)


CHAT = "<|user|>\n{request}<|end|>\n<|assistant|>\n{response}<|end|>\n"
REQUESTS = {  # request templates per domain: {name} is filled from the passage the request asks for
    "python": ["Write a Python function {name}.", "How is {name} implemented in Python?",
               "Show me Python code that defines {name}.", "Can you write {name} in Python for me?"],
    "c": ["Write the C function {name}.", "How would you implement {name} in C?",
          "Show me C code for {name}.", "Give me a C implementation of {name}."],
    "unix": ["What does the {name} command do?", "How do I use {name}?", "Show me the manual of {name}.",
             "Explain the options of {name}."],
    "english": ["Tell me a saying.", "Write a short quote.", "Give me a piece of advice.", "Share a funny line."],
    "german": ["Erzähl mir einen Spruch.", "Schreib ein kurzes Gedicht.", "Gib mir einen guten Rat.",
               "Kennst du ein Zitat?"],
    "spanish": ["Dime un refrán.", "Escríbeme una cita corta.", "Dame un consejo.", "¿Conoces alguna frase célebre?"],
}
DEFINED = {"python": re.compile(r"^\s*def (\w+)\(", re.M), "c": re.compile(r"^[A-Za-z_][\w \*]*?\b(\w+)\([^;{]*\)\s*\{", re.M),
           "unix": re.compile(r"^NAME\s*\n\s+([\w.+-]+)", re.M)}


def requests_of(domain: str, text: str, rng: random.Random, held_out: set[str]) -> list[str]:
    """Chat items in the form users send: a request about the passage, then the passage as the answer.

    Code and man pages: the request names a function or command the passage defines. Prose: a generic
    request in the domain's language. Math and SQL passages already hold question/answer items (chatify).
    Requests that equal a held-out query (patterns/eval/queries, patterns/dev) are dropped."""
    if domain in DEFINED:
        names = DEFINED[domain].findall(text)
        if not names:
            return []
        request = rng.choice(REQUESTS[domain]).format(name=rng.choice(names))
    else:
        request = rng.choice(REQUESTS[domain])
    if request.lower().strip() in held_out:
        return []
    return [CHAT.format(request=request, response=text.strip())]


def held_out_queries(patterns: Path) -> set[str]:
    """Every evaluation and dev query and every user turn of a dev chat, lower-cased: training requests must not repeat them."""
    out = set()
    for folder in (patterns / "eval" / "queries", patterns / "dev"):
        for path in folder.rglob("*.jsonl"):
            for record in (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()):
                turns = [m["content"] for m in record["messages"] if m["role"] == "user"] if "messages" in record else [record["text"]]
                out |= {t.lower().strip() for t in turns}
    return out


def domain_stream(corpus: Path, domain: str, tok, seed: int, cache: Path, held_out: set[str] = frozenset(),
                  request_share: float = 0.25) -> np.ndarray:
    """All training passages of a domain as one uint16 token stream, eos between passages; about
    `request_share` of the passages also appear as the answer to a user-style request (chat template)."""
    path = cache / f"{domain}.npy"
    if path.exists():
        return np.load(path)
    rng = random.Random(f"{seed}:chat:{domain}")
    texts = [json.loads(l)["text"] for l in open(corpus / domain / "train.jsonl", encoding="utf-8")]
    if domain in ("math", "sql"):
        texts = [chatify(domain, t) if rng.random() < 0.5 else t for t in texts]
    elif request_share > 0:
        asked = random.Random(f"{seed}:requests:{domain}")
        texts += [item for t in texts if asked.random() < request_share for item in requests_of(domain, t, asked, held_out)]
        asked.shuffle(texts)
    ids = tok(texts, add_special_tokens=False).input_ids
    eos = tok.eos_token_id
    arr = np.fromiter((t for seq in ids for t in (*seq, eos)), dtype=np.uint16)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


def read_eval(patterns: Path, domain: str) -> list[str]:
    with gzip.open(patterns / "eval" / f"{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(l)["text"] for l in f]


def eval_batch(tok, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on padding) for teacher-forced held-out scoring."""
    ids = [x[:max_len] for x in tok(texts, add_special_tokens=False).input_ids]
    n = max(map(len, ids))
    inp = torch.full((len(ids), n), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(ids), n), -100, dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, :len(x)] = torch.tensor(x)
        lab[i, :len(x)] = torch.tensor(x)
    return inp, lab


@torch.no_grad()
def held_out(model, batches: dict[str, tuple[torch.Tensor, torch.Tensor]], chunk: int = 16) -> dict:
    """Per-domain mean next-token loss, perplexity and top-1 accuracy over all scored tokens."""
    model.eval()
    out = {}
    for d, (inp, lab) in batches.items():
        nll, hit, n = 0.0, 0, 0
        for s in range(0, len(inp), chunk):
            x, y = inp[s:s + chunk], lab[s:s + chunk]
            logits = model(input_ids=x, attention_mask=(y != -100).long(), output_router_logits=False).logits[:, :-1].float()
            tgt = y[:, 1:]
            m = tgt != -100
            nll += torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="sum").item()
            hit += (logits.argmax(-1)[m] == tgt[m]).sum().item()
            n += m.sum().item()
        out[d] = {"loss": nll / n, "ppl": math.exp(nll / n), "acc": hit / n, "tokens": n}
    model.train()
    return out


def sample_batch(streams: dict[str, np.ndarray], rng: np.random.Generator, cfg: TrainConfig) -> torch.Tensor:
    rows = []
    for d in DOMAINS:
        s = streams[d]
        for o in rng.integers(0, len(s) - cfg.seq_len - 1, size=cfg.seqs_per_domain):
            rows.append(s[o:o + cfg.seq_len + 1].astype(np.int64))
    return torch.from_numpy(np.stack(rows))


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# ---------------------------------------------------------------- checkpoints (safetensors + json)

def save_ckpt(ckpt: Path, model, opt, step: int, rng: np.random.Generator, tokens: int) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                state[f"{n}::exp_avg"] = st["exp_avg"].contiguous()
                state[f"{n}::exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                state[f"{n}::step"] = st["step"].reshape(1).float()
    save_file(state, tmp / "optimizer.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "tokens": tokens,
                                                         "rng": rng.bit_generator.state}))
    if ckpt.exists():
        old = ckpt.with_name(ckpt.name + ".old")
        ckpt.rename(old)
        tmp.rename(ckpt)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(ckpt)


def load_ckpt(ckpt: Path, model, opt, rng: np.random.Generator) -> tuple[int, int]:
    """Restore AdamW state (keyed by in-memory parameter names) and the data RNG; weights load earlier."""
    state = load_file(ckpt / "optimizer.safetensors")
    for n, p in model.named_parameters():
        if f"{n}::exp_avg" in state:
            opt.state[p] = {"exp_avg": state[f"{n}::exp_avg"], "exp_avg_sq": state[f"{n}::exp_avg_sq"],
                            "step": state[f"{n}::step"].reshape(())}
    ts = json.loads((ckpt / "trainer_state.json").read_text())
    rng.bit_generator.state = ts["rng"]
    return ts["step"], ts["tokens"]


# ---------------------------------------------------------------- main

def bench(tok, streams: dict[str, np.ndarray], cfg: TrainConfig, steps: int, work: Path) -> dict:
    """Training tokens/s of v1's settings (1 thread, 1 sequence per domain) and of `cfg`, measured in one run."""
    out = {}
    for name, threads, seqs in (("v1", 1, 1), ("now", cfg.threads, cfg.seqs_per_domain)):
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        run = TrainConfig(seqs_per_domain=seqs, threads=threads)
        model = Qwen3MoeForCausalLM(model_config(tok)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        rng = np.random.default_rng(cfg.seed)
        for i in range(steps + 1):  # the first step warms up and is not timed
            if i == 1:
                t0 = time.time()
            batch = sample_batch(streams, rng, run)
            model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), output_router_logits=True).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[name] = {"threads": threads, "seqs_per_domain": seqs,
                     "tokens_per_s": steps * len(DOMAINS) * seqs * cfg.seq_len / (time.time() - t0)}
        print(f"{name}: {threads} thread(s), {seqs} sequence(s) per domain: {out[name]['tokens_per_s']:.0f} tokens/s")
    out["speedup"] = out["now"]["tokens_per_s"] / out["v1"]["tokens_per_s"]
    print(f"speedup {out['speedup']:.2f}x")
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench.json").write_text(json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("/work/scratch/corpus"))
    ap.add_argument("--patterns", type=Path, default=Path("patterns"))
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/train"))
    ap.add_argument("--out", type=Path, default=Path("models/tiny-moe"))
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="time this many steps with v1's settings and with these, "
                    "in one run, print tokens/s of both, write <work>/bench.json and exit")
    args = ap.parse_args()
    cfg = TrainConfig(steps=args.steps, lr=args.lr)

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(args.out)
    queries = held_out_queries(args.patterns)
    streams = {d: domain_stream(args.corpus, d, tok, cfg.seed, args.work / "tokens", queries)
               for d in tqdm(DOMAINS, desc="tokenize")}
    if args.bench:
        bench(tok, streams, cfg, args.bench, args.work)
        return
    evals = {d: eval_batch(tok, read_eval(args.patterns, d)[:cfg.eval_passages], cfg.seq_len) for d in DOMAINS}
    print({d: len(s) for d, s in streams.items()})

    ckpt = args.work / "ckpt"
    resume = args.resume and ckpt.exists()
    mcfg = model_config(tok)
    # from_pretrained converts the on-disk per-expert keys back to the fused in-memory layout
    model = Qwen3MoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32) if resume else Qwen3MoeForCausalLM(mcfg)
    assert model.config._experts_implementation == "grouped_mm", model.config._experts_implementation
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(cfg.seed)
    step, tokens = 0, 0
    log_path = args.work / "log.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    if resume:
        step, tokens = load_ckpt(ckpt, model, opt, rng)
        # --steps may differ from the interrupted run's: the cosine is then re-planned from here on
        with open(log_path, "a") as f:
            f.write(json.dumps({"resume": step, "steps": cfg.steps, "tokens": tokens}) + "\n")
        print(f"resumed at step {step}, planning {cfg.steps} steps")
    else:
        log_path.write_text(json.dumps({"config": asdict(cfg), "model": mcfg.to_dict(),
                                        "params": sum(p.numel() for p in model.parameters())}) + "\n")
    model.train()
    t0, acc_loss, acc_aux, n_acc = time.time(), 0.0, 0.0, 0
    bar = tqdm(total=cfg.steps, initial=step, desc="train")
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = sample_batch(streams, rng, cfg)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone(), output_router_logits=True)
        # transformers shifts labels itself; passing the input ids as labels predicts token t+1.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += batch[:, :-1].numel()
        aux = out.aux_loss.item()
        acc_loss += out.loss.item() - mcfg.router_aux_loss_coef * aux
        acc_aux += aux
        n_acc += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, "tokens": tokens, "lr": lr_at(step - 1, cfg), "train_loss": acc_loss / n_acc,
                   "aux_loss": acc_aux / n_acc, "elapsed_s": round(time.time() - t0, 1)}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec["held_out"] = held_out(model, evals)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", aux=f"{rec['aux_loss']:.3f}")
            acc_loss, acc_aux, n_acc = 0.0, 0.0, 0
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_ckpt(ckpt, model, opt, step, rng, tokens)
    bar.close()
    model.to(torch.bfloat16).save_pretrained(args.out)
    GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     do_sample=False, max_new_tokens=64).save_pretrained(args.out)
    print(f"saved {args.out} after {step} steps, {tokens} tokens, {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
