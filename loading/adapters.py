"""PEFT adapter directories and their base models.

An adapter-only directory (adapter_config.json, no config.json) names its base in
`base_model_name_or_path`. Left to PEFT, a base that is not local becomes a silent multi-GB
download (or a ~47 s hang offline). We resolve the base through the same chain as any model;
where the named base is neither local nor cached, the adapter's parent directory is tried before
the Hub, as fine-tunes usually sit (`models/X/final_model/` next to the base in `models/X/`).

Once attached, `adapter_targets` says which parts of the base an adapter changes (a VLM adapter may
touch its vision tower and projector too, not only its language model) and refuses one that changes
nothing: its weights found no module of this base, which PEFT only warns about.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    AdapterBaseNotFoundError,
    AdapterMismatchError,
    ModelNotFoundError,
    UnreadableModelError,
    UnsupportedModelError,
)
from .offline import HubStatus
from .placement import safetensors_header
from .resolve import WEIGHT_SUFFIXES, Resolved, is_model_dir, resolve_source, user_path
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AdapterInfo:
    path: Path
    base_name: str  # what the adapter (or the config override) names as its base
    peft_type: str
    base_revision: str | None = None  # the base's revision the adapter was trained on (PEFT's `revision`)


def read_adapter(path: Path) -> AdapterInfo | None:
    """AdapterInfo if `path` is an adapter-only directory, else None. A config.json beside the adapter
    (some trainers save the base's) does not make it a model: only weights other than the adapter's do."""
    config = path / "adapter_config.json"
    if not config.is_file():
        return None
    if (path / "config.json").is_file() and any(
            p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("adapter_model") for p in path.iterdir()):
        return None  # a whole model that also carries an adapter's config
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableModelError(str(path), f"{config} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise UnreadableModelError(str(path), f"{config} is not a JSON object")
    revision = data.get("revision")
    return AdapterInfo(path, str(data.get("base_model_name_or_path") or ""), str(data.get("peft_type", "LORA")),
                       str(revision) if revision else None)


def resolve_base(
    adapter: AdapterInfo,
    settings: Settings,
    *,
    override: str | None = None,
    hub: HubStatus | None = None,
    allow_download: bool = True,
    local_dir: Path | None = None,
) -> Resolved:
    """Find the adapter's base model, never starting an unannounced download (nor any, with
    `allow_download=False`): the base it names (or `override`) where it is local or cached, else its
    parent directory when that holds a model, else the named base from the Hub. The adapter's base is
    looked for at the revision it records, as AutoPeftModel loads it; `override` at its main revision.
    With `local_dir`, a base from the HF cache or the Hub lands there as plain files (as in `resolve_source`)."""
    base = override or adapter.base_name
    revision = None if override else adapter.base_revision
    # The parent directory is a guess, for a base the adapter does not name or that is nowhere here; an
    # explicit `base_model:` is the operator's word and must win (and fail if missing).
    parent = adapter.path.parent
    guess = parent if not override and is_model_dir(parent) and (parent / "config.json").is_file() else None
    if not base and guess is None:
        raise AdapterBaseNotFoundError(
            str(adapter.path), "<unnamed>", [f"{adapter.path}/adapter_config.json (no base_model_name_or_path)"],
            "set `base_model:` for this model in serve_config.yaml.",
        )
    explicit = user_path(base)  # "~user" of no such user: a path that is not there, not a RuntimeError
    if base and is_model_dir(explicit):
        return Resolved(explicit.resolve(), "local path")
    if guess is not None:
        return _named_here_or_parent(adapter, base, guess, settings, revision, local_dir)
    try:
        return resolve_source(
            base, settings, revision=revision, what="base model", hub=hub, allow_download=allow_download,
            local_dir=local_dir,
        )
    except ModelNotFoundError as exc:
        raise AdapterBaseNotFoundError(
            str(adapter.path), base, exc.looked_at,
            f"put the base model at one of those places (e.g. {parent}/ next to the adapter), run "
            "`modelfleet fetch` where the Hub is reachable, or set `base_model:` to a local directory.",
            offline_reason=exc.offline_reason,
        ) from None


def _named_here_or_parent(adapter: AdapterInfo, base: str, parent: Path, settings: Settings,
                          revision: str | None, local_dir: Path | None) -> Resolved:
    """The named base where it is local or cached (never the Hub), else the adapter's parent directory."""
    looked_at: list[str] = []
    if base:
        try:
            return resolve_source(base, settings, revision=revision, what="base model",
                                  hub=HubStatus(False, "not asked: the adapter's parent directory holds a model"),
                                  allow_download=False, local_dir=local_dir)
        except ModelNotFoundError as exc:
            looked_at = exc.looked_at
    log.info("adapter %s: base %s is not here; using its parent directory %s", adapter.path, base or "(unnamed)",
             parent)
    return Resolved(parent.resolve(), "adapter's parent directory", looked_at)


#: What PEFT puts before a base module's name in an adapter file's keys.
_PEFT_PREFIX = "base_model.model."
#: An adapter tensor kind -> (its axis, the base layer's attribute that axis must equal).
_LORA_AXES = {"lora_A": (1, "in_features"), "lora_B": (0, "out_features"),
              "lora_embedding_A": (1, "num_embeddings"), "lora_embedding_B": (0, "embedding_dim")}


def adapter_misfit(model: Any, adapter: Path, base: str, reason: str) -> AdapterMismatchError:
    """The error for an adapter that PEFT could not apply to `model` (which failed with `reason`), naming
    its first tensor that does not fit the base, where its safetensors file shows one. A weights file that
    is cut short is an UnreadableModelError (download it again), and one whose LoRA rank is not its
    adapter_config.json's `r` says so: neither was made for another model."""
    file = adapter / "adapter_model.safetensors"
    header = safetensors_header(file) if file.is_file() else {}
    rank = _rank_misfit(adapter, header)
    if rank is not None:
        return AdapterMismatchError(str(adapter), base, rank, fix=(
            "Its adapter_config.json and its weights are not of one adapter: save the adapter again, or "
            "correct `r` there."))
    return AdapterMismatchError(str(adapter), base, _first_misfit(model, header) or reason)


def _rank_misfit(adapter: Path, header: dict) -> str | None:
    """'<tensor> has rank <n>, but adapter_config.json has r=<r>' for the first LoRA tensor whose rank is not
    the config's (PEFT makes every layer of rank `r` unless `rank_pattern` says otherwise); None if all agree."""
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    if not isinstance(rank, int) or config.get("rank_pattern"):
        return None
    for key, meta in header.items():
        axis_attr = _lora_axis(key)[1]
        axis = 1 - axis_attr[0] if axis_attr is not None else None  # the rank: a LoRA matrix's other axis
        if axis is not None and len(meta["shape"]) == 2 and meta["shape"][axis] != rank:
            return (f"tensor {key} has rank {meta['shape'][axis]} (shape {meta['shape']}), but adapter_config.json "
                    f"has r={rank}")
    return None


def _lora_axis(key: str) -> tuple[str, tuple[int, str] | None]:
    """An adapter tensor's module name and its _LORA_AXES entry (None for a tensor that is not a LoRA matrix)."""
    module_name, _, rest = key.removeprefix(_PEFT_PREFIX).partition(".lora_")
    return module_name, _LORA_AXES.get("lora_" + rest.split(".")[0]) if rest else None


def _first_misfit(model: Any, header: dict) -> str | None:
    """'<tensor> has shape [..], but the base's <module> has <attribute>=<n>' for the adapter's first LoRA
    tensor that does not fit the base's layer (or names a layer the base lacks); None when all fit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, meta in header.items():
        module_name, axis_attr = _lora_axis(key)
        if axis_attr is None:
            continue
        try:
            layer = base.get_submodule(module_name)
        except AttributeError:
            return f"tensor {key} is for {module_name}, which the base does not have"
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        axis, attribute = axis_attr
        expected = getattr(layer, attribute, None)
        if expected is not None and meta["shape"][axis] != expected:
            return f"tensor {key} has shape {meta['shape']}, but the base's {module_name} has {attribute}={expected}"
    return None


#: A text model's decoder (and every model's lm_head) is reported as this part.
LANGUAGE_MODEL = "language_model"
#: LoRA's "B" matrices: zero from PEFT's initialisation until weights are loaded into them.
_LORA_B = ("lora_B", "lora_embedding_B")


def adapter_targets(model: Any, adapter_name: str, source: str = "") -> tuple[list[str], list[str]]:
    """The parts of the base that adapter `adapter_name` of PeftModel `model` changes, sorted, and
    warnings for the layers it was injected into but leaves unchanged.

    A part is a top-level submodule of the model's body (`model.`), by the model's own names: LLaVA's
    `language_model`, `vision_tower`, `multi_modal_projector`, Qwen2-VL's `visual`, Whisper's `encoder`
    and `decoder`; a decoder-only text model's body, and every head outside the body (`lm_head`),
    count as `language_model`. A LoRA layer whose B matrices are all zero changes nothing: its
    weights were not in the file or matched no module (a base whose modules were renamed), or it was
    never trained (as the last CLIP layer of a LLaVA that reads the one before). Such layers are a
    warning; an adapter that changes nothing at all is an UnsupportedModelError.
    """
    changed: set[str] = set()
    injected, idle = 0, []
    for name, part, module in _tuner_layers(model):
        if not _holds(module, adapter_name):
            continue
        injected += 1
        if _changes(module, adapter_name):
            changed.add(part)
        else:
            idle.append(name)
    if injected and not changed:
        raise UnsupportedModelError(
            source,
            f"adapter {source!r} changes nothing in its base: all {injected} of the layers it targets kept "
            "zero LoRA weights (its weight names match no module of this base: was it trained on another "
            "architecture, or another transformers version's module names?)",
        )
    warnings = []
    if idle:
        shown = ", ".join(idle[:3]) + (f" and {len(idle) - 3} more" if len(idle) > 3 else "")
        warnings.append(f"adapter {adapter_name!r}: {len(idle)} of its {injected} layers change nothing "
                        f"(zero LoRA weights: untrained, or not in its file): {shown}")
        log.warning("%s", warnings[-1])
    return sorted(changed), warnings


def adapted_parts(model: Any) -> set[str]:
    """The parts of a PeftModel's base (as in `adapter_targets`) that hold layers of any adapter."""
    return {part for _, part, _ in _tuner_layers(model)}


def _tuner_layers(model: Any) -> Iterator[tuple[str, str, Any]]:
    """(module name, part, module) of each PEFT tuner layer (LoRA or other) in a PeftModel's base."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    body = getattr(base, "model", None)
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, _part(name, body), module


def _holds(module: Any, adapter_name: str) -> bool:
    return any(adapter_name in getattr(module, attr, {}) for attr in module.adapter_layer_names)


def _changes(module: Any, adapter_name: str) -> bool:
    """False only for a LoRA layer whose B matrices are zero; other tuners are taken to change their layer."""
    found = [getattr(module, attr)[adapter_name] for attr in _LORA_B if adapter_name in getattr(module, attr, {})]
    if not found:
        return True
    return any(bool(_tensor(b).detach().abs().amax() > 0) for b in found)


def _tensor(holder: Any) -> Any:
    return holder.weight if hasattr(holder, "weight") else holder


def _part(name: str, body: Any) -> str:
    if body is None or not name.startswith("model.") or hasattr(body, "layers"):
        return LANGUAGE_MODEL  # a head outside the body, or a decoder-only text model
    return name.removeprefix("model.").split(".")[0]
