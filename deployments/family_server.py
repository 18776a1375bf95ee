"""What every family deployment shares: its model pool, one inference thread, a memory gate,
health, and the Serve options it runs with.

All model calls run on a single inference thread per replica so that the replica's event loop
stays free to accept and batch requests and to answer health checks while a model computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeVar

from loading import DevicePreference, LoadedModel, ModelSpec

from .admission import MB, MemoryGate, free_memory, settle
from .metrics import FamilyMetrics
from .options import FamilyOptions
from .pool import ModelPool
from .ray_daemons import lower_at_replica_start
from .runtime_catalog import ReplicaCatalog
from .threads import ComputeThreads
from .wakeups import call_soon

T = TypeVar("T")


def cancelled(params: Any) -> bool:
    """Whether a request's caller gave up on it (its client left, the ingress timed out)."""
    event = getattr(params, "cancelled", None)
    return event is not None and event.is_set()


class FamilyServer:
    #: the options this family takes (`args.families.<family>`); the builder validates them with it
    Options: ClassVar[type[FamilyOptions]] = FamilyOptions

    def __init__(self, specs: list[ModelSpec], options: FamilyOptions):
        self.options = options
        lower_at_replica_start()  # before the model's threads start computing
        self.threads = ComputeThreads(options)  # before the pool: its loads import torch
        self.pool = ModelPool(list(specs), options.max_loaded_models, self.threads.threads)
        budget = None if options.memory_budget_mb is None else int(options.memory_budget_mb * MB)
        self.memory = MemoryGate(budget, fraction=options.memory_budget_fraction,
                                 measure=lambda: free_memory(self._compute_device()))
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # adapters and models added at run time by the admin routes (runtime_catalog.py)
        self.runtime = ReplicaCatalog(self.pool, specs[0].family if specs else None, self._infer)
        self.runtime.load_at_start()
        self._busy_since: float | None = None
        self._stuck_after_s = 3 * max((s.generation_timeout_s for s in self.pool.specs.values()), default=60)
        # shown in /health: how requests were batched, and how many were abandoned by their client
        self.batch_stats = {"model_calls": 0, "requests": 0, "largest_batch": 0, "cancelled": 0}
        family = specs[0].family if specs and specs[0].family else None
        self.metrics = FamilyMetrics(family.value if family else type(self).__name__.lower())
        self.metrics.models(self._model_status())

    def _compute_device(self) -> str | None:
        """The device this replica's loaded models compute on (a GPU before the CPU), None while none is."""
        devices = {handle.loaded.report.device for handle in self.pool.handles.values() if handle.loaded is not None}
        return next((d for d in sorted(devices) if d.startswith("cuda")), next(iter(devices), None))

    @classmethod
    def deployment_options(cls, name: str, options: FamilyOptions, num_gpus: float,
                           env: dict[str, str]) -> dict[str, Any]:
        """Serve's options for this family's deployment; `num_gpus` per replica (family_gpus)."""
        actor: dict[str, Any] = {"num_cpus": options.num_cpus, "num_gpus": num_gpus}
        if num_gpus == 0:
            # Ray >= 2.49 no longer empties CUDA_VISIBLE_DEVICES for an actor given no GPU: a CPU replica saw
            # every GPU of its node, and `device: auto` loaded onto cuda:0, beside a replica Ray gave it to
            env = {**env, "CUDA_VISIBLE_DEVICES": ""}
        if env:
            actor["runtime_env"] = {"env_vars": env}
        out: dict[str, Any] = {
            "name": name,
            "ray_actor_options": actor,
            "max_ongoing_requests": options.max_ongoing_requests,
            "max_queued_requests": options.max_queued_requests,
            # a load can take minutes on a real model: health checks must not time out meanwhile
            "health_check_period_s": 10,
            "health_check_timeout_s": 60,
            "graceful_shutdown_timeout_s": options.graceful_shutdown_timeout_s,
        }
        if options.autoscaling is None:
            out["num_replicas"] = 1
        else:
            out["autoscaling_config"] = options.autoscaling.model_dump(exclude_none=True)
        per_node = replicas_per_node(options, num_gpus)
        if per_node is not None:
            out["max_replicas_per_node"] = per_node
        return out

    async def _infer(self, fn, *args):
        """Run a blocking model call on the replica's inference thread."""

        def timed():
            self._busy_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self._busy_since = None

        return await asyncio.get_running_loop().run_in_executor(self._inference, timed)

    def _calls_waiting(self) -> bool:
        """Whether model calls wait for the inference thread (submitted, not started): the decode loop, which
        runs as one call for as long as requests keep coming, lets them go first. Without it a generate()
        batch (a Qwen2-VL-kind model beside a decode-loop model in one replica) waited as long as the loop had
        a row: 20 s and no answer beside 8 clients of the other model."""
        queue = getattr(self._inference, "_work_queue", None)  # ThreadPoolExecutor's queue of work not started
        return queue is not None and not queue.empty()

    def _progressed(self) -> None:
        """From the inference thread, after each bounded piece of a long call (the decode loop's steps,
        which run as one call for as long as requests keep coming): the call is not stuck. Without it a
        healthy replica under steady traffic failed its health check after 3 x generation_timeout_s."""
        if self._busy_since is not None:
            self._busy_since = time.monotonic()

    async def _infer_model(self, loaded: LoadedModel, fn: Callable[..., T], *args: Any) -> T:
        """`_infer` for a call of one model, with the threads torch computes it with (and the node's CPU turns)."""

        def call() -> T:
            with self.threads.calling(loaded):
                return fn(*args)

        return await self._infer(call)

    async def _run_groups(self, batch: list, key: Callable[[Any], tuple], work: Callable) -> list:
        """Run `work(spec, loaded, items)` once per group of batched requests that share a model and
        `key(item)`. A group's failure goes back to that group's requests only, as the exception.

        Each request runs on the model it was admitted with (`item.served`), not on what its name finds in
        the pool now: looked up again here, one evicted meanwhile (max_loaded_models) answered a request
        admitted with its model loaded with a 503 "still loading", and started loading it once more."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, item in enumerate(batch):
            served = getattr(item, "served", None)
            groups[(item.model, id(served[1]) if served else None, key(item))].append(index)
        results: list[Any] = [None] * len(batch)
        for (model, _, _), indices in groups.items():
            items = [batch[i] for i in indices]
            self.batch_stats["model_calls"] += 1
            self.batch_stats["requests"] += len(items)
            self.batch_stats["largest_batch"] = max(self.batch_stats["largest_batch"], len(items))
            self.metrics.batch(model, len(items))
            for item in items:
                if (running := getattr(item, "running", None)) is not None:
                    running()
            try:
                spec, loaded = items[0].served or await self.pool.get(model)
                outputs = await self._infer_model(loaded, work, spec, loaded, items)
            except Exception as exc:
                outputs = [exc] * len(items)
            for i, output in zip(indices, outputs, strict=True):
                results[i] = output
        return results

    async def _until_cancelled(self, params: Any, work: Awaitable[T]) -> T:
        """Await `work` for a request; if the request is cancelled (client gone, ingress timeout),
        flag it so the model call drops it at its next step, wait for the call to let go of it, then let
        the cancellation through. So the request's memory hold (released as the cancellation goes up) lasts
        as long as the memory: a generate() batch keeps a dropped row's cache to the batch's end, and a
        model call on the inference thread cannot be stopped."""
        params.cancelled = params.cancelled or threading.Event()
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not params.cancelled.is_set():  # once per request: a stream's pieces share its event
                params.cancelled.set()
                self.batch_stats["cancelled"] += 1
            self._cancelled()
            await settle(task, self._stuck_after_s)
            raise

    def _cancelled(self) -> None:
        """A request of this replica was just flagged cancelled (a family with a queue of its own wakes it)."""

    @contextlib.contextmanager
    def _observed(self, params: Any) -> Iterator[Callable[[], None]]:
        """Count a request in the replica's queue_depth metric until the `running` it yields is called
        (from any thread: when its output starts), then in running_requests until the block ends; and in
        /health's `cancelled` if its caller leaves before a model call dropped it (`_until_cancelled` counts
        those): one that left while it waited for memory, or for its audio's cuts, was counted nowhere."""
        loop = asyncio.get_running_loop()
        state = {"running": False, "closed": False}

        def now_running() -> None:
            if not state["running"] and not state["closed"]:
                state["running"] = True
                self.metrics.queued(-1)
                self.metrics.started(1)

        def running() -> None:
            call_soon(loop, now_running)

        self.metrics.queued(1)
        try:
            yield running
        except (asyncio.CancelledError, GeneratorExit):  # the caller left (a stream: closed before its end)
            if not cancelled(params):
                self.batch_stats["cancelled"] += 1
            raise
        finally:
            state["closed"] = True
            if state["running"]:
                self.metrics.started(-1)
            else:
                self.metrics.queued(-1)

    def _model_status(self) -> list[dict]:
        status = self.pool.status()
        for info in status:
            info["load_count"] = self.pool.handles[info["name"]].load_count
        return status

    async def status(self) -> list[dict]:
        turns = self.threads.turns
        status = self.pool.status(batching=dict(self.batch_stats), memory=self.memory.status(),
                                  torch_threads=self.threads.threads,
                                  cpu_turns=turns.status() if turns is not None else None)
        for info in status:  # the threads each loaded model computes with (one for a small CPU model)
            loaded = self.pool.handles[info["name"]].loaded
            if loaded is not None:
                info["torch_threads"] = self.threads.for_model(loaded)
        return status

    # -- the runtime catalog: what the ingress calls once a model was added at run time ----------------
    async def call(self, catalog: str, method: str, *args: Any) -> Any:
        """`method(*args)` after applying runtime additions up to the ingress's catalog token."""
        await self.runtime.sync(catalog, wait=method != "status")  # /health's short timeout: no attach wait
        if method != "status":
            await self.runtime.attached(args)
        with self.runtime.using(args):
            return await getattr(self, method)(*args)

    async def call_stream(self, catalog: str, method: str, *args: Any) -> AsyncIterator[Any]:
        """The streaming twin of `call`."""
        await self.runtime.sync(catalog)
        await self.runtime.attached(args)
        with self.runtime.using(args):
            async with contextlib.aclosing(getattr(self, method)(*args)) as items:
                async for item in items:
                    yield item

    async def runtime_state(self, names: list[str], wait_s: float) -> dict[str, Any]:
        return await self.runtime.state(names, wait_s)

    async def inspect_runtime(self, kind: str, *args: Any) -> Any:
        """Find and read the files of an adapter or model to add (runtime_admin.py), off the event loop."""
        from . import runtime_admin

        return await asyncio.to_thread(runtime_admin.inspect_adapter if kind == "adapter"
                                       else runtime_admin.inspect_model, *args)

    def check_health(self) -> None:
        """Healthy while the replica can serve. A model that is loading or failed to load is no
        reason for Ray to kill the replica: a restart would only repeat the load."""
        self.metrics.models(self._model_status())  # Serve calls this every health_check_period_s
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self._stuck_after_s:
            # every model call is bounded (generate's max_time); one far past it is stuck
            raise RuntimeError(f"inference thread stuck for {time.monotonic() - busy_since:.0f} s")


def raise_if_error(result: Any) -> Any:
    if isinstance(result, BaseException):
        raise result
    return result


def family_gpus(options: FamilyOptions, planned: int, specs: list[ModelSpec] | None = None) -> float:
    """GPUs per replica of a family: its own `num_gpus`, else 0 where every model of it is `device: cpu`
    (a GPU reserved for nothing), else what args.device planned for every family."""
    if options.num_gpus is not None:
        return options.num_gpus
    if specs and all(spec.device is DevicePreference.CPU for spec in specs):
        return 0
    return planned


def replicas_per_node(options: FamilyOptions, num_gpus: float) -> int | None:
    """The family's max_replicas_per_node: as set, else 1 for CPU replicas (a node's cores serve one
    replica's threads; a second only competes for them), else none (a GPU replica holds a GPU)."""
    if options.max_replicas_per_node is not None:
        return options.max_replicas_per_node
    return 1 if num_gpus == 0 else None
