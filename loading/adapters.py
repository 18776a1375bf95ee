"""PEFT adapter directories and their base models.

An adapter-only directory (adapter_config.json, no config.json) names its base in
`base_model_name_or_path`. Left to PEFT, a base that is not local becomes a silent multi-GB
download (or a ~47 s hang offline). We resolve the base through the same chain as any model,
also trying the adapter's parent directory, where fine-tunes usually sit
(`models/X/final_model/` next to the base in `models/X/`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import AdapterBaseNotFoundError, ModelNotFoundError
from .offline import HubStatus
from .resolve import Resolved, is_model_dir, resolve_source
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    path: Path
    base_name: str  # what the adapter (or the config override) names as its base
    peft_type: str


def read_adapter(path: Path) -> AdapterInfo | None:
    """AdapterInfo if `path` is an adapter-only directory, else None."""
    config = path / "adapter_config.json"
    if not config.is_file() or (path / "config.json").is_file():
        return None
    data = json.loads(config.read_text())
    return AdapterInfo(path, str(data.get("base_model_name_or_path") or ""), str(data.get("peft_type", "LORA")))


def resolve_base(
    adapter: AdapterInfo,
    settings: Settings,
    *,
    override: str | None = None,
    revision: str | None = None,
    hub: HubStatus | None = None,
    allow_download: bool = True,
) -> Resolved:
    """Find the adapter's base model, never starting an unannounced download (nor any, with
    `allow_download=False`)."""
    base = override or adapter.base_name
    parent = adapter.path.parent
    # The parent directory is a guess for the adapter's own base name; an explicit `base_model:` is
    # the operator's word and must win (and fail if missing) rather than fall back to the parent.
    extra = (parent,) if not override and is_model_dir(parent) and (parent / "config.json").is_file() else ()
    if not base and not extra:
        raise AdapterBaseNotFoundError(
            str(adapter.path), "<unnamed>", [f"{adapter.path}/adapter_config.json (no base_model_name_or_path)"],
            "set `base_model:` for this model in serve_config.yaml.",
        )
    if not base:
        log.info("adapter %s names no base; using its parent directory %s", adapter.path, parent)
        return Resolved(parent.resolve(), "adapter's parent directory")
    # An explicit base path that exists wins; then the parent dir; then the usual chain.
    explicit = Path(base).expanduser()
    if is_model_dir(explicit):
        return Resolved(explicit.resolve(), "local path")
    try:
        return resolve_source(
            base, settings, revision=revision, extra_dirs=extra, what="base model", hub=hub,
            allow_download=allow_download,
        )
    except ModelNotFoundError as exc:
        raise AdapterBaseNotFoundError(
            str(adapter.path), base, exc.looked_at,
            f"put the base model at one of those places (e.g. {parent}/ next to the adapter), run "
            "`modelfleet fetch` where the Hub is reachable, or set `base_model:` to a local directory.",
            offline_reason=exc.offline_reason,
        ) from None
