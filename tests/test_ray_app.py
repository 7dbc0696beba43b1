"""domex on Ray Serve (runtime/ray_app.py), on a local Ray instance started here: 2 replicas x 2 domains,
real HTTP through Ray's proxy, a replica killed and replaced, and nothing left running afterwards."""

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest

ray = pytest.importorskip("ray")

from domex.runtime.ray_app import build_app, start  # noqa: E402
from domex.runtime.server import free_port  # noqa: E402
from test_server import sse_events  # noqa: E402
from tiny import DOMAINS, QUERIES, pool_and_store, tiny_checkpoint  # noqa: E402

TOKEN = "ray-s3cret"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    pool, store = pool_and_store(root, tiny_checkpoint(root / "model"), domains=("cooking", "python", "football"))
    port = free_port()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start(build_app(pool, store, replicas=2, domains_per_replica=2, budget="4", max_tokens=24, admin_token=TOKEN),
          port=port, num_cpus=2, object_store_bytes=80 << 20)
    yield f"http://127.0.0.1:{port}", before
    if ray.is_initialized():  # the last test shuts it down itself; this is for a failure before it
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"max_tokens": 6, **body}, timeout=120)


def test_mixed_domain_requests_are_answered_with_their_domain(cluster):
    url, _ = cluster

    async def fire():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{url}/v1/completions", json={"prompt": QUERIES[d], "max_tokens": 6})
                                          for d in ["cooking", "python", "football"] * 3])

    replies = asyncio.run(fire())
    assert [r.status_code for r in replies] == [200] * 9
    assert [r.headers["x-domex-domain"] for r in replies] == ["cooking", "python", "football"] * 3
    assert all(r.json()["choices"][0]["finish_reason"] in ("length", "stop") for r in replies)


def test_a_domains_requests_land_on_a_replica_that_holds_it(cluster):
    """Once every domain is held somewhere (and Ray's routers have heard of it), no request loads a domain again:
    each replica's load counter stays where it was."""
    url, _ = cluster
    for d in ("cooking", "python", "football"):
        assert complete(url, prompt=DOMAINS[d][0], domain=d).status_code == 200
    time.sleep(3)  # replicas push the ids they hold to Ray's routers
    loads: dict[int, set] = {}
    for _ in range(4):
        for d in ("cooking", "python", "football"):
            info = complete(url, prompt=DOMAINS[d][0], domain=d).json()["domex"]
            loads.setdefault(info["replica_pid"], set()).add(info["replica_loads"])
    assert all(len(counts) == 1 for counts in loads.values()), loads  # 12 requests, not one new load


def test_streaming_goes_through_the_ingress_and_the_replica(cluster):
    url, _ = cluster
    r = complete(url, prompt=QUERIES["python"], stream=True, stream_options={"include_usage": True})
    events = sse_events(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["domex"]["domain"] == "python"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1 and chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert "replica_pid" in chunks[-2]["domex"]


def test_a_domain_registered_through_the_ingress_is_served_by_the_replicas(cluster):
    url, _ = cluster
    demos = [{"text": t} for t in ["Rain is expected on Tuesday with strong winds from the west.",
                                   "The forecast says sunny skies and twenty degrees this weekend.",
                                   "A storm front moves in tonight, bringing thunder and hail."]]
    r = httpx.post(f"{url}/v1/domains", json={"name": "weather", "demos": demos},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
    assert r.status_code == 201, r.text
    for _ in range(4):  # no restart: the mask travels with the request, from the ingress's new store snapshot
        reply = complete(url, prompt="Will it rain tomorrow?", domain="weather")
        assert reply.status_code == 200 and reply.json()["domex"]["domain"] == "weather"
    matched = complete(url, prompt="Heavy rain and strong winds are expected tomorrow afternoon.")
    assert matched.status_code == 200 and matched.json()["domex"]["domain"] == "weather"


def test_a_killed_replica_is_replaced_and_no_request_is_lost(cluster):
    """Requests sent after a replica is killed are all answered: the ingress resends a request whose replica died
    before it streamed anything, and Ray replaces the replica."""
    url, _ = cluster
    victim = complete(url, prompt=DOMAINS["cooking"][0], domain="cooking").json()["domex"]["replica_pid"]
    os.kill(victim, signal.SIGKILL)
    replies = [complete(url, prompt=DOMAINS[d][0], domain=d) for d in ("cooking", "python", "football") * 3]
    assert [r.status_code for r in replies] == [200] * 9, [r.text for r in replies if r.status_code != 200]
    assert victim not in {r.json()["domex"]["replica_pid"] for r in replies}
    from ray import serve

    deadline, running = time.time() + 120, 0
    while time.time() < deadline and running != 2:  # Ray brings the deployment back to 2 replicas
        deployments = serve.status().applications["domex"].deployments
        running = next(d.replica_states.get("RUNNING", 0) for name, d in deployments.items() if "Replica" in name)
        time.sleep(1)
    assert running == 2


def test_ray_shuts_down_and_leaves_no_process_behind(cluster):
    from ray import serve

    _, before = cluster
    serve.shutdown()
    ray.shutdown()
    deadline = time.time() + 30
    while time.time() < deadline:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            break
        time.sleep(0.5)
    assert not left, [p.name() for p in left]
