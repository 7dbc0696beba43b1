"""Serving: requests grouped by the experts they need, batched, generated with those experts resident.

A worker thread owns the engine. It takes the waiting requests, groups them by mask, and runs
a batch that mixes masks with their union when the union fits the slots of every layer,
otherwise the groups one after the other. Every batch is one `generate` call with its own KV
cache, so a cache never outlives the expert set it was computed with. Tokens stream to each
request as they are decoded; a cancelled request (client gone) stops its row at the next step.

Isolation: prompts arrive tokenised and checked (the route does it, so a prompt that cannot be
tokenised fails alone); when a batch's generate raises, its rows that have not streamed anything
yet are run again one by one, so only the row that fails by itself gets the error.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from domex.store.budget import Budget, domain_mask
from domex.store.db import Snapshot, Store
from domex.store.mask import Mask

from .match import Match


@dataclass
class Job:
    """One request on its way through the worker; `emit(text)` streams, `finish(reason, usage)` ends it."""

    ids: list[int]  # the prompt's token ids [T]
    max_tokens: int
    temperature: float
    top_p: float
    mask: Mask
    emit: Callable[[str], None]
    finish: Callable[[str, dict], None]
    fail: Callable[[Exception], None]
    match: Match | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)


class MaskBook:
    """Masks for sets of domains under one budget, built from a store snapshot and cached per generation."""

    def __init__(self, store: Store, budget: Budget, *, num_layers: int, num_experts: int, criterion: str = "easyep",
                 rule: str = "uniform"):
        self.store, self.budget, self.criterion, self.rule = store, budget, criterion, rule
        self.num_layers, self.num_experts = num_layers, num_experts
        self._cache: dict[tuple, Mask] = {}  # (generation, sorted domains) -> mask; only the newest generation kept
        self._lock = threading.Lock()

    def mask(self, domains: list[str] | None, snapshot: Snapshot | None = None) -> Mask:
        """The mask of `domains` in `snapshot` (default: the store's current one); None means every expert."""
        if domains is None:
            return Mask.full(self.num_layers, self.num_experts)
        snapshot = snapshot or self.store.snapshot()
        key = (snapshot.generation, tuple(sorted(domains)))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        mask = domain_mask([snapshot.get(d) for d in key[1]], self.budget, self.criterion, self.rule)
        with self._lock:
            newest = max([g for g, _ in self._cache] + [key[0]])
            self._cache = {k: m for k, m in self._cache.items() if k[0] == newest}
            if key[0] == newest:
                self._cache[key] = mask
        return mask


class _RowStreamer(BaseStreamer):
    """Splits a batch's new tokens by row and emits each row's newly decoded text."""

    def __init__(self, tokenizer, jobs: list[Job]):
        self.tokenizer, self.jobs = tokenizer, jobs
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.prompt_seen = False
        self.eos = set(tokenizer.all_special_ids)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            job = self.jobs[row]
            if job.cancelled.is_set() or len(self.ids[row]) >= job.max_tokens or token in self.eos:
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half a UTF-8 character: wait for the rest
                continue
            if len(text) > len(self.sent[row]):
                job.emit(text[len(self.sent[row]):])
                self.sent[row] = text

    def end(self) -> None:
        pass


class _RowStop(StoppingCriteria):
    """Per row: stop when its request was cancelled or reached its own max_tokens."""

    def __init__(self, streamer: _RowStreamer):
        self.streamer = streamer

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        jobs, ids = self.streamer.jobs, self.streamer.ids
        return torch.tensor([j.cancelled.is_set() or len(ids[r]) >= j.max_tokens for r, j in enumerate(jobs)])


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] padded on the left (decoder-only generation) and their attention mask [B, T]."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, attention


def plan(jobs: list[Job], slots: int) -> list[tuple[Mask, list[Job]]]:
    """(mask, jobs) runs: one run with the union when it fits `slots` per layer, else one per mask."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.mask.layers, []).append(job)
    masks = [g[0].mask for g in groups.values()]
    union = masks[0]
    for m in masks[1:]:
        union = union.union(m)
    if max(union.kept_counts()) <= slots:
        return [(union, jobs)]
    return [(g[0].mask, g) for g in groups.values()]


class Scheduler:
    """The one thread that runs the engine; requests come in through `submit` from any thread."""

    def __init__(self, engine, *, max_batch: int = 8, window_s: float = 0.005, on_batch=None):
        self.engine, self.max_batch, self.window_s, self.on_batch = engine, max_batch, window_s, on_batch
        self.queue: queue.Queue[Job] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="domex-scheduler", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
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
                for mask, run in plan(group, self.engine.cache.num_slots):
                    self._run(mask, run)

    def _run(self, mask: Mask, jobs: list[Job]) -> None:
        """Generate one batch; on an error, rows that streamed nothing yet are retried alone (isolation)."""
        streamer = _RowStreamer(self.engine.tokenizer, jobs)
        try:
            self._generate(mask, jobs, streamer)
        except Exception as e:  # the worker lives on for the next batch
            if len(jobs) == 1:
                jobs[0].fail(e)
                return
            for row, job in enumerate(jobs):
                if streamer.ids[row]:  # its client has text already: a rerun would send it twice
                    job.fail(e)
                else:
                    self._run(mask, [job])
            return
        for row, job in enumerate(jobs):
            n = len(streamer.ids[row])
            reason = "length" if n >= job.max_tokens else "stop"
            prompt_tokens = len(job.ids)
            job.finish(reason, {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n})

    def _generate(self, mask: Mask, jobs: list[Job], streamer: _RowStreamer) -> None:
        report = self.engine.ensure(mask)
        if self.on_batch:
            self.on_batch(jobs, report)
        tok = self.engine.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids, attention = left_pad([j.ids for j in jobs], pad)
        sample = jobs[0].temperature > 0
        self.engine.generate(ids, attention_mask=attention, max_new_tokens=max(j.max_tokens for j in jobs),
                             do_sample=sample, temperature=jobs[0].temperature if sample else None,
                             top_p=jobs[0].top_p if sample else None, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([_RowStop(streamer)]), pad_token_id=pad)
