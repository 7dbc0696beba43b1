"""`domex serve` as a real process on a free loopback port, driven over HTTP with httpx."""

import asyncio
import json

import httpx
import pytest

from domex.runtime.server import free_port, spawn
from tiny import DOMAINS, QUERIES, pool_and_store, tiny_checkpoint

TOKEN = "s3cret"


def start_server(pool, store, port, *extra):
    """The test servers' common flags: an admin token, small max_tokens and body limits, budget 4."""
    return spawn(pool, store, port, "--budget", "4", "--admin-token", TOKEN, "--max-tokens", "24",
                 "--max-body-bytes", "20000", *extra)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    pool, store = pool_and_store(root, tiny_checkpoint(root / "model"))
    port = free_port()
    proc = start_server(pool, store, port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_completion_reports_the_matched_domain(server):
    r = httpx.post(f"{server}/v1/completions", json={"prompt": QUERIES["cooking"], "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["domex"]["domain"] == "cooking" and r.headers["x-domex-domain"] == "cooking"
    assert body["usage"]["completion_tokens"] <= 8 and body["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_and_streaming_give_the_same_greedy_text(server):
    msg = {"messages": [{"role": "user", "content": QUERIES["python"]}], "max_tokens": 10}
    whole = httpx.post(f"{server}/v1/chat/completions", json=msg, timeout=60)
    assert whole.status_code == 200, whole.text
    assert whole.json()["object"] == "chat.completion" and whole.headers["x-domex-domain"] == "python"
    streamed = httpx.post(f"{server}/v1/chat/completions", json={**msg, "stream": True}, timeout=60)
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["domex"]["domain"] == "python" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == whole.json()["choices"][0]["message"]["content"]


def test_a_chat_is_matched_on_its_user_turns_newest_first(server):
    """A follow-up is matched with the turns before it: the same decision as a prompt of those turns, newest first."""
    follow_up = "and if empty?"
    turns = [{"role": "user", "content": QUERIES["python"]}, {"role": "assistant", "content": "ok"},
             {"role": "user", "content": follow_up}]
    chat = httpx.post(f"{server}/v1/chat/completions", json={"messages": turns, "max_tokens": 2}, timeout=60)
    joined = httpx.post(f"{server}/v1/completions", json={"prompt": follow_up + "\n\n" + QUERIES["python"], "max_tokens": 2},
                        timeout=60)
    alone = httpx.post(f"{server}/v1/chat/completions", json={"messages": turns[-1:], "max_tokens": 2}, timeout=60)
    assert chat.status_code == joined.status_code == alone.status_code == 200, chat.text
    seen, expected = chat.json()["domex"], joined.json()["domex"]
    assert chat.headers["x-domex-domain"] == seen["domain"] == expected["domain"] == "python"
    assert (seen["similarity"], seen["margin"], seen["ood"]) == (expected["similarity"], expected["margin"], expected["ood"])
    assert alone.json()["domex"]["similarity"] != seen["similarity"]  # the follow-up alone is another query


def test_forced_domain_and_errors(server):
    forced = httpx.post(f"{server}/v1/completions", json={"prompt": QUERIES["cooking"], "max_tokens": 2, "domain": "python"}, timeout=60)
    assert forced.status_code == 200 and forced.json()["domex"]["domain"] == "python" and forced.json()["domex"]["forced"]
    unknown = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "domain": "astronomy", "max_tokens": 2}, timeout=30)
    assert unknown.status_code == 404 and "forced domain 'astronomy' is not registered" in unknown.json()["error"]["message"]
    bad_json = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert bad_json.status_code == 400 and "invalid request" in bad_json.json()["error"]["message"]
    missing = httpx.post(f"{server}/v1/completions", json={"max_tokens": 3}, timeout=30)
    assert missing.status_code == 400 and "prompt" in missing.json()["error"]["message"]
    too_big = httpx.post(f"{server}/v1/completions", json={"prompt": "x" * 30000, "max_tokens": 2}, timeout=30)
    assert too_big.status_code == 413 and "exceeds the limit of 20000 bytes" in too_big.json()["error"]["message"]
    too_long = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 100}, timeout=30)
    assert too_long.status_code == 400 and "max_tokens=100 exceeds this server's limit of 24" in too_long.json()["error"]["message"]
    no_token = httpx.request("DELETE", f"{server}/v1/domains/python", timeout=30)
    assert no_token.status_code == 401
    wrong = httpx.post(f"{server}/v1/domains", json={"name": "x", "demos": [{"text": "a"}]},
                       headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]["message"]


def test_register_while_serving_then_route_to_it(server):
    demos = [{"text": t} for t in DOMAINS["football"]]
    r = httpx.post(f"{server}/v1/domains", json={"name": "football", "demos": demos},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["demos"] == len(demos)
    assert "football" in [d["name"] for d in httpx.get(f"{server}/v1/domains", timeout=30).json()["data"]]
    q = httpx.post(f"{server}/v1/completions", json={"prompt": QUERIES["football"], "max_tokens": 4}, timeout=60)
    assert q.status_code == 200 and q.headers["x-domex-domain"] == "football"
    bad = httpx.post(f"{server}/v1/domains", json={"name": "broken", "demos": [{"txt": "a"}]},
                     headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert bad.status_code == 400 and "demos[0]" in bad.json()["error"]["message"]


def test_concurrent_mixed_domain_requests(server):
    names = ["cooking", "python"] * 8

    async def fire():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{server}/v1/completions", json={"prompt": QUERIES[n], "max_tokens": 6})
                                          for n in names])

    replies = asyncio.run(fire())
    assert [r.status_code for r in replies] == [200] * 16
    assert [r.json()["domex"]["domain"] for r in replies] == names


def test_metrics_count_requests_matches_and_loads(server):
    httpx.post(f"{server}/v1/completions", json={"prompt": QUERIES["cooking"], "max_tokens": 2}, timeout=60)
    text = httpx.get(f"{server}/metrics", timeout=30).text
    assert 'domex_domain_matches_total{domain="cooking",ood="false"}' in text
    assert "domex_requests_total" in text and "domex_bytes_loaded_total" in text and "domex_resident_bytes" in text
    loaded = float(next(l.split()[-1] for l in text.splitlines() if l.startswith("domex_bytes_loaded_total")))
    assert loaded > 0


def test_skip_ratio_drops_expert_calls_and_says_how_many(tmp_path):
    pool, store = pool_and_store(tmp_path, tiny_checkpoint(tmp_path / "model"))
    port = free_port()
    proc = start_server(pool, store, port, "--skip-ratio", "0.6")
    try:
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": QUERIES["cooking"], "max_tokens": 6}, timeout=60)
        assert r.status_code == 200
        metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                   if line.startswith("domex_expert_calls")}
        assert 0 < metrics["domex_expert_calls_skipped"] < metrics["domex_expert_calls"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    with pytest.raises(RuntimeError, match=r"--skip-ratio 1.5 must lie between 0 and 1"):
        start_server(pool, store, free_port(), "--skip-ratio", "1.5")


def test_serving_plans_under_a_memory_budget(tmp_path):
    """--memory serves each domain's plan at the pool's tiers (with novices), and refuses what cannot work."""
    from domex.runtime.pool import build

    model = tiny_checkpoint(tmp_path / "model")
    _, store = pool_and_store(tmp_path, model)
    build(model, tmp_path / "tiered", tiers="int8,int4", progress=False)
    port = free_port()
    proc = start_server(tmp_path / "tiered", store, port, "--memory", "40%", "--novices")
    try:
        url = f"http://127.0.0.1:{port}"
        for domain in ("cooking", "python"):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": QUERIES[domain], "max_tokens": 5}, timeout=60)
            assert r.status_code == 200 and r.json()["domex"]["domain"] == domain
            assert r.json()["usage"]["completion_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    for flags, message in ((["--memory", "4"], "--memory: a share of the expert bytes"),
                           (["--novices"], "--novices comes with plans"),
                           (["--memory", "40%", "--scheduler", "static"], "needs the continuous scheduler")):
        with pytest.raises(RuntimeError, match=message):
            start_server(tmp_path / "tiered", store, free_port(), *flags)
