"""Continuous batching with per-row masks (runtime/serving.py), on tiny models of every family.

Each request of a mixed-domain batch must come out exactly as when served alone under its own mask
(greedy, fp32), while rows join and leave between decode steps. Admission keeps the union of the
running rows' masks within the expert slots and never evicts an expert a running row needs.
"""

import threading
import time

import pytest
import torch

from domex.runtime.engine import Engine
from domex.runtime.pool import build
from domex.runtime.serving import ContinuousScheduler, Job
from domex.errors import Overloaded
from domex.store.mask import Mask
from tiny import FAMILIES, tiny_checkpoint

E, L, K = 8, 2, 2


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for family in FAMILIES:
        build(tiny_checkpoint(root / family / "model", family, num_experts=E, num_layers=L, top_k=K),
              root / family / "pool", progress=False)
        out[family] = root / family / "pool"
    return out


def random_mask(seed: int, keep: int, layers: int) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask.of(E, [sorted(torch.randperm(E, generator=g)[:keep].tolist()) for _ in range(layers)])


class Outcome:
    """Collects one job's end (finish or fail) and lets a test wait for it."""

    def __init__(self):
        self.done = threading.Event()
        self.reason = self.error = None
        self.started = self.ended = None

    def job(self, ids, mask, max_tokens, **kw) -> Job:
        def finish(reason, usage):
            self.reason, self.ended = reason, time.perf_counter()
            self.done.set()

        def fail(exc):
            self.error, self.ended = exc, time.perf_counter()
            self.done.set()

        def emit(text):
            self.started = self.started or time.perf_counter()

        return Job(ids, max_tokens, 0.0, 1.0, mask, emit=emit, finish=finish, fail=fail, **kw)


def solo(engine: Engine, ids: list[int], mask: Mask, max_tokens: int) -> list[int]:
    """The stock transformers `generate` of one prompt alone under its mask, cut at the first EOS."""
    out = engine.generate(torch.tensor([ids]), mask=mask, do_sample=False, max_new_tokens=max_tokens).tolist()[0][len(ids):]
    eos = engine.model.generation_config.eos_token_id
    return out[:out.index(eos)] if eos in out else out


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 120, (int(torch.randint(3, 14, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_domain_rows_equal_their_solo_runs(pools, family, device):
    """Rows with different masks share batches; every request equals its solo restricted run."""
    engine = Engine.open(pools[family], budget=str(E), device=device)
    layers = engine.pool.manifest.num_layers
    masks = [random_mask(s, 4, layers) for s in range(3)]
    cases = [(ids, masks[i % 3], 4 + 3 * i) for i, ids in enumerate(prompts(6, seed=len(family)))]
    expected = [solo(engine, ids, mask, n) for ids, mask, n in cases]
    scheduler = ContinuousScheduler(engine, max_batch=4)
    outcomes = [Outcome() for _ in cases]
    jobs = [o.job(ids, mask, n) for o, (ids, mask, n) in zip(outcomes, cases)]
    for i, job in enumerate(jobs):  # staggered: later requests join a batch that is already decoding
        scheduler.submit(job)
        if i % 2:
            time.sleep(0.01)
    for o in outcomes:
        assert o.done.wait(60) and o.error is None, o.error
    assert [j.tokens for j in jobs] == expected
    for job, o, (_, _, n) in zip(jobs, outcomes, cases):
        assert o.reason == ("length" if len(job.tokens) == n else "stop")


def test_a_row_routes_only_among_its_own_experts(pools):
    """Per-row masks reach the router: with two rows in one batch, each row's chosen experts lie in its own mask."""
    engine = Engine.open(pools["qwen3_moe"], budget=str(E))
    a, b = random_mask(1, 2, L), random_mask(2, 2, L)
    engine.ensure(a.union(b))
    engine.allow_rows([a, b])
    chosen = []
    router = engine.pool.adapter.router(engine.pool.adapter.moe_blocks(engine.model)[0][1])
    handle = router.register_forward_hook(lambda m, args, out: chosen.append(out[2]))
    with torch.no_grad():
        engine.model(input_ids=torch.tensor(prompts(2, seed=3)[0][:3]).repeat(2, 1))
    handle.remove()
    slots = chosen[0].view(2, 3, K)  # [B, S, k] slot ids
    expert_of = {int(s): e for e, s in enumerate(engine.cache.slot_of[0].tolist()) if s >= 0}
    for row, mask in enumerate((a, b)):
        assert {expert_of[int(s)] for s in slots[row].flatten()} <= set(mask.layers[0])


def test_a_request_waits_until_its_experts_fit_and_running_experts_stay(pools, monkeypatch):
    """S=4 slots, two disjoint 4-expert masks: the second request waits for the first row to leave, and no
    load ever evicts an expert of a running row (spied on the cache)."""
    engine = Engine.open(pools["mixtral"], budget="4")
    first = Mask.of(E, [[0, 1, 2, 3]] * L)
    second = Mask.of(E, [[4, 5, 6, 7]] * L)
    scheduler = ContinuousScheduler(engine, max_batch=4)
    evicted_while_running = []
    make_resident = engine.cache.make_resident

    def spy(mask):
        running = [r.job.mask for r in scheduler.rows]
        before = engine.cache.resident()
        report = make_resident(mask)
        after = engine.cache.resident()
        for l in range(L):
            gone = set(before.layers[l]) - set(after.layers[l])
            evicted_while_running.extend(e for m in running for e in gone if e in m.layers[l])
        return report

    monkeypatch.setattr(engine.cache, "make_resident", spy)
    a, b = Outcome(), Outcome()
    ids = prompts(2, seed=5)
    job_a, job_b = a.job(ids[0], first, 24), b.job(ids[1], second, 4)
    scheduler.submit(job_a)
    time.sleep(0.05)
    scheduler.submit(job_b)
    assert a.done.wait(60) and b.done.wait(60)
    assert a.error is None and b.error is None
    assert b.started > a.ended  # b's experts fitted only once a's row had left
    assert job_b.tokens == solo(engine, ids[1], second, 4)
    assert evicted_while_running == []


def started_in_order(jobs: dict[str, Job]) -> list[str]:
    """Wraps each job's emit to record the order in which the jobs streamed their first text."""
    order, lock = [], threading.Lock()
    for name, job in jobs.items():
        def emit(text, name=name, original=job.emit):
            original(text)
            with lock:
                if name not in order:
                    order.append(name)
        job.emit = emit
    return order


def test_a_request_that_fits_overtakes_the_head_a_bounded_number_of_times(pools):
    """S=4: the head needs the running row's slots; one later request that fits may overtake it
    (max_overtakes=1), the next one waits behind the head: no starvation, and the rest stays FIFO."""
    engine = Engine.open(pools["olmoe"], budget="4")
    a, b = Mask.of(E, [[0, 1, 2, 3]] * L), Mask.of(E, [[4, 5, 6, 7]] * L)
    scheduler = ContinuousScheduler(engine, max_batch=4, max_overtakes=1)
    ids = prompts(4, seed=7)
    outcomes = {name: Outcome() for name in ("running", "head", "second", "third")}
    jobs = {"running": outcomes["running"].job(ids[0], a, 40), "head": outcomes["head"].job(ids[1], b, 2),
            "second": outcomes["second"].job(ids[2], a, 2), "third": outcomes["third"].job(ids[3], a, 2)}
    order = started_in_order(jobs)
    scheduler.submit(jobs["running"])
    while not jobs["running"].tokens:
        time.sleep(0.002)
    for name in ("head", "second", "third"):
        scheduler.submit(jobs[name])
    for o in outcomes.values():
        assert o.done.wait(60) and o.error is None
    assert order == ["running", "second", "head", "third"]


def test_the_waiting_queue_is_bounded(pools):
    engine = Engine.open(pools["olmoe"], budget="4")
    a, b = Mask.of(E, [[0, 1, 2, 3]] * L), Mask.of(E, [[4, 5, 6, 7]] * L)
    scheduler = ContinuousScheduler(engine, max_batch=4, max_waiting=2, max_overtakes=0)
    ids = prompts(3, seed=8)
    running = Outcome()
    job = running.job(ids[0], a, 30)
    scheduler.submit(job)
    while not job.tokens:
        time.sleep(0.002)
    waiting = [Outcome() for _ in range(2)]
    for o in waiting:
        scheduler.submit(o.job(ids[1], b, 2))  # need the running row's slots: they wait
    with pytest.raises(Overloaded) as full:
        scheduler.submit(Outcome().job(ids[2], b, 2))
    assert full.value.http_status == 429 and full.value.retry_after >= 1 and "--max-waiting" in str(full.value)
    for o in [running, *waiting]:
        assert o.done.wait(60) and o.error is None


def test_a_cancelled_row_leaves_and_frees_its_place(pools):
    engine = Engine.open(pools["qwen2_moe"], budget=str(E))
    scheduler = ContinuousScheduler(engine, max_batch=1)
    mask = random_mask(4, 4, L)
    ids = prompts(2, seed=9)
    long, short = Outcome(), Outcome()
    job = long.job(ids[0], mask, 100)
    scheduler.submit(job)
    deadline = time.time() + 30
    while not job.tokens and time.time() < deadline:
        time.sleep(0.005)
    job.cancelled.set()  # the client went away
    scheduler.submit(short.job(ids[1], mask, 3))
    assert short.done.wait(60) and short.reason in ("length", "stop")
    assert not long.done.is_set() and len(job.tokens) < 100


def test_a_row_at_the_context_limit_ends_with_length(pools):
    engine = Engine.open(pools["qwen3_moe"], budget=str(E))
    scheduler = ContinuousScheduler(engine)
    context = engine.model.config.max_position_embeddings
    ids = (prompts(1, seed=11)[0] * 20)[:context - 3]
    o = Outcome()
    job = o.job(ids, random_mask(5, 4, L), 50)
    engine.model.generation_config.eos_token_id = None  # no early stop: the context must end it
    scheduler.stop = set()
    scheduler.submit(job)
    assert o.done.wait(60) and o.error is None
    assert o.reason == "length" and len(ids) + len(job.tokens) == context


def test_a_failing_step_fails_its_rows_and_the_worker_goes_on(pools, monkeypatch):
    engine = Engine.open(pools["qwen3_moe"], budget=str(E))
    scheduler = ContinuousScheduler(engine)
    mask = random_mask(6, 4, L)
    ids = prompts(2, seed=12)
    broken = Outcome()
    monkeypatch.setattr(scheduler, "_decode", lambda: (_ for _ in ()).throw(RuntimeError("bug in a step")))
    scheduler.submit(broken.job(ids[0], mask, 3))
    assert broken.done.wait(60) and isinstance(broken.error, RuntimeError)
    monkeypatch.undo()
    after = Outcome()
    job = after.job(ids[1], mask, 3)
    scheduler.submit(job)
    assert after.done.wait(60) and after.error is None and job.tokens == solo(engine, ids[1], mask, 3)[:len(job.tokens)]


def test_plan_rows_with_tiers_and_novices_equal_their_solo_runs(tmp_path):
    """Rows under different plans (one expert at bf16 for one row and int4 for another; novices for some) share
    batches, each routed to its own tier's copy, and every request equals its solo run under its plan."""
    import numpy as np

    from domex.store.plan import NOVICE, Plan

    build(tiny_checkpoint(tmp_path / "model", num_experts=E, num_layers=L, top_k=K), tmp_path / "pool", tiers="int8,int4",
          progress=False)
    engine = Engine.open(tmp_path / "pool", budget=str(E), tier_slots={"int8": E, "int4": E})
    base = engine.pool.manifest.base_tier
    rng = np.random.default_rng(0)
    vectors = rng.normal(0, 0.5, (L, E, engine.model.config.hidden_size)).astype(np.float32)
    plans = [Plan.of(E, [{0: base, 1: "int4", 2: "int8", 3: "int4"}] * L),
             Plan.of(E, [{0: "int4", 1: base, 2: base, 5: NOVICE, 6: NOVICE}] * L),
             Plan.of(E, [{1: "int8", 3: base, 4: "int4", 7: NOVICE}] * L)]
    novices = [None, vectors, vectors]
    cases = [(ids, i % 3, 3 + 2 * i) for i, ids in enumerate(prompts(6, seed=11))]
    expected = []
    for ids, p, n in cases:
        engine.ensure(plans[p], novices[p])
        out = engine.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n).tolist()[0][len(ids):]
        eos = engine.model.generation_config.eos_token_id
        expected.append(out[:out.index(eos)] if eos in out else out)
    scheduler = ContinuousScheduler(engine, max_batch=4)
    outcomes = [Outcome() for _ in cases]
    jobs = [o.job(ids, plans[p], n, novices=novices[p]) for o, (ids, p, n) in zip(outcomes, cases)]
    for job in jobs:
        scheduler.submit(job)
    for o in outcomes:
        assert o.done.wait(60) and o.error is None, o.error
    assert [j.tokens for j in jobs] == expected
