"""Adapters and whole models added and removed at run time: what the admin routes (routes/admin.py) do.

    POST /v1/load_lora_adapter   {"lora_name", "lora_path", "base_model"?}   (vLLM's bodies)
    POST /v1/unload_lora_adapter {"lora_name"}
    POST /models/load            {"model_id", "name"?, "family"?, ...}      (the seed LocalLab server's)
    POST /models/unload          {"model_id"}

The ingress checks names and bases against what it serves; the files are found and read on a replica of
a family (`inspect_adapter` / `inspect_model`, through `loading`, where the models will load): a local
directory, LOCAL_MODELS_DIR or the HF cache, never a download unless `admin.allow_downloads` (its size
logged first). An addition then goes into the runtime catalog (runtime_catalog.py), which every replica
of its family applies before its next call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loading import AdapterCheck, Family, LoadingMode, ModelCheck, ModelSpec

from .admin_protocol import (
    LoadLoraAdapterRequest,
    LoadModelRequest,
    RuntimeModelResponse,
    UnloadLoraAdapterRequest,
    UnloadModelRequest,
)
from .errors import APIError, InvalidRequestError
from .runtime_catalog import AdminConfig, BaseGone, BaseInUse, NameTaken, RuntimeRecord

if TYPE_CHECKING:
    from .ingress import Ingress

log = logging.getLogger(__name__)

CHAT_FAMILIES = (Family.LLM, Family.VLM)


# -- on a family replica: loading finds and reads the files (loading/runtime_sources.py) ----------------------

def _not_found(exc: Exception, param: str) -> APIError:
    return APIError(str(exc), status=404, type="invalid_request_error", param=param, code="model_not_found")


def _refused(exc: Exception, param: str) -> APIError:
    """What an admin pointed at and cannot be served: a file that cannot be read, a model of the wrong
    family or of no family (a 400 on the field that named it, not a 503 for a model of ours)."""
    return InvalidRequestError(str(exc), param=param, code="invalid_model")


def inspect_adapter(lora_path: str, candidates: list[ModelSpec], requested: str | None,
                    allow_downloads: bool) -> AdapterCheck:
    from loading import LoadingError, ModelNotFoundError, RuntimeSourceError, locate_adapter

    try:
        return locate_adapter(lora_path, candidates, requested, allow_downloads)
    except ModelNotFoundError as exc:
        raise _not_found(exc, "lora_path") from None
    except RuntimeSourceError as exc:
        raise InvalidRequestError(str(exc), param=exc.param, code=exc.code) from None
    except LoadingError as exc:
        raise _refused(exc, "lora_path") from None


def inspect_model(model_id: str, revision: str | None, family: Family | None, allow_downloads: bool) -> ModelCheck:
    from loading import LoadingError, ModelNotFoundError, RuntimeSourceError, locate_model

    try:
        return locate_model(model_id, revision, family, allow_downloads)
    except ModelNotFoundError as exc:
        raise _not_found(exc, "model_id") from None
    except RuntimeSourceError as exc:
        raise InvalidRequestError(str(exc), param=exc.param, code=exc.code) from None
    except LoadingError as exc:
        raise _refused(exc, "model_id") from None


# -- in the ingress -------------------------------------------------------------------------------------------

class RuntimeAdmin:
    """The ingress's part: names and bases checked against what it serves, the catalog written."""

    def __init__(self, ingress: Ingress):
        self.ingress = ingress
        self.config: AdminConfig = ingress.config.admin
        self._pending: set[str] = set()  # names being added right now

    def _claim(self, name: str, param: str) -> None:
        if name in self.ingress.catalog or name in self._pending:
            raise InvalidRequestError(f"The model {name!r} has already been loaded: a served model or alias has this "
                                      "name; choose another", param=param, code="model_exists")
        limit = self.config.max_runtime_models
        if len(self.ingress.runtime.records) + len(self._pending) >= limit:
            raise InvalidRequestError(f"{limit} adapters and models are loaded at run time already "
                                      f"(admin.max_runtime_models={limit}); unload one first", param=param)
        self._pending.add(name)

    def _deployed(self, *families: Family) -> Family:
        for family in families:
            if family.value in self.ingress.handles:
                return family
        raise InvalidRequestError(f"this app has no {' or '.join(f.value for f in families)} deployment: add a model "
                                  "of that family to serve_config.yaml to get one", param="family")

    async def _put(self, record: RuntimeRecord, param: str, base_uid: str | None = None) -> None:
        """`base_uid`: the addition an adapter's base is, where it was added at run time too."""
        try:
            await self.ingress.runtime.put(record, base_uid)
        except NameTaken:  # another ingress replica added it meanwhile
            raise InvalidRequestError(f"The model {record.spec.name!r} has already been loaded", param=param,
                                      code="model_exists") from None
        except BaseGone:  # its base (added at run time) was unloaded while this adapter was checked
            raise _base_unloaded(record.spec.base_model or "") from None

    async def _state(self, family: Family, name: str, wait_s: float) -> dict[str, Any]:
        """The model as the replica that serves this call sees it (applying the catalog first)."""
        state = await self.ingress._call(family, "runtime_state", [name], wait_s, timeout=wait_s + 30)
        return {"info": state["models"].get(name, {}), "in_flight": state["in_flight"].get(name, 0)}

    async def load_adapter(self, body: LoadLoraAdapterRequest) -> RuntimeModelResponse:
        name = body.lora_name
        self._claim(name, "lora_name")
        try:
            candidates = [s for s in self.ingress.served_models() if s.family in CHAT_FAMILIES and not s.base_model]
            requested = None
            if body.base_model is not None:
                named = self.ingress.catalog.get(body.base_model)
                if named is None or named not in candidates:
                    raise InvalidRequestError(
                        f"base_model {body.base_model!r} is not a served LLM or VLM base model; those are: "
                        f"{', '.join(c.name for c in candidates) or 'none'}", param="base_model")
                requested = named.name
            asked = self.ingress.catalog[requested].family if requested else self._deployed(*CHAT_FAMILIES)
            assert asked is not None
            check: AdapterCheck = await self.ingress._call(
                asked, "inspect_runtime", "adapter", body.lora_path, candidates, requested, self.config.allow_downloads)
            base = self.ingress.catalog.get(check.base)
            if base is None:  # unloaded while its new adapter was being checked
                raise _base_unloaded(check.base)
            spec = base.model_copy(update={
                "name": name, "source": check.path, "base_model": base.name, "aliases": [], "build_tiny": None,
                "loading": LoadingMode.BACKGROUND, "revision": None, "debug_load_delay_s": 0.0})
            runtime_base = self.ingress.runtime.records.get(base.name)  # None: a configured base
            await self._put(RuntimeRecord("adapter", spec, attach_wait_s=self.config.adapter_wait_s), "lora_name",
                            runtime_base.uid if runtime_base is not None else None)
        finally:
            self._pending.discard(name)
        assert base.family is not None
        state = await self._state(base.family, name, self.config.adapter_wait_s)
        info = state["info"]
        if info.get("state") == "failed":
            await self.ingress.runtime.remove(name)
            raise InvalidRequestError(f"adapter {body.lora_path!r} could not be attached to {base.name!r}: "
                                      f"{info.get('error')}", param="lora_path", code="adapter_load_failed")
        log.info("adapter %s (%s) loaded at run time on %s", name, check.path, base.name)
        return RuntimeModelResponse(
            id=name, kind="adapter", family=base.family.value, status="loaded" if info.get("state") == "ready" else
            "loading", message=f"Success: LoRA adapter '{name}' added successfully.", source=check.path,
            base_model=base.name, phase=info.get("phase"))

    async def load_model(self, body: LoadModelRequest) -> RuntimeModelResponse:
        name = body.name or default_name(body.model_id)
        self._claim(name, "name" if body.name else "model_id")
        try:
            asked = self._deployed(body.family) if body.family else self._deployed(*Family)
            check: ModelCheck = await self.ingress._call(
                asked, "inspect_runtime", "model", body.model_id, body.revision, body.family,
                self.config.allow_downloads)
            self._deployed(check.family)
            spec = ModelSpec(
                name=name, source=check.source, family=check.family, revision=body.revision, dtype=body.dtype,
                quantization=body.quantization, device=body.device, max_new_tokens=body.max_new_tokens,
                max_prompt_tokens=body.max_prompt_tokens, generation_timeout_s=body.generation_timeout_s,
                debug_load_delay_s=body.debug_load_delay_s,
                loading=LoadingMode.LAZY)  # loaded now, and like a lazy model unloaded beyond max_loaded_models
            await self._put(RuntimeRecord("model", spec), "model_id")
        finally:
            self._pending.discard(name)
        info = (await self._state(check.family, name, 0.0))["info"]
        log.info("model %s (%s, %s) added at run time", name, check.source, check.origin)
        return RuntimeModelResponse(
            id=name, kind="model", family=check.family.value,
            status="loaded" if info.get("state") == "ready" else "loading",
            message=f"Success: model '{name}' added; it loads in the background (its phase is in /health).",
            source=check.source, phase=info.get("phase"), download_bytes=check.download_bytes)

    async def unload_adapter(self, body: UnloadLoraAdapterRequest) -> RuntimeModelResponse:
        record = self._record(body.lora_name, "lora_name")
        if record.kind != "adapter":
            raise InvalidRequestError(f"{body.lora_name!r} is a whole model, not an adapter: remove it with "
                                      "POST /models/unload", param="lora_name")
        return await self._remove(record)

    async def unload_model(self, body: UnloadModelRequest) -> RuntimeModelResponse:
        return await self._remove(self._record(body.model_id, "model_id"))

    def _record(self, name: str, param: str) -> RuntimeRecord:
        records = self.ingress.runtime.records
        spec = self.ingress.catalog.get(name)
        if spec is not None and spec.name in records:
            return records[spec.name]
        if spec is not None:
            raise InvalidRequestError(f"{spec.name!r} is configured in serve_config.yaml, not loaded at run time: "
                                      "remove it there", param=param)
        raise APIError(f"The model {name!r} cannot be found among those loaded at run time "
                       f"({', '.join(sorted(records)) or 'none'}).", status=404, type="invalid_request_error",
                       param=param, code="model_not_found")

    async def _remove(self, record: RuntimeRecord) -> RuntimeModelResponse:
        name, family = record.spec.name, record.spec.family
        assert family is not None
        users = sorted(r.spec.name for r in self.ingress.runtime.records.values() if r.spec.base_model == name)
        try:
            if users:
                raise BaseInUse(name, users)
            await self.ingress.runtime.remove(name)  # the catalog checks again: an adapter may be added meanwhile
        except BaseInUse as exc:
            raise InvalidRequestError(f"{name!r} is the base of adapters {', '.join(exc.users)}: unload them first",
                                      param="model_id") from None
        in_flight = (await self._state(family, name, 0.0))["in_flight"]
        log.info("%s %s unloaded at run time (%d request(s) finishing on the replica asked)", record.kind, name,
                 in_flight)
        what = "LoRA adapter" if record.kind == "adapter" else "model"
        return RuntimeModelResponse(id=name, kind=record.kind, family=family.value, status="unloaded",
                                    message=f"Success: {what} '{name}' removed successfully.",
                                    source=record.spec.source, base_model=record.spec.base_model, in_flight=in_flight)


def _base_unloaded(base: str) -> InvalidRequestError:
    return InvalidRequestError(f"base model {base!r} was unloaded while this adapter was being added; load the base "
                               "again first", param="base_model", code="model_not_found")


def default_name(model_id: str) -> str:
    """A model's name when the request gives none: its id, or the last component of a path or GGUF file."""
    if model_id.startswith(("/", "./", "../", "~")) or model_id.lower().endswith(".gguf"):
        stem = Path(model_id.rstrip("/")).name
        return stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    return model_id
