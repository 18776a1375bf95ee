"""The ingress deployment: knows which family serves each model and calls it through handles.

Every call to a family is bounded by `request_timeout_s`: Ray leaves a call to a failed or
pending deployment waiting forever, and a client deserves a 503 with the reason instead.
The HTTP routes live in api.py; this class only routes and composes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from loading import Family, ModelSpec

from .app_config import AppConfig
from .errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from .media import load_image
from .params import ChatParams, ChatResult, SpeechParams, SpeechResult, TranscribeParams, TranscribeResult

log = logging.getLogger(__name__)

DEMO_NOTE = "random-weight demo model: its output is gibberish by design (see README, 'Demo models')"


class Ingress:
    def __init__(self, handles: dict[str, Any], config: dict, notes: list[str] | None = None,
                 resources: dict[str, dict[str, float]] | None = None):
        self.config = AppConfig.model_validate(config)
        self.handles = handles  # family name -> DeploymentHandle
        self.streams = {family: handle.options(stream=True) for family, handle in handles.items()}
        self.catalog: dict[str, ModelSpec] = {n: s for s in self.config.models for n in s.all_names}
        self.notes = list(notes or [])  # build-time findings for /health, e.g. GPUs asked for but absent
        self.resources = dict(resources or {})  # family -> what one replica asks Ray for, e.g. {"CPU": 1, "GPU": 1}
        self._deployments: tuple[float, dict[str, dict]] | None = None  # (fetched at, Serve's view), cached 1 s

    def __serve_build_asgi_app__(self):
        from .api import build_api

        return build_api(self)

    # -- lookup -----------------------------------------------------------------------------------
    def spec(self, name: str, *families: Family) -> ModelSpec:
        spec = self.catalog.get(name)
        if spec is None or (families and spec.family not in families):
            fitting = [s.name for s in self.config.models if not families or s.family in families]
            raise ModelNotFoundError(name, fitting)
        return spec

    def default_model(self, family: Family) -> str:
        for spec in self.config.models:
            if spec.family is family:
                return spec.name
        raise ServiceUnavailableError(f"no {family.value} model is configured in serve_config.yaml")

    # -- calls through handles --------------------------------------------------------------------
    async def _call(self, family: Family, method: str, *args: Any, timeout: float | None = None) -> Any:
        handle = self.handles.get(family.value)
        if handle is None:
            raise ServiceUnavailableError(f"no {family.value} deployment is configured")
        response = getattr(handle, method).remote(*args)
        limit = timeout or self.config.request_timeout_s
        try:
            return await asyncio.wait_for(response, limit)
        except asyncio.TimeoutError:
            response.cancel()
            raise ServiceUnavailableError(
                f"the {family.value} deployment did not answer within {limit:g} s: its replicas may still be "
                f"starting, pending for resources{self._resource_hint()}, or overloaded",
                retry_after_s=5,
            ) from None

    def _resource_hint(self) -> str:
        return f" ({'; '.join(self.notes)})" if self.notes else ""

    def chat_params(self, spec: ModelSpec, messages: list[dict], wait_s: float, **sampling: Any) -> ChatParams:
        images = []
        for m_index, message in enumerate(messages):
            if isinstance(message.get("content"), list):
                for p_index, part in enumerate(message["content"]):
                    if part.get("type") == "image":
                        param = f"messages.{m_index}.content.{p_index}.image_url"
                        images.append(load_image(part.pop("url"), self.config.allowed_media_dirs, param))
        if images and spec.family is not Family.VLM:
            raise InvalidRequestError(
                f"model {spec.name!r} is a text-only {spec.family.value.upper()} and cannot read images; "
                f"use a VLM model ({', '.join(s.name for s in self.config.models if s.family is Family.VLM) or 'none configured'})",
                param="messages",
            )
        return ChatParams(model=spec.name, messages=messages, images=images, wait_s=wait_s, **sampling)

    async def chat(self, params: ChatParams) -> ChatResult:
        spec = self.spec(params.model, Family.LLM, Family.VLM)
        return await self._call(spec.family, "chat", params)

    async def chat_stream(self, params: ChatParams) -> AsyncIterator[dict]:
        """Chunks from the family; the first is awaited under the timeout so errors come before headers."""
        spec = self.spec(params.model, Family.LLM, Family.VLM)
        generator = self.streams[spec.family.value].chat_stream.remote(params)
        limit = self.config.request_timeout_s
        try:
            first = await asyncio.wait_for(generator.__anext__(), limit)
        except asyncio.TimeoutError:
            generator.cancel()
            raise ServiceUnavailableError(
                f"the {spec.family.value} deployment did not start streaming within {limit:g} s", retry_after_s=5
            ) from None
        except StopAsyncIteration:
            return
        yield first
        async for chunk in generator:
            yield chunk

    async def transcribe(self, params: TranscribeParams) -> TranscribeResult:
        self.spec(params.model, Family.STT)
        return await self._call(Family.STT, "transcribe", params)

    async def synthesize(self, params: SpeechParams) -> SpeechResult:
        self.spec(params.model, Family.TTS)
        return await self._call(Family.TTS, "synthesize", params)

    # -- status ------------------------------------------------------------------------------------
    def _fetch_deployments(self) -> dict[str, dict]:
        """Serve's view of this application's family deployments, and the cluster's GPUs (blocking calls)."""
        import ray
        from ray import serve

        app = serve.get_replica_context().app_name
        status = serve.status().applications.get(app)
        total, free = ray.cluster_resources().get("GPU", 0.0), ray.available_resources().get("GPU", 0.0)
        out = {}
        for name, deployment in (status.deployments if status else {}).items():
            if name not in self.handles:
                continue
            replicas = {str(getattr(state, "value", state)): count for state, count in deployment.replica_states.items()}
            out[name] = {"status": str(getattr(deployment.status, "value", deployment.status)), "replicas": replicas,
                         "message": deployment.message, "replica_resources": self.resources.get(name, {}),
                         "cluster_gpus": {"total": total, "free": free}}
        return out

    async def deployment_states(self) -> dict[str, dict]:
        """Per family: Serve's status, replica counts by state and its message (empty when unknown)."""
        cached = self._deployments
        if cached is not None and time.monotonic() - cached[0] < 1.0:
            return cached[1]
        try:
            states = await asyncio.wait_for(asyncio.to_thread(self._fetch_deployments), self.config.status_timeout_s)
        except Exception as exc:  # /health must answer even when the controller does not
            log.warning("could not read Serve's deployment status: %s", exc)
            states = {}
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

    async def model_status(self) -> dict[str, dict]:
        """Per model: its replica's view, or why its family did not answer, with Serve's view of the family."""
        deployments = await self.deployment_states()  # never raises; cached for 1 s
        families = sorted({s.family for s in self.config.models}, key=lambda f: f.value)
        # A family scaled to zero is not woken up by a health probe: only real requests start it.
        asleep = {f for f in families if self._scaled_to_zero(f, deployments.get(f.value, {}))}
        awake = [f for f in families if f not in asleep]
        answers = await asyncio.gather(
            *(self._call(f, "status", timeout=self.config.status_timeout_s) for f in awake), return_exceptions=True
        )
        out: dict[str, dict] = {}
        for family in asleep:
            for spec in (s for s in self.config.models if s.family is family):
                out[spec.name] = {"name": spec.name, "family": family.value, "state": "scaled_to_zero",
                                  "note": "no replica running; the next request starts one (cold start)",
                                  "demo": spec.is_demo, "max_new_tokens": spec.max_new_tokens,
                                  "deployment": deployments[family.value]}
        for family, answer in zip(awake, answers):
            specs = [s for s in self.config.models if s.family is family]
            view = deployments.get(family.value, {})
            if isinstance(answer, BaseException):
                reason = str(answer) if isinstance(answer, ServiceUnavailableError) else f"{type(answer).__name__}: {answer}"
                pending = self.pending_reason(family.value, view)
                if pending:
                    reason = f"{reason}. {pending}"
                for spec in specs:
                    out[spec.name] = {"name": spec.name, "family": family.value, "state": "unavailable",
                                      "error": reason, "demo": spec.is_demo, "max_new_tokens": spec.max_new_tokens}
            else:
                for info in answer:
                    out[info["name"]] = info
            for spec in specs:
                if view and spec.name in out:
                    out[spec.name]["deployment"] = view
        for info in out.values():
            if info.get("demo"):
                info["note"] = DEMO_NOTE
        return out
