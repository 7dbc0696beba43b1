"""Gateway: an OpenAI-compatible front that matches each query to a domain and proxies it to that domain's upstream.

    request -> query text (prompt, or the user turns newest first) -> embedding matcher -> domain -> upstream URL
    (healthy? else the default) -> proxied as is (SSE passed through chunk by chunk) -> X-Domex-* headers

The upstreams are any OpenAI-compatible servers: `vllm serve` of a `domex export` checkpoint per
domain, or `domex serve` processes. Which upstream a request went to, and why, is reported in headers:
  X-Domex-Domain    the matched (or forced, via the request's `domain` field) domain
  X-Domex-Upstream  the upstream URL used
  X-Domex-Route     domain | forced | ood | unmapped | down   (own upstream; the request's `domain` field;
                    out-of-domain, no upstream listed for the domain, or its upstream down -> the default)
The upstream request carries the domain in `X-Domex-Domain` and `serve_multiplexed_model_id`, so one
Ray Serve deployment multiplexed by domain can stand behind every domain's URL.
Out-of-domain queries go to --default; without one, to the nearest domain's upstream. Upstreams are
health-checked with GET /health every --health-interval seconds and at once when a request to them
fails to connect; a request whose upstream refuses the connection is retried once on the default.
Binds 127.0.0.1 by default: put an authenticating proxy in front before exposing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from domex.store.db import Store
from domex.errors import BadGateway, BadRequest, ConfigError, UpstreamUnavailable

from .protocol import install_error_handlers
from .query import query_text

PROXIED = ("/v1/completions", "/v1/chat/completions")
REQUEST_DROPPED = {"host", "accept-encoding"}  # bytes are passed through raw, so ask the upstream for no compression
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding", "date", "server"}


@dataclass
class Upstream:
    """One upstream server and what the last health check (or failed request) said about it."""

    url: str
    healthy: bool = True  # optimistic until the first check: a fresh gateway may start before its upstreams
    checked: float = 0.0  # time.monotonic() of the last check
    error: str = ""


@dataclass
class GatewayConfig:
    upstreams: dict[str, str]  # domain -> base URL
    default: str | None = None  # base URL for out-of-domain queries and dead upstreams
    ood_quantile: float | None = None  # share of each domain's demos its threshold flags (None: match.QUANTILE)
    health_interval: float = 5.0  # seconds between health checks
    timeout: float = 600.0  # seconds for an upstream response (a long generation)

    @classmethod
    def from_flags(cls, pairs: list[str], default: str | None, **kw) -> "GatewayConfig":
        """From `--upstream NAME=URL` flags; ConfigError for a malformed pair or no upstream at all."""
        upstreams = {}
        for pair in pairs:
            name, sep, url = pair.partition("=")
            if not sep or not name or not url.startswith(("http://", "https://")):
                raise ConfigError(f"--upstream {pair!r}: write NAME=URL with an http(s) URL, e.g. "
                                  "--upstream cooking=http://127.0.0.1:8001")
            upstreams[name] = url.rstrip("/")
        if not upstreams and not default:
            raise ConfigError("the gateway has nowhere to send requests: give --upstream NAME=URL (per domain) "
                              "and/or --default URL")
        return cls(upstreams, default.rstrip("/") if default else None, **kw)


@dataclass(frozen=True)
class Route:
    domain: str
    upstream: str
    reason: str  # domain | ood | unmapped | down | forced


@dataclass
class Gateway:
    """Upstream table + health + matcher; `route(text)` decides, `proxy` forwards."""

    config: GatewayConfig
    matcher: object  # .match_many(texts) -> [Match]
    upstreams: dict[str, Upstream] = field(default_factory=dict)  # url -> state
    client: httpx.AsyncClient | None = None

    def __post_init__(self):
        for url in [*self.config.upstreams.values(), *([self.config.default] if self.config.default else [])]:
            self.upstreams.setdefault(url, Upstream(url))

    async def check(self, url: str) -> bool:
        """GET {url}/health; marks the upstream healthy or down."""
        up = self.upstreams[url]
        try:
            r = await self.client.get(f"{url}/health", timeout=2.0)
            up.healthy, up.error = r.status_code == 200, ("" if r.status_code == 200 else f"/health said {r.status_code}")
        except httpx.HTTPError as e:
            up.healthy, up.error = False, f"{type(e).__name__}: {e}"
        up.checked = time.monotonic()
        return up.healthy

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(url) for url in self.upstreams))

    async def health_loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.health_interval)

    def mark_down(self, url: str, error: str) -> None:
        self.upstreams[url].healthy, self.upstreams[url].error = False, error
        asyncio.get_running_loop().create_task(self.check(url))  # back up at the next successful check

    def _fallback(self, domain: str, reason: str) -> Route:
        default = self.config.default
        if default and self.upstreams[default].healthy:
            return Route(domain, default, reason)
        own = self.config.upstreams.get(domain)
        if own and self.upstreams[own].healthy:  # no (healthy) default: the nearest domain's upstream is next best
            return Route(domain, own, reason)
        down = ", ".join(f"{u.url} ({u.error or 'down'})" for u in self.upstreams.values() if not u.healthy)
        raise UpstreamUnavailable(f"no healthy upstream for domain {domain!r} ({reason}); down: {down or 'none'}; "
                                  "start the upstream servers or give a reachable --default URL")

    async def route(self, text: str, forced: str | None = None) -> Route:
        """The domain of a query and the upstream that serves it."""
        if forced is not None:
            domain, ood = forced, False
        else:
            match = (await run_in_threadpool(self.matcher.match_many, [text]))[0]
            domain, ood = match.domain, match.ood
        if ood:
            return self._fallback(domain, "ood")
        own = self.config.upstreams.get(domain)
        if own is None:
            return self._fallback(domain, "unmapped")
        if not self.upstreams[own].healthy:
            return self._fallback(domain, "down")
        return Route(domain, own, "forced" if forced is not None else "domain")

    async def proxy(self, path: str, raw: bytes, headers: dict, route: Route, stream: bool) -> Response:
        """Forward the body unchanged; on a refused connection mark the upstream down and retry once via the fallback."""
        out_headers = {"X-Domex-Domain": route.domain, "X-Domex-Upstream": route.upstream, "X-Domex-Route": route.reason}
        # the domain travels to the upstream too: Ray Serve multiplexing routes on serve_multiplexed_model_id
        sent = {**headers, "X-Domex-Domain": route.domain, "serve_multiplexed_model_id": route.domain}
        request = self.client.build_request("POST", route.upstream + path, content=raw, headers=sent)
        try:
            upstream = await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            self.mark_down(route.upstream, f"{type(e).__name__}: {e}")
            retry = self._fallback(route.domain, "down")
            if retry.upstream == route.upstream:
                raise UpstreamUnavailable(f"upstream {route.upstream} refused the connection and no other is healthy; "
                                          "start it again or give a reachable --default URL") from None
            return await self.proxy(path, raw, headers, retry, stream)
        passed = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS and not k.lower().startswith("x-domex-")}
        passed.update(out_headers)
        if stream and upstream.status_code == 200:
            async def chunks():
                try:
                    async for chunk in upstream.aiter_raw():  # as the upstream sends them: SSE events pass through
                        yield chunk
                finally:
                    await upstream.aclose()

            return StreamingResponse(chunks(), status_code=200, headers=passed,
                                     media_type=upstream.headers.get("content-type", "text/event-stream"))
        body = await upstream.aread()
        await upstream.aclose()
        return Response(body, status_code=upstream.status_code, headers=passed,
                        media_type=upstream.headers.get("content-type"))


def create_app(gateway: Gateway, store: Store) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        gateway.client = httpx.AsyncClient(timeout=httpx.Timeout(gateway.config.timeout, connect=2.0))
        task = asyncio.get_running_loop().create_task(gateway.health_loop())
        try:
            yield
        finally:
            task.cancel()
            await gateway.client.aclose()

    app = FastAPI(title="domex gateway", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)  # UpstreamUnavailable (503) and every other error in the one shape

    async def forward(request: Request, path: str) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object (an OpenAI completion or chat request)")
        try:
            route = await gateway.route(query_text(body, chat=path.endswith("/chat/completions")), body.get("domain"))
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS | REQUEST_DROPPED}
            return await gateway.proxy(path, raw, headers, route, bool(body.get("stream")))
        except httpx.HTTPError as e:
            raise BadGateway(f"upstream failed: {type(e).__name__}: {e}") from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await forward(request, "/v1/chat/completions")

    @app.get("/health")
    async def health():
        ups = [{"url": u.url, "healthy": u.healthy, "error": u.error} for u in gateway.upstreams.values()]
        ok = any(u.healthy for u in gateway.upstreams.values())
        return JSONResponse({"status": "ok" if ok else "no_healthy_upstream", "upstreams": ups,
                             "default": gateway.config.default}, status_code=200 if ok else 503)

    @app.get("/v1/domains")
    async def domains():
        names = store.names()
        data = []
        for name in sorted(set(names) | set(gateway.config.upstreams)):
            url = gateway.config.upstreams.get(name)
            data.append({"name": name, "registered": name in names, "upstream": url,
                         "healthy": gateway.upstreams[url].healthy if url else None})
        return {"object": "list", "data": data, "default": gateway.config.default}

    return app


def gateway_command(store: str, upstream: list[str], default: str | None = None, ood_quantile: float | None = None,
                    health_interval: float = 5.0, timeout: float = 600.0, host: str = "127.0.0.1", port: int = 8100) -> int:
    """`domex gateway`: match with the store's demos, proxy to the upstreams, until interrupted."""
    import uvicorn

    from .match import Matcher

    config = GatewayConfig.from_flags(upstream, default, ood_quantile=ood_quantile, health_interval=health_interval,
                                      timeout=timeout)
    opened = Store.open(store, create=False)
    matcher = Matcher(opened, "embedding", quantile=config.ood_quantile)
    matcher.match_many(["warm up"])  # load the embedder and the index before the first request
    uvicorn.run(create_app(Gateway(config, matcher), opened), host=host, port=port, log_level="info")
    return 0
