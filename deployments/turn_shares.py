"""Who takes the node's CPU turn next: the replica that has computed least, as CFS does for threads.

Turns taken one forward each, in the order the kernel wakes the waiters, share the node by forwards and
not by time: SmolLM2's 16-row decode steps alternated with a whisper-base decoder's one-row steps, several
times shorter, and the STT kept 28-31% of its rate alone against the LLM's 62-66% (bench/CPU_TURNS.md).
Here each replica counts the seconds it has computed in turns (divided by its weight), and before a
forward, one that is ahead of a rival by more than `QUANTUM_S` lets the rival go first. A rival is a
replica waiting for or holding the turn, or one that released it within `ACTIVE_S` (between two
forwards of one call). A replica that was idle starts level with the least-served active rival, so
idleness banks no credit.

The table is mapped from the turn's lock file, a slot per process (pid, seconds computed, when it began
waiting or holding, when it last released); only its owner writes a slot. Reads race with writes on
purpose: the table only decides who waits a few ms, the lock alone decides who computes, and a deferral
ends after `MAX_DEFER_S`, so a stale or dead rival cannot stall anyone.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable

import numpy as np

SLOTS = 64
SLOT = np.dtype([("pid", "<i8"), ("computed", "<f8"), ("active_since", "<f8"), ("released", "<f8")])
QUANTUM_S = 0.005  # a lead below this is noise: no deferral for it
ACTIVE_S = 0.02  # released this recently: a rival between two forwards of one call
STALE_S = 5.0  # waiting or holding longer than this: a slot its owner left without a release
MAX_DEFER_S = 0.5  # the longest one forward waits for rivals that are behind
POLL_S = 0.001


class TurnShares:
    """This process's slot in the node's table, and the rule that decides whether it goes first."""

    def __init__(self, fd: int, lock: Callable[[], None], unlock: Callable[[], None], weight: float = 1.0):
        size = SLOTS * SLOT.itemsize
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)  # an older, empty lock file (growing only: no one's slots move)
        self._map = mmap.mmap(fd, size)
        self.table = np.frombuffer(self._map, dtype=SLOT, count=SLOTS)
        self._lock, self._unlock = lock, unlock
        self.weight = weight  # a share of the node's time against the others' weights
        self.me = self._claim()
        self.deferrals = 0
        self.deferred_s = 0.0
        self.computed_s = 0.0  # seconds held by this process (the table keeps them divided by the weight)

    def _claim(self) -> int:
        """A slot for this process: a free one, or one whose process is gone (under the lock)."""
        pid = os.getpid()
        self._lock()
        try:
            pids = self.table["pid"]
            mine = np.flatnonzero(pids == pid)  # another CpuTurns of this process: one process, one share
            if len(mine):
                return int(mine[0])
            for i in range(SLOTS):
                if pids[i] == 0 or not _alive(int(pids[i])):
                    self.table[i] = (pid, self._floor(time.monotonic(), skip=i), 0.0, 0.0)
                    return i
        finally:
            self._unlock()
        raise OSError(f"all {SLOTS} slots of the node's CPU turn table are taken by live processes")

    def _rivals(self, now: float, skip: int) -> np.ndarray:
        """Slots other than `skip` whose process is waiting for, holding or just done with a turn."""
        table = self.table
        active = (table["pid"] != 0) & (((table["active_since"] > 0) & (now - table["active_since"] < STALE_S))
                                        | (now - table["released"] < ACTIVE_S))
        active[skip] = False
        return active

    def _floor(self, now: float, skip: int) -> float:
        """The least computed among active rivals (0 with none): where an idle process starts again."""
        active = self._rivals(now, skip)
        return float(self.table["computed"][active].min()) if active.any() else 0.0

    def _ahead(self, now: float) -> bool:
        behind = self._rivals(now, self.me) & (self.table["computed"] + QUANTUM_S < self.table["computed"][self.me])
        if not behind.any():
            return False
        return any(_alive(int(pid)) for pid in self.table["pid"][behind])

    def take(self) -> None:
        """Take the node's lock, first letting go every rival that has computed less (for up to MAX_DEFER_S)."""
        slot = self.table[self.me : self.me + 1]
        now = started = time.monotonic()
        if now - float(slot["released"][0]) > ACTIVE_S:  # idle until now: start level, with no credit
            slot["computed"] = max(float(slot["computed"][0]), self._floor(now, self.me))
        slot["active_since"] = now
        deferred = locked = False
        try:
            while True:
                if not (self._ahead(now) and now - started < MAX_DEFER_S):
                    self._lock()
                    locked, now = True, time.monotonic()
                    if not (self._ahead(now) and now - started < MAX_DEFER_S):  # a rival took no turn yet
                        break
                    self._unlock()
                    locked = False
                deferred = True
                time.sleep(POLL_S)
                now = time.monotonic()
        except BaseException:
            if locked:
                self._unlock()
            slot["active_since"] = 0.0
            raise
        if deferred:
            self.deferrals += 1
            self.deferred_s += now - started
        slot["active_since"] = now

    def give(self, held_s: float) -> None:
        """Count a turn held for `held_s` and release the lock."""
        slot = self.table[self.me : self.me + 1]
        slot["computed"] += held_s / self.weight
        self.computed_s += held_s
        slot["released"] = time.monotonic()
        slot["active_since"] = 0.0
        self._unlock()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
