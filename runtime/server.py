"""HTTP server: OpenAI-compatible completions and chat, domain registration while serving, metrics.

A request's path: route -> match (or the forced domain) -> fallback policy -> mask (MaskBook)
-> Scheduler (make resident, restricted generate) -> tokens back, streamed as SSE or at once.
DomexError subclasses map to their `http_status` in one handler. Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from domex.store.db import Store
from domex.store.errors import ConfigError, DomexError, UnknownDomain

from .match import fallback_domains
from .protocol import ChatCompletionRequest, CompletionRequest, DomainRequest, completion_body, new_id
from .serving import Job, MaskBook, Scheduler


class Metrics:
    """Prometheus counters of one server (own registry, so several servers can live in one process)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("domex_requests", "Requests served", ["endpoint", "status"], registry=r)
        self.matches = Counter("domex_domain_matches", "Requests per matched domain", ["domain", "ood"], registry=r)
        self.switches = Counter("domex_switches", "Batches that loaded at least one expert", registry=r)
        self.bytes_loaded = Counter("domex_bytes_loaded", "Expert bytes copied from the pool", registry=r)
        self.resident = Gauge("domex_resident_bytes", "Routed expert bytes resident now", registry=r)
        self.latency = Histogram("domex_request_seconds", "Request latency", ["endpoint"], registry=r)
        self.match_latency = Histogram("domex_match_seconds", "Query matching latency", registry=r,
                                       buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))


@dataclass
class ServerState:
    engine: object
    store: Store
    matcher: object
    masks: MaskBook
    model_name: str
    policy: str = "nearest"
    register_domain: object = None  # callable(name, demos, replace) -> Pattern; None disables POST /v1/domains
    admin_token: str | None = None
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    metrics: Metrics = field(default_factory=Metrics)
    register_lock: threading.Lock = field(default_factory=threading.Lock)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as the model was trained to read it: its chat template, else the turns joined."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="domex", version="0.1.0")

    def on_batch(jobs, report):
        if report.loaded:
            state.metrics.switches.inc()
        state.metrics.bytes_loaded.inc(report.bytes_read)
        state.metrics.resident.set(state.engine.stats().resident_bytes)

    scheduler = Scheduler(state.engine, on_batch=on_batch)
    app.state.domex = state

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and int(size) > state.max_body_bytes:
            return _error(413, f"request body of {size} bytes exceeds the limit of {state.max_body_bytes} bytes "
                               "(--max-body-bytes)", "request_too_large")
        return await call_next(request)

    @app.exception_handler(DomexError)
    async def domex_error(request: Request, exc: DomexError):
        return _error(exc.http_status, str(exc), type(exc).__name__)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error(400, f"invalid request: {problems}", "invalid_request_error")

    def require_admin(request: Request) -> JSONResponse | None:
        if state.admin_token and request.headers.get("authorization") != f"Bearer {state.admin_token}":
            return _error(401, "this endpoint changes the store: send 'Authorization: Bearer <admin token>'",
                          "unauthorized")
        return None

    async def choose(text: str, forced: str | None):
        """(match or None, mask) for a query: the forced domain, else the matcher and the fallback policy."""
        if forced is not None:
            if forced not in state.store:
                raise UnknownDomain(f"forced domain {forced!r} is not registered; registered: {', '.join(state.store.names())}")
            return None, state.masks.mask([forced])
        start = time.perf_counter()
        match = (await run_in_threadpool(state.matcher.match_many, [text]))[0]
        state.metrics.match_latency.observe(time.perf_counter() - start)
        state.metrics.matches.labels(match.domain, str(match.ood).lower()).inc()
        return match, state.masks.mask(fallback_domains(match, state.policy, state.store))

    async def complete(request: Request, body, prompt: str, query: str, chat: bool, endpoint: str):
        if body.max_tokens > state.max_tokens:
            raise ConfigError(f"max_tokens={body.max_tokens} exceeds this server's limit of {state.max_tokens} (--max-tokens)")
        start = time.perf_counter()
        match, mask = await choose(query, body.domain)
        domain = body.domain or match.domain
        domex = {"domain": domain, "forced": body.domain is not None,
                 **({k: v for k, v in match.to_json().items() if k != "domain"} if match else {})}
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)  # noqa: E731
        job = Job(prompt, not chat, body.max_tokens, body.temperature, body.top_p, mask, match=match,
                  emit=lambda text: put(("text", text)), finish=lambda reason, usage: put(("done", reason, usage)),
                  fail=lambda exc: put(("error", exc)))
        scheduler.submit(job)
        rid = new_id("chatcmpl" if chat else "cmpl")
        headers = {"X-Domex-Domain": domain}

        def finished(status: str):
            state.metrics.requests.labels(endpoint, status).inc()
            state.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        if body.stream:
            async def events():
                try:
                    while True:
                        item = await chunks.get()
                        if item[0] == "error":
                            yield f"data: {json.dumps({'error': {'message': str(item[1]), 'type': type(item[1]).__name__}})}\n\n"
                            break
                        text, reason = (item[1], None) if item[0] == "text" else ("", item[1])
                        yield f"data: {json.dumps(completion_body(rid, state.model_name, text, reason, domex, None, chat))}\n\n"
                        if item[0] == "done":
                            break
                    yield "data: [DONE]\n\n"
                    finished("ok")
                finally:
                    job.cancelled.set()  # a client that went away stops its row at the next step

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        parts = []
        while True:
            try:
                item = await asyncio.wait_for(chunks.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    finished("disconnected")
                    return JSONResponse({}, status_code=499)
                continue
            if item[0] == "text":
                parts.append(item[1])
            elif item[0] == "error":
                finished("error")
                raise item[1]
            else:
                finished("ok")
                return JSONResponse(completion_body(rid, state.model_name, "".join(parts), item[1], domex, item[2], chat),
                                    headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await complete(request, body, body.prompt, body.prompt, chat=False, endpoint="completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        prompt = chat_prompt(state.engine.tokenizer, [m.model_dump() for m in body.messages])
        return await complete(request, body, prompt, body.query_text(), chat=True, endpoint="chat")

    @app.get("/v1/domains")
    async def list_domains():
        out = []
        for name in state.store.names():
            p = state.store.get(name)
            out.append({"name": name, "demos": len(p.demos), "tokens": p.tokens, "criteria": list(p.criteria),
                        "updated": p.updated})
        return {"object": "list", "data": out}

    @app.post("/v1/domains")
    async def add_domain(request: Request, body: DomainRequest):
        if (denied := require_admin(request)) is not None:
            return denied
        if state.register_domain is None:
            raise ConfigError("this server was started without a pool to register from; registration is off")

        def register():
            with state.register_lock:  # one registration at a time; serving goes on meanwhile
                return state.register_domain(body.name, body.demos, body.replace)

        pattern = await run_in_threadpool(register)
        return JSONResponse({"name": pattern.name, "demos": len(pattern.demos), "tokens": pattern.tokens,
                             "criteria": list(pattern.criteria)}, status_code=201)

    @app.delete("/v1/domains/{name}")
    async def delete_domain(request: Request, name: str):
        if (denied := require_admin(request)) is not None:
            return denied
        state.store.delete(name)
        return {"deleted": name}

    @app.get("/health")
    async def health():
        return {"status": "ok", "domains": len(state.store.names()), "model": state.model_name}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(state.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    return app


def run(args) -> int:
    """`domex serve`: open the engine and the store, then serve until interrupted."""
    import uvicorn

    from domex.store.budget import Budget
    from domex.store.demos import Demo

    from .engine import Engine
    from .indexer import register
    from .match import POLICIES, make_matcher

    if args.policy not in POLICIES:
        raise ConfigError(f"unknown fallback policy {args.policy!r}; policies: {', '.join(POLICIES)}")
    engine = Engine.open(args.pool, budget=args.budget, device=args.device)
    store = Store.open(args.store, fingerprint=engine.pool.fingerprint)
    manifest = engine.pool.manifest
    masks = MaskBook(store, Budget.parse(args.budget), num_layers=manifest.num_layers, num_experts=manifest.num_experts,
                     criterion=args.criterion, rule=args.rule)

    def register_domain(name: str, demos: list[dict], replace: bool):
        parsed = [Demo.from_json(d, where=f"demos[{i}]") for i, d in enumerate(demos)]
        return register(args.pool, store, name, parsed, replace=replace, streaming=True, progress=False)

    state = ServerState(engine, store, make_matcher(args.matcher, store, engine=engine, threshold=args.threshold),
                        masks, model_name=Path(args.pool).name, policy=args.policy, register_domain=register_domain,
                        admin_token=args.admin_token, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="info")
    return 0
