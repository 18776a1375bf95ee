"""Find a model's directory: explicit path -> LOCAL_MODELS_DIR -> HF cache -> Hub download.

A GGUF file (`*.gguf`, `pkg://<package>/<file>.gguf`) resolves to its converted directory under
LOCAL_MODELS_DIR, converted first where needed (`loading/gguf.py`).

Every place looked at is recorded, so a miss can say exactly where we looked and what to do.
Downloads happen only when the Hub is reachable, under a file lock so that replicas sharing a
cache download once, and with their size logged before they start.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from filelock import FileLock
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

from .errors import ModelNotFoundError
from .offline import HubStatus, hub_status
from .settings import Settings

log = logging.getLogger(__name__)

#: the one list of weight-file suffixes: what makes a directory a model, and what its size on disk counts
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MARKER_FILES = ("config.json", "adapter_config.json")
# The Hub answered: no such repo (or private/gated: GatedRepoError is a subclass) or no such revision.
NOT_ON_HUB = (RepositoryNotFoundError, RevisionNotFoundError)


@dataclass
class Resolved:
    path: Path
    # "local path" | "LOCAL_MODELS_DIR" | "adapter's parent directory" | "HF cache" | "copied from the HF cache"
    # | "Hub download" | "GGUF <file> (<where>), converted now|earlier"
    origin: str
    looked_at: list[str] = field(default_factory=list)


def is_model_dir(path: Path) -> bool:
    """A directory that holds a config (model or adapter) and some weights."""
    if not path.is_dir() or not any((path / name).is_file() for name in MARKER_FILES):
        return False
    return any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir())


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or "\\" in source


def is_repo_id(source: str) -> bool:
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return not looks_like_path(source)


def cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path) -> Path | None:
    """The cached snapshot dir of repo_id if it holds a config and weights, else None."""
    for marker in MARKER_FILES:
        hit = huggingface_hub.try_to_load_from_cache(repo_id, marker, cache_dir=cache_dir, revision=revision)
        if isinstance(hit, str):
            snapshot = Path(hit).parent
            return snapshot if is_model_dir(snapshot) else None
    return None


def local_candidates(source: str, settings: Settings, extra_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """Directories to try, in order, before the HF cache."""
    candidates = [Path(source).expanduser()]
    candidates += [d for d in extra_dirs]
    if not looks_like_path(source):
        candidates.append(settings.local_models_dir / source)
    # By last path component too: a Hub id "Org/Name" or a path from another machine.
    candidates.append(settings.local_models_dir / Path(source.rstrip("/")).name)
    unique: list[Path] = []
    for c in candidates:
        if c not in unique:
            unique.append(c)
    return unique


def download_size_bytes(repo_id: str, revision: str | None, cache_dir: Path) -> int | None:
    """Bytes still to download (dry run against the Hub), or None when the Hub will not say."""
    try:
        infos = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, dry_run=True)
    except Exception as exc:  # the size is advice; the download itself reports real errors
        missing = exc if isinstance(exc, NOT_ON_HUB) else exc.__cause__  # dry run wraps a 404 in DryRunError
        if isinstance(missing, NOT_ON_HUB):
            raise missing from None  # not a sizing problem: there is nothing to download
        log.info("could not size %s before download: %s", repo_id, exc)
        return None
    return sum(getattr(i, "file_size", 0) or 0 for i in infos if getattr(i, "will_download", True))


def download(
    repo_id: str, revision: str | None, settings: Settings, *, what: str = "model", local_dir: Path | None = None
) -> Path:
    """Download a snapshot once per cache, however many processes ask at the same time."""
    settings.hf_hub_cache.mkdir(parents=True, exist_ok=True)
    lock_path = settings.hf_hub_cache / f".modelfleet-{repo_id.replace('/', '--')}.lock"
    with FileLock(str(lock_path)):
        hit = cached_snapshot(repo_id, revision, settings.hf_hub_cache)
        if hit is not None:  # another process finished the download while we waited
            return hit
        size = download_size_bytes(repo_id, revision, settings.hf_hub_cache)
        size_text = f"{size / 1e9:.2f} GB" if size is not None else "unknown size"
        log.warning("Downloading %s %s (%s) from the Hub into %s", what, repo_id, size_text, settings.hf_hub_cache)
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=settings.hf_hub_cache, local_dir=local_dir
        )
        return Path(path)


def resolve_source(
    source: str,
    settings: Settings,
    *,
    revision: str | None = None,
    extra_dirs: tuple[Path, ...] = (),
    what: str = "model",
    hub: HubStatus | None = None,
    allow_download: bool = True,
    local_dir: Path | None = None,
    progress: Callable[[str, float | None], None] | None = None,
) -> Resolved:
    """Resolve `source` to a local directory or raise ModelNotFoundError listing every place tried.

    With `local_dir`, a model found in the HF cache is copied there as plain files, and a download
    lands there instead of in the cache (`modelfleet fetch --local-models-dir`). A GGUF file is
    converted into LOCAL_MODELS_DIR where allowed (`allow_download`), reporting to `progress`.
    """
    from .gguf import is_gguf_source

    if is_gguf_source(source):
        from .gguf import resolve_gguf

        if progress is None:
            return resolve_gguf(source, settings, convert=allow_download)
        return resolve_gguf(source, settings, convert=allow_download, progress=progress)
    looked_at: list[str] = []
    for candidate in local_candidates(source, settings, extra_dirs):
        if is_model_dir(candidate):
            origin = "local path" if candidate == Path(source).expanduser() else "LOCAL_MODELS_DIR"
            if candidate in extra_dirs:
                origin = "adapter's parent directory"
            log.info("%s %s resolved to %s (%s)", what, source, candidate, origin)
            return Resolved(candidate.resolve(), origin, looked_at)
        state = "no config.json/adapter_config.json with weights" if candidate.exists() else "does not exist"
        looked_at.append(f"{candidate} ({state})")

    if not is_repo_id(source):
        raise ModelNotFoundError(
            source,
            looked_at,
            f"{source!r} is not a Hub id, so only local directories were searched. Check the path, or put "
            f"the model under LOCAL_MODELS_DIR={settings.local_models_dir}.",
        )

    hit = cached_snapshot(source, revision, settings.hf_hub_cache)
    if hit is not None and local_dir is not None:
        # Asked for a self-contained copy (e.g. to carry to an offline machine): the cache's
        # symlinked snapshot is copied as plain files, no Hub needed.
        shutil.copytree(hit, local_dir, dirs_exist_ok=True)
        log.info("%s %s copied from cached snapshot %s to %s", what, source, hit, local_dir)
        return Resolved(local_dir.resolve(), "copied from the HF cache", looked_at)
    if hit is not None:
        log.info("%s %s resolved to cached snapshot %s", what, source, hit)
        return Resolved(hit, "HF cache", looked_at)
    looked_at.append(f"HF cache {settings.hf_hub_cache} (no complete snapshot of {source}@{revision or 'main'})")

    hub = hub or hub_status(settings)
    if not hub.online or not allow_download:
        reason = hub.reason if not hub.online else "downloads disabled for this call"
        raise ModelNotFoundError(
            source,
            looked_at,
            f"run `modelfleet fetch` on a machine with Hub access (or copy the model directory to "
            f"{settings.local_models_dir / source.split('/')[-1]}), then start again.",
            offline_reason=reason,
        )
    try:
        path = download(source, revision, settings, what=what, local_dir=local_dir)
    except NOT_ON_HUB as exc:
        answer = "no such revision" if isinstance(exc, RevisionNotFoundError) else "no such repo, or private/gated"
        looked_at.append(f"the Hub at {settings.hub_endpoint} ({answer}: {source}@{revision or 'main'})")
        raise ModelNotFoundError(
            source,
            looked_at,
            "check the id and `revision:` (a private or gated repo also needs HF_TOKEN), or put the model under "
            f"LOCAL_MODELS_DIR={settings.local_models_dir}.",
        ) from exc
    return Resolved(path, "Hub download", looked_at)
