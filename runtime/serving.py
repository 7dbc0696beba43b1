"""Serving: continuous batching, each row routed among its own request's experts only.

One worker thread owns the engine and runs a loop of steps (iteration-level batching, as in Orca
and vLLM). At every step:

  admit   waiting requests join in FIFO order while the union of the running rows' masks and
          theirs fits the expert cache's slots in every layer (only that union is made resident,
          so no expert a running row needs is ever evicted); the ones joining together are
          prefilled in one left-padded batch, each row under its own mask, and their KV caches
          join the running batch, left-padded to one length. When the
          head does not fit, a later request that fits may overtake it, at most `max_overtakes`
          times; then nothing joins until the running rows have left room for the head
  decode  one forward of every running row; layer by layer, row b's router chooses only among
          its own mask's experts ([B, E] allowed), exactly as if it were served alone
  leave   rows that finished (EOS, max_tokens, the model's context) or were cancelled leave at
          once; the KV columns no row needs any more are cut

So no request starves: the head is overtaken a bounded number of times, and running rows end (max_tokens,
the context). Requests that cannot join keep their FIFO order. The queue is bounded and a full queue
refuses new requests (Overloaded, HTTP 429 with Retry-After).

Why not transformers' own continuous batching (5.x, `generate_batch`/`ContinuousBatchingManager`):
it can carry per-row masks only through private hooks (its batch processor and scheduler), shares
prefix KV blocks keyed on tokens alone (two requests with one prompt and different masks would
share them), and sizes its paged cache at ~10 GiB by default. This loop uses public pieces only
(the model's forward, DynamicCache built from tensors, per-row attention masks and positions) and
works the same for every family. Measured on this project's 2-core CPU (../shared/research/
continuous_batching.md): 16 staggered requests, 16/16 equal to their solo runs in fp32.

Isolation: when a prefill raises, its prompts are prefilled again one by one, so a faulty one fails alone; a failed decode step fails the rows of
that step (they have streamed text already, so a rerun would send it twice).

`StaticScheduler` is the earlier design, kept as the baseline of `--scheduler static` and of the
benchmark: batches formed from the queue, run to their longest row under the union of their masks.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from domex.errors import Overloaded, PoolError
from domex.store.mask import Mask
from domex.store.plan import Plan

from .match import Match

log = logging.getLogger("domex.serving")


@dataclass
class Job:
    """One request on its way through the worker; `emit(text)` streams, `finish(reason, usage)` ends it."""

    ids: list[int]  # the prompt's token ids [T]
    max_tokens: int
    temperature: float
    top_p: float
    mask: Mask | Plan  # a plan (store/plan.py) when serving under --memory
    emit: Callable[[str], None]
    finish: Callable[[str, dict], None]
    fail: Callable[[Exception], None]
    match: Match | None = None
    novices: np.ndarray | None = None  # [L, E, H] when the plan answers pruned experts with novices
    key: str = ""  # the selection's domains ("python", "python+sql", "*"): what a replica holds for it
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)  # generated so far
    info: dict = field(default_factory=dict)  # what the backend reports with the result (e.g. which replica)

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.ids) + len(self.tokens)}


class TextStream:
    """A row's new tokens as text: emits what decoding added, holding back half a UTF-8 character."""

    def __init__(self, tokenizer, job: Job):
        self.tokenizer, self.job, self.sent = tokenizer, job, ""

    def push(self) -> None:
        text = self.tokenizer.decode(self.job.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(self.sent):
            self.job.emit(text[len(self.sent):])
            self.sent = text


def stop_ids(engine, tokenizer) -> set[int]:
    """Token ids that end a row: the generation config's EOS ids, and the tokenizer's when there is one."""
    eos = engine.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def optional_tokenizer(engine):
    """The pool's tokenizer, or None for a pool without one (callers then work on token ids only)."""
    try:
        return engine.tokenizer
    except PoolError:
        return None


def sample(logits: torch.Tensor, temperature: list[float], top_p: list[float], generator: torch.Generator) -> list[int]:
    """One token per row from logits [B, V]: greedy where temperature is 0, else nucleus sampling."""
    out = logits.float().argmax(dim=-1).tolist()
    for b, (t, p) in enumerate(zip(temperature, top_p)):
        if t > 0:
            probs = F.softmax(logits[b].float() / t, dim=-1)
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(0) - sorted_probs > p  # keep the smallest prefix whose mass reaches p
            sorted_probs[drop] = 0.0
            out[b] = int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return out


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] padded on the left (decoder-only generation) and their attention mask [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, attention


def merge(batch: DynamicCache | None, attention: torch.Tensor | None, rows: DynamicCache,
          rows_attention: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """The batch's KV cache and attention mask [B, T] with new rows appended, all left-padded to one length."""
    width = max(rows_attention.shape[1], attention.shape[1] if attention is not None else 0)

    def pad(t: torch.Tensor) -> torch.Tensor:  # [B, heads, T, d] -> [B, heads, width, d], zeros on the left
        return F.pad(t, (0, 0, width - t.shape[-2], 0))

    if batch is None:
        layers = [(pad(layer.keys), pad(layer.values)) for layer in rows.layers]
    else:
        layers = [(torch.cat([pad(old.keys), pad(new.keys)]), torch.cat([pad(old.values), pad(new.values)]))
                  for old, new in zip(batch.layers, rows.layers)]
    mask = F.pad(rows_attention, (width - rows_attention.shape[1], 0))
    if attention is not None:
        mask = torch.cat([F.pad(attention, (width - attention.shape[1], 0)), mask])
    return DynamicCache(layers), mask


def select_rows(cache: DynamicCache, attention: torch.Tensor, keep: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Only the rows in `keep`, without the leading columns none of them attends to."""
    index = torch.tensor(keep)
    attention = attention[index]
    start = int(attention.any(dim=0).long().argmax())  # the first column some row still attends to
    layers = [(layer.keys[index.to(layer.keys.device), :, start:], layer.values[index.to(layer.values.device), :, start:])
              for layer in cache.layers]
    return DynamicCache(layers), attention[:, start:]


@dataclass
class Row:
    job: Job
    text: TextStream | None
    position: int  # position id of the last token taken (the next one fed)
    next_token: int
    ended: bool = False  # finished (its job told) or cancelled


class ContinuousScheduler:
    """The one thread that runs the engine, step by step; see the module docstring."""

    def __init__(self, engine, *, max_batch: int = 8, max_waiting: int = 64, max_overtakes: int | None = None,
                 on_load=None, seed: int = 0):
        self.engine, self.max_batch, self.max_waiting, self.on_load = engine, max_batch, max_waiting, on_load
        self.max_overtakes = max_batch if max_overtakes is None else max_overtakes
        self.overtaken = 0  # times the current head of the queue was overtaken
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.attention: torch.Tensor | None = None  # [B, T] 1 = a real token of that row
        self._routed: list[int] | None = None  # ids of the jobs the routers' per-row masks were last set for
        self.generator = torch.Generator().manual_seed(seed)
        self.context = int(getattr(engine.model.config, "max_position_embeddings", 0) or 0) or None
        self.tokenizer = optional_tokenizer(engine)
        self.stop = stop_ids(engine, self.tokenizer)
        self.thread = threading.Thread(target=self._loop, name="domex-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; Overloaded when the waiting queue is full, CacheTooSmall when its mask can never fit."""
        self.engine.cache.check_fits(job.mask)
        with self.cond:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"the server is busy: {len(self.waiting)} requests are waiting (--max-waiting); "
                                 "retry shortly", retry_after=1)
            self.waiting.append(job)
            self.cond.notify()

    def running_masks(self) -> list[Mask | Plan]:
        return [r.job.mask for r in self.rows]

    def _route_rows(self, jobs: list[Job]) -> None:
        self.engine.allow_rows([j.mask for j in jobs], [j.novices for j in jobs])

    def _loop(self) -> None:
        while True:
            try:
                admitted = self._admissible()
                if admitted:
                    self._prefill(admitted)
                if self.rows:
                    self._decode()
            except Exception as e:  # a bug here must not stop the worker: the rows it hit fail, serving goes on
                log.exception("scheduler step failed")
                for r in self.rows:
                    if not r.ended:
                        r.job.fail(e)
                self.rows, self.cache, self.attention = [], None, None

    def _admissible(self) -> list[Job]:
        """The waiting jobs that join now: FIFO, while rows are free and the union of masks fits the slots."""
        with self.cond:
            while not self.rows and not self.waiting:
                self.cond.wait()
            for job in [j for j in self.waiting if j.cancelled.is_set()]:
                self.waiting.remove(job)
            admitted: list[Job] = []
            for i, job in enumerate(list(self.waiting)):
                if len(self.rows) + len(admitted) >= self.max_batch:
                    break
                if not self.engine.fits(self.running_masks() + [j.mask for j in admitted] + [job.mask]):
                    continue  # waits for running rows to leave room
                if job is not self.waiting[0]:
                    if self.overtaken >= self.max_overtakes:
                        break  # the head has waited long enough: let the batch drain for it
                    self.overtaken += 1
                else:
                    self.overtaken = 0
                self.waiting.remove(job)
                admitted.append(job)
            return admitted

    def _prefill(self, jobs: list[Job]) -> None:
        """Run the new prompts (one left-padded batch, each row under its own mask), emit each one's first
        token, and join the running batch. When that raises, each prompt runs alone: only a faulty one fails."""
        engine = self.engine
        try:
            report = engine.ensure(self.running_masks() + [j.mask for j in jobs])
            if self.on_load:
                self.on_load(report)
            self._route_rows(jobs)
            self._routed = None
            ids, attention = left_pad([j.ids for j in jobs], 0)
            cache = DynamicCache()
            with torch.no_grad():
                logits = engine.model(input_ids=ids.to(engine.device), attention_mask=attention.to(engine.device),
                                      position_ids=(attention.cumsum(-1) - 1).clamp(min=0).to(engine.device),
                                      cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            tokens = sample(logits, [j.temperature for j in jobs], [j.top_p for j in jobs], self.generator)
        except Exception as e:
            if len(jobs) == 1:
                jobs[0].fail(e)  # this prompt's own failure; the batch goes on
            else:
                for job in jobs:
                    self._prefill([job])
            return
        rows = [Row(j, TextStream(self.tokenizer, j) if self.tokenizer is not None else None, len(j.ids) - 1, t)
                for j, t in zip(jobs, tokens)]
        keep = [i for i, (row, t) in enumerate(zip(rows, tokens)) if self._take(row, t)]
        if keep:
            cache, attention = select_rows(cache, attention, keep) if len(keep) < len(jobs) else (cache, attention)
            self.cache, self.attention = merge(self.cache, self.attention, cache, attention)
            self.rows += [rows[i] for i in keep]

    def _decode(self) -> None:
        engine = self.engine
        if self._routed != [id(r.job) for r in self.rows]:
            self._route_rows([r.job for r in self.rows])
            self._routed = [id(r.job) for r in self.rows]
        ids = torch.tensor([[r.next_token] for r in self.rows], device=engine.device)  # [B, 1]
        positions = torch.tensor([[r.position] for r in self.rows], device=engine.device)  # [B, 1]
        attention = F.pad(self.attention, (0, 1), value=1)  # [B, T + 1]
        try:
            with torch.no_grad():
                logits = engine.model(input_ids=ids, attention_mask=attention.to(engine.device), position_ids=positions,
                                      cache=self.cache, use_cache=True).logits[:, -1]
            tokens = sample(logits, [r.job.temperature for r in self.rows], [r.job.top_p for r in self.rows],
                            self.generator)
        except Exception as e:
            for r in self.rows:
                r.job.fail(e)
            self.rows, self.cache, self.attention = [], None, None
            return
        self.attention = attention
        keep = [i for i, (r, t) in enumerate(zip(self.rows, tokens)) if self._take(r, t)]
        if len(keep) < len(self.rows):
            self._leave(keep)

    def _take(self, row: Row, token: int) -> bool:
        """Append a sampled token to its row (streaming it); False when the row ended (finished or cancelled)."""
        job = row.job
        reason = None  # cancelled: the client is gone, nobody to tell
        if not job.cancelled.is_set():
            if token in self.stop:
                reason = "stop"
            else:
                job.tokens.append(token)
                if row.text is not None:
                    row.text.push()
                row.position += 1
                row.next_token = token
                at_context = self.context is not None and len(job.ids) + len(job.tokens) >= self.context
                if len(job.tokens) < job.max_tokens and not at_context:
                    return True
                reason = "length"
        row.ended = True
        if reason:
            job.finish(reason, job.usage())
        return False

    def _leave(self, keep: list[int]) -> None:
        """Drop the rows not in `keep` from the batch, its KV cache and mask."""
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.cache, self.attention = select_rows(self.cache, self.attention, keep)
        else:
            self.cache, self.attention = None, None


def _union(masks: list[Mask]) -> Mask | None:
    if not masks:
        return None
    union = masks[0]
    for m in masks[1:]:
        union = union.union(m)
    return union


class _RowStreamer(BaseStreamer):
    """Static batches: splits a batch's new tokens by row and streams each row's text."""

    def __init__(self, tokenizer, jobs: list[Job]):
        self.jobs, self.prompt_seen = jobs, False
        self.streams = [TextStream(tokenizer, j) for j in jobs]
        self.eos = set(tokenizer.all_special_ids)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            job = self.jobs[row]
            if job.cancelled.is_set() or len(job.tokens) >= job.max_tokens or token in self.eos:
                continue
            job.tokens.append(token)
            self.streams[row].push()

    def end(self) -> None:
        pass


class _RowStop(StoppingCriteria):
    """Static batches, per row: stop when its request was cancelled or reached its own max_tokens."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([j.cancelled.is_set() or len(j.tokens) >= j.max_tokens for j in self.jobs])


class StaticScheduler:
    """The baseline: batches taken from the queue and run to their longest row under their masks' union
    (or one mask group after another when the union does not fit)."""

    def __init__(self, engine, *, max_batch: int = 8, window_s: float = 0.005, on_load=None):
        self.engine, self.max_batch, self.window_s, self.on_load = engine, max_batch, window_s, on_load
        self.queue: queue.Queue[Job] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="domex-static-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.engine.cache.check_fits(job.mask)
        self.queue.put(job)

    def _take(self) -> list[Job]:
        jobs = [self.queue.get()]
        deadline = time.perf_counter() + self.window_s
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self.queue.get(timeout=max(0.0, deadline - time.perf_counter())))
            except queue.Empty:
                break
        return [j for j in jobs if not j.cancelled.is_set()]

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            sampling: dict[tuple, list[Job]] = {}
            for job in jobs:
                sampling.setdefault((job.temperature, job.top_p), []).append(job)
            for group in sampling.values():
                union = _union([j.mask for j in group])
                if max(union.kept_counts()) <= self.engine.cache.num_slots:
                    self._run(union, group)
                    continue
                by_mask: dict[tuple, list[Job]] = {}
                for job in group:
                    by_mask.setdefault(job.mask.layers, []).append(job)
                for run in by_mask.values():
                    self._run(run[0].mask, run)

    def _run(self, mask: Mask, jobs: list[Job]) -> None:
        """Generate one batch; on an error, rows that streamed nothing yet are retried alone (isolation)."""
        try:
            self._generate(mask, jobs)
        except Exception as e:  # the worker lives on for the next batch
            if len(jobs) == 1:
                jobs[0].fail(e)
                return
            for job in jobs:
                if job.tokens:  # its client has text already: a rerun would send it twice
                    job.fail(e)
                else:
                    self._run(mask, [job])
            return
        for job in jobs:
            job.finish("length" if len(job.tokens) >= job.max_tokens else "stop", job.usage())

    def _generate(self, mask: Mask, jobs: list[Job]) -> None:
        report = self.engine.ensure(mask)
        if self.on_load:
            self.on_load(report)
        tok = self.engine.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, attention = left_pad([j.ids for j in jobs], pad)
        sample = jobs[0].temperature > 0
        self.engine.generate(ids, attention_mask=attention, max_new_tokens=max(j.max_tokens for j in jobs),
                             do_sample=sample, temperature=jobs[0].temperature if sample else None,
                             top_p=jobs[0].top_p if sample else None, streamer=_RowStreamer(tok, jobs),
                             stopping_criteria=StoppingCriteriaList([_RowStop(jobs)]), pad_token_id=pad)


SCHEDULERS = {"continuous": ContinuousScheduler, "static": StaticScheduler}
