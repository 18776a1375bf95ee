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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loading import Family, LoadingMode, ModelSpec

from .admin_protocol import (
    LoadLoraAdapterRequest,
    LoadModelRequest,
    RuntimeModelResponse,
    UnloadLoraAdapterRequest,
    UnloadModelRequest,
)
from .errors import APIError, InvalidRequestError
from .runtime_catalog import AdminConfig, NameTaken, RuntimeRecord

if TYPE_CHECKING:
    from .ingress import Ingress

log = logging.getLogger(__name__)

CHAT_FAMILIES = (Family.LLM, Family.VLM)
DOWNLOADS_OFF = "downloads are off for models added at run time (admin.allow_downloads: false)"


# -- on a family replica: find and read the files (loading's resolution, no download unless allowed) --------

@dataclass(frozen=True)
class AdapterCheck:
    path: str  # the adapter directory found
    base: str  # the served model it attaches to
    adapter_base: str  # what its adapter_config.json names as its base


@dataclass(frozen=True)
class ModelCheck:
    source: str  # what the model's spec loads from: the directory found, or the Hub id / GGUF file
    family: Family
    origin: str
    download_bytes: int | None = None


def _not_found(exc: Exception, param: str) -> APIError:
    return APIError(str(exc), status=404, type="invalid_request_error", param=param, code="model_not_found")


def _offline_first() -> Any:
    from loading.offline import HubStatus

    return HubStatus(False, DOWNLOADS_OFF)


def inspect_adapter(lora_path: str, candidates: list[ModelSpec], requested: str | None,
                    allow_downloads: bool) -> AdapterCheck:
    """The adapter at `lora_path` and the served base it goes on: the one its base_model_name_or_path names
    (by name, source or the directory both resolve to), or `requested` if it names none of them."""
    from loading import ModelNotFoundError, Settings
    from loading.adapters import read_adapter
    from loading.resolve import resolve_source

    settings = Settings.from_env()
    try:
        found = resolve_source(lora_path, settings, what="adapter", hub=None if allow_downloads else _offline_first(),
                               allow_download=allow_downloads)
    except ModelNotFoundError as exc:
        raise _not_found(exc, "lora_path") from None
    adapter = read_adapter(found.path)
    if adapter is None:
        raise InvalidRequestError(
            f"{lora_path!r} ({found.path}) is not a LoRA adapter directory (adapter_config.json without config.json); "
            "a whole model is added with POST /models/load", param="lora_path")
    matches = matching_bases(adapter, candidates, settings)
    served = ", ".join(f"{c.name} ({c.family.value if c.family else '?'}: {c.source})" for c in candidates) or "none"
    if requested is not None:
        if matches and requested not in matches:
            raise InvalidRequestError(
                f"adapter {lora_path!r} was made for base model {adapter.base_name!r} (base_model_name_or_path in its "
                f"adapter_config.json), which is served model {' / '.join(matches)!r}, not base_model {requested!r} "
                "that the request names", param="base_model", code="adapter_base_mismatch")
        return AdapterCheck(str(found.path), requested, adapter.base_name)
    if len(matches) == 1:
        return AdapterCheck(str(found.path), matches[0], adapter.base_name)
    if not matches:
        raise InvalidRequestError(
            f"adapter {lora_path!r} was made for base model {adapter.base_name or '(none named)'!r} "
            f"(base_model_name_or_path in its adapter_config.json), which is none of the served LLM/VLM base "
            f"models: {served}. If it was trained on one of them, name it in `base_model`",
            param="lora_path", code="adapter_base_mismatch")
    raise InvalidRequestError(
        f"adapter {lora_path!r} fits served models {', '.join(matches)} (all from {adapter.base_name!r}): name the "
        "one to attach it to in `base_model`", param="base_model")


def matching_bases(adapter: Any, candidates: list[ModelSpec], settings: Any) -> list[str]:
    """The candidates the adapter's base names: by name or alias, by source, or by resolved directory
    (local, LOCAL_MODELS_DIR, HF cache: never the Hub)."""
    from loading.adapters import resolve_base
    from loading.resolve import resolve_source

    offline = _offline_first()
    try:
        base_dir: Path | None = resolve_base(adapter, settings, hub=offline, allow_download=False).path.resolve()
    except Exception:  # not resolvable here: only names and sources can match
        base_dir = None
    matches = []
    for spec in candidates:
        if adapter.base_name and (adapter.base_name in spec.all_names or adapter.base_name == spec.source):
            matches.append(spec.name)
            continue
        if base_dir is None:
            continue
        try:
            path = resolve_source(spec.source, settings, revision=spec.revision, hub=offline, allow_download=False).path
        except Exception:
            continue
        if path.resolve() == base_dir:
            matches.append(spec.name)
    return matches


def inspect_model(model_id: str, revision: str | None, family: Family | None, allow_downloads: bool) -> ModelCheck:
    """Where the model is and its family (from its config.json), without downloading unless allowed."""
    from transformers import AutoConfig

    from loading import ModelNotFoundError, Settings
    from loading.adapters import read_adapter
    from loading.families import select_family
    from loading.gguf import check_supported, is_gguf_source, locate, read_info
    from loading.resolve import resolve_source

    settings = Settings.from_env()
    if is_gguf_source(model_id):  # converted once, in the background load (phase in /health)
        try:
            gguf = locate(model_id, settings)
        except ModelNotFoundError as exc:
            raise _not_found(exc, "model_id") from None
        check_supported(gguf, read_info(gguf.path))
        return ModelCheck(model_id, Family.LLM, f"GGUF file {gguf.path} ({gguf.origin})")
    try:
        found = resolve_source(model_id, settings, revision=revision, hub=_offline_first(), allow_download=False)
    except ModelNotFoundError as exc:
        if not allow_downloads:
            raise _not_found(exc, "model_id") from None
        return _downloadable(model_id, revision, family, settings, exc)
    if read_adapter(found.path) is not None:
        raise InvalidRequestError(f"{model_id!r} ({found.path}) is a LoRA adapter: add it with "
                                  "POST /v1/load_lora_adapter", param="model_id")
    config = AutoConfig.from_pretrained(found.path, local_files_only=True)
    chosen = select_family(config, family, model_id).family
    return ModelCheck(str(found.path), chosen, found.origin)


def _downloadable(model_id: str, revision: str | None, family: Family | None, settings: Any,
                  missing: Exception) -> ModelCheck:
    """A Hub model the operator lets us download: its family from its config.json (a small download), and
    the size of the rest, logged now; the weights are downloaded by the replicas' background loads."""
    import huggingface_hub
    from transformers import AutoConfig

    from loading.families import select_family
    from loading.offline import hub_status
    from loading.resolve import download_size_bytes, is_repo_id

    hub = hub_status(settings)
    if not is_repo_id(model_id) or not hub.online:
        raise _not_found(missing, "model_id") from None
    if family is None:
        config_file = huggingface_hub.hf_hub_download(model_id, "config.json", revision=revision,
                                                      cache_dir=settings.hf_hub_cache)
        family = select_family(AutoConfig.from_pretrained(Path(config_file).parent, local_files_only=True),
                               None, model_id).family
    size = download_size_bytes(model_id, revision, settings.hf_hub_cache)
    log.warning("model %s added at run time will be downloaded from the Hub (%s) into %s", model_id,
                f"{size / 1e9:.2f} GB" if size is not None else "unknown size", settings.hf_hub_cache)
    return ModelCheck(model_id, family, "Hub download (admin.allow_downloads: true)", size)


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

    async def _put(self, record: RuntimeRecord, param: str) -> None:
        try:
            await self.ingress.runtime.put(record)
        except NameTaken:  # another ingress replica added it meanwhile
            raise InvalidRequestError(f"The model {record.spec.name!r} has already been loaded", param=param,
                                      code="model_exists") from None

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
            base = self.ingress.catalog[check.base]
            spec = base.model_copy(update={
                "name": name, "source": check.path, "base_model": base.name, "aliases": [], "build_tiny": None,
                "loading": LoadingMode.BACKGROUND, "revision": None, "debug_load_delay_s": 0.0})
            await self._put(RuntimeRecord("adapter", spec, attach_wait_s=self.config.adapter_wait_s), "lora_name")
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
        if users:
            raise InvalidRequestError(f"{name!r} is the base of adapters {', '.join(users)}: unload them first",
                                      param="model_id")
        await self.ingress.runtime.remove(name)
        in_flight = (await self._state(family, name, 0.0))["in_flight"]
        log.info("%s %s unloaded at run time (%d request(s) finishing on the replica asked)", record.kind, name,
                 in_flight)
        what = "LoRA adapter" if record.kind == "adapter" else "model"
        return RuntimeModelResponse(id=name, kind=record.kind, family=family.value, status="unloaded",
                                    message=f"Success: {what} '{name}' removed successfully.",
                                    source=record.spec.source, base_model=record.spec.base_model, in_flight=in_flight)


def default_name(model_id: str) -> str:
    """A model's name when the request gives none: its id, or the last component of a path or GGUF file."""
    if model_id.startswith(("/", "./", "../", "~")) or model_id.lower().endswith(".gguf"):
        stem = Path(model_id.rstrip("/")).name
        return stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
    return model_id
