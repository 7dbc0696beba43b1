"""Benchmark domex on Ray Serve: domain multiplexing on vs off (not a test: prints a table, writes JSON).

    python tools/bench_ray.py --pool P --store S [--replicas 2 --domains-per-replica 2] --json out.json

A local Ray instance (no dashboard), `replicas` expert replicas holding `domains-per-replica` domains
each, mixed-domain user queries (patterns/eval/queries, 8 domains), greedy, --max-tokens each, at
--concurrency. Measured in one run, with multiplexing on (Ray routes a request to a replica that holds
its domain) and off (plain load balancing): requests/s, domain loads per request (a load = a replica
taking a domain it did not hold; counted by the replicas), and latency p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import user_queries  # noqa: E402


def run_mode(pool: str, store: str, multiplex: bool, args, work: list[str]) -> dict:
    import ray
    from ray import serve

    from domex.runtime.ray_app import build_app, start
    from domex.runtime.server import free_port

    port = free_port()
    start(build_app(pool, store, replicas=args.replicas, domains_per_replica=args.domains_per_replica,
                    multiplex=multiplex, budget=args.budget, max_tokens=args.max_tokens), port=port, num_cpus=2)
    url = f"http://127.0.0.1:{port}"
    try:
        loads: dict[int, int] = {}
        latency: list[float] = []

        async def fire(texts):
            sem = asyncio.Semaphore(args.concurrency)
            async with httpx.AsyncClient(timeout=600) as client:
                async def one(text):
                    async with sem:
                        t = time.perf_counter()
                        r = await client.post(f"{url}/v1/completions", json={"prompt": text, "max_tokens": args.max_tokens})
                        r.raise_for_status()
                        latency.append(time.perf_counter() - t)
                        info = r.json()["domex"]
                        loads[info["replica_pid"]] = max(loads.get(info["replica_pid"], 0), info["replica_loads"])
                await asyncio.gather(*[one(t) for t in texts])

        asyncio.run(fire(work[:4]))  # warm up: embedder, index, first experts
        latency.clear()
        warm = sum(loads.values())
        start_t = time.perf_counter()
        asyncio.run(fire(work))
        wall = time.perf_counter() - start_t
        return {"rps": len(work) / wall, "loads_per_request": (sum(loads.values()) - warm) / len(work),
                "latency_p50_ms": float(np.percentile(latency, 50) * 1e3), "replicas_seen": len(loads)}
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--domains-per-replica", type=int, default=2)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", default="bench_ray.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, domains = user_queries()
    work = texts[:args.requests]
    result = {"setup": {"replicas": args.replicas, "domains_per_replica": args.domains_per_replica,
                        "domains": len(set(domains[:args.requests])), "requests": len(work),
                        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "budget": args.budget},
              "machine": {"cpu": platform.machine(), "cores": os.cpu_count(), "loadavg": os.getloadavg()}}
    for name, multiplex in (("on", True), ("off", False)):
        result[f"multiplex_{name}"] = run_mode(args.pool, args.store, multiplex, args, work)
    on, off = result["multiplex_on"], result["multiplex_off"]
    print("| measure | multiplexing on | off (plain load balancing) | on / off |\n|---|---|---|---|")
    for key, label in (("rps", "requests/s"), ("loads_per_request", "domain loads per request"),
                       ("latency_p50_ms", "latency p50 (ms)")):
        print(f"| {label} | {on[key]:.3f} | {off[key]:.3f} | {on[key] / max(off[key], 1e-9):.2f}x |")
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
