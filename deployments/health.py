"""What /health and /v1/models say: each model's state from its family's replica, with Serve's
own view of the family (replica counts, pending reasons) where a family does not answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loading import Family, ModelSpec

from .app_config import AppConfig
from .errors import ServiceUnavailableError

log = logging.getLogger(__name__)

DEMO_NOTE = "random-weight demo model: its output is gibberish by design (see README, 'Quick start')"
# What an unauthorised caller sees of a model when API keys are on (no paths, errors or pids).
PUBLIC_MODEL_FIELDS = ("name", "family", "state", "phase", "progress", "demo")
Call = Callable[..., Awaitable[Any]]  # (family, method, *args, timeout=) -> the family's answer


class HealthMonitor:
    def __init__(self, config: AppConfig, call: Call, families: list[str], notes: list[str],
                 resources: dict[str, dict[str, float]], served: Callable[[], list[ModelSpec]] | None = None):
        self.config = config
        # the models to show: configured and added at run time (an added model whose family is down or
        # scaled to zero is shown so, not left out)
        self._served = served or (lambda: list(config.models))
        self._call = call
        self.families = families  # the family deployments this app has
        self.notes = notes  # build-time findings, e.g. GPUs asked for but absent
        self.resources = resources  # family -> what one replica asks Ray for, e.g. {"CPU": 1, "GPU": 1}
        self._deployments: tuple[float, dict[str, dict]] | None = None  # (fetched at, Serve's view), cached 1 s
        # one fetch at a time, on a thread of its own: serve.status() waits on the controller without a bound,
        # and a /health probe each second while it did not answer left a blocked thread each time in the
        # default executor, which also runs the guard's JSON checks and media decoding (those then hung)
        self._fetching: concurrent.futures.Future | None = None
        self._fetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="serve-status")

    async def health(self, authorized: bool) -> dict[str, Any]:
        models = await self.model_status()
        states = {info["state"] for info in models.values()}
        # lazy models not loaded yet and families scaled to zero are fine: they start on first use
        settled = {"ready", "not_loaded", "scaled_to_zero"}
        status = "degraded" if states & {"failed", "unavailable"} else "loading" if states - settled else "ok"
        if not authorized:
            models = {name: {k: v for k, v in info.items() if k in PUBLIC_MODEL_FIELDS}
                      for name, info in models.items()}
            return {"status": status, "models": models}
        body: dict[str, Any] = {"status": status, "models": models, "ingress": {"pid": os.getpid()}}
        if self.notes:
            body["notes"] = self.notes
        if any(info.get("demo") for info in models.values()):
            body["demo"] = "Demo models have random weights: their output is gibberish by design."
        return body

    def _fetch_deployments(self) -> dict[str, dict]:
        """Serve's view of this application's family deployments, and the cluster's GPUs (blocking calls)."""
        import ray
        from ray import serve

        app = serve.get_replica_context().app_name
        status = serve.status().applications.get(app)
        total, free = ray.cluster_resources().get("GPU", 0.0), ray.available_resources().get("GPU", 0.0)
        out = {}
        for name, deployment in (status.deployments if status else {}).items():
            if name not in self.families:
                continue
            replicas = {str(getattr(state, "value", state)): count
                        for state, count in deployment.replica_states.items()}
            out[name] = {"status": str(getattr(deployment.status, "value", deployment.status)), "replicas": replicas,
                         "message": deployment.message, "replica_resources": self.resources.get(name, {}),
                         "cluster_gpus": {"total": total, "free": free}}
        return out

    async def deployment_states(self) -> dict[str, dict]:
        """Per family: Serve's status, replica counts by state and its message (empty when unknown)."""
        cached = self._deployments
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            return cached[1]
        if self._fetching is None or self._fetching.done():
            self._fetching = self._fetcher.submit(self._fetch_deployments)
        try:  # shielded: a timed-out wait leaves the fetch running, and the next /health waits for it
            states = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._fetching)),
                                            self.config.status_timeout_s)
        except Exception as exc:  # /health must answer even when the controller does not
            log.warning("could not read Serve's deployment status: %r", exc)
            return cached[1] if cached is not None else {}  # the last view while the controller is silent
        self._deployments = (time.monotonic(), states)
        return states

    def _scaled_to_zero(self, family: Family, view: dict) -> bool:
        scaling = self.config.family_options(family).autoscaling
        replicas = view.get("replicas", {}) if view else None
        return bool(scaling and scaling.min_replicas == 0 and replicas is not None
                    and not any(replicas.get(state, 0) for state in ("RUNNING", "STARTING", "UPDATING", "RECOVERING")))

    @staticmethod
    def pending_reason(family: str, view: dict) -> str:
        """Why a family has no replica to answer, from Serve's view: e.g. replicas waiting for GPUs."""
        if not view:
            return ""
        replicas = view["replicas"]
        running = replicas.get("RUNNING", 0)
        waiting = replicas.get("STARTING", 0) + replicas.get("RECOVERING", 0)
        parts = [f"Serve: deployment {family!r} is {view['status']} with {running} replica(s) running"]
        if waiting:
            ask = view.get("replica_resources") or {}
            gpus = view.get("cluster_gpus") or {}
            wanted = ", ".join(f"{k}: {v:g}" for k, v in ask.items() if v)
            parts.append(f"{waiting} starting or PENDING until the cluster can place them (each asks {{{wanted}}}"
                         + (f"; the cluster has {gpus.get('total', 0):g} GPU(s), {gpus.get('free', 0):g} free"
                            if ask.get("GPU") else "") + ")")
        if view.get("message"):
            parts.append(view["message"])
        return "; ".join(parts)

    def _placeholder(self, family: Family, state: str, **extra: Any) -> dict[str, dict]:
        return {spec.name: {"name": spec.name, "family": family.value, "state": state, "demo": spec.is_demo,
                            "max_new_tokens": spec.max_new_tokens, **extra}
                for spec in self._served() if spec.family is family}

    async def model_status(self) -> dict[str, dict]:
        """Per model: its replica's view, or why its family did not answer, with Serve's view of the family."""
        deployments = await self.deployment_states()  # never raises; cached for 1 s
        families = sorted({s.family for s in self.config.models if s.family is not None}, key=lambda f: f.value)
        # A family scaled to zero is not woken up by a health probe: only real requests start it.
        asleep = {f for f in families if self._scaled_to_zero(f, deployments.get(f.value, {}))}
        awake = [f for f in families if f not in asleep]
        answers = await asyncio.gather(
            *(self._call(f, "status", timeout=self.config.status_timeout_s) for f in awake), return_exceptions=True
        )
        out: dict[str, dict] = {}
        for family in asleep:
            out.update(self._placeholder(family, "scaled_to_zero", deployment=deployments[family.value],
                                         note="no replica running; the next request starts one (cold start)"))
        for family, answer in zip(awake, answers, strict=True):
            view = deployments.get(family.value, {})
            if isinstance(answer, BaseException):
                known = isinstance(answer, ServiceUnavailableError)
                reason = str(answer) if known else f"{type(answer).__name__}: {answer}"
                pending = self.pending_reason(family.value, view)
                error = f"{reason}. {pending}" if pending else reason
                out.update(self._placeholder(family, "unavailable", error=error))
            else:
                out.update({info["name"]: info for info in answer})
            for spec in self._served():
                if spec.family is family and view and spec.name in out:
                    out[spec.name]["deployment"] = view
        for info in out.values():
            if info.get("demo"):
                info["note"] = DEMO_NOTE
        return out
