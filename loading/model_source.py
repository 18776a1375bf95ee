"""A served model's files, found once: resolve -> adapter -> base -> config -> family.

    found = resolve_model(spec, settings)   # -> ResolvedModel(resolved, adapter, base, config, family)

`load_model`, `attach_adapter`, `modelfleet doctor` (`inspect_model`, `detect_family`) and
`modelfleet fetch` all go through `resolve_model`, so they agree on where a model is, which base an
adapter gets and which family a config belongs to. Nothing here reads weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from .adapters import AdapterInfo, read_adapter, resolve_base
from .config import ModelSpec
from .errors import UnreadableModelError, UnsupportedModelError
from .families import FamilyLoader, select_family
from .offline import HubStatus, offline_for_libraries
from .resolve import Resolved, looks_like_path, resolve_source, user_path
from .settings import Settings

log = logging.getLogger(__name__)

#: progress(phase, fraction): how far a load got, shown by /health
Progress = Callable[[str, "float | None"], None]
#: files that make a directory carry its own tokenizer/processor (a fine-tune's, next to its adapter)
PROCESSOR_FILES = ("tokenizer_config.json", "tokenizer.json", "preprocessor_config.json", "processor_config.json")


def no_progress(phase: str, fraction: float | None = None) -> None:
    return None


@dataclass(frozen=True)
class ResolvedModel:
    """Where a served model's files are and what they hold, found without reading any weights."""

    resolved: Resolved  # where `spec.source` is: the model, or the adapter of an adapter-only dir
    adapter: AdapterInfo | None = None  # set when `resolved` is an adapter-only directory
    base: Resolved | None = None  # the adapter's base (None for a plain model, or when not asked for)
    config: Any = None  # the transformers config of the weights (None when not asked for)
    family: FamilyLoader | None = None  # the family chosen from `config` and `spec.family`

    @property
    def path(self) -> Path:
        return self.resolved.path

    @property
    def model_dir(self) -> Path:
        """The directory whose weights are loaded: the base's for an adapter, else the model's own."""
        return self.base.path if self.base is not None else self.resolved.path

    @property
    def has_own_processor(self) -> bool:
        """Whether `path` carries its own tokenizer/processor (a fine-tune often saves one next to its adapter)."""
        return any((self.path / name).is_file() for name in PROCESSOR_FILES)


def resolve_model(
    spec: ModelSpec,
    settings: Settings,
    *,
    hub: HubStatus | None = None,
    allow_download: bool = True,
    local_dir: Path | None = None,
    with_base: bool = True,
    with_config: bool = True,
    progress: Progress = no_progress,
) -> ResolvedModel:
    """Find `spec`'s directory, its adapter's base and its config, and choose its family.

    `allow_download=False` never downloads, neither the model nor an adapter's base. `with_base=False`
    stops after reading the adapter (for an adapter attached to a base that is already loaded);
    `with_config=False` stops before the config (for `modelfleet fetch`, which only needs the files).
    `find_base` and `read_config` are the later steps, for a caller that reports between them.

    Raises ModelNotFoundError / AdapterBaseNotFoundError (nothing found), OSError or ValueError (an
    unreadable config.json) and UnsupportedModelError (a config of no served family, or of another one
    than `spec.family`).
    """
    if with_config and not with_base:
        raise ValueError("with_config=True needs with_base=True: an adapter's config is its base's")
    progress("resolving", 0.1)
    resolved = resolve_source(
        spec.source, settings, revision=spec.revision, hub=hub, allow_download=allow_download, local_dir=local_dir,
        progress=progress,
    )
    found = ResolvedModel(resolved, read_adapter(resolved.path))
    if with_base:
        found = find_base(found, spec, settings, hub=hub, allow_download=allow_download, progress=progress)
    return read_config(found, spec, progress) if with_config else found


def find_base(
    found: ResolvedModel,
    spec: ModelSpec,
    settings: Settings,
    *,
    hub: HubStatus | None = None,
    allow_download: bool = True,
    local_dir: Path | None = None,
    progress: Progress = no_progress,
) -> ResolvedModel:
    """`found` with its adapter's base resolved (`spec.base_model` wins over the adapter's own word);
    `found` itself for a plain model. With `local_dir`, a base from the HF cache or the Hub lands there."""
    if found.adapter is None:
        return found
    progress("resolving adapter base", 0.15)
    base = resolve_base(found.adapter, settings, override=spec.base_model, hub=hub, allow_download=allow_download,
                        local_dir=local_dir)
    log.info("%s: adapter %s on base %s (%s)", spec.name, found.adapter.path, base.path, base.origin)
    return replace(found, base=base)


def base_name(found: ResolvedModel, spec: ModelSpec) -> str:
    """What an adapter's base is looked up by: `spec.base_model`, else the adapter's own word ("" for a model)."""
    return (spec.base_model or found.adapter.base_name) if found.adapter is not None else ""


def read_config(found: ResolvedModel, spec: ModelSpec, progress: Progress = no_progress) -> ResolvedModel:
    """`found` with the config of its weights (the base's, for an adapter) and the family it belongs to."""
    if found.adapter is not None and found.base is None:
        raise ValueError(f"{found.path} is an adapter whose base was not resolved: its config is the base's")
    progress("reading config", 0.2)
    config = read_config_file(found.model_dir, spec.source, spec.trust_remote_code)
    family = select_family(config, spec.family, spec.source, spec.trust_remote_code)
    return replace(found, config=config, family=family)


def read_config_file(model_dir: Path, source: str, trust_remote_code: bool = False) -> Any:
    """AutoConfig of `model_dir`; what it cannot read is a LoadingError that says why and what to do."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableModelError(source, f"{path} cannot be read ({type(exc).__name__}: {exc}): download "
                                   "the model again") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not trust_remote_code and model_type not in CONFIG_MAPPING_NAMES:
        custom = " The model ships its own code (auto_map): set trust_remote_code: true if you trust it." if (
            isinstance(raw, dict) and raw.get("auto_map")) else ""
        raise UnsupportedModelError(
            source, f"{path} has model_type {model_type!r}, which transformers {transformers.__version__} does "
            f"not know: it is newer than this transformers (upgrade it) or not a transformers model.{custom}")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnreadableModelError(source, f"transformers cannot read {path} ({type(exc).__name__}: {exc})") \
            from None


def tiny_target(spec_source: str, settings: Settings) -> Path:
    """Where the demo model of `build_tiny` is built: the path itself, or a name under LOCAL_MODELS_DIR."""
    return user_path(spec_source) if looks_like_path(spec_source) else settings.local_models_dir / spec_source


def ensure_demo_model(spec: ModelSpec, settings: Settings) -> None:
    """Build the tiny demo model (and its tiny base, for an adapter) if it is not there yet."""
    from .tiny import base_kind, ensure_tiny, is_complete

    kind = spec.build_tiny
    if kind is None:
        return
    dest = tiny_target(spec.source, settings)
    if kind.endswith("-lora"):
        if not is_complete(dest):
            offline_for_libraries(settings)  # the adapter is made with peft, which may call the Hub as it is imported
        if not spec.base_model:
            raise ValueError(f"model {spec.name!r}: build_tiny={kind!r} needs `base_model` (where its tiny base lives)")
        base = tiny_target(spec.base_model, settings)
        ensure_tiny(base_kind(kind), base)
        ensure_tiny(kind, dest, base=base)
    else:
        ensure_tiny(kind, dest)
