"""The models one replica serves: a ModelHandle each, looked up by name or alias.

Background models start loading when the pool is created; lazy ones on first use. Beyond
`max_loaded_models` in memory, the least recently used lazy model is unloaded; background and eager
models (and a base that adapters share) are never unloaded, so they alone may exceed it.
(Ray Serve's `@serve.multiplexed` is also an LRU, but its loads are per-request and invisible;
ours report their state to /health and keep a failed load sticky instead of retrying it.)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections import OrderedDict
from typing import Any

from loading import LoadedModel, LoadingMode, ModelHandle, ModelLoadingInProgress, ModelSpec, State

from .errors import UnknownModelError

log = logging.getLogger(__name__)

# How often a request waiting for a model that is still loading (X-Wait-For-Model) looks again
LOAD_POLL_S = 0.05


def _node_id() -> str | None:
    """The Ray node this replica runs on (None outside Ray): shows replicas spread over nodes."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


class ModelPool:
    def __init__(self, specs: list[ModelSpec], max_loaded_models: int = 4, torch_threads: int | None = None):
        self.torch_threads = torch_threads
        self.specs = {spec.name: spec for spec in specs}
        self.aliases = {alias: spec.name for spec in specs for alias in spec.all_names}
        self.handles = {spec.name: self._handle(spec) for spec in specs}
        self.max_loaded_models = max_loaded_models
        self._last_used: OrderedDict[str, float] = OrderedDict()
        self.retired: dict[str, tuple[ModelSpec, ModelHandle]] = {}  # removed at run time, still in use
        for spec in specs:
            if spec.loading is LoadingMode.EAGER:
                try:  # eager: this replica starts only once the model is in memory (or failed)
                    self.handles[spec.name].start()
                    self.handles[spec.name].get()
                except Exception as exc:  # sticky and visible in /health; never crash the constructor
                    log.error("eager load of %s failed: %s", spec.name, exc)
            elif spec.loading is LoadingMode.BACKGROUND:
                self.handles[spec.name].start()

    def shared_base(self, spec: ModelSpec) -> str | None:
        """The served model whose weights this adapter shares (its `base_model` names one), if any."""
        if spec.base_model is None:
            return None
        base = self.aliases.get(spec.base_model)
        return base if base is not None and base != spec.name else None

    def add(self, spec: ModelSpec, adapter_name: str | None = None) -> None:
        """Serve `spec` from now on (a model or adapter added at run time), loading in the background; a
        lazy one counts against max_loaded_models at once. `adapter_name`: its name inside the PEFT model."""
        self.specs[spec.name] = spec
        self.aliases.update({alias: spec.name for alias in spec.all_names})
        self.handles[spec.name] = self._handle(spec, adapter_name)
        self.handles[spec.name].start()
        if spec.loading is LoadingMode.LAZY:
            self._touch(spec.name)

    def remove(self, name: str) -> ModelHandle:
        """Stop serving `name` (a model added at run time): unknown from now on, but `get` still finds it for
        the requests already using it, until `forget(name, handle)`. Returns its handle."""
        spec = self.specs.pop(name)
        for alias in spec.all_names:
            self.aliases.pop(alias, None)
        self._last_used.pop(name, None)
        handle = self.handles.pop(name)
        self.retired[name] = (spec, handle)
        return handle

    def forget(self, name: str, handle: ModelHandle) -> None:
        if self.retired.get(name, (None, None))[1] is handle:
            del self.retired[name]

    def _handle(self, spec: ModelSpec, adapter_name: str | None = None) -> ModelHandle:
        base_name = self.shared_base(spec)
        attached = spec if adapter_name is None else spec.model_copy(update={"name": adapter_name})

        def load(progress):
            progress("importing torch and transformers", 0.0)
            import loading  # imported here, in the loader thread: seconds on 2 cores

            if self.torch_threads:
                import torch

                torch.set_num_threads(self.torch_threads)  # process-wide; the env var is read only at import

            if base_name is None:
                return loading.load_model(spec, progress=progress)
            progress(f"waiting for base model {base_name}", 0.0)
            return loading.attach_adapter(attached, self.handles[base_name].get(), progress=progress)

        return ModelHandle(spec.name, load)

    def canonical(self, name: str) -> str:
        if name not in self.aliases:
            raise UnknownModelError(name, sorted(self.aliases))
        return self.aliases[name]

    async def get(self, name: str, wait_s: float = 0.0) -> tuple[ModelSpec, LoadedModel]:
        """The loaded model, or ModelLoadingInProgress / ModelLoadFailed straight away (or after wait_s)."""
        if name not in self.aliases and name in self.retired:  # removed at run time: its requests finish
            spec, retired = self.retired[name]
            return spec, await loaded_within(retired, wait_s)
        name = self.canonical(name)
        handle = self.handles[name]
        loaded = handle.get(0) if handle.state is State.READY else await loaded_within(handle, wait_s)
        self._touch(name)
        return self.specs[name], loaded

    def _touch(self, name: str) -> None:
        if name not in self.handles:  # removed (at run time) while its caller waited for it
            return
        self._last_used[name] = time.monotonic()
        self._last_used.move_to_end(name)
        # (a model just added counts while it loads)
        resident = [n for n in self._last_used if n == name or self.handles[n].state is State.READY]
        shared = {self.shared_base(spec) for spec in self.specs.values()}
        for victim in resident[: max(0, len(resident) - self.max_loaded_models)]:
            # a base shared with adapters stays: they hold its weights anyway
            if self.specs[victim].loading is LoadingMode.LAZY and victim != name and victim not in shared:
                log.info("unloading %s (least recently used; max_loaded_models=%d)", victim, self.max_loaded_models)
                self.handles[victim].reload()
                self._last_used.pop(victim, None)
                gc.collect()

    def status(self, **replica_facts: Any) -> list[dict]:
        replica = {"pid": os.getpid(), "node_id": _node_id(),
                   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), **replica_facts}
        out = []
        for name, handle in self.handles.items():
            spec = self.specs[name]
            info = {
                "name": name, "family": spec.family.value if spec.family else None, "source": spec.source,
                "aliases": spec.aliases, "loading": spec.loading.value, "max_new_tokens": spec.max_new_tokens,
                "demo": spec.is_demo, **handle.status(), "replica": replica,
            }
            if handle.loaded is not None:
                report = handle.loaded.report
                fallbacks = [a.__dict__ for a in report.attempts if a.outcome != "loaded"]
                info.update(family=report.family, model_class=report.model_class, device_reason=report.device_reason,
                            adapter=report.adapter_path, base=report.base_resolved_from, fallbacks=fallbacks)
            out.append(info)
        return out


async def loaded_within(handle: ModelHandle, wait_s: float) -> LoadedModel:
    """`handle.get(wait_s)` without a thread blocked for the wait: the event loop looks again every
    LOAD_POLL_S. Waiting in `asyncio.to_thread` held one of the replica's few default-executor threads
    (cores + 4) per waiting request for up to wait_s (600 s), even after its client left, and every other
    request's thread work (a long prompt's tokenizing, a grammar's compiling, an image's processing, an
    upload's VAD and resampling) queued behind them until the model loaded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            return handle.get(0)  # starts a lazy load; never blocks
        except ModelLoadingInProgress:
            left = deadline - loop.time()
            if left <= 0:
                raise
            await asyncio.sleep(min(LOAD_POLL_S, left))
