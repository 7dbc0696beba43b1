"""HTTP server: OpenAI-compatible completions and chat, domain registration while serving, metrics.

A request's path: route (validate, tokenise, check the prompt fits) -> selection (one store
snapshot -> match or the forced domain -> fallback policy -> mask) -> scheduler (waits for its
experts to fit next to the running rows', joins the running batch, decodes restricted to its own
mask) -> tokens back, streamed as SSE or at once. The snapshot is the only view of the store a
request has, so a domain registered or deleted meanwhile never half-changes it. A full waiting
queue answers 429 with Retry-After.

Every error has one shape (protocol.error_response); client-facing messages name store and pool
files relative to their folders' parents, never by absolute server path. Admin routes check the
token (constant time) before reading the body. The body limit counts the bytes that actually
arrive, chunked or not. /health says `degraded` with the reasons when the store cannot be written
or the pool failed verification. Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from domex.store.db import Store
from domex.errors import BadRequest, ConfigError, PromptTooLong, Unauthorized
from domex.store.pattern import check_name

from .protocol import (ChatCompletionRequest, CompletionRequest, DomainRequest, completion_body, error_body, error_shape,
                       install_error_handlers, new_id)
from .selection import Selector, ServeConfig
from .serving import SCHEDULERS, Job

log = logging.getLogger("domex.server")
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class Metrics:
    """Prometheus counters of one server (own registry, so several servers can live in one process).

    domex_requests{endpoint, status}: every completion request once, status ok | invalid (4xx) |
    error (5xx, in a stream too) | disconnected (the client left before the end).
    """

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("domex_requests", "Requests served", ["endpoint", "status"], registry=r)
        self.matches = Counter("domex_domain_matches", "Requests per matched domain", ["domain", "ood"], registry=r)
        self.match_errors = Counter("domex_match_errors", "Requests whose matching raised", registry=r)
        self.switches = Counter("domex_switches", "Admissions that loaded at least one expert", registry=r)
        self.bytes_loaded = Counter("domex_bytes_loaded", "Expert bytes copied from the pool", registry=r)
        self.resident = Gauge("domex_resident_bytes", "Routed expert bytes resident now", registry=r)
        self.expert_calls = Gauge("domex_expert_calls", "(token, selected expert) pairs routed", registry=r)
        self.expert_calls_skipped = Gauge("domex_expert_calls_skipped", "Pairs dropped by --skip-ratio", registry=r)
        self.latency = Histogram("domex_request_seconds", "Request latency", ["endpoint"], registry=r)
        self.match_latency = Histogram("domex_match_seconds", "Query matching latency", registry=r,
                                       buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))


@dataclass
class ServerState:
    engine: object
    store: Store
    selector: Selector
    model_name: str
    config: ServeConfig = field(default_factory=ServeConfig)
    register_domain: object = None  # callable(name, demos, replace) -> Pattern; None disables POST /v1/domains
    admin_token: str | None = None
    max_tokens: int = 512
    max_prompt_tokens: int | None = None  # None: the model's context minus the request's max_tokens
    max_body_bytes: int = 1 << 20
    max_demos: int = 256
    metrics: Metrics = field(default_factory=Metrics)
    register_lock: threading.Lock = field(default_factory=threading.Lock)

    def relative(self, message: str) -> str:
        """The message with the pool's and the store's absolute folders cut to their names."""
        for root in (Path(self.engine.pool.dir), Path(self.store.path)):
            for p in {root, root.resolve()}:
                if p.is_absolute():
                    message = message.replace(str(p), p.name)
        return message

    def problems(self) -> list[str]:
        """Why the server is degraded: the store cannot be written, the pool failed verification."""
        store = self.store.write_problem()
        out = ([store] if store else []) + [f"pool corrupt: {c}" for c in self.engine.pool.corrupt]
        return [self.relative(p) for p in out]


class BodyLimit:
    """ASGI middleware: 413 once a body exceeds `limit` bytes, by Content-Length or by the bytes that
    arrive (a chunked upload has no Content-Length). Raised where the body is read, so a route that
    checks auth first answers 401 before it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        declared = length.isdigit()
        seen = int(length) if declared else 0

        async def counted():
            nonlocal seen
            message = await receive() if seen <= self.limit else {}
            if not declared:
                seen += len(message.get("body", b""))
            if seen > self.limit:
                size = seen if declared else f"more than {self.limit}"
                raise HTTPException(413, f"request body of {size} bytes exceeds the limit of {self.limit} bytes "
                                         "(--max-body-bytes)")
            return message

        await self.app(scope, counted, send)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as the model was trained to read it: its chat template, else the turns joined."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def create_app(state: ServerState, scheduler=None) -> FastAPI:
    """The HTTP app over `state`; `scheduler` (anything with `submit(job)`) defaults to the one state.config names,
    running on state.engine (the Ray ingress passes one that forwards jobs to its replicas)."""
    app = FastAPI(title="domex", version="0.1.0")

    def on_load(report):
        if report.loaded:
            state.metrics.switches.inc()
        state.metrics.bytes_loaded.inc(report.bytes_read)
        state.metrics.resident.set(state.engine.stats().resident_bytes)

    def on_match(seconds, matches):
        if matches is None:
            state.metrics.match_errors.inc()
            return
        state.metrics.match_latency.observe(seconds)
        for match in matches:
            state.metrics.matches.labels(match.domain, str(match.ood).lower()).inc()

    state.selector.observe = on_match
    config = state.config
    if scheduler is None and config.scheduler == "static":
        scheduler = SCHEDULERS["static"](state.engine, max_batch=config.max_batch, on_load=on_load)
    elif scheduler is None:
        scheduler = SCHEDULERS["continuous"](state.engine, max_batch=config.max_batch, max_waiting=config.max_waiting,
                                             max_overtakes=config.max_overtakes, on_load=on_load)
    # prompts are tokenised on request threads with a tokenizer of their own: a fast tokenizer's padding and
    # truncation are state of the object (the matcher keeps its own copy for the same reason)
    tokenizer = copy.deepcopy(state.engine.tokenizer)
    app.state.domex = state
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)

    def record(request: Request, status: int) -> None:
        """An error reply of a completion endpoint, counted once (a stream's end counts itself)."""
        endpoint = ENDPOINTS.get(request.url.path)
        if endpoint is not None:
            state.metrics.requests.labels(endpoint, "invalid" if status < 500 else "error").inc()

    install_error_handlers(app, rewrite=state.relative, record=record)

    def require_admin(request: Request) -> None:
        """401 unless the bearer token matches (constant time); checked before the body is read."""
        if not state.admin_token:
            return
        sent = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(sent, f"Bearer {state.admin_token}".encode()):
            raise Unauthorized("this endpoint changes the store: send 'Authorization: Bearer <admin token>'")

    def prompt_ids(prompt: str, special_tokens: bool, max_tokens: int) -> list[int]:
        """The prompt's token ids, refused when not Unicode, empty, or longer than the context leaves room for."""
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can carry lone surrogates ("\ud800"); a tokenizer cannot take them
            raise BadRequest(f"the prompt holds a lone surrogate {prompt[e.start]!r} at character {e.start}; "
                             "send valid Unicode") from None
        ids = list(tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"])
        if not ids:
            raise BadRequest("the prompt is empty (it tokenises to no tokens); send some text")
        context = int(getattr(state.engine.model.config, "max_position_embeddings", 0) or 0)
        if state.max_prompt_tokens is not None:
            limit, why = state.max_prompt_tokens, "--max-prompt-tokens"
        else:
            limit, why = context - max_tokens, f"the model's context of {context} minus max_tokens={max_tokens}"
        if len(ids) > limit:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens, more than the {limit} this server takes ({why}); "
                                "shorten it" + ("" if state.max_prompt_tokens is not None else " or ask for fewer max_tokens"))
        return ids

    async def complete(request: Request, body, prompt: str, query: str, chat: bool, endpoint: str):
        if body.max_tokens > state.max_tokens:
            raise ConfigError(f"max_tokens={body.max_tokens} exceeds this server's limit of {state.max_tokens} (--max-tokens)")
        start = time.perf_counter()
        ids = await run_in_threadpool(prompt_ids, prompt, not chat, body.max_tokens)
        selection = await run_in_threadpool(state.selector.select, query, body.domain)
        domex = selection.to_json()
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item)  # noqa: E731
        job = Job(ids, body.max_tokens, body.temperature, body.top_p, selection.mask, novices=selection.novices,
                  match=selection.match,
                  key=selection.key,
                  emit=lambda text: put(("text", text)), finish=lambda reason, usage: put(("done", reason, usage)),
                  fail=lambda exc: put(("error", exc)))
        scheduler.submit(job)
        rid = new_id("chatcmpl" if chat else "cmpl")
        headers = {"X-Domex-Domain": selection.domain}

        def finished(status: str):
            state.metrics.requests.labels(endpoint, status).inc()
            state.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        if body.stream:
            async def events():
                status = "disconnected"  # until [DONE] is handed over
                try:
                    while True:
                        item = await chunks.get()
                        if item[0] == "error":
                            code, message, kind = error_shape(item[1])
                            if code >= 500:
                                log.error("request %s failed", rid, exc_info=item[1])
                            yield f"data: {json.dumps(error_body(code, state.relative(message), kind))}\n\n"
                            outcome = "invalid" if code < 500 else "error"
                            break
                        text, reason = (item[1], None) if item[0] == "text" else ("", item[1])
                        domex.update(job.info if item[0] == "done" else {})
                        yield f"data: {json.dumps(completion_body(rid, state.model_name, text, reason, domex, None, chat))}\n\n"
                        if item[0] == "done":
                            if body.stream_options and body.stream_options.include_usage:
                                last = {**completion_body(rid, state.model_name, "", None, domex, None, chat),
                                        "choices": [], "usage": item[2]}
                                yield f"data: {json.dumps(last)}\n\n"
                            outcome = "ok"
                            break
                    yield "data: [DONE]\n\n"
                    status = outcome
                finally:
                    job.cancelled.set()  # a client that went away stops its row at the next step
                    finished(status)

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
                if error_shape(item[1])[0] >= 500:
                    log.error("request %s failed", rid, exc_info=item[1])
                raise item[1]  # the error handlers answer and count it
            else:
                finished("ok")
                domex.update(job.info)
                return JSONResponse(completion_body(rid, state.model_name, "".join(parts), item[1], domex, item[2], chat),
                                    headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await complete(request, body, body.prompt, body.prompt, chat=False, endpoint="completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        prompt = chat_prompt(tokenizer, [m.model_dump() for m in body.messages])
        return await complete(request, body, prompt, body.query_text(), chat=True, endpoint="chat")

    @app.get("/v1/domains")
    async def list_domains():
        snapshot = await run_in_threadpool(state.store.snapshot)
        return {"object": "list", "data": [{"name": p.name, "demos": len(p.demos), "tokens": p.tokens,
                                            "criteria": list(p.criteria), "updated": p.updated}
                                           for p in snapshot.patterns.values()]}

    @app.post("/v1/domains")
    async def add_domain(request: Request):
        require_admin(request)
        if state.register_domain is None:
            raise ConfigError("this server was started without a pool to register from; registration is off")
        state.store.require_writable()
        body = parse(DomainRequest, await request.body())
        if len(body.demos) > state.max_demos:
            raise BadRequest(f"{len(body.demos)} demos, more than the {state.max_demos} this server registers at once "
                             "(--max-demos); send fewer, or register offline with `domex register`")

        def register():
            with state.register_lock:  # one registration at a time; serving goes on meanwhile
                return state.register_domain(body.name, body.demos, body.replace)

        pattern = await run_in_threadpool(register)
        return JSONResponse({"name": pattern.name, "demos": len(pattern.demos), "tokens": pattern.tokens,
                             "criteria": list(pattern.criteria)}, status_code=201)

    @app.delete("/v1/domains/{name}")
    async def delete_domain(request: Request, name: str):
        require_admin(request)
        check_name(name)
        await run_in_threadpool(state.store.delete, name)
        return {"deleted": name}

    @app.get("/health")
    async def health():
        problems = await run_in_threadpool(state.problems)
        snapshot = await run_in_threadpool(state.store.snapshot)
        return {"status": "degraded" if problems else "ok", "problems": problems, "domains": len(snapshot.names),
                "model": state.model_name, "read_only": state.store.read_only}

    @app.get("/metrics")
    async def metrics():
        stats = state.engine.stats()
        state.metrics.expert_calls.set(stats.expert_calls)
        state.metrics.expert_calls_skipped.set(stats.expert_calls_skipped)
        return PlainTextResponse(generate_latest(state.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    return app


def parse(model, raw: bytes):
    """A request body read by hand (after auth), failing like FastAPI's own parsing: 400 naming the fields."""
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and invalid UTF-8
        raise BadRequest(f"the request body is not JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def open_state(pool: str, store: str, config: ServeConfig, *, device: str = "cpu", slots: str | None = None,
               read_only: bool = False, verify_pool: bool = False, **limits) -> ServerState:
    """The engine, store, matcher and selection that serve `pool` with `store`. `slots` overrides the resident
    set (the Ray ingress keeps top_k: it only matches and tokenises); `limits` are ServerState's request limits."""
    from domex.store.budget import Budget
    from domex.store.demos import Demo

    from .engine import Engine
    from .indexer import register
    from .match import make_matcher
    from .selection import MaskBook

    from .pool import PoolManifest

    manifest = PoolManifest.from_dir(pool)
    engine = Engine.open(pool, budget=slots or config.slots(), device=device, dtype=config.dtype,
                         skip_ratio=config.skip_ratio, tier_slots=config.tier_slots(manifest))  # checks files, sizes
    if slots is None:
        config.check_fits(engine.pool.manifest)
    if verify_pool:
        for bad in engine.pool.verify_checksums():
            log.warning("pool verification: %s failed its checksum; requests that need it will fail", bad)
    opened = Store.open(store, fingerprint=engine.pool.fingerprint, read_only=read_only)
    masks = MaskBook(opened, Budget.parse(config.budget), num_layers=manifest.num_layers, num_experts=manifest.num_experts,
                     criterion=config.criterion, rule=config.rule, memory=config.memory, manifest=manifest,
                     novices=config.novices)
    matcher = make_matcher(config.matcher, opened, engine=engine, quantile=config.ood_quantile)

    def register_domain(name: str, demos: list[dict], replace: bool):
        parsed = [Demo.from_json(d, where=f"demos[{i}]") for i, d in enumerate(demos)]
        return register(pool, opened, name, parsed, replace=replace, streaming=True, progress=False)

    return ServerState(engine, opened, Selector(opened, matcher, masks, config.policy), model_name=Path(pool).name,
                       config=config, register_domain=register_domain, **limits)


def serve_command(pool: str, store: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu",
                  read_only: bool = False, verify_pool: bool = False, admin_token: str | None = None,
                  max_tokens: int = 512, max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None,
                  max_demos: int = 256, **serving) -> int:
    """`domex serve`: open the engine and the store, verify the pool, then serve until interrupted.

    `serving` holds the ServeConfig options (budget, resident, criterion, rule, policy, matcher, ...)."""
    import uvicorn

    config = ServeConfig.of(serving)  # a bad flag stops the start here, named
    state = open_state(pool, store, config, device=device, read_only=read_only, verify_pool=verify_pool,
                       admin_token=admin_token, max_tokens=max_tokens, max_body_bytes=max_body_bytes,
                       max_prompt_tokens=max_prompt_tokens, max_demos=max_demos)
    uvicorn.run(create_app(state), host=host, port=port, log_level="info")
    return 0


# ---------------------------------------------------------------------------------------------
# A server process, for tests, benchmarks and chaos runs


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(pool, store, port: int, *flags: str, output=None, timeout: float = 180.0):
    """`domex serve --pool POOL --store STORE --port PORT FLAGS...` as a process, returned once /health answers.

    `output`: a file for its log (default: a pipe, whose tail goes into the error when the server dies)."""
    import os
    import subprocess
    import sys

    import httpx

    cmd = [sys.executable, "-m", "domex.runtime.cli", "serve", "--pool", str(pool), "--store", str(store), "--port",
           str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=output or subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = proc.stdout.read().decode()[-3000:] if output is None else f"see {getattr(output, 'name', 'its log')}"
            raise RuntimeError(f"domex serve exited with {proc.returncode}: {tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"domex serve did not come up in {timeout:.0f} s")
