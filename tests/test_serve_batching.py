"""`domex serve` with continuous batching, over HTTP: mixed-domain requests answered concurrently equal
their solo answers (the demo model, fp32); a full waiting queue answers 429; bad flags stop the start."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from domex.runtime.indexer import register
from domex.runtime.pool import build
from domex.store.demos import Demo
from test_server import free_port, start_server
from tiny import DOMAINS, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO_DOMAINS = ("python", "german", "sql")
PROMPTS = ["def parse_args(argv):", "Die Stadt liegt am Ufer des Flusses und", "SELECT name FROM users WHERE",
           "import os\nfor path in", "Am Morgen gingen wir", "INSERT INTO orders (id, total) VALUES"]


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-serve")
    build(ROOT / "models" / "tiny-moe", root / "pool", progress=False)
    for name in DEMO_DOMAINS:
        lines = (ROOT / "patterns" / f"{name}.jsonl").read_text().splitlines()[:4]
        register(root / "pool", root / "store", name, [Demo.from_json(json.loads(x)) for x in lines], progress=False)
    return root


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*[client.post(f"{url}/v1/completions", json=b) for b in bodies])


def test_concurrent_mixed_domain_requests_equal_their_solo_answers(demo_world):
    port = free_port()
    proc = start_server(demo_world / "pool", demo_world / "store", port, "--dtype", "float32", "--max-batch", "4",
                        "--budget", "50%")
    url = f"http://127.0.0.1:{port}"
    try:
        bodies = [{"prompt": p, "max_tokens": 6 + 3 * i, "domain": DEMO_DOMAINS[i % 3]} for i, p in enumerate(PROMPTS)]
        alone = [post(url, b).json() for b in bodies]
        together = [r.json() for r in asyncio.run(post_all(url, bodies))]
        assert [r["choices"][0]["text"] for r in together] == [r["choices"][0]["text"] for r in alone]
        assert [r["domex"]["domain"] for r in together] == [b["domain"] for b in bodies]
        assert [r["usage"] for r in together] == [r["usage"] for r in alone]
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'domex_requests_total{endpoint="completions",status="ok"} 12.0' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_full_waiting_queue_answers_429_with_retry_after(tmp_path):
    build(tiny_checkpoint(tmp_path / "model"), tmp_path / "pool", progress=False)
    register(tmp_path / "pool", tmp_path / "store", "cooking", [Demo.from_json({"text": t}) for t in DOMAINS["cooking"]],
             progress=False)
    port = free_port()
    proc = start_server(tmp_path / "pool", tmp_path / "store", port, "--max-batch", "1", "--max-waiting", "1")
    url = f"http://127.0.0.1:{port}"
    try:
        replies = asyncio.run(post_all(url, [{"prompt": "Whisk the eggs", "max_tokens": 24, "domain": "cooking"}] * 6))
        codes = sorted(r.status_code for r in replies)
        assert 429 in codes and 200 in codes and set(codes) == {200, 429}, codes
        busy = next(r for r in replies if r.status_code == 429)
        assert int(busy.headers["retry-after"]) >= 1
        assert "--max-waiting" in busy.json()["error"]["message"]
        assert post(url, {"prompt": "Whisk the eggs", "max_tokens": 4, "domain": "cooking"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("flag, value", [("--criterion", "bogus"), ("--rule", "bogus"), ("--policy", "bogus"),
                                         ("--matcher", "bogus"), ("--dtype", "float8"), ("--scheduler", "bogus"),
                                         ("--budget", "lots"), ("--resident", "lots"), ("--max-waiting", "-1")])
def test_a_bad_serve_flag_stops_the_start_naming_it(tmp_path, flag, value):
    r = subprocess.run([sys.executable, "-m", "domex.runtime.cli", "serve", "--pool", str(tmp_path / "none"),
                        "--store", str(tmp_path / "none"), flag, value], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_resident_set_smaller_than_one_mask_stops_the_start(tmp_path):
    build(tiny_checkpoint(tmp_path / "model"), tmp_path / "pool", progress=False)
    r = subprocess.run([sys.executable, "-m", "domex.runtime.cli", "serve", "--pool", str(tmp_path / "pool"), "--store",
                        str(tmp_path / "store"), "--budget", "50%", "--resident", "3"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--resident 3 holds 3 experts per layer, fewer than the 4" in r.stderr
