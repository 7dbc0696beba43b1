"""Benchmark query matching and end-to-end serving (not a test: prints a table, writes JSON).

    python tools/bench_serve.py --json out.json [--pool P --store S]

Without --pool/--store it builds them under --work from the shipped demo model and packs.
Measures, in one run:
  - matching latency of single user-style queries (patterns/eval/queries, p50, p99) and queries/s
    in batches of 64 with the default matcher of `domex serve` (hybrid: MiniLM + the model's first
    router), with the default (int8 ONNX) embedder and the PyTorch one (`_slow`): top-1 accuracy of
    both, how often they agree, the routing view's share, and the single-query p50 on passages;
  - the embedder alone on ~100 user-style queries: latency, queries/s in batches of 64, and how
    close the int8 ONNX vectors are to the PyTorch ones (mean cosine, nearest-neighbour agreement);
  - end-to-end serving by `domex serve` (a real server process on a loopback port): mixed-domain
    user queries, max_tokens 8-128, greedy, streamed, at concurrency 1, 8 and 32: generated tokens/s,
    time to first token (TTFT) and latency p50/p99 with masks of --budget and --resident slots; in
    the same run the static scheduler as it served before (`--scheduler static --max-batch 8`; at
    concurrency 32 also with batches of 32), the full model (every expert, continuous batching), and
    both schedulers at concurrency 32 with slots for one mask only;
  - batch invariance: the share of mixed-domain requests whose greedy tokens in one continuous
    batch equal their solo run, in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

QUERIES = [  # user-style requests for the embedder: 3-30 words, prose and code, several languages
    "How do I reverse a list in Python?",
    "Write a function that checks whether a string is a palindrome.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Why does my for loop skip every other element when I remove items?",
    "import numpy as np; x = np.arange(10).reshape(2, 5)",
    "What is the difference between a list and a tuple?",
    "Explain Python decorators with a short example.",
    "How can I read a CSV file with pandas and drop empty rows?",
    "async def fetch(url): async with httpx.AsyncClient() as c: return await c.get(url)",
    "TypeError: 'NoneType' object is not subscriptable, what does it mean?",
    "Sort a dictionary by value in descending order.",
    "class Stack: def __init__(self): self.items = []",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 5;",
    "How do I join three tables in SQL without duplicating rows?",
    "Write a query that returns the second highest salary per department.",
    "CREATE INDEX idx_users_email ON users(email);",
    "What does a LEFT OUTER JOIN return when there is no match?",
    "UPDATE accounts SET balance = balance - 100 WHERE id = 42;",
    "Find customers who ordered nothing in the last 30 days.",
    "Is a window function faster than a correlated subquery?",
    "int main(void) { printf(\"hello\\n\"); return 0; }",
    "Why does my C program segfault when I free a pointer twice?",
    "How do I allocate a 2D array with malloc?",
    "struct node { int value; struct node *next; };",
    "What is undefined behaviour in C and why should I care?",
    "for (int i = 0; i < n; i++) sum += a[i] * b[i];",
    "Explain the difference between stack and heap memory.",
    "How do I read a file line by line in C with fgets?",
    "What is 17 times 23?",
    "Solve 3x + 7 = 22 for x.",
    "What is the derivative of x squared times sine of x?",
    "Compute the sum of the first 100 positive integers.",
    "Is 221 a prime number?",
    "A train travels 120 km in 1.5 hours; what is its average speed?",
    "Simplify (2a + 3b)(2a - 3b).",
    "What is the probability of rolling two sixes with two dice?",
    "Integrate 1 / (1 + x^2) from 0 to 1.",
    "How many ways can 5 people sit in a row?",
    "grep -rn TODO src | wc -l",
    "How do I find files larger than 100 MB on Linux?",
    "tar -czf backup.tar.gz /home/user/documents",
    "What does chmod 755 do?",
    "How can I kill a process that is listening on port 8080?",
    "Write a bash loop that renames all .txt files to .md.",
    "ssh -L 8888:localhost:8888 user@server",
    "Why does my cron job not run at all?",
    "Wie spät ist es in Berlin gerade?",
    "Kannst du mir ein gutes Rezept für Apfelstrudel empfehlen?",
    "Ich suche eine Wohnung in München mit zwei Zimmern.",
    "Was ist der Unterschied zwischen Wetter und Klima?",
    "¿Cuál es la capital de Australia?",
    "Necesito ayuda para escribir una carta de presentación.",
    "¿Cómo se prepara una paella valenciana tradicional?",
    "Mi perro no quiere comer desde ayer, ¿qué hago?",
    "Quelle est la meilleure saison pour visiter le Japon ?",
    "Peux-tu traduire cette phrase en anglais, s'il te plaît ?",
    "Comment fonctionne l'impôt sur le revenu en France ?",
    "Qual è la differenza tra un espresso e un ristretto?",
    "Come posso imparare a suonare la chitarra da solo?",
    "Como faço para abrir uma conta bancária em Portugal?",
    "Hoe laat gaat de supermarkt morgen open?",
    "Как приготовить борщ дома?",
    "Сколько стоит билет на поезд из Москвы в Казань?",
    "東京から大阪まで新幹線でどのくらいかかりますか？",
    "この文章を英語に翻訳してください。",
    "北京今天的天气怎么样？",
    "请帮我写一封请假邮件。",
    "서울에서 가장 맛있는 김치찌개 집은 어디인가요?",
    "ما هي عاصمة المغرب؟",
    "Merhaba, en yakın eczane nerede?",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "Write a short poem about autumn rain.",
    "Summarise the plot of Hamlet in three sentences.",
    "What are the symptoms of iron deficiency?",
    "My landlord refuses to return my deposit; what are my rights?",
    "How much should I save each month to retire at 60?",
    "Who won the football World Cup in 2014?",
    "Give me a recipe for vegan chocolate chip cookies.",
    "What is the best way to learn a new language as an adult?",
    "Recommend three science fiction novels for a long flight.",
    "How do vaccines train the immune system?",
    "Explain inflation to a ten year old.",
    "What is the tallest mountain in Africa?",
    "Draft a polite email declining a meeting invitation.",
    "{\"name\": \"Alice\", \"age\": 30, \"tags\": [\"admin\", \"dev\"]}",
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: web",
    "id,name,price\n1,apple,0.5\n2,pear,0.7",
    "<div class=\"card\"><h2>Title</h2><p>Body text</p></div>",
    ">seq1\nATGCGTACGTTAGCCTAGGCTAACGTTAGC",
    "fn main() { let v: Vec<i32> = (1..10).collect(); println!(\"{:?}\", v); }",
    "public static void main(String[] args) { System.out.println(\"Hi\"); }",
    "const add = (a, b) => a + b; console.log(add(2, 3));",
    "package main; import \"fmt\"; func main() { fmt.Println(\"go\") }",
    "How do I center a div horizontally and vertically with CSS?",
    "What is the time complexity of quicksort in the worst case?",
    "Explain the CAP theorem in distributed systems.",
    "How does gradient descent find a minimum?",
    "What is the difference between TCP and UDP?",
    "Patient presents with chest pain radiating to the left arm and shortness of breath.",
    "The defendant moved to dismiss for lack of personal jurisdiction.",
]


def passages(limit: int) -> list[str]:
    out = []
    for path in sorted((ROOT / "patterns" / "eval").glob("*.jsonl.gz")):
        if path.name.startswith("ood"):
            continue
        with gzip.open(path, "rt") as f:
            out += [json.loads(line)["text"][:400] for _, line in zip(range(limit), f)]
    return out


def latencies(fn, texts: list[str]) -> tuple[list[float], list]:
    """Milliseconds of fn([text]) for each text, and what it returned."""
    fn(texts[:8])  # load models, calibrate, read the index
    ms, out = [], []
    for text in texts:
        start = time.perf_counter()
        out.extend(fn([text]))
        ms.append((time.perf_counter() - start) * 1e3)
    return ms, out


def batched_qps(fn, texts: list[str], size: int = 64) -> float:
    batches = [texts[i:i + size] for i in range(0, len(texts) - size + 1, size)] or [texts]
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def user_queries() -> tuple[list[str], list[str]]:
    """(query, its domain) of the hand-written user-style queries, shuffled: what routing is judged on."""
    pairs = [(json.loads(line)["text"], path.stem) for path in sorted((ROOT / "patterns" / "eval" / "queries").glob("*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    np.random.default_rng(0).shuffle(pairs)
    return [q for q, _ in pairs], [d for _, d in pairs]


def bench_matching(pool: Path, store_dir: Path, long_texts: list[str]) -> dict:
    """The default (hybrid) matcher as `domex serve` runs it, with the int8 ONNX and the PyTorch embedder,
    on user-style queries; its routing view alone; and the default on held-out passages for comparison."""
    from domex.runtime.match import open_matcher
    from domex.store.db import Store
    from domex.store.embed import get_embedder

    texts, domains = user_queries()
    store = Store.open(store_dir, create=False)
    fast = open_matcher("hybrid", store, pool)
    slow = open_matcher("hybrid", store, pool)
    slow.embedder = get_embedder("torch")
    single, routed = latencies(fast.match_many, texts)
    single_slow, routed_slow = latencies(slow.match_many, texts)
    routing_view, _ = latencies(fast.profiles, texts)

    def accuracy(matches):
        return float(np.mean([m.domain == d for m, d in zip(matches, domains)]))

    return {"match_matcher": fast.name, "match_p50_ms": float(np.percentile(single, 50)),
            "match_p99_ms": float(np.percentile(single, 99)), "match_qps_batched": batched_qps(fast.match_many, texts),
            "match_queries": len(single), "match_p50_ms_slow": float(np.percentile(single_slow, 50)),
            "match_accuracy": accuracy(routed), "match_accuracy_slow": accuracy(routed_slow),
            "match_agreement_slow": float(np.mean([a.domain == b.domain for a, b in zip(routed, routed_slow)])),
            "match_ood_agreement_slow": float(np.mean([a.ood == b.ood for a, b in zip(routed, routed_slow)])),
            "match_routing_view_p50_ms": float(np.percentile(routing_view, 50)),
            "match_p50_ms_passage": float(np.percentile(latencies(fast.match_many, long_texts)[0], 50))}


def bench_embedding(texts: list[str]) -> dict:
    """The embedder alone: the default (int8 ONNX) path, and the PyTorch path it replaces."""
    from domex.store.embed import get_embedder

    fast, slow = get_embedder(), get_embedder("torch")
    single, vecs = latencies(fast.encode, texts)
    single_slow, ref = latencies(slow.encode, texts)
    vecs, ref = np.stack(vecs), np.stack(ref)  # [Q, D]

    def nearest(v):  # each query's nearest other query
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return sims.argmax(1)

    cos = (vecs * ref).sum(1)
    return {"embed_backend": fast.backend, "embed_p50_ms": float(np.percentile(single, 50)),
            "embed_p99_ms": float(np.percentile(single, 99)), "embed_qps_batched": batched_qps(fast.encode, texts * 4),
            "embed_p50_ms_slow": float(np.percentile(single_slow, 50)), "embed_queries": len(texts),
            "embed_cosine_to_slow": float(cos.mean()), "embed_cosine_min": float(cos.min()),
            "embed_nn_agreement": float(np.mean(nearest(vecs) == nearest(ref)))}


def serve(pool: Path, store: Path, flags: list[str]):
    """A `domex serve` process on a free loopback port; yields its URL and stops it afterwards."""
    import contextlib

    from domex.runtime.server import free_port, spawn

    @contextlib.contextmanager
    def running():
        port = free_port()
        server = spawn(pool, store, port, "--max-tokens", "128", *flags, output=subprocess.DEVNULL)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.terminate()
            server.wait(timeout=30)

    return running()


def traffic(url: str, work: list[tuple[str, int]], concurrency: int) -> dict:
    """Stream every (prompt, max_tokens) at `concurrency`; tokens/s, TTFT and latency percentiles."""
    import httpx

    async def run():
        ttft, latency, tokens = [], [], []
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(prompt, max_tokens):
                async with sem:
                    t, first = time.perf_counter(), None
                    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
                    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                        r.raise_for_status()
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            first = first or time.perf_counter()
                            if chunk.get("usage"):
                                tokens.append(chunk["usage"]["completion_tokens"])
                    ttft.append(first - t)
                    latency.append(time.perf_counter() - t)
            start = time.perf_counter()
            await asyncio.gather(*[one(p, n) for p, n in work])
            return time.perf_counter() - start, ttft, latency, tokens

    wall, ttft, latency, tokens = asyncio.run(run())
    return {"tps": sum(tokens) / wall, "rps": len(work) / wall, "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
            "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3), "latency_p50_ms": float(np.percentile(latency, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(latency, 99) * 1e3)}


def bench_e2e(pool: Path, store: Path, budget: str, resident: str, requests: int) -> dict:
    """Mixed-domain user queries, max_tokens 8-128, greedy, streamed: the continuous scheduler (masks of
    `budget`, `resident` slots), and in the same run the static scheduler (same flags), the full model
    (every expert, continuous) and both schedulers with only one mask's slots (resident = budget: `_tight`).
    The static scheduler runs as it did before continuous batching (batches of 8); `_static32` with the
    same cap as the continuous one."""
    texts, _ = user_queries()
    rng = np.random.default_rng(0)
    work = [(t, int(rng.integers(8, 129))) for t in texts[:requests]]
    flags = ["--budget", budget, "--resident", resident]
    out = {}
    static = ["--scheduler", "static", "--max-batch", "8"]  # as it served before continuous batching
    for suffix, extra, levels in (("", flags, (1, 8, 32)), ("_static", flags + static, (1, 8, 32)),
                                  ("_static32", flags + ["--scheduler", "static"], (32,)),
                                  ("_full", ["--budget", "100%"], (1, 8, 32)), ("_tight", ["--budget", budget], (32,)),
                                  ("_static_tight", ["--budget", budget, *static], (32,))):
        with serve(pool, store, extra) as url:
            traffic(url, work[:4], 4)  # warm up: embedder, index, first expert loads
            for concurrency in levels:
                shown = work[:max(8, requests // 4)] if concurrency == 1 else work
                for key, value in traffic(url, shown, concurrency).items():
                    out[f"{key}_c{concurrency}{suffix}"] = value
    for c in (1, 8):  # the earlier keys
        out[f"e2e_rps_c{c}"], out[f"e2e_p50_ms_c{c}"] = out[f"rps_c{c}"], out[f"latency_p50_ms_c{c}"]
    return out


def batch_agreement(pool: Path, store_dir: Path, budget: str, resident: str, dtype: str, requests: int = 16,
                    tokens: int = 24) -> float:
    """Share of mixed-domain requests whose greedy tokens in one continuous batch equal their solo `generate`."""
    import threading

    import torch

    from domex.runtime.engine import Engine
    from domex.runtime.selection import MaskBook
    from domex.runtime.serving import ContinuousScheduler, Job
    from domex.store.budget import Budget
    from domex.store.db import Store

    store = Store.open(store_dir, create=False)
    engine = Engine.open(pool, budget=resident, dtype=dtype)
    m = engine.pool.manifest
    masks = MaskBook(store, Budget.parse(budget), num_layers=m.num_layers, num_experts=m.num_experts)
    texts, domains = user_queries()
    cases = [(engine.tokenizer(t)["input_ids"], masks.mask([d])) for t, d in zip(texts[:requests], domains)]
    solo = []
    for ids, mask in cases:
        out = engine.generate(torch.tensor([ids]), mask=mask, do_sample=False, max_new_tokens=tokens)[0, len(ids):].tolist()
        eos = engine.model.generation_config.eos_token_id
        solo.append(out[:out.index(eos)] if eos in out else out)
    done = threading.Semaphore(0)
    jobs = [Job(ids, tokens, 0.0, 1.0, mask, emit=lambda text: None, finish=lambda reason, usage: done.release(),
                fail=lambda exc: done.release()) for ids, mask in cases]
    scheduler = ContinuousScheduler(engine, max_batch=requests)
    for job in jobs:
        scheduler.submit(job)
    for _ in jobs:
        done.acquire()
    engine.close()
    return float(np.mean([j.tokens == s for j, s in zip(jobs, solo)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool")
    ap.add_argument("--store")
    ap.add_argument("--work", default=".domex", help="where the pool and store are built when not given")
    ap.add_argument("--budget", default="50%", help="each domain's mask (serve --budget)")
    ap.add_argument("--resident", default="100%", help="expert slots per layer (serve --resident)")
    ap.add_argument("--passages", type=int, default=40, help="held-out passages per domain for matching")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level (a quarter at concurrency 1)")
    ap.add_argument("--json", default="bench_serve.json")
    ap.add_argument("--matching-only", action="store_true", help="only the matching and embedding rows (~2 min)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    pool, store = Path(args.pool or Path(args.work) / "pool"), Path(args.store or Path(args.work) / "store")
    if not (store / "data.mdb").is_file():
        subprocess.run([sys.executable, "-m", "domex.runtime.cli", "demo", "--work", args.work, "--passages", "1",
                        "--tokens", "1"], check=True, stdout=subprocess.DEVNULL)
    texts = passages(args.passages)
    rng = np.random.default_rng(0)
    rng.shuffle(texts)
    load = os.getloadavg()
    result = bench_matching(pool, store, texts)
    result.update(bench_embedding(QUERIES))
    if not args.matching_only:
        result.update(bench_e2e(pool, store, args.budget, args.resident, args.requests))
        result["batch_agreement_fp32"] = batch_agreement(pool, store, args.budget, args.resident, "float32")
        result["batch_agreement_bf16"] = batch_agreement(pool, store, args.budget, args.resident, "bfloat16")
    import torch

    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                         "loadavg_before_matching": load}
    rows = [("match p50 (user query)", f"{result['match_p50_ms']:.1f} ms",
             f"{result['match_matcher']}; target <= 5 ms; PyTorch embedder {result['match_p50_ms_slow']:.1f} ms"),
            ("match p99 (user query)", f"{result['match_p99_ms']:.1f} ms", "target <= 15 ms"),
            ("match, batches of 64", f"{result['match_qps_batched']:.0f} q/s", "target >= 1000 q/s"),
            ("match top-1 (user queries)", f"{result['match_accuracy']:.1%}",
             f"PyTorch embedder {result['match_accuracy_slow']:.1%}; same domain {result['match_agreement_slow']:.1%}, "
             f"same OOD flag {result['match_ood_agreement_slow']:.1%}"),
            ("match routing view p50", f"{result['match_routing_view_p50_ms']:.1f} ms", "first MoE router, run beside the embedder"),
            ("match p50 (held-out passage)", f"{result['match_p50_ms_passage']:.1f} ms", "~115 tokens"),
            ("embed p50 (user query)", f"{result['embed_p50_ms']:.1f} ms",
             f"{result['embed_backend']}; PyTorch {result['embed_p50_ms_slow']:.1f} ms"),
            ("embed p99 (user query)", f"{result['embed_p99_ms']:.1f} ms", ""),
            ("embed, batches of 64", f"{result['embed_qps_batched']:.0f} q/s", ""),
            ("embed cosine to PyTorch", f"{result['embed_cosine_to_slow']:.3f}",
             f"min {result['embed_cosine_min']:.3f}; nearest neighbour agrees {result['embed_nn_agreement']:.0%}")]
    rows += [] if args.matching_only else serving_rows(result)
    print(f"| {'measure':32} | {'value':>12} | note |\n| {'-' * 32} | {'-' * 12} | --- |")
    for name, value, note in rows:
        print(f"| {name:32} | {value:>12} | {note} |")
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


def serving_rows(result: dict) -> list[tuple[str, str, str]]:
    """The serving rows of the table: tokens/s, TTFT and latency per concurrency, static batches, batch = solo."""
    return [*[(f"generated tokens/s, concurrency {c}", f"{result[f'tps_c{c}']:.0f}",
               f"static {result[f'tps_c{c}_static']:.0f} ({result[f'tps_c{c}'] / result[f'tps_c{c}_static']:.2f}x); "
               f"full model {result[f'tps_c{c}_full']:.0f} ({result[f'tps_c{c}'] / result[f'tps_c{c}_full']:.2f}x)")
              for c in (1, 8, 32)],
            *[(f"TTFT p50 / p99, concurrency {c}", f"{result[f'ttft_p50_ms_c{c}']:.0f} / {result[f'ttft_p99_ms_c{c}']:.0f} ms",
               f"static {result[f'ttft_p50_ms_c{c}_static']:.0f} / {result[f'ttft_p99_ms_c{c}_static']:.0f} ms; "
               f"p99 {result[f'ttft_p99_ms_c{c}_static'] / result[f'ttft_p99_ms_c{c}']:.1f}x lower")
              for c in (1, 8, 32)],
            *[(f"latency p50 / p99, concurrency {c}",
               f"{result[f'latency_p50_ms_c{c}']:.0f} / {result[f'latency_p99_ms_c{c}']:.0f} ms",
               f"static {result[f'latency_p50_ms_c{c}_static']:.0f} / {result[f'latency_p99_ms_c{c}_static']:.0f} ms")
              for c in (1, 8, 32)],
            ("requests/s, concurrency 1 / 8", f"{result['e2e_rps_c1']:.2f} / {result['e2e_rps_c8']:.2f}",
             "max_tokens 8-128, streamed"),
            ("static, batches of 32, c32", f"{result['tps_c32_static32']:.0f} tok/s",
             f"TTFT p99 {result['ttft_p99_ms_c32_static32']:.0f} ms; continuous {result['tps_c32'] / result['tps_c32_static32']:.2f}x "
             f"tokens/s, {result['ttft_p99_ms_c32_static32'] / result['ttft_p99_ms_c32']:.1f}x lower TTFT p99"),
            ("tokens/s c32, resident = budget", f"{result['tps_c32_tight']:.0f}",
             f"static {result['tps_c32_static_tight']:.0f} ({result['tps_c32_tight'] / result['tps_c32_static_tight']:.2f}x); "
             f"TTFT p99 {result['ttft_p99_ms_c32_tight']:.0f} vs static {result['ttft_p99_ms_c32_static_tight']:.0f} ms"),
            ("batch = solo, fp32 / bf16", f"{result['batch_agreement_fp32']:.0%} / {result['batch_agreement_bf16']:.0%}",
             "greedy tokens of mixed-domain rows in one batch vs each alone")]


if __name__ == "__main__":
    sys.exit(main())
