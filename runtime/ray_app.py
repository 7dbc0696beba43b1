"""Ray Serve: domex on a distributed engine, each domain's requests sent to a replica that holds its experts.

    client -> Ingress       selection (store + matcher, the defaults of `domex serve`) and the same
                            OpenAI-compatible routes (server.create_app), tokenising the prompt
           -> ExpertReplica chosen by Ray's model multiplexing on the selection's key ("python",
                            "python+sql"); each holds one Engine over the shared read-only pool and
                            decodes with continuous batching (serving.ContinuousScheduler)

A replica holds up to `domains_per_replica` keys (`serve.multiplexed`, least recently used goes) and an
expert cache with room for that many masks, so Ray's router sends a domain's requests to a replica
that already holds it, and its held domains decode in one batch. Each request carries its mask, taken
from the ingress's store snapshot: replicas read no store, so a domain registered through the ingress
is served by any replica on its next request, with no restart.

    domex ray-serve --pool P --store S --replicas R --domains-per-replica N [--address ADDR]
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict

from domex.errors import UpstreamUnavailable
from domex.store.mask import Mask

from .serving import Job


class ReplicaScheduler:
    """The ingress's scheduler: forwards each job to a replica and streams its chunks back into the job.

    `multiplex=False` leaves placement to Ray's plain load balancing (the benchmark's baseline)."""

    def __init__(self, handle, multiplex: bool = True):
        self.handle, self.multiplex = handle.options(stream=True), multiplex

    def submit(self, job: Job) -> None:
        asyncio.get_running_loop().create_task(self._forward(job))

    async def _forward(self, job: Job, attempts: int = 4) -> None:
        """Stream one job from a replica. A replica that dies before the job streamed anything costs nothing:
        the job goes to another (Ray replaces the dead one); after the first text it fails cleanly (503)."""
        from ray.exceptions import RayActorError, RayTaskError

        handle = self.handle.options(multiplexed_model_id=job.key) if self.multiplex else self.handle
        streamed = False
        for attempt in range(attempts):
            stream = handle.generate.remote(job.ids, job.max_tokens, job.temperature, job.top_p, job.key,
                                            [list(layer) for layer in job.mask.layers], job.mask.num_experts)
            try:
                async for kind, *rest in stream:
                    if job.cancelled.is_set():  # the client went away: the replica frees the row
                        stream.cancel()
                        return
                    if kind == "text":
                        streamed = True
                        job.emit(rest[0])
                    else:
                        job.info.update(rest[2])
                        job.finish(rest[0], rest[1])
                return
            except RayTaskError as e:  # the replica raised: hand on its own error (CacheTooSmall, Overloaded, ...)
                job.fail(getattr(e, "cause", None) or e)
                return
            except RayActorError as e:
                if streamed or attempt == attempts - 1:
                    job.fail(UpstreamUnavailable(f"the replica serving this request died ({type(e).__name__}); retry"))
                    return
                await asyncio.sleep(0.5 * (attempt + 1))
            except Exception as e:  # noqa: BLE001  (the request's own failure; the ingress goes on)
                job.fail(e)
                return


class ExpertReplica:
    """One replica: an Engine on the shared pool with slots for `domains_per_replica` masks, batching continuously."""

    def __init__(self, pool: str, budget: str, domains_per_replica: int, dtype: str = "auto", skip_ratio: float = 0.0,
                 max_batch: int = 32, device: str = "cpu", max_waiting: int = 64):
        import torch

        from domex.store.budget import Budget

        from .engine import Engine
        from .pool import PoolManifest
        from .serving import ContinuousScheduler

        torch.set_num_threads(1)  # this process is the replica's own; replicas share the machine's cores
        m = PoolManifest.from_dir(pool)
        kept = Budget.parse(budget).experts_per_layer(m.num_layers, m.num_experts, m.expert_bytes, m.top_k)
        self.engine = Engine.open(pool, budget=str(min(m.num_experts, kept * domains_per_replica)), dtype=dtype,
                                  device=device, skip_ratio=skip_ratio)
        self.scheduler = ContinuousScheduler(self.engine, max_batch=max_batch, max_waiting=max_waiting)
        self.capacity, self.loads, self.held = domains_per_replica, 0, OrderedDict()

    async def hold(self, key: str) -> str:
        """A key becomes held (counted as a load when it was not); the least recently used beyond capacity goes."""
        if key in self.held:
            self.held.move_to_end(key)
            return key
        self.loads += 1
        self.held[key] = True
        while len(self.held) > self.capacity:
            self.held.popitem(last=False)
        return key

    async def generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, key: str,
                       layers: list[list[int]], num_experts: int):
        """("text", piece)... then ("done", finish_reason, usage, replica info): one request's stream."""
        await self.hold(key)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        put = lambda item: loop.call_soon_threadsafe(items.put_nowait, item)  # noqa: E731
        job = Job(ids, max_tokens, temperature, top_p, Mask.of(num_experts, layers), key=key,
                  emit=lambda text: put(("text", text)), finish=lambda reason, usage: put(("done", reason, usage)),
                  fail=lambda exc: put(("error", exc)))
        self.scheduler.submit(job)
        try:
            while True:
                item = await items.get()
                if item[0] == "error":
                    raise item[1]
                if item[0] == "done":
                    yield (*item, {"replica_pid": os.getpid(), "replica_loads": self.loads})
                    return
                yield item
        finally:
            job.cancelled.set()  # finished, failed or cancelled by the ingress: the row is freed


class Ingress:
    """Selection and the HTTP routes of `domex serve`; generation goes to the replicas."""

    def __init__(self, replicas, pool: str, store: str, options: dict, multiplex: bool = True):
        from .pool import PoolManifest
        from .selection import ServeConfig
        from .server import open_state

        limits = {k: options.pop(k) for k in ("admin_token", "max_tokens", "max_body_bytes", "max_prompt_tokens",
                                              "max_demos") if k in options}
        config = ServeConfig.of(options)
        top_k = PoolManifest.from_dir(pool).top_k
        self.state = open_state(pool, store, config, slots=str(top_k), **limits)  # matching needs the first router only
        self.scheduler = ReplicaScheduler(replicas, multiplex=multiplex)

    def __serve_build_asgi_app__(self):
        from .server import create_app

        return create_app(self.state, self.scheduler)


def build_app(pool: str, store: str, *, replicas: int = 2, domains_per_replica: int = 2, multiplex: bool = True,
              budget: str = "50%", dtype: str = "auto", skip_ratio: float = 0.0, max_batch: int = 32, replica_cpus: float = 0.0,
              replica_gpus: float = 0.0, device: str = "cpu", **options):
    """The Ray Serve application: an ingress in front of `replicas` expert replicas multiplexed by domain.

    `options` are `domex serve`'s (matcher, policy, criterion, max_tokens, admin_token, ...)."""
    from ray import serve

    class Replica(ExpertReplica):
        hold = serve.multiplexed(max_num_models_per_replica=domains_per_replica)(ExpertReplica.hold)

    @serve.ingress()
    class Front(Ingress):
        pass

    replica = serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
                               max_ongoing_requests=4 * max_batch)(Replica)
    ingress = serve.deployment(ray_actor_options={"num_cpus": 0})(Front)
    return ingress.bind(replica.bind(str(pool), budget, domains_per_replica, dtype, skip_ratio, max_batch, device), str(pool),
                        str(store), {"budget": budget, "dtype": dtype, "skip_ratio": skip_ratio, **options}, multiplex)


def start(app, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
          object_store_bytes: int = 128 << 20) -> None:
    """Run `app` on Ray Serve: attach to the cluster at `address`, or start a local Ray instance (no dashboard)."""
    import ray
    from ray import serve

    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=object_store_bytes, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="domex", route_prefix="/")


def ray_serve_command(pool: str, store: str, replicas: int = 2, domains_per_replica: int = 2, address: str | None = None,
                      host: str = "127.0.0.1", port: int = 8000, no_multiplex: bool = False, replica_cpus: float = 0.0,
                      replica_gpus: float = 0.0, device: str = "cpu", **options) -> int:
    """`domex ray-serve`: the application on Ray Serve until interrupted; `options` are `domex serve`'s."""
    import time

    from ray import serve

    from .selection import ServeConfig

    ServeConfig.of(dict(options))  # a bad flag stops the start here, before Ray starts
    start(build_app(pool, store, replicas=replicas, domains_per_replica=domains_per_replica, multiplex=not no_multiplex,
                    replica_cpus=replica_cpus, replica_gpus=replica_gpus, device=device, **options),
          address=address, host=host, port=port)
    print(f"domex on Ray Serve at http://{host}:{port}: {replicas} replicas x {domains_per_replica} domains; Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
