"""Chaos run of `domex serve`: load, dropped streams, store churn, bad input and SIGKILLs at once; prints JSON.

    python tools/chaos_serve.py [--requests 120] [--concurrency 16] [--kills 2] [--work DIR] [--json out.json]
    python tools/chaos_serve.py --short      # the form tests/test_reliability.py runs (about a minute on 2 cores)

Builds a pool and a store from the shipped demo model and packs under --work (once), starts a real
server on a loopback port and runs epochs; in each, concurrently and bounded by --concurrency:
  - mixed-domain valid requests, a third of them chats of two user turns (matched on both), half of
    them streaming, 20% of the streams dropped by the client right after the response headers;
  - bad inputs mixed into the same batches (malformed JSON, empty prompt, lone surrogate forced to a
    domain, chunked body over the limit, prompt over the context, max_tokens over the limit, unknown
    or invalid forced domain, registration without token or with a bad name);
  - a register / replace / delete loop on a domain of its own.
After the epoch's load the server's counters are compared with the client's; then, except in the
last epoch, a burst of requests is sent and the server is SIGKILLed under it; the store is checked
(every domain whole, the base domains all there) and the server restarted on it.

Goals (issue 12): no valid request failed or lost outside those in flight at a SIGKILL; every bad
input answered 4xx; the store consistent after every restart; metrics equal to the client's counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from domex.runtime.server import free_port, spawn

ROOT = Path(__file__).resolve().parent.parent
BASE = ("python", "sql", "german")  # registered once; the churn loop works on CHURN
CHURN = "chaos"
TOKEN = "chaos-token"
MAX_TOKENS, MAX_BODY = 16, 64 * 1024
JSON = {"content-type": "application/json"}


def demos(domain: str, n: int) -> list[dict]:
    lines = (ROOT / "patterns" / f"{domain}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:n]]


def prompt_of(demo: dict) -> str:
    return (demo.get("prompt") or demo.get("text") or "")[:300]


def prepare(work: Path, model: Path, n_demos: int) -> tuple[Path, Path]:
    """Pool and store under `work`, made once and reused."""
    from domex.runtime.indexer import register
    from domex.runtime.pool import MANIFEST, build
    from domex.store.db import Store
    from domex.store.demos import Demo

    pool, store = work / "pool", work / "store"
    if not (pool / MANIFEST).is_file():
        build(model, pool, progress=False)
    opened = Store.open(store, create=True)
    have = opened.names()
    opened.close()
    for d in BASE:
        if d not in have:
            register(pool, store, d, [Demo.from_json(x) for x in demos(d, n_demos)], streaming=True, progress=False)
    Store.open(store).close()
    return pool, store


def start(pool: Path, store: Path, port: int, log) -> subprocess.Popen:
    return spawn(pool, store, port, "--admin-token", TOKEN, "--max-tokens", str(MAX_TOKENS), "--max-body-bytes",
                 str(MAX_BODY), output=log)


def store_consistent(store: Path) -> tuple[bool, str]:
    """Every domain reads whole (records, scores of every criterion, one embedding per demo) and the base ones are there."""
    from domex.store.db import Store

    s = Store.open(store, create=False)
    try:
        snap = s.snapshot()
        missing = [d for d in BASE if d not in snap]
        if missing:
            return False, f"base domains missing: {missing}"
        if set(snap.names) - {*BASE, CHURN}:
            return False, f"unexpected domains: {snap.names}"
        for p in snap.patterns.values():
            if len(p.embeddings) != len(p.demos) or set(p.scores) != set(p.criteria):
                return False, f"domain {p.name} is not whole"
        return True, f"generation {snap.generation}: {', '.join(snap.names)}"
    except Exception as e:  # a torn store is exactly what this looks for
        return False, f"{type(e).__name__}: {e}"
    finally:
        s.close()


class Chunked:
    """A body of `size` spaces sent chunked (no Content-Length), anew each time it is iterated."""

    def __init__(self, size: int):
        self.size = size

    async def __aiter__(self):
        for _ in range(0, self.size, 4096):
            yield b" " * 4096


def bad_inputs(prompts: dict[str, list[str]]) -> list[tuple[str, str, dict]]:
    """(kind, path, httpx kwargs) of requests that must get a 4xx; path None = not a completion endpoint."""
    long = " ".join(prompts["german"]) * 40
    return [
        ("malformed_json", "/v1/completions", {"content": b'{"prompt": ', "headers": JSON}),
        ("wrong_type", "/v1/completions", {"json": {"prompt": 5}}),
        ("empty_prompt", "/v1/completions", {"json": {"prompt": ""}}),
        ("lone_surrogate", "/v1/completions",
         {"content": json.dumps({"prompt": "ab\ud800", "domain": "python"}), "headers": JSON}),
        ("chunked_oversize", "/v1/completions", {"content": Chunked(2 * MAX_BODY), "headers": JSON}),
        ("over_context", "/v1/completions", {"json": {"prompt": long, "max_tokens": 8}}),
        ("max_tokens", "/v1/completions", {"json": {"prompt": "hello", "max_tokens": MAX_TOKENS + 1}}),
        ("unknown_domain", "/v1/chat/completions",
         {"json": {"messages": [{"role": "user", "content": "hi"}], "domain": "astronomy"}}),
        ("bad_domain_name", "/v1/completions", {"json": {"prompt": "hi", "domain": "ok\n"}}),
        ("register_no_token", None, {"json": {"name": CHURN, "demos": [{"text": "x"}]}}),
        ("register_bad_name", None, {"json": {"name": "a b", "demos": [{"text": "x"}]},
                                     "headers": {"Authorization": f"Bearer {TOKEN}"}}),
    ]


class Tally:
    def __init__(self):
        self.valid = Counter()  # ok | failed | lost | dropped | in_flight_at_kill
        self.bad = Counter()  # answered_4xx | not_4xx
        self.bad_kinds = Counter()
        self.churn = Counter()
        self.failures: list[str] = []
        self.endpoint = Counter()  # what the server should count: ok | invalid | disconnected | error

    def fail(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what[:300])


def valid_body(prompt: str, earlier: str | None) -> tuple[str, dict]:
    """A completion of `prompt`, or with an `earlier` turn a chat whose last user turn is `prompt`."""
    if earlier is None:
        return "/v1/completions", {"prompt": prompt}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": earlier}, {"role": "assistant", "content": "ok"},
                                                 {"role": "user", "content": prompt}]}


async def valid_request(client, url, path, body, stream, drop, tally, epoch_tally):
    body = {**body, "max_tokens": MAX_TOKENS, "stream": stream}
    try:
        if not stream:
            r = await client.post(f"{url}{path}", json=body)
            ok = r.status_code == 200 and "choices" in r.json()
            tally.valid["ok" if ok else "failed"] += 1
            epoch_tally["ok" if ok else ("invalid" if r.status_code < 500 else "error")] += 1
            if not ok:
                tally.fail(f"{r.status_code} {r.text}")
            return
        async with client.stream("POST", f"{url}{path}", json=body) as r:
            if drop and r.status_code == 200:
                tally.valid["dropped"] += 1
                epoch_tally["disconnected"] += 1
                return  # leaving the block closes the connection unread
            text = (await r.aread()).decode()
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        ok = r.status_code == 200 and events[-1:] == ["[DONE]"] and not any('"error"' in e for e in events)
        tally.valid["ok" if ok else "failed"] += 1
        epoch_tally["ok" if ok else ("invalid" if r.status_code < 500 else "error")] += 1
        if not ok:
            tally.fail(f"stream {r.status_code} {text[-300:]}")
    except httpx.HTTPError as e:
        tally.valid["lost"] += 1
        tally.fail(f"lost: {type(e).__name__}: {e}")


async def bad_request(client, url, kind, path, kwargs, tally, epoch_tally):
    target = path or "/v1/domains"
    try:
        r = await client.post(f"{url}{target}", **kwargs)
        status = r.status_code
    except httpx.HTTPError as e:
        status = f"{type(e).__name__}"
    good = isinstance(status, int) and 400 <= status < 500
    tally.bad["answered_4xx" if good else "not_4xx"] += 1
    tally.bad_kinds[kind] += 1
    if not good:
        tally.fail(f"bad input {kind}: {status}")
    if path is not None:
        epoch_tally["invalid"] += 1


async def churn(client, url, stop: asyncio.Event, tally):
    """Register, replace and delete CHURN until told to stop."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    pack = demos("unix", 6)
    while not stop.is_set():
        for action in ("register", "replace", "delete"):
            try:
                if action == "delete":
                    r = await client.delete(f"{url}/v1/domains/{CHURN}", headers=auth)
                    good = r.status_code in (200, 404)
                else:
                    r = await client.post(f"{url}/v1/domains", headers=auth,
                                          json={"name": CHURN, "demos": pack, "replace": True})
                    good = r.status_code == 201
            except httpx.HTTPError as e:
                r, good = None, False
                tally.fail(f"churn {action}: {type(e).__name__}")
            tally.churn[action if good else f"{action}_failed"] += 1
            if not good and r is not None:
                tally.fail(f"churn {action}: {r.status_code} {r.text}")
            if stop.is_set():
                return


def server_counts(url: str) -> Counter:
    counts = Counter()
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("domex_requests_total{"):
            labels = dict(kv.split("=") for kv in line[line.index("{") + 1:line.index("}")].split(","))
            counts[labels["status"].strip('"')] += int(float(line.split()[-1]))
    return counts


async def epoch(url, prompts, n, concurrency, rng, tally) -> Counter:
    """One epoch's load, bad inputs and churn; returns what the server should have counted."""
    expected = Counter()
    gate = asyncio.Semaphore(concurrency)
    bads = bad_inputs(prompts)
    stop = asyncio.Event()

    async def bounded(coro):
        async with gate:
            await coro

    # a fresh connection per request: a reused keep-alive connection that the server closes as idle at
    # the moment it is reused fails in the client before the server sees a request, and would read as lost
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        churner = asyncio.create_task(churn(client, url, stop, tally))
        tasks = []
        for i in range(n):
            domain = BASE[i % len(BASE)]
            stream = i % 2 == 1
            drop = stream and rng.random() < 0.2
            earlier = rng.choice(prompts[domain]) if i % 3 == 0 else None  # a third are chats of two user turns
            path, body = valid_body(rng.choice(prompts[domain]), earlier)
            tasks.append(bounded(valid_request(client, url, path, body, stream, drop, tally, expected)))
        for i in range(len(bads) + n // 4):  # every kind once, then one more per 4 valid requests
            kind, path, kwargs = bads[i % len(bads)]
            tasks.append(bounded(bad_request(client, url, kind, path, kwargs, tally, expected)))
        rng.shuffle(tasks)
        await asyncio.gather(*tasks)
        stop.set()
        await churner
    return expected


async def kill_under_load(url, prompts, proc, concurrency, tally) -> None:
    """Send a burst and SIGKILL the server while it serves it; its requests are 'in flight at SIGKILL'."""
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i):
            try:
                await client.post(f"{url}/v1/completions", json={"prompt": prompts[BASE[i % 3]][0], "max_tokens": MAX_TOKENS})
            except httpx.HTTPError:
                pass
            tally.valid["in_flight_at_kill"] += 1

        async def write():  # a registration under way when the server dies: the store keeps old or new
            try:
                await client.post(f"{url}/v1/domains", headers={"Authorization": f"Bearer {TOKEN}"},
                                  json={"name": CHURN, "demos": demos("unix", 6), "replace": True})
            except httpx.HTTPError:
                pass

        burst = [asyncio.create_task(one(i)) for i in range(concurrency)] + [asyncio.create_task(write())]
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*burst)
    proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-moe"))
    parser.add_argument("--work", default=".domex-chaos", help="pool, store and server log (reused between runs)")
    parser.add_argument("--requests", type=int, default=120, help="valid requests per epoch")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kills", type=int, default=2, help="SIGKILL/restart cycles (epochs = kills + 1)")
    parser.add_argument("--demos", type=int, default=12, help="demos per base domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short", action="store_true", help="the test-suite form: 12 requests per epoch, 1 kill, concurrency 8")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.short:
        args.requests, args.kills, args.concurrency, args.demos = 12, 1, 8, 4

    started, load_start = time.time(), os.getloadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pool, store = prepare(work, Path(args.model), args.demos)
    prompts = {d: [prompt_of(x) for x in demos(d, 20)] for d in BASE}
    rng = random.Random(args.seed)
    tally = Tally()
    consistent, metrics = [], []
    log = open(work / "server.log", "ab")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(pool, store, port, log)
    try:
        for e in range(args.kills + 1):
            expected = asyncio.run(epoch(url, prompts, args.requests, args.concurrency, rng, tally))
            seen = server_counts(url)
            metrics.append({"epoch": e, "client": dict(expected), "server": dict(seen), "exact": seen == expected})
            if e == args.kills:
                break
            asyncio.run(kill_under_load(url, prompts, proc, args.concurrency, tally))
            ok, what = store_consistent(store)
            consistent.append({"after_kill": e + 1, "ok": ok, "store": what})
            proc = start(pool, store, port, log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

    v = tally.valid
    sent = v["ok"] + v["failed"] + v["lost"] + v["dropped"]
    result = {
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "model": Path(args.model).name, "epochs": args.kills + 1, "concurrency": args.concurrency,
        "requests": {"sent": sent, "ok": v["ok"], "failed": v["failed"], "lost": v["lost"],
                     "dropped_by_client": v["dropped"], "in_flight_at_sigkill": v["in_flight_at_kill"]},
        "bad_inputs": {"sent": sum(tally.bad.values()), "answered_4xx": tally.bad["answered_4xx"],
                       "kinds": dict(tally.bad_kinds)},
        "churn": dict(tally.churn),
        "store_consistent": {"checks": len(consistent), "ok": sum(c["ok"] for c in consistent), "after": consistent},
        "metrics": {"epochs": len(metrics), "exact": sum(m["exact"] for m in metrics), "detail": metrics},
        "failures": tally.failures,
        "seconds": round(time.time() - started, 1),
    }
    result["goals_met"] = (v["failed"] == 0 and v["lost"] == 0 and tally.bad["not_4xx"] == 0
                           and result["store_consistent"]["ok"] == len(consistent)
                           and result["metrics"]["exact"] == len(metrics)
                           and not any(k.endswith("_failed") for k in tally.churn))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
