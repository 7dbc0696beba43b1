"""The gateway in front of real `domex serve` upstream processes on free loopback ports, driven over HTTP with httpx."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from domex.runtime.gateway import Gateway, GatewayConfig
from domex.runtime.protocol import ChatCompletionRequest
from domex.runtime.query import query_text
from domex.runtime.indexer import register
from domex.runtime.match import Match
from domex.runtime.pool import build
from domex.runtime.server import free_port
from domex.store.demos import Demo
from domex.errors import ConfigError, UpstreamUnavailable
from tiny import DOMAINS, QUERIES, UNRELATED, tiny_checkpoint


def spawn(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "domex.runtime.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_healthy(procs: dict, timeout: float = 120) -> None:
    """Poll GET /health of every (url -> process) until all answer 200; bounded."""
    deadline, left = time.time() + timeout, dict(procs)
    while left and time.time() < deadline:
        for url, proc in list(left.items()):
            if proc.poll() is not None:
                raise RuntimeError(f"{url} exited: {proc.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    del left[url]
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    if left:
        raise RuntimeError(f"not up after {timeout} s: {list(left)}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_gateway(store_dir, upstreams: dict, default: str, port: int):
    """The gateway in this process (a uvicorn server on a thread): the embedder is loaded here already."""
    import threading

    import uvicorn

    from domex.runtime.gateway import create_app
    from domex.runtime.match import Matcher
    from domex.store.db import Store

    store = Store.open(store_dir, create=False)
    config = GatewayConfig(upstreams, default, health_interval=0.5)
    server = uvicorn.Server(uvicorn.Config(create_app(Gateway(config, Matcher(store, "embedding")), store),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two `domex serve` upstreams of one tiny pool and store: A serves cooking and is the default, B serves python.

    The servers start while the domains are registered (they see new domains without restart).
    """
    root = tmp_path_factory.mktemp("gateway")
    build(tiny_checkpoint(root / "model"), root / "pool", progress=False)
    ports = {name: free_port() for name in ("a", "b", "gateway")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    procs = {name: spawn("serve", "--pool", root / "pool", "--store", root / "store", "--budget", "4",
                         "--port", ports[name], "--max-tokens", "16") for name in ("a", "b")}
    server = None
    try:
        for name in ("cooking", "python"):
            register(root / "pool", root / "store", name, [Demo.from_json({"text": t}) for t in DOMAINS[name]],
                     progress=False)
        server, thread = start_gateway(root / "store", {"cooking": urls["a"], "python": urls["b"]}, urls["a"],
                                       ports["gateway"])
        wait_healthy({urls["a"]: procs["a"], urls["b"]: procs["b"]})
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.1)
        yield urls, procs
    finally:
        for proc in procs.values():
            stop(proc)
        if server is not None:
            server.should_exit = True
            thread.join(timeout=10)


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_each_domain_goes_to_its_own_upstream(cluster):
    urls, _ = cluster
    gw = urls["gateway"]
    r = httpx.post(f"{gw}/v1/completions", json={"prompt": QUERIES["cooking"], "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.headers["x-domex-domain"], r.headers["x-domex-upstream"], r.headers["x-domex-route"]) == \
           ("cooking", urls["a"], "domain")
    assert r.json()["object"] == "text_completion" and r.json()["domex"]["domain"] == "cooking"  # the upstream agrees

    chat = {"messages": [{"role": "user", "content": QUERIES["python"]}], "max_tokens": 4}
    r = httpx.post(f"{gw}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.headers["x-domex-domain"], r.headers["x-domex-upstream"]) == ("python", urls["b"])
    assert r.json()["object"] == "chat.completion"

    forced = httpx.post(f"{gw}/v1/completions", json={"prompt": QUERIES["python"], "max_tokens": 2, "domain": "cooking"},
                        timeout=60)
    assert (forced.headers["x-domex-upstream"], forced.headers["x-domex-route"]) == (urls["a"], "forced")


def test_streaming_is_passed_through_chunk_by_chunk_and_ends_with_done(cluster):
    urls, _ = cluster
    body = {"messages": [{"role": "user", "content": QUERIES["python"]}], "max_tokens": 6, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{urls['gateway']}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-domex-upstream"] == urls["b"]
        chunks = [c for c in r.iter_raw()]
    events = sse_events(b"".join(chunks).decode())
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(parsed) >= 2


def test_out_of_domain_goes_to_the_default(cluster):
    urls, _ = cluster
    r = httpx.post(f"{urls['gateway']}/v1/completions", json={"prompt": UNRELATED, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.headers["x-domex-upstream"], r.headers["x-domex-route"]) == (urls["a"], "ood")


def test_domains_and_health(cluster):
    urls, _ = cluster
    domains = httpx.get(f"{urls['gateway']}/v1/domains", timeout=10).json()
    assert {d["name"]: (d["upstream"], d["healthy"]) for d in domains["data"]} == \
           {"cooking": (urls["a"], True), "python": (urls["b"], True)}
    health = httpx.get(f"{urls['gateway']}/health", timeout=10).json()
    assert health["status"] == "ok" and all(u["healthy"] for u in health["upstreams"])


def test_killed_upstream_falls_back_to_the_default(cluster):
    """Runs last: kills the python upstream B; its queries then go to the default A, and /health says B is down."""
    urls, procs = cluster
    stop(procs["b"])
    r = httpx.post(f"{urls['gateway']}/v1/completions", json={"prompt": QUERIES["python"], "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert (r.headers["x-domex-domain"], r.headers["x-domex-upstream"], r.headers["x-domex-route"]) == \
           ("python", urls["a"], "down")
    health = httpx.get(f"{urls['gateway']}/health", timeout=10).json()
    assert {u["url"]: u["healthy"] for u in health["upstreams"]}[urls["b"]] is False
    cooking = httpx.post(f"{urls['gateway']}/v1/completions", json={"prompt": QUERIES["cooking"], "max_tokens": 2},
                         timeout=60)
    assert (cooking.headers["x-domex-upstream"], cooking.headers["x-domex-route"]) == (urls["a"], "domain")


# --- without processes -------------------------------------------------------------------------


class FixedMatcher:
    def __init__(self, domain, ood=False):
        self.domain, self.ood = domain, ood

    def match_many(self, texts):
        return [Match(self.domain, 0.9, 0.5, self.ood, "fixed") for _ in texts]


def test_no_healthy_upstream_is_a_503_error_that_says_what_to_do():
    gateway = Gateway(GatewayConfig({"python": "http://127.0.0.1:9"}), FixedMatcher("python"))
    gateway.upstreams["http://127.0.0.1:9"].healthy = False
    with pytest.raises(UpstreamUnavailable, match="no healthy upstream for domain 'python' \\(down\\)") as e:
        asyncio.run(gateway.route("x"))
    assert "give a reachable --default URL" in str(e.value) and e.value.http_status == 503
    # out-of-domain without a default: the nearest domain's upstream
    gateway = Gateway(GatewayConfig({"python": "http://127.0.0.1:9"}), FixedMatcher("python", ood=True))
    route = asyncio.run(gateway.route("x"))
    assert (route.upstream, route.reason) == ("http://127.0.0.1:9", "ood")


def test_upstream_flags_are_checked():
    with pytest.raises(ConfigError, match="write NAME=URL with an http\\(s\\) URL"):
        GatewayConfig.from_flags(["cooking:8001"], None)
    with pytest.raises(ConfigError, match="nowhere to send requests"):
        GatewayConfig.from_flags([], None)
    assert GatewayConfig.from_flags(["a=http://h:1/"], "http://d:2/").upstreams == {"a": "http://h:1"}


def test_query_text_reads_the_prompt_or_the_user_turns_newest_first():
    assert query_text({"prompt": "abc"}, chat=False) == "abc"
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "second"}]}]}
    assert query_text(chat, chat=True) == "second\n\nfirst"
    assert query_text({"messages": chat["messages"][:2]}, chat=True) == "first"
    assert query_text({"messages": [{"role": "system", "content": "only"}]}, chat=True) == "only"  # no user turn: what there is
    served = ChatCompletionRequest.model_validate(chat)  # domex serve reads content parts the same way
    assert served.messages[-1].content == "second" and served.query_text() == "second\n\nfirst"


def test_cli_refuses_a_malformed_upstream(tmp_path, capsys):
    from domex.runtime.cli import main

    assert main(["gateway", "--store", str(tmp_path), "--upstream", "cooking:8001"]) == 2
    assert "domex gateway: error: --upstream 'cooking:8001': write NAME=URL" in capsys.readouterr().err


def test_proxy_sends_the_domain_upstream_and_streams_bytes_as_they_come():
    """An in-memory upstream (httpx.MockTransport) sees the domain headers and the body unchanged."""
    seen = {}

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.update(headers=dict(request.headers), body=request.content, url=str(request.url))
        return httpx.Response(200, headers={"content-type": "text/event-stream", "x-domex-domain": "other"},
                              stream=httpx.ByteStream(b"data: {\"a\": 1}\n\ndata: [DONE]\n\n"))

    async def go():
        gateway = Gateway(GatewayConfig({"python": "http://up"}), FixedMatcher("python"))
        gateway.client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
        route = await gateway.route("def f(): pass")
        response = await gateway.proxy("/v1/completions", b'{"prompt": "x", "stream": true}', {}, route, stream=True)
        body = b"".join([c async for c in response.body_iterator])
        await gateway.client.aclose()
        return response, body

    response, body = asyncio.run(go())
    assert seen["url"] == "http://up/v1/completions" and seen["body"] == b'{"prompt": "x", "stream": true}'
    assert seen["headers"]["x-domex-domain"] == "python" and seen["headers"]["serve_multiplexed_model_id"] == "python"
    assert response.headers["x-domex-domain"] == "python"  # the gateway's decision, not the upstream's header
    assert body.endswith(b"data: [DONE]\n\n")
