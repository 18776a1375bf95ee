"""Exceptions raised while finding and loading a model.

Every message names the bad value and the fix. The serving layer maps these classes (never
their text) to HTTP status codes, so each carries the facts it needs as attributes.
"""

from __future__ import annotations


def _rebuild(cls: type, args: tuple, kwargs: dict) -> Exception:
    return cls(*args, **kwargs)


def short_error(exc: BaseException) -> str:
    """One line for a failure: its first line and, where that only introduces the details ("Error(s) in
    loading state_dict for X:"), the first detail line after it (torch adds lines to a CUDA error on
    CUDA_LAUNCH_BLOCKING and TORCH_USE_CUDA_DSA)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}"


class PicklableError(Exception):
    """An exception that survives pickling whatever its __init__ signature.

    Errors cross process boundaries (Ray pickles them from a replica to the ingress), and
    Exception's default pickling calls __init__ with the message alone.
    """

    _init: tuple[tuple, dict]  # the constructor's arguments, for __reduce__

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls, *args)
        self._init = (args, kwargs)
        return self

    def __reduce__(self):
        return _rebuild, (type(self), *self._init)


class LoadingError(PicklableError):
    """Base class: something about a model could not be found or loaded."""

    #: whether retrying the same load can succeed without a change by the operator
    permanent: bool = True


class ModelNotFoundError(LoadingError):
    """The model is not local, not cached, and cannot be downloaded."""

    def __init__(self, source: str, looked_at: list[str], fix: str, *, offline_reason: str | None = None):
        self.source = source
        self.looked_at = list(looked_at)
        self.fix = fix
        self.offline_reason = offline_reason
        where = "\n".join(f"  - {place}" for place in looked_at)
        offline = f"\nHub access: {offline_reason}" if offline_reason else ""
        super().__init__(f"Model {source!r} was not found. Looked at:\n{where}{offline}\nFix: {fix}")


class AdapterBaseNotFoundError(ModelNotFoundError):
    """An adapter-only directory whose base model is nowhere to be found."""

    def __init__(self, adapter: str, base: str, looked_at: list[str], fix: str, *, offline_reason: str | None = None):
        self.adapter = adapter
        self.base = base
        super().__init__(base, looked_at, fix, offline_reason=offline_reason)
        self.args = (f"Adapter {adapter!r} needs base model {base!r}, which was not found. {self.args[0]}",)


class UnsupportedModelError(LoadingError):
    """The model's config does not belong to the family it was asked for, or to any family."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(message)


class AdapterMismatchError(LoadingError):
    """An adapter whose weights do not fit its base (another model, or another size of it): no load
    strategy can change that, so it is one error, not a failed strategy."""

    ANOTHER_MODEL = ("It was made for another model (or another size of it): check base_model_name_or_path in its "
                     "adapter_config.json, or set `base_model:` to the model it was trained on.")

    def __init__(self, adapter: str, base: str, detail: str, fix: str = ANOTHER_MODEL):
        self.adapter = adapter
        self.base = base
        self.detail = detail
        super().__init__(f"Adapter {adapter!r} cannot be applied to its base model {base!r}: {detail}. {fix}")


class UnreadableModelError(LoadingError):
    """The model's files are there but cannot be read: a truncated download, a git-lfs pointer where a
    weight file should be, a corrupt GGUF, a config transformers cannot parse."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(message)


class AllStrategiesFailedError(LoadingError):
    """Every placement/quantization strategy failed; `attempts` holds (strategy, reason) pairs."""

    def __init__(self, source: str, attempts: list[tuple[str, str]]):
        self.source = source
        self.attempts = list(attempts)
        steps = "\n".join(f"  - {name}: {reason}" for name, reason in attempts)
        super().__init__(f"Could not load {source!r} with any strategy:\n{steps}")


class ModelLoadingInProgress(LoadingError):
    """The model is still loading; the caller may retry after `retry_after_s`."""

    permanent = False

    def __init__(self, name: str, phase: str, progress: float | None, retry_after_s: float):
        self.name = name
        self.phase = phase
        self.progress = progress
        self.retry_after_s = retry_after_s
        pct = f" ({progress:.0%})" if progress is not None else ""
        super().__init__(f"Model {name!r} is still loading: {phase}{pct}. Retry in {retry_after_s:.0f} s.")


class ModelLoadFailed(LoadingError):
    """The model failed to load earlier; the failure is sticky until the operator fixes it."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"Model {name!r} failed to load and will not be retried: {reason}")


class NoDeviceError(LoadingError):
    """The configured device does not exist in this process (e.g. device: cuda without a GPU)."""
