"""Benchmark query matching and end-to-end serving (not a test: prints a table, writes JSON).

    python tools/bench_serve.py --json out.json [--pool P --store S]

Without --pool/--store it builds them under --work from the shipped demo model and packs.
Measures, in one run:
  - matching latency of single queries (p50, p99) and queries/s in batches of 64, on held-out
    passages of every domain (embedding matcher: MiniLM + FAISS vote);
  - end-to-end requests/s and latency of `domex serve` (a real server process on a loopback port)
    at concurrency 1 and 8 on mixed-domain traffic, each request 16 new tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def passages(limit: int) -> list[str]:
    out = []
    for path in sorted((ROOT / "patterns" / "eval").glob("*.jsonl.gz")):
        if path.name.startswith("ood"):
            continue
        with gzip.open(path, "rt") as f:
            out += [json.loads(line)["text"][:400] for _, line in zip(range(limit), f)]
    return out


def bench_matching(store_dir: Path, texts: list[str]) -> dict:
    from domex.runtime.match import EmbeddingMatcher
    from domex.store.db import Store

    matcher = EmbeddingMatcher(Store.open(store_dir, create=False))
    matcher.match_many(texts[:8])  # load the embedder, calibrate, read the index
    single = []
    for text in texts:
        start = time.perf_counter()
        matcher.match_many([text])
        single.append((time.perf_counter() - start) * 1e3)
    batches = [texts[i:i + 64] for i in range(0, len(texts) - 63, 64)] or [texts]
    start = time.perf_counter()
    for batch in batches:
        matcher.match_many(batch)
    qps = sum(len(b) for b in batches) / (time.perf_counter() - start)
    return {"match_p50_ms": float(np.percentile(single, 50)), "match_p99_ms": float(np.percentile(single, 99)),
            "match_qps_batched": qps, "match_queries": len(single)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_e2e(pool: Path, store: Path, texts: list[str], budget: str, requests: int) -> dict:
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "domex.runtime.cli", "serve", "--pool", str(pool), "--store", str(store),
                               "--budget", budget, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        out = {}
        for concurrency in (1, 8):
            async def run():
                latencies = []
                sem = asyncio.Semaphore(concurrency)
                async with httpx.AsyncClient(timeout=300) as client:
                    async def one(text):
                        async with sem:
                            t = time.perf_counter()
                            r = await client.post(f"{url}/v1/completions", json={"prompt": text[:300], "max_tokens": 16})
                            r.raise_for_status()
                            latencies.append(time.perf_counter() - t)
                    start = time.perf_counter()
                    await asyncio.gather(*[one(t) for t in texts[:requests]])
                    return requests / (time.perf_counter() - start), latencies
            rps, lat = asyncio.run(run())
            out[f"e2e_rps_c{concurrency}"] = rps
            out[f"e2e_p50_ms_c{concurrency}"] = float(np.percentile(lat, 50) * 1e3)
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool")
    ap.add_argument("--store")
    ap.add_argument("--work", default=".domex", help="where the pool and store are built when not given")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--passages", type=int, default=40, help="held-out passages per domain for matching")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--json", default="bench_serve.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    pool, store = Path(args.pool or Path(args.work) / "pool"), Path(args.store or Path(args.work) / "store")
    if not (store / "data.mdb").is_file():
        subprocess.run([sys.executable, "-m", "domex.runtime.cli", "demo", "--work", args.work, "--passages", "1",
                        "--tokens", "1"], check=True, stdout=subprocess.DEVNULL)
    texts = passages(args.passages)
    rng = np.random.default_rng(0)
    rng.shuffle(texts)
    result = bench_matching(store, texts)
    result.update(bench_e2e(pool, store, texts, args.budget, args.requests))
    import torch

    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    rows = [("match p50 (single query)", f"{result['match_p50_ms']:.1f} ms", "target <= 10 ms"),
            ("match p99 (single query)", f"{result['match_p99_ms']:.1f} ms", "target <= 30 ms"),
            ("match, batches of 64", f"{result['match_qps_batched']:.0f} q/s", "target >= 300 q/s"),
            ("e2e requests/s, concurrency 1", f"{result['e2e_rps_c1']:.2f}", f"p50 {result['e2e_p50_ms_c1']:.0f} ms"),
            ("e2e requests/s, concurrency 8", f"{result['e2e_rps_c8']:.2f}",
             f"p50 {result['e2e_p50_ms_c8']:.0f} ms; {result['e2e_rps_c8'] / result['e2e_rps_c1']:.2f}x concurrency 1")]
    print(f"| {'measure':32} | {'value':>12} | note |\n| {'-' * 32} | {'-' * 12} | --- |")
    for name, value, note in rows:
        print(f"| {name:32} | {value:>12} | {note} |")
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
