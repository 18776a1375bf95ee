"""Finding the files of an adapter or a whole model that an operator adds while the server runs.

The admin routes (deployments/runtime_admin.py) call these on a replica of the family, where the model
will load: a local directory, LOCAL_MODELS_DIR or the HF cache, the same resolution as configured models,
and never a download unless the operator allows it (its size logged first). Failures are
RuntimeSourceError (a bad request: `param` and `code` name what to change) or ModelNotFoundError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Family, ModelSpec
from .errors import LoadingError, ModelNotFoundError, UnsupportedModelError

log = logging.getLogger(__name__)

DOWNLOADS_OFF = "downloads are off for models added at run time (admin.allow_downloads: false)"


class RuntimeSourceError(LoadingError):
    """What was asked for cannot be added as asked (not an adapter, the wrong base, ...)."""

    def __init__(self, message: str, param: str, code: str | None = None):
        self.param, self.code = param, code
        super().__init__(message)


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


def _offline_first() -> Any:
    from .offline import HubStatus

    return HubStatus(False, DOWNLOADS_OFF)


def locate_adapter(lora_path: str, candidates: list[ModelSpec], requested: str | None,
                   allow_downloads: bool) -> AdapterCheck:
    """The adapter at `lora_path` and the served base it goes on: the one its base_model_name_or_path names
    (by name, source or the directory both resolve to), or `requested` if it names none of them."""
    from .adapters import read_adapter
    from .resolve import resolve_source
    from .settings import Settings

    settings = Settings.from_env()
    found = resolve_source(lora_path, settings, what="adapter", hub=None if allow_downloads else _offline_first(),
                           allow_download=allow_downloads)
    adapter = read_adapter(found.path)
    if adapter is None:
        raise RuntimeSourceError(
            f"{lora_path!r} ({found.path}) is not a LoRA adapter directory (adapter_config.json without config.json); "
            "a whole model is added with POST /models/load", param="lora_path")
    matches = matching_bases(adapter, candidates, settings)
    served = ", ".join(f"{c.name} ({c.family.value if c.family else '?'}: {c.source})" for c in candidates) or "none"
    if requested is not None:
        if matches and requested not in matches:
            raise RuntimeSourceError(
                f"adapter {lora_path!r} was made for base model {adapter.base_name!r} (base_model_name_or_path in its "
                f"adapter_config.json), which is served model {' / '.join(matches)!r}, not base_model {requested!r} "
                "that the request names", param="base_model", code="adapter_base_mismatch")
        return AdapterCheck(str(found.path), requested, adapter.base_name)
    if len(matches) == 1:
        return AdapterCheck(str(found.path), matches[0], adapter.base_name)
    if not matches:
        raise RuntimeSourceError(
            f"adapter {lora_path!r} was made for base model {adapter.base_name or '(none named)'!r} "
            f"(base_model_name_or_path in its adapter_config.json), which is none of the served LLM/VLM base "
            f"models: {served}. If it was trained on one of them, name it in `base_model`",
            param="lora_path", code="adapter_base_mismatch")
    raise RuntimeSourceError(
        f"adapter {lora_path!r} fits served models {', '.join(matches)} (all from {adapter.base_name!r}): name the "
        "one to attach it to in `base_model`", param="base_model")


def matching_bases(adapter: Any, candidates: list[ModelSpec], settings: Any) -> list[str]:
    """The candidates the adapter's base names: by name or alias, by source, or by resolved directory
    (local, LOCAL_MODELS_DIR, HF cache: never the Hub)."""
    from .adapters import resolve_base
    from .resolve import resolve_source

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


def locate_model(model_id: str, revision: str | None, family: Family | None, allow_downloads: bool) -> ModelCheck:
    """Where the model is and its family (from its config.json), without downloading unless allowed."""
    from .adapters import read_adapter
    from .families import select_family
    from .gguf import check_supported, is_gguf_source, locate, read_info
    from .model_source import read_config_file
    from .resolve import resolve_source
    from .settings import Settings

    settings = Settings.from_env()
    if is_gguf_source(model_id):  # converted once, in the background load (phase in /health)
        gguf = locate(model_id, settings)
        check_supported(gguf, read_info(gguf.path))
        return ModelCheck(model_id, Family.LLM, f"GGUF file {gguf.path} ({gguf.origin})")
    try:
        found = resolve_source(model_id, settings, revision=revision, hub=_offline_first(), allow_download=False)
    except ModelNotFoundError as exc:
        if not allow_downloads:
            raise
        return _downloadable(model_id, revision, family, settings, exc)
    if read_adapter(found.path) is not None:
        raise RuntimeSourceError(f"{model_id!r} ({found.path}) is a LoRA adapter: add it with "
                                 "POST /v1/load_lora_adapter", param="model_id")
    config = read_config_file(found.path, model_id)
    try:
        chosen = select_family(config, family, model_id).family
    except UnsupportedModelError as exc:
        if family is None:
            raise
        select_family(config, None, model_id)  # a model of no family at all is the model_id's fault
        raise RuntimeSourceError(str(exc), param="family", code="family_mismatch") from None
    return ModelCheck(str(found.path), chosen, found.origin)


def _downloadable(model_id: str, revision: str | None, family: Family | None, settings: Any,
                  missing: ModelNotFoundError) -> ModelCheck:
    """A Hub model the operator lets us download: its family from its config.json (a small download), and
    the size of the rest, logged now; the weights are downloaded by the replicas' background loads."""
    import huggingface_hub
    from transformers import AutoConfig

    from .families import select_family
    from .offline import hub_status
    from .resolve import download_size_bytes, is_repo_id

    hub = hub_status(settings)
    if not is_repo_id(model_id) or not hub.online:
        raise missing
    if family is None:
        config_file = huggingface_hub.hf_hub_download(model_id, "config.json", revision=revision,
                                                      cache_dir=settings.hf_hub_cache)
        family = select_family(AutoConfig.from_pretrained(Path(config_file).parent, local_files_only=True),
                               None, model_id).family
    size = download_size_bytes(model_id, revision, settings.hf_hub_cache)
    log.warning("model %s added at run time will be downloaded from the Hub (%s) into %s", model_id,
                f"{size / 1e9:.2f} GB" if size is not None else "unknown size", settings.hf_hub_cache)
    return ModelCheck(model_id, family, "Hub download (admin.allow_downloads: true)", size)
