"""Find a model's directory: explicit path -> LOCAL_MODELS_DIR -> HF cache -> Hub download.

A GGUF file (`*.gguf`, `pkg://<package>/<file>.gguf`) resolves to its converted directory under
LOCAL_MODELS_DIR, converted first where needed (`loading/gguf.py`).

Every place looked at is recorded, so a miss can say exactly where we looked and what to do.
Downloads happen only when the Hub is reachable, under a file lock so that replicas sharing a
cache download once, and with their size logged before they start.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import huggingface_hub
from filelock import FileLock
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .errors import ModelNotFoundError
from .offline import HubStatus, hub_status
from .settings import Settings

log = logging.getLogger(__name__)

#: the one list of weight-file suffixes: what makes a directory a model, and what its size on disk counts
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MARKER_FILES = ("config.json", "adapter_config.json")
#: What a Hub download leaves out, always: other frameworks' weights and exports, which transformers (5.x reads
#: PyTorch weights only) and PEFT never read: TensorFlow, Flax, rust-bert, TFLite, Core ML, ONNX, OpenVINO, and
#: GGUF files (a GGUF source is converted from its one file, never downloaded as a repo). The TensorFlow and Flax
#: shard indexes go too: an index whose shards are not there would read as an incomplete download.
OTHER_FRAMEWORK_FILES = (
    "*.h5", "*.h5.index.json", "*.msgpack", "*.msgpack.index.json", "*.ot", "*.tflite", "*.mlmodel", "*.mlpackage/*",
    "*.onnx", "*.onnx_data", "*.onnx.data", "onnx/*", "openvino/*", "coreml/*", "*.gguf",
)
#: Where the repo's top level has the files that make transformers' and PEFT's from_pretrained read safetensors
#: (model.safetensors or its shard index, adapter_model.safetensors), its PyTorch pickles are never read: the same
#: weights again (pytorch_model*.bin, adapter_model.bin, original/consolidated.*.pth) or training state
#: (training_args.bin, optimizer.pt, rng_state.pth). They are left out too.
SAFETENSORS_FIRST = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
PICKLED_WEIGHT_FILES = ("*.bin", "*.bin.index.json", "*.pt", "*.pth")
#: Beside model.safetensors, other formats of the same weights that transformers never reads: Mistral's native
#: consolidated.safetensors (~14 GB for a 7B model) and the original/ checkpoints of Llama and Mistral repos.
NATIVE_DUPLICATES = ("consolidated.safetensors", "consolidated.*.safetensors", "original/*")
# The Hub answered: no such repo (or private/gated: GatedRepoError is a subclass) or no such revision.
NOT_ON_HUB = (RepositoryNotFoundError, RevisionNotFoundError)
# The Hub did not answer usably: a timeout, a dropped connection, an error page (checked after NOT_ON_HUB,
# whose errors are HTTP errors too).
HUB_UNANSWERED = (httpx2.HTTPError, HfHubHTTPError, LocalEntryNotFoundError)


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


def _not_a_model(path: Path) -> str:
    """Why an existing path is not a model directory, for the not-found message: a config saved without
    its weights (an adapter's `save_pretrained` interrupted, or only its JSON copied) says so."""
    try:
        configs = [name for name in MARKER_FILES if (path / name).is_file()] if path.is_dir() else []
    except OSError:
        configs = []
    if not configs:
        return "no config.json/adapter_config.json with weights"
    return (f"has {configs[0]} but no weight files ({', '.join(sorted(WEIGHT_SUFFIXES))}): copy or save the "
            "weights with it")


def missing_weight_files(path: Path) -> list[str]:
    """Weight files a model directory links or names but lacks: a symlink to a blob never downloaded
    (an interrupted HF cache download), a shard its index lists that is not there."""
    missing = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and not p.exists())
    for index in sorted(path.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            continue
        missing += sorted(name for name in shards if isinstance(name, str) and not (path / name).is_file()
                          and name not in missing)
    return missing




def user_path(source: str) -> Path:
    """`source` as a path, "~" expanded; "~user" of no such user stays as written (expanduser raises
    RuntimeError for it), so it is a path that is not there rather than an error from deep inside."""
    try:
        return Path(source).expanduser()
    except RuntimeError:
        return Path(source)


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
            if is_model_dir(snapshot) and (missing := missing_weight_files(snapshot)):
                log.warning("the cached snapshot %s lacks %s: not used", snapshot, ", ".join(missing))
                return None
            return snapshot if is_model_dir(snapshot) else None
    return None


def local_candidates(source: str, settings: Settings, extra_dirs: tuple[Path, ...] = ()) -> list[Path]:
    """Directories to try, in order, before the HF cache."""
    candidates = [user_path(source)]
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


# Written by `modelfleet fetch --local-models-dir` into each copy it makes: LOCAL_MODELS_DIR is searched by
# last path component too, and a copy of Org-A/model must not be served for Org-B/model.
FETCHED_MARKER = ".modelfleet-source.json"


def mark_fetched(directory: Path, source: str, revision: str | None) -> None:
    (directory / FETCHED_MARKER).write_text(json.dumps({"source": source, "revision": revision}))


def fetched_source(directory: Path) -> str | None:
    """The Hub id a directory was fetched from (None: not made by fetch, or unreadable)."""
    source = _fetched(directory).get("source")
    return source if isinstance(source, str) else None


def _fetched(directory: Path) -> dict:
    """What `mark_fetched` wrote into `directory`; {} where it wrote nothing readable."""
    try:
        marker = json.loads((directory / FETCHED_MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _other_revision(candidate: Path, asked: str, revision: str | None) -> str | None:
    """Why `candidate`, a copy that fetch made, is not at `revision` (None: it is, or fetch did not make it);
    fetch records "main" where it pinned none. Unpinned is main too, for the Hub id the copy was fetched from:
    a copy fetched at v1 must not outlive its pin. A path to the copy, asked for unpinned, is taken as it is."""
    marker = _fetched(candidate)
    source, fetched = marker.get("source"), marker.get("revision") or "main"
    if not isinstance(source, str) or fetched == (revision or "main") or (revision is None and source != asked):
        return None
    wanted = f"revision {revision} is pinned" if revision else "no revision is pinned, so main"
    return f"{candidate} (holds {source}@{fetched}, fetched there by `modelfleet fetch`; {wanted})"


def _clear_stale_copy(local_dir: Path, source: str) -> None:
    """Remove an older copy of `source` that fetch made in `local_dir` (another revision, or incomplete)
    before another is put there: its files would otherwise stay beside the new ones (a single
    model.safetensors is read before a sharded index)."""
    if fetched_source(local_dir) == source:
        log.info("removing the earlier copy of %s in %s", source, local_dir)
        shutil.rmtree(local_dir)


def _left_out_of(snapshot: Path) -> Callable[[str, list[str]], set[str]]:
    """copytree's `ignore` for a copy of a cached snapshot: the files a download of it leaves out now
    (`ignored_files`), which a snapshot downloaded whole may hold."""
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    kept = set(filter_repo_objects(files, ignore_patterns=ignored_files(files)))
    kept |= {parent.as_posix() for name in kept for parent in Path(name).parents}  # and the folders on their way

    def ignore(directory: str, names: list[str]) -> set[str]:  # a file left out, a folder of only such files
        where = Path(directory).relative_to(snapshot)
        return {name for name in names if (where / name).as_posix() not in kept}

    return ignore


def fetch_destination(source: str, settings: Settings) -> Path:
    """Where `modelfleet fetch --local-models-dir` puts a model: LOCAL_MODELS_DIR/<Hub id> (Org/Name), which
    no other repo shares; a source that is not a Hub id by its last path component."""
    return settings.local_models_dir / (source if is_repo_id(source) else Path(source.rstrip("/")).name)


def ignored_files(repo_files: Iterable[str]) -> list[str]:
    """The ignore patterns of a download of a repo holding `repo_files` (its paths in the repo): files that
    transformers and PEFT never read where they load from (the snapshot's top level)."""
    patterns = list(OTHER_FRAMEWORK_FILES)
    names = set(repo_files)
    if names & set(SAFETENSORS_FIRST):
        patterns += PICKLED_WEIGHT_FILES
    if names & {"model.safetensors", "model.safetensors.index.json"}:
        patterns += NATIVE_DUPLICATES
    return patterns


@dataclass(frozen=True)
class DownloadPlan:
    """What a snapshot download of a repo fetches: the files it leaves out and the bytes still to download."""

    ignore_patterns: list[str]
    size: int | None  # None: the Hub would not say (the repo's listing unknown: only OTHER_FRAMEWORK_FILES left out)


def plan_download(repo_id: str, revision: str | None, cache_dir: Path) -> DownloadPlan:
    """List the repo (dry run against the Hub; other frameworks' files left out) to decide what else to leave
    out, and count the bytes of what is left that is not cached yet: the size announced is the size downloaded."""
    try:
        infos = huggingface_hub.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, dry_run=True,
                                                  ignore_patterns=list(OTHER_FRAMEWORK_FILES))
    except Exception as exc:  # the size is advice; the download itself reports real errors
        missing = exc if isinstance(exc, NOT_ON_HUB) else exc.__cause__  # dry run wraps a 404 in DryRunError
        if isinstance(missing, NOT_ON_HUB):
            raise missing from None  # not a sizing problem: there is nothing to download
        log.info("could not size %s before download: %s", repo_id, exc)
        return DownloadPlan(list(OTHER_FRAMEWORK_FILES), None)
    patterns = ignored_files(getattr(i, "filename", "") for i in infos)
    kept = filter_repo_objects(infos, ignore_patterns=patterns, key=lambda i: getattr(i, "filename", ""))
    size = sum(getattr(i, "file_size", 0) or 0 for i in kept if getattr(i, "will_download", True))
    return DownloadPlan(patterns, size)


def download_size_bytes(repo_id: str, revision: str | None, cache_dir: Path) -> int | None:
    """Bytes still to download (dry run against the Hub), or None when the Hub will not say; the files a
    download leaves out (`plan_download`) are not counted."""
    return plan_download(repo_id, revision, cache_dir).size


_bounded_hub: float | None = None  # the read timeout huggingface_hub's client was last given


def bound_hub_calls(settings: Settings) -> None:
    """huggingface_hub 2.x's client waits for an answer forever (timeout=None) wherever a call sets none
    (model_info, the size dry run): an endpoint that takes the connection and never answers (a
    firewall, a captive portal) hung the load, holding the download lock other replicas wait on. Every
    Hub call of this process gets a bound: MODELFLEET_HUB_READ_TIMEOUT_S."""
    global _bounded_hub
    if _bounded_hub == settings.hub_read_timeout_s:
        return
    from huggingface_hub.utils import _http  # its default client (hooks, redirects), with our timeout

    bounds = httpx2.Timeout(settings.hub_read_timeout_s, connect=max(5.0, settings.hub_probe_timeout_s)).as_dict()

    def bound(request: httpx2.Request) -> None:  # calls pass timeout=None explicitly: the client default is not enough
        if all(value is None for value in (request.extensions.get("timeout") or {}).values()):
            request.extensions["timeout"] = bounds

    def bounded_client() -> httpx2.Client:
        client = _http.default_client_factory()
        hooks = client.event_hooks
        hooks["request"] = [*hooks.get("request", []), bound]
        client.event_hooks = hooks
        return client

    huggingface_hub.set_client_factory(bounded_client)
    _bounded_hub = settings.hub_read_timeout_s


def download(
    repo_id: str, revision: str | None, settings: Settings, *, what: str = "model", local_dir: Path | None = None
) -> Path:
    """Download a snapshot once per cache, however many processes ask at the same time."""
    bound_hub_calls(settings)
    settings.hf_hub_cache.mkdir(parents=True, exist_ok=True)
    lock_path = settings.hf_hub_cache / f".modelfleet-{repo_id.replace('/', '--')}.lock"
    with FileLock(str(lock_path)):
        hit = cached_snapshot(repo_id, revision, settings.hf_hub_cache)
        if hit is not None:  # another process finished the download while we waited
            return hit
        plan = plan_download(repo_id, revision, settings.hf_hub_cache)
        size_text = f"{plan.size / 1e9:.2f} GB" if plan.size is not None else "unknown size"
        log.warning("Downloading %s %s (%s) from the Hub into %s", what, repo_id, size_text, settings.hf_hub_cache)
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, cache_dir=settings.hf_hub_cache, local_dir=local_dir,
            ignore_patterns=plan.ignore_patterns,
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
    by_name_only = settings.local_models_dir / Path(source.rstrip("/")).name
    exact = {user_path(source), settings.local_models_dir / source}
    for candidate in local_candidates(source, settings, extra_dirs):
        if (candidate == by_name_only and candidate not in exact and is_repo_id(source)
                and (other := fetched_source(candidate)) is not None and other != source):
            # found by its last path component only: another repo of that name (Org-A/model for Org-B/model)
            looked_at.append(f"{candidate} (holds {other}, fetched there by `modelfleet fetch`)")
            continue
        if (other_revision := _other_revision(candidate, source, revision)) is not None:
            looked_at.append(other_revision)
            continue
        try:
            model_dir = is_model_dir(candidate)
            missing = missing_weight_files(candidate) if model_dir else []
            exists = model_dir or candidate.exists()
        except OSError as exc:  # pathlib raises past ENOENT: a name over NAME_MAX, a directory we may not read
            looked_at.append(f"{candidate} ({exc.strerror or exc})")
            continue
        if missing:
            looked_at.append(f"{candidate} (incomplete: lacks {', '.join(missing[:5])}; download it again)")
            continue
        if model_dir:
            origin = "local path" if candidate == user_path(source) else "LOCAL_MODELS_DIR"
            if candidate in extra_dirs:
                origin = "adapter's parent directory"
            log.info("%s %s resolved to %s (%s)", what, source, candidate, origin)
            return Resolved(candidate.resolve(), origin, looked_at)
        looked_at.append(f"{candidate} ({_not_a_model(candidate) if exists else 'does not exist'})")

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
        _clear_stale_copy(local_dir, source)
        shutil.copytree(hit, local_dir, dirs_exist_ok=True, ignore=_left_out_of(hit))
        mark_fetched(local_dir, source, revision)
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
        if local_dir is not None:
            _clear_stale_copy(local_dir, source)
        path = download(source, revision, settings, what=what, local_dir=local_dir)
        if local_dir is not None:
            mark_fetched(local_dir, source, revision)
    except NOT_ON_HUB as exc:
        answer = "no such revision" if isinstance(exc, RevisionNotFoundError) else "no such repo, or private/gated"
        looked_at.append(f"the Hub at {settings.hub_endpoint} ({answer}: {source}@{revision or 'main'})")
        raise ModelNotFoundError(
            source,
            looked_at,
            "check the id and `revision:` (a private or gated repo also needs HF_TOKEN), or put the model under "
            f"LOCAL_MODELS_DIR={settings.local_models_dir}.",
        ) from exc
    except HUB_UNANSWERED as exc:
        looked_at.append(f"the Hub at {settings.hub_endpoint} (no usable answer: {type(exc).__name__}: {exc})")
        raise ModelNotFoundError(
            source, looked_at,
            f"check the network to {settings.hub_endpoint} (a proxy or firewall that takes connections but does "
            f"not answer looks like this; the wait is MODELFLEET_HUB_READ_TIMEOUT_S={settings.hub_read_timeout_s:g} "
            f"s), or put the model under LOCAL_MODELS_DIR={settings.local_models_dir}.",
        ) from exc
    return Resolved(path, "Hub download", looked_at)
