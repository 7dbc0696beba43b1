"""Reliability of `domex serve` under load, faults and bad input (issue 12): one regression test per defect.

Servers are real `domex serve` processes on loopback ports (tests/test_server.py's start_server), on a
tiny Qwen3-MoE saved in bfloat16 like the demo model, so registration builds a bf16 model beside
requests. One shared server takes most tests; a read-only one and one on a corrupted pool take theirs.
"""

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from domex.runtime.engine import Engine
from domex.runtime.pool import MANIFEST, PoolManifest, meta_model
from domex.runtime.serving import Job, SCHEDULERS
from domex.store.db import Store
from domex.errors import InvalidName, StoreUnwritable
from domex.store.mask import Mask
from domex.store.pattern import check_name
from test_server import TOKEN, free_port, sse_events, start_server
from tiny import DOMAINS, QUERIES, pool_and_store, tiny_model, tiny_tokenizer

ADMIN = {"Authorization": f"Bearer {TOKEN}"}
CONTEXT = 128  # the tiny model's max_position_embeddings; its tokenizer has one token per character


def bf16_checkpoint(path):
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    pool_and_store(root, bf16_checkpoint(root / "model"))
    return root


@pytest.fixture(scope="module")
def server(world):
    port = free_port()
    proc = start_server(world / "pool", world / "store", port, "--max-demos", "8")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


JSON = {"content-type": "application/json"}
FRESH = httpx.Limits(max_keepalive_connections=0)  # no reuse of a keep-alive connection the server is closing as idle


def complete(url, path="/v1/completions", **body):
    """POST as JSON with ASCII escapes, so lone surrogates travel as "\\ud800" (as a hostile client sends them)."""
    return httpx.post(f"{url}{path}", content=json.dumps({"max_tokens": 4, **body}), headers=JSON, timeout=120)


def assert_error(reply, status, *words):
    """The one error shape, the status, and words the message must hold; never an absolute tmp path."""
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert all(w in error["message"] for w in words), error["message"]
    assert "/tmp/" not in error["message"] and "pytest-" not in error["message"], error["message"]
    return error


def metric(url, name, **labels) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


# -- 1: building a bf16 model never changes torch's process-wide default dtype ------------------


def test_building_a_bf16_model_leaves_the_default_dtype_alone(world):
    config = json.loads((world / "pool" / MANIFEST).read_text())["config"]
    assert config["dtype"] == "bfloat16"
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(torch.get_default_dtype())

    watcher = threading.Thread(target=watch)
    watcher.start()
    for _ in range(5):
        model = meta_model(config)
    stop.set()
    watcher.join()
    assert seen == {torch.float32}
    assert model.config.dtype == torch.bfloat16


def test_registering_beside_requests_fails_none_of_them(server):
    """Defects 1 and 2: replace one domain and add/delete another while mixed requests run."""
    demos = [{"text": t} for t in DOMAINS["football"]]
    errors = []

    def churn():
        for _ in range(2):
            for body in ({"name": "football", "demos": demos, "replace": True},
                         {"name": "cooking", "demos": [{"text": t} for t in DOMAINS["cooking"]], "replace": True}):
                r = httpx.post(f"{server}/v1/domains", json=body, headers=ADMIN, timeout=120)
                errors.extend([r.text] if r.status_code != 201 else [])
            r = httpx.delete(f"{server}/v1/domains/football", headers=ADMIN, timeout=60)
            errors.extend([r.text] if r.status_code != 200 else [])

    async def load():
        async with httpx.AsyncClient(timeout=120, limits=FRESH) as client:
            replies = []
            for _ in range(6):
                replies += await asyncio.gather(*[client.post(f"{server}/v1/completions", json={
                    "prompt": QUERIES[n], "max_tokens": 3, "stream": i % 2 == 1}) for i, n in enumerate(["cooking", "python"] * 3)])
            return replies

    writer = threading.Thread(target=churn)
    writer.start()
    replies = asyncio.run(load())
    writer.join()
    assert errors == []
    assert [r.status_code for r in replies] == [200] * len(replies), [r.text for r in replies if r.status_code != 200]
    assert not any('"error"' in r.text for r in replies)


# -- 3, 6: bad input is refused alone, with a 400, streaming or not ----------------------------


def test_a_bad_request_does_not_fail_its_batch(server):
    async def fire():
        async with httpx.AsyncClient(timeout=120, limits=FRESH) as client:
            good = [client.post(f"{server}/v1/completions", json={"prompt": QUERIES["cooking"], "max_tokens": 4,
                                                                   "domain": "cooking"}) for _ in range(7)]
            bad = client.post(f"{server}/v1/completions", headers=JSON,
                              content=json.dumps({"prompt": "\ud800", "max_tokens": 4, "domain": "cooking"}))
            return await asyncio.gather(*good, bad)

    replies = asyncio.run(fire())
    assert [r.status_code for r in replies] == [200] * 7 + [400]
    assert_error(replies[-1], 400, "body.prompt", "unicode")


@pytest.mark.parametrize("kind", ["continuous", "static"])
def test_a_row_that_fails_in_generate_fails_alone(world, kind):
    """Continuous: each prompt is prefilled alone, so a faulty one fails there. Static: a batch that
    raises is rerun row by row. Either way only the faulty row errs."""
    engine = Engine.open(world / "pool")
    mask = Mask.full(engine.pool.manifest.num_layers, engine.pool.manifest.num_experts)
    results, done = {}, threading.Semaphore(0)

    def job(name, ids):
        def end(outcome):
            results[name] = outcome
            done.release()
        return Job(ids, 3, 0.0, 1.0, mask, emit=lambda text: None, finish=lambda reason, usage: end("ok"),
                   fail=lambda exc: end(type(exc).__name__))

    scheduler = SCHEDULERS[kind](engine)
    for name, ids in [("a", [40, 41, 42]), ("bad", [40, 10**6]), ("b", [50, 51])]:
        scheduler.submit(job(name, ids))
    for _ in range(3):
        done.acquire()
    assert results == {"a": "ok", "bad": "IndexError", "b": "ok"}
    engine.pool.close()


@pytest.mark.parametrize("stream", [False, True])
def test_empty_and_surrogate_prompts_get_400(server, stream):
    assert_error(complete(server, prompt="", stream=stream), 400, "prompt")
    assert_error(complete(server, prompt="ab\udfffcd", stream=stream), 400, "body.prompt", "unicode")
    chat = complete(server, "/v1/chat/completions", messages=[{"role": "user", "content": "\ud800"}], stream=stream)
    assert_error(chat, 400, "lone surrogate")


# -- 4, 5: limits on prompt tokens and on the body as it arrives -------------------------------


def test_a_prompt_longer_than_the_context_is_refused(server):
    error = assert_error(complete(server, prompt="x" * 120, max_tokens=16), 400, "120 tokens", "112",
                         f"context of {CONTEXT}", "max_tokens=16")
    assert error["code"] == "prompt_too_long"
    assert complete(server, prompt="x" * 100, max_tokens=16).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(30):
            yield b" " * 1000
    r = httpx.post(f"{server}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert_error(r, 413, "exceeds the limit of 20000 bytes")


# -- 7: names -----------------------------------------------------------------------------------


def test_names_are_matched_whole():
    assert check_name("ok") == "ok"
    for bad in ("ok\n", "ok\nX-Evil: 1", "-x", "a b", ""):
        with pytest.raises(InvalidName):
            check_name(bad)


def test_invalid_names_get_400(server):
    r = httpx.post(f"{server}/v1/domains", json={"name": "ok\n", "demos": [{"text": "a"}]}, headers=ADMIN, timeout=30)
    assert_error(r, 400, "domain name 'ok\\n' is not allowed")
    assert_error(complete(server, prompt="hello", domain="ok\n"), 400, "not allowed")
    assert_error(httpx.delete(f"{server}/v1/domains/a%20b", headers=ADMIN, timeout=30), 400, "not allowed")


# -- 10: auth first, constant-time token, demo cap, one error shape, no absolute paths ----------


def test_auth_comes_before_the_body(server):
    no_token = httpx.post(f"{server}/v1/domains", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert_error(no_token, 401, "Bearer")
    assert_error(httpx.post(f"{server}/v1/domains", content=b"x" * 30000, headers={"Authorization": "Bearer s"}, timeout=30), 401)
    assert_error(httpx.post(f"{server}/v1/domains", content=b"{not json", headers=ADMIN, timeout=30), 400, "not JSON")
    assert_error(httpx.post(f"{server}/v1/domains", json={"name": "x"}, headers=ADMIN, timeout=30), 400, "demos")


def test_registration_caps_its_demos(server):
    r = httpx.post(f"{server}/v1/domains", json={"name": "many", "demos": [{"text": "a b c"}] * 9}, headers=ADMIN, timeout=30)
    assert_error(r, 400, "9 demos", "8", "--max-demos")


def test_every_error_has_one_shape(server):
    assert_error(httpx.get(f"{server}/nowhere", timeout=30), 404)
    assert_error(httpx.get(f"{server}/v1/completions", timeout=30), 405)
    assert_error(httpx.post(f"{server}/v1/completions", content=b'{"prompt": "\xff\xfe"}',
                            headers={"content-type": "application/json"}, timeout=30), 400)
    assert_error(complete(server, prompt="x", domain="astronomy"), 404, "forced domain 'astronomy'")
    taken = httpx.post(f"{server}/v1/domains", json={"name": "python", "demos": [{"text": "a"}]}, headers=ADMIN, timeout=60)
    assert_error(taken, 409, "already registered in store")


# -- 9: metrics under trouble ------------------------------------------------------------------


def test_dropped_streams_and_refusals_are_counted(server):
    before = {s: metric(server, "domex_requests_total", endpoint="completions", status=s)
              for s in ("ok", "invalid", "disconnected")}
    with httpx.stream("POST", f"{server}/v1/completions", json={"prompt": QUERIES["python"], "max_tokens": 24,
                                                                  "stream": True}, timeout=60) as r:
        next(r.iter_lines())
    complete(server, prompt="")
    complete(server, prompt=QUERIES["cooking"])
    deadline = time.time() + 60
    while metric(server, "domex_requests_total", endpoint="completions", status="disconnected") == before["disconnected"]:
        assert time.time() < deadline, "the dropped stream was never counted"
        time.sleep(0.2)
    after = {s: metric(server, "domex_requests_total", endpoint="completions", status=s) for s in before}
    assert {s: after[s] - before[s] for s in before} == {"ok": 1, "invalid": 1, "disconnected": 1}


# -- 8: read-only store -------------------------------------------------------------------------


def test_a_read_only_store_is_served_and_refuses_writes(world):
    store_copy = world / "ro-store"
    shutil.copytree(world / "store", store_copy)
    before = (store_copy / "data.mdb").read_bytes()
    port = free_port()
    proc = start_server(world / "pool", store_copy, port, "--read-only", "--max-prompt-tokens", "40")
    url = f"http://127.0.0.1:{port}"
    try:
        assert complete(url, prompt=QUERIES["python"][:40]).status_code == 200
        assert_error(complete(url, prompt="x" * 41), 400, "41 tokens", "40", "--max-prompt-tokens")
        r = httpx.post(f"{url}/v1/domains", json={"name": "football", "demos": [{"text": "a"}]}, headers=ADMIN, timeout=30)
        assert_error(r, 503, "read-only")
        assert_error(httpx.delete(f"{url}/v1/domains/python", headers=ADMIN, timeout=30), 503, "read-only")
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "ok" and health["read_only"] and health["domains"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert (store_copy / "data.mdb").read_bytes() == before


def test_a_read_only_store_writes_nothing(world, tmp_path):
    shutil.copytree(world / "store", tmp_path / "store")
    store = Store.open(tmp_path / "store", read_only=True)
    assert store.snapshot().names == ["cooking", "python"] and store.write_problem() is None
    with pytest.raises(StoreUnwritable, match="read-only"):
        store.delete("python")
    store.close()


# -- 8, 9, 10: a corrupt pool is found at start, reported by /health; its errors and matching's are counted --


def test_a_corrupt_pool_is_reported_and_its_errors_counted(world):
    pool = world / "bad-pool"
    shutil.copytree(world / "pool", pool)
    manifest = PoolManifest.from_dir(pool)
    layer = pool / manifest.layer_files[0]
    data = bytearray(layer.read_bytes())
    for e in range(manifest.num_experts):  # every expert of the first MoE layer
        data[manifest.offset(0, e)] ^= 0xFF
    layer.write_bytes(bytes(data))
    store = world / "bad-pool-store"
    shutil.copytree(world / "store", store)
    port = free_port()
    proc = start_server(pool, store, port, "--verify-pool")
    url = f"http://127.0.0.1:{port}"
    try:
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["status"] == "degraded" and len(health["problems"]) == manifest.num_experts
        assert health["problems"][0].startswith(f"pool corrupt: bad-pool/{manifest.layer_files[0]}: MoE layer 0")
        assert_error(complete(url, prompt=QUERIES["cooking"]), 500, "checksum", "bad-pool/experts/")
        streamed = complete(url, prompt=QUERIES["cooking"], stream=True)
        events = sse_events(streamed.text)
        assert events[-1] == "[DONE]" and "checksum" in json.loads(events[0])["error"]["message"]
        assert metric(url, "domex_requests_total", endpoint="completions", status="error") == 2
        assert metric(url, "domex_requests_total", endpoint="completions", status="ok") == 0
        for name in ("cooking", "python"):  # an empty store: matching itself fails, and is counted
            assert httpx.delete(f"{url}/v1/domains/{name}", headers=ADMIN, timeout=30).status_code == 200
        assert complete(url, prompt=QUERIES["cooking"]).status_code >= 400
        assert metric(url, "domex_match_errors_total") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# -- the chaos tool's short form ---------------------------------------------------------------


def test_chaos_short_form_meets_the_goals(tmp_path):
    tool = [sys.executable, "tools/chaos_serve.py", "--short", "--work", str(tmp_path / "chaos")]
    done = subprocess.run(tool, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["goals_met"], done.stdout[-3000:]
    assert result["requests"]["failed"] == result["requests"]["lost"] == 0 and result["requests"]["ok"] > 0
    assert result["bad_inputs"]["answered_4xx"] == result["bad_inputs"]["sent"] >= 22
    assert result["store_consistent"] == {**result["store_consistent"], "checks": 1, "ok": 1}
    assert result["metrics"]["exact"] == result["metrics"]["epochs"] == 2
