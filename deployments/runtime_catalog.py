"""The adapters and models added at run time (admin routes), and how every replica learns of them.

Serve handles cannot broadcast to all replicas of a deployment, so the additions live in one small named
Ray actor per application (`CatalogActor`, made by the ingress at the first admin call, in the app's
namespace, not detached: it lives as long as the ingress replica that made it). Every change gets a new
token, `<epoch>:<version>`. The ingress passes its token with each call to a family (`FamilyServer.call`);
a replica whose token is older fetches the catalog once and applies it before serving the call. So a
change costs one actor call per replica, and steady-state traffic costs nothing but the token string,
while every request sees every change that its ingress saw (a poll would leave a window of staleness
on each replica, and cost a call per replica every period forever). A replica started later reads the
catalog when it starts. With several ingress replicas, the others read the catalog at most every
`admin.catalog_poll_s` (the one that made a change knows it at once).

If the actor is lost with the replica that made it, a surviving ingress makes a new one (a new epoch)
and writes back the additions it knows; the whole app restarting forgets them (configure a model in
serve_config.yaml to keep it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loading import ModelSpec, State, adapter_layers

from .pool import loaded_within

log = logging.getLogger(__name__)

Kind = Literal["adapter", "model"]


class AdminConfig(BaseModel):
    """`args.admin`: adapters and models added at run time. The routes need an admin key (`auth.admin_keys_env`)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    allow_downloads: bool = False
    """Whether a model or adapter added at run time may be downloaded from the Hub (its size is logged first).
    Off: only a local directory, LOCAL_MODELS_DIR or the HF cache (offline rules as for configured models)."""
    max_runtime_models: int = Field(default=16, ge=1)
    """Adapters and models added at run time, together, at most (more is a 400 naming this field)."""
    adapter_wait_s: float = Field(default=30.0, gt=0)
    """How long attaching an added adapter may take on a replica: the load call waits this long for it on the
    replica it asks, and a request that brings the adapter to another replica waits for it there."""
    catalog_poll_s: float = Field(default=1.0, gt=0)
    """With several ingress replicas: how often each reads the additions the others made."""


@dataclass(frozen=True)
class RuntimeRecord:
    """One addition: its spec as the family serves it. `uid` tells a re-added name from the earlier one."""

    kind: Kind
    spec: ModelSpec
    attach_wait_s: float = 30.0  # an adapter: how long a request that brings it to a replica waits for it
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    added_at: float = field(default_factory=time.time)

    @property
    def peft_name(self) -> str:
        """The adapter's name inside the PEFT model: unique per addition and free of '.', which PEFT
        module names cannot hold (an adapter removed while in use may still be there when re-added)."""
        return f"runtime_{self.uid}"


@dataclass(frozen=True)
class Snapshot:
    token: str
    records: tuple[RuntimeRecord, ...] = ()


def is_newer(token: str, seen: str) -> bool:
    """Whether catalog `token` is later than `seen` ('' = none): another epoch, or a higher version."""
    if not token:
        return False
    if not seen:
        return True
    epoch, _, version = token.rpartition(":")
    seen_epoch, _, seen_version = seen.rpartition(":")
    return epoch != seen_epoch or int(version) > int(seen_version)


class NameTaken(ValueError):
    """A runtime addition of this name exists already."""


class BaseGone(ValueError):
    """An adapter's base, itself added at run time, was removed before the adapter was written."""


class BaseInUse(ValueError):
    """A runtime model that adapters sit on cannot be removed before them."""

    def __init__(self, name: str, users: list[str]):
        super().__init__(name, users)
        self.name, self.users = name, users


class CatalogActor:
    """The Ray actor holding the runtime additions (its methods run one at a time)."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex[:12]
        self.version = 0
        self.records: dict[str, RuntimeRecord] = {}

    def snapshot(self) -> Snapshot:
        return Snapshot(f"{self.epoch}:{self.version}", tuple(self.records.values()))

    def put(self, record: RuntimeRecord, base_uid: str | None = None) -> Snapshot:
        """`base_uid`: the addition an adapter's base is (None: a configured base). Checked here, where
        changes are made one at a time: an ingress's own view could not see a removal by another
        ingress, or by itself while it checked the adapter's files, and the adapter would outlive it."""
        if record.spec.name in self.records:
            raise NameTaken(record.spec.name)
        base = self.records.get(record.spec.base_model or "")
        if base_uid is not None and (base is None or base.uid != base_uid):
            raise BaseGone(record.spec.base_model)
        self.records[record.spec.name] = record
        self.version += 1
        return self.snapshot()

    def remove(self, name: str) -> Snapshot:
        users = sorted(r.spec.name for r in self.records.values() if r.spec.base_model == name)
        if users:
            raise BaseInUse(name, users)
        if self.records.pop(name, None) is not None:
            self.version += 1
        return self.snapshot()

    def restore(self, records: list[RuntimeRecord]) -> Snapshot:
        """Write back what a surviving ingress knows into a new actor (names it has already kept)."""
        for record in records:
            if record.spec.name not in self.records:
                self.records[record.spec.name] = record
                self.version += 1
        return self.snapshot()


def _actor_name(app: str) -> str:
    return f"modelfleet-runtime-catalog-{app}"


def app_name() -> str | None:
    """The Serve application this replica belongs to (None outside a Serve replica)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:
        return None


def find_actor(app: str | None) -> Any:
    """The catalog actor of `app`, or None while there is none (nothing was added at run time yet)."""
    if app is None:
        return None
    import ray

    try:
        return ray.get_actor(_actor_name(app))
    except ValueError:
        return None


def make_actor(app: str) -> Any:
    import ray

    actor_class = ray.remote(num_cpus=0, max_restarts=0)(CatalogActor)
    return actor_class.options(name=_actor_name(app), get_if_exists=True).remote()


class IngressCatalog:
    """The ingress's side: writes changes, keeps the current snapshot and token."""

    def __init__(self, poll_s: float, others: bool, on_change: Callable[[Snapshot], None]):
        self.poll_s = poll_s
        self.others = others  # other ingress replicas may change the catalog: read it now and then
        self.on_change = on_change
        self.snapshot = Snapshot("")
        self._actor: Any = None
        self._read_at = 0.0
        self._reading: asyncio.Task | None = None
        self._unread = False  # the catalog is to be read once before this ingress's first family calls

    def prepare(self) -> None:
        """Make the actor now (a Ray worker takes seconds to start), not at the first admin call; read it at
        the first call: a restarted ingress gets a new actor (the last one went with it), and family replicas
        that hold what the last one held drop it once they see the new actor's token, instead of keeping the
        forgotten additions in memory and in /health for good."""
        app = app_name()
        if app is not None and self._actor is None:
            self._actor = make_actor(app)
            self._unread = True

    @property
    def token(self) -> str:
        return self.snapshot.token

    @property
    def records(self) -> dict[str, RuntimeRecord]:
        return {record.spec.name: record for record in self.snapshot.records}

    async def _call(self, method: str, *args: Any, create: bool = True) -> Snapshot | None:
        """A catalog method; a lost actor is made again (or found: another ingress replica's, made since) and
        given back what this ingress knows before the call (given back only when the old one failed a call,
        they were lost when a later call found the replacement that a restarted ingress replica made)."""
        import ray

        app = app_name()
        for _ in (1, 2):
            if self._actor is None:
                self._actor = make_actor(app or "default") if create else find_actor(app)
                if self._actor is None:
                    return None
                if self.snapshot.records:
                    await self._actor.restore.remote(list(self.snapshot.records))
            try:  # an exception raised in the actor (NameTaken) arrives as itself
                return await getattr(self._actor, method).remote(*args)
            except ray.exceptions.RayActorError:
                log.warning("the runtime catalog actor is gone; making a new one")
                self._actor = None
        raise RuntimeError("the runtime catalog actor could not be reached")

    def _apply(self, snapshot: Snapshot | None) -> None:
        if self.others and snapshot is not None and snapshot.token.endswith(":0"):
            # a new actor nothing was written to: an ingress replica that holds additions gives them back to it
            # at its next read; the family replicas told this empty catalog first dropped them meanwhile
            return
        # a read that started before a change and ended after it must not take the change back
        if snapshot is not None and is_newer(snapshot.token, self.snapshot.token):
            self.snapshot = snapshot
            self.on_change(snapshot)

    async def put(self, record: RuntimeRecord, base_uid: str | None = None) -> None:
        self._apply(await self._call("put", record, base_uid))

    async def remove(self, name: str) -> None:
        self._apply(await self._call("remove", name))

    def maybe_refresh(self) -> None:
        """With other ingress replicas: read their changes, at most every poll_s, off the request's path;
        alone, once (see `prepare`)."""
        if not (self.others or self._unread) or time.monotonic() - self._read_at < self.poll_s:
            return
        if self._reading is None or self._reading.done():
            self._read_at = time.monotonic()
            self._reading = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        try:
            self._apply(await self._call("snapshot", create=False))
            self._unread = False
        except Exception as exc:  # the next request tries again
            log.warning("could not read the runtime catalog: %s", exc)


class ReplicaCatalog:
    """A family replica's side: applies the catalog's records of its family to the replica's pool.

    A removed model leaves the pool's list at once (the ingress answers 404 to new requests for it), but
    the requests already using it still find it; once none is in flight, its memory goes: an adapter is
    deleted from its base on the inference thread, which runs no decode step meanwhile."""

    def __init__(self, pool: Any, family: Any, infer: Callable[..., Awaitable[Any]]):
        self.pool = pool
        self.family = family
        self._infer = infer
        self.seen = ""
        self.records: dict[str, RuntimeRecord] = {}
        # Requests in flight per addition (its uid; a configured model: its name). By name, a removed
        # model's memory waited for the traffic of a copy added again under its name too.
        self.in_flight: Counter[str] = Counter()
        self.retired_uids: dict[str, str] = {}  # name -> the uid last removed under it (pool.get still finds it)
        self.retiring: dict[str, asyncio.Task] = {}
        self.stale: dict[str, set[str]] = {}  # base -> removed adapters still in it (see delete_adapters)
        self._lock = asyncio.Lock()

    def load_at_start(self) -> None:
        """A replica started after additions were made serves them too (read once, before any request)."""
        actor = find_actor(app_name())
        if actor is None:
            return
        import ray

        try:
            self._apply(ray.get(actor.snapshot.remote(), timeout=10))
        except Exception as exc:  # the first call with a newer token reads it again
            log.warning("could not read the runtime catalog at start: %s", exc)

    async def sync(self, token: str, wait: bool = True) -> None:
        """Apply the catalog if `token` (the ingress's) is newer than what this replica applied; with `wait`,
        let the call wait for the adapters it brings to be attached."""
        if not is_newer(token, self.seen):
            return
        async with self._lock:
            if not is_newer(token, self.seen):
                return
            actor = find_actor(app_name())
            if actor is None:  # lost with the ingress that made it: its next change makes a new one (new epoch)
                log.warning("the runtime catalog of token %s is gone", token)
                self.seen = token
                return
            added = self._apply(await actor.snapshot.remote())
        if wait:
            await self._adapters_attached(added)

    def _apply(self, snapshot: Snapshot) -> list[str]:
        """Add and remove pool entries to match the snapshot; returns the adapters added."""
        wanted = {r.spec.name: r for r in snapshot.records if r.spec.family is self.family}
        for name, record in list(self.records.items()):
            if name not in wanted or wanted[name].uid != record.uid:
                self._retire(name)
        added = []
        # whole models first: an adapter may sit on one of them
        for record in sorted(wanted.values(), key=lambda r: r.kind != "model"):
            name = record.spec.name
            if name in self.records:
                continue
            if name in self.pool.specs:  # the ingress refuses these; never shadow a configured model
                log.error("runtime %s %r has the name of a configured model; not added", record.kind, name)
                continue
            self.pool.add(record.spec, adapter_name=record.peft_name if record.kind == "adapter" else None)
            self.records[name] = record
            log.info("runtime %s %r added (%s)", record.kind, name, record.spec.source)
            if record.kind == "adapter":
                added.append(name)
        self.seen = snapshot.token
        return added

    async def _adapters_attached(self, names: list[str]) -> None:
        """Attaching an adapter takes a moment: let the request that brought it wait for it, rather than
        answer 503 'loading' (when its base is still loading, the request gets that answer)."""
        for name in names:
            handle, record = self.pool.handles.get(name), self.records.get(name)
            base = self.pool.handles.get(record.spec.base_model or "") if record else None
            if handle is not None and record is not None and base is not None and base.state is State.READY:
                with contextlib.suppress(Exception):  # a failure is the handle's state, shown by /health
                    await loaded_within(handle, record.attach_wait_s)

    def _retire(self, name: str) -> None:
        record = self.records.pop(name)
        handle = self.pool.remove(name)
        self.retired_uids[name] = record.uid
        log.info("runtime %s %r removed; %d request(s) still using it", record.kind, name, self.in_flight[record.uid])
        task = asyncio.ensure_future(self._release(record, handle))
        self.retiring[record.uid] = task
        task.add_done_callback(lambda _: self.retiring.pop(record.uid, None))

    async def _release(self, record: RuntimeRecord, handle: Any) -> None:
        """Free a removed model's memory once no request uses it."""
        name = record.spec.name
        while self.in_flight[record.uid] > 0:
            await asyncio.sleep(0.05)
        self.in_flight.pop(record.uid, None)
        if self.retired_uids.get(name) == record.uid:
            del self.retired_uids[name]
        if handle.state is State.LOADING:  # a load still running ends first (its result is dropped)
            with contextlib.suppress(Exception):
                await loaded_within(handle, math.inf)
        again = self.records.get(name)
        if record.kind == "adapter" and (again is None or again.uid != record.uid):  # not given back as it was
            # (an addition given back, e.g. by a surviving ingress replica to a new catalog, is attached again
            # under its PEFT name: deleting that name would take the adapter from the copy now serving)
            base_name = record.spec.base_model or ""
            stale = self.stale.setdefault(base_name, set())
            stale.add(record.peft_name)
            base = self.pool.handles.get(base_name)
            if base is not None and base.loaded is not None:
                await self._infer(delete_adapters, base.loaded, stale)
        self.pool.forget(name, handle)
        del handle
        gc.collect()

    def _model_of(self, args: tuple) -> str | None:
        """The pool name of the model a family call's first argument (its params) asks for."""
        model = getattr(args[0], "model", None) if args else None
        return self.pool.aliases.get(model, model) if isinstance(model, str) else None

    async def attached(self, args: tuple) -> None:
        """A request for a runtime adapter still attaching waits for it as the call that brought it does:
        the catalog may have been applied by a call that does not wait (/health's), and then no later
        request carries a newer token (one answered 503 'loading' while its adapter attached)."""
        name = self._model_of(args)
        if name is None:
            return
        record, handle = self.records.get(name), self.pool.handles.get(name)
        if record is not None and record.kind == "adapter" and handle is not None and handle.state is State.LOADING:
            await self._adapters_attached([name])

    def _in_flight_key(self, name: str) -> str:
        """What a request for `name` counts against: the addition the pool gives it (the current one, or
        the one removed under that name, which `pool.get` still finds), or a configured model's name."""
        record = self.records.get(name)
        if record is not None:
            return record.uid
        return self.retired_uids.get(name, name) if name not in self.pool.specs else name

    @contextlib.contextmanager
    def using(self, args: tuple) -> Iterator[None]:
        """Count a request as in flight for its model while it runs (a removal waits for it)."""
        name = self._model_of(args)
        if name is None:
            yield
            return
        key = self._in_flight_key(name)
        self.in_flight[key] += 1
        try:
            yield
        finally:
            self.in_flight[key] -= 1

    async def state(self, names: list[str], wait_s: float) -> dict[str, Any]:
        """The pool's view of `names` (an adapter's attach waited for up to wait_s), for the admin routes."""
        adapters = [name for name in names if name in self.records and self.records[name].kind == "adapter"]
        for name in adapters if wait_s > 0 else []:
            with contextlib.suppress(Exception):  # a failure is in the status below
                await loaded_within(self.pool.handles[name], wait_s)
        models = {info["name"]: info for info in self.pool.status() if info["name"] in names}
        return {"models": models, "in_flight": {name: self._named_in_flight(name) for name in names}}

    def _named_in_flight(self, name: str) -> int:
        """Requests using `name`: its current addition's and the removed one's still finishing."""
        keys = {self._in_flight_key(name), self.retired_uids.get(name, name)}
        return sum(self.in_flight[key] for key in keys)


def delete_adapters(base: Any, names: set[str]) -> None:
    """Delete removed adapters from their base model (on the inference thread, under the model's lock).
    PEFT cannot run a model left without adapters, so the last one stays, inactive, until another adapter
    is attached and one more removal comes by; at most one removed adapter per base stays that way."""
    model = base.model
    config = getattr(model, "peft_config", None) or {}
    with base.lock:
        adapter_layers(model, enabled=True)  # a base call may have left them off
        for name in sorted(names):
            if name not in config:
                names.discard(name)
            elif len(config) > 1:
                if getattr(model, "active_adapter", None) == name:
                    model.set_adapter(next(other for other in config if other != name))
                model.delete_adapter(name)
                names.discard(name)
                log.info("adapter %s deleted from its base", name)
