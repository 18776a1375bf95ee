"""CPU replicas on one node compute in turns: one model forward at a time.

Each replica's torch threads spin at every barrier while they wait for each other. Two replicas
computing at once on the same cores therefore do not share them: each one's threads keep stalling
the other's at every operation, and both slow down far more than twice (bench/CPU_TURNS.md). Taking
turns, each forward runs on all the cores alone, and the node does as much work as one replica would.

The decode loop takes a turn per forward of a batch; a whole model call (Whisper's or LLaVA's
`generate`, a VITS synthesis) takes one per forward of the model and of its encoder, so a long
transcription does not keep the LLM's steps waiting until it ends.
Only forwards on more than one thread take turns (deployments/threads.py): a one-thread forward has
no threads spinning at a barrier, and waiting for the LLM's steps would only slow a tiny model's
many small forwards.

The turn is an exclusive `flock` on a file every replica of the node opens: the kernel releases it
when its holder exits or dies, so a killed replica never leaves the node locked. With `share_time`, who
goes next is decided by the seconds each replica has computed (turn_shares.py); without, by the
order the kernel wakes the waiters.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .turn_shares import TurnShares

logger = logging.getLogger(__name__)


def default_path() -> Path:
    """A file the node's processes share: /dev/shm (memory, per host or container) where there is one.
    Per user: another user's file would not open for writing (Ray runs a cluster's workers as one)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"modelfleet-cpu-turns-{os.getuid()}.lock"


class CpuTurns:
    """The node's turn to compute, taken around each forward of this process's models."""

    def __init__(self, path: Path | None = None, share_time: bool = True, weight: float = 1.0):
        self.path = Path(path) if path is not None else default_path()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self.shares: TurnShares | None = None
        if share_time:
            try:
                self.shares = TurnShares(self._fd, self._lock, self._unlock, weight)
            except (OSError, ValueError) as exc:  # no table (a full one, a file that cannot be mapped)
                logger.warning("cpu_turns in wake order in this replica: %s has no room for its share (%s)",
                               self.path, exc)
        self._depth = 0  # a call inside a call (one thread) holds the one turn
        self._owner: int | None = None
        self._mutex = threading.Lock()  # the turn is the process's: its threads take it one at a time
        self._local = threading.local()  # each_forward's switch, per thread
        self._hooked: weakref.WeakSet = weakref.WeakSet()  # modules whose forwards can take turns
        self.turns = 0
        self.waited_s = 0.0
        self._since = 0.0  # when the held turn began

    def _acquire(self) -> None:
        me = threading.get_ident()
        if self._owner == me:  # a forward inside a held call (an encoder inside the model's forward)
            self._depth += 1
            return
        started = time.perf_counter()
        self._mutex.acquire()
        try:
            if self.shares is not None:
                self.shares.take()
            else:
                self._lock()
        except BaseException:
            self._mutex.release()
            raise
        self._since = time.perf_counter()
        self.waited_s += self._since - started
        self.turns += 1
        self._owner, self._depth = me, 1

    def _release(self) -> None:
        if self._owner != threading.get_ident():
            return
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            if self.shares is not None:
                self.shares.give(time.perf_counter() - self._since)
            else:
                self._unlock()
            self._mutex.release()

    def _lock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """One turn for the whole block (the decode loop's forward of a batch)."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def each_forward(self, model: Any) -> Iterator[None]:
        """Within the block, each forward of `model` (and of its encoder) on this thread takes a turn of
        its own: a call that runs many, such as `generate`, lets the node's other replicas compute
        between its steps rather than after its last one."""
        self._hook(model)
        self._local.armed = True
        try:
            yield
        finally:
            self._local.armed = False
            while self._owner == threading.get_ident():  # a forward that never reached its end hook
                self._release()

    def _hook(self, model: Any) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT runs the base's forward
        encoder = base.get_encoder() if hasattr(base, "get_encoder") else None  # generate runs it apart
        for module in (base, encoder):
            if module is None or module in self._hooked:
                continue
            module.register_forward_pre_hook(lambda *_: self._acquire() if self._armed() else None)
            module.register_forward_hook(lambda *_: self._release() if self._armed() else None, always_call=True)
            self._hooked.add(module)

    def _armed(self) -> bool:
        return getattr(self._local, "armed", False)

    def status(self) -> dict:
        status: dict = {"path": str(self.path), "turns": self.turns, "waited_s": round(self.waited_s, 3)}
        if self.shares is not None:  # by time: seconds computed in turns, and the turns that let a rival go first
            status.update(computed_s=round(self.shares.computed_s, 3), weight=self.shares.weight,
                          deferrals=self.shares.deferrals, deferred_s=round(self.shares.deferred_s, 3))
        return status


def node_turns(share_time: bool = True, weight: float = 1.0) -> CpuTurns | None:
    """The node's turns for this replica, or None (with a warning) where the file cannot be opened:
    the replica then computes without them rather than failing its requests."""
    try:
        return CpuTurns(share_time=share_time, weight=weight)
    except OSError as exc:
        logger.warning("cpu_turns off in this replica: %s cannot be opened (%s)", default_path(), exc)
        return None
