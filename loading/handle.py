"""A model that loads once, in the background or on first use, and tells how far it got.

States: not_loaded -> loading (phase, progress) -> ready | failed (sticky, with the reason).
However many callers arrive while it loads, the load runs once; each caller waits up to its own
timeout. A failure stays visible and is not retried in a loop: `reload()` is the operator's call.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from .errors import LoadingError, ModelLoadFailed, ModelLoadingInProgress
from .report import LoadedModel

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelHandle:
    def __init__(self, name: str, load: Callable[[Callable[[str, float | None], None]], LoadedModel]):
        """`load(progress)` does the work; `progress(phase, fraction)` reports how far it got."""
        self.name = name
        self._load = load
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._state = State.NOT_LOADED
        self._phase = ""
        self._progress: float | None = None
        self._loaded: LoadedModel | None = None
        self._error: str | None = None
        self._started_at: float | None = None
        self._finished_at: float | None = None
        self.load_count = 0  # how many times the loader actually ran (tests assert it is 1)

    # -- starting -------------------------------------------------------------------------------
    def start(self) -> bool:
        """Begin loading in a background thread; False if it is already loading, ready or failed."""
        with self._lock:
            if self._state is not State.NOT_LOADED:
                return False
            self._begin()
        threading.Thread(target=self._run, name=f"load-{self.name}", daemon=True).start()
        return True

    def _begin(self) -> None:
        self._state, self._phase, self._progress = State.LOADING, "starting", 0.0
        self._started_at, self._done = time.monotonic(), threading.Event()

    def _on_progress(self, phase: str, fraction: float | None = None) -> None:
        self._phase, self._progress = phase, fraction

    def _run(self) -> None:
        self.load_count += 1
        try:
            loaded = self._load(self._on_progress)
        except BaseException as exc:  # BaseException too (a Rust panic from tokenizers is one): never stuck loading
            reason = str(exc) if isinstance(exc, LoadingError) else f"{type(exc).__name__}: {exc}"
            log.error("model %s failed to load: %s", self.name, reason)
            with self._lock:
                self._state, self._error, self._finished_at = State.FAILED, reason, time.monotonic()
        else:
            with self._lock:
                self._state, self._loaded, self._finished_at = State.READY, loaded, time.monotonic()
                self._phase, self._progress = "ready", 1.0
        finally:
            self._done.set()

    # -- using ----------------------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> LoadedModel:
        """The loaded model, starting a lazy load if needed and waiting up to `timeout` seconds.

        Raises ModelLoadingInProgress when the wait times out, ModelLoadFailed if loading failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.start()
            with self._lock:  # one consistent view: a reload() may run between any two reads
                state, loaded, error, done = self._state, self._loaded, self._error, self._done
            if state is State.READY and loaded is not None:
                return loaded
            if state is State.FAILED:
                raise ModelLoadFailed(self.name, error or "unknown error")
            # loading, or reloaded since start(): wait for this load, then look again
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if state is State.LOADING and not done.wait(remaining):
                raise ModelLoadingInProgress(self.name, self._phase, self._progress, self.retry_after_s())
            if deadline is not None and time.monotonic() >= deadline and state is not State.LOADING:
                raise ModelLoadingInProgress(self.name, self._phase, self._progress, self.retry_after_s())

    def retry_after_s(self) -> float:
        """A hint for clients: a few seconds, longer once a load has been running a while."""
        elapsed = time.monotonic() - (self._started_at or time.monotonic())
        return float(min(30, max(2, round(elapsed / 4))))

    def reload(self) -> None:
        """Forget a failure (or a loaded model) so that the next start() loads again."""
        with self._lock:
            if self._state is State.LOADING:
                return
            self._state, self._loaded, self._error = State.NOT_LOADED, None, None

    @property
    def state(self) -> State:
        return self._state

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    def status(self) -> dict:
        """JSON-ready summary for /health."""
        info: dict = {"state": self._state.value}
        if self._state is State.LOADING:
            info.update(phase=self._phase, progress=self._progress,
                        loading_for_s=round(time.monotonic() - (self._started_at or time.monotonic()), 1))
        if self._state is State.FAILED:
            info["error"] = self._error
        if self._loaded is not None:
            report = self._loaded.report
            info.update(device=report.device, loading_strategy=report.strategy, dtype=report.dtype,
                        load_seconds=report.load_seconds)
            if report.adapter_targets:
                info["adapter_targets"] = report.adapter_targets
            if report.kernels:
                info["kernels"] = report.kernels
        return info
