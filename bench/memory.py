"""Resident memory of process trees, sampled from /proc: the peak per phase of each watched process plus its
descendants (a `serve run` and the Ray cluster it starts, a peer server and its workers). Used by
bench/hostile.py and bench/real_model.py."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, session id) of a process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[3])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int, parents: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def mem_available_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


def find_serve_actors(session: int) -> dict[str, int]:
    """Serve controller and HTTP proxy actors of *this* `serve run` (other Ray clusters may share the machine)."""
    found = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is None or stat[1] != session:
            continue
        cmd = _cmdline(pid)
        if cmd.startswith("ray::ServeController"):
            found["controller"] = pid
        elif cmd.startswith("ray::ProxyActor"):
            found["proxy"] = pid
    return found


class Sampler(threading.Thread):
    """Every `interval` s: VmRSS (kB) of each watched process plus its descendants, the peak per phase."""

    def __init__(self, pids: dict[str, int], interval: float = 0.05):
        super().__init__(daemon=True, name="rss-sampler")
        self.pids, self.interval = pids, interval
        self.phase = "startup"
        self.peaks: dict[str, dict[str, dict[str, int]]] = {}  # phase -> process -> {VmRSS, RssAnon, ...} peaks
        self.series: dict[str, dict[str, list[int]]] = {}  # phase -> process -> VmRSS samples (kB)
        self.min_available: dict[str, int] = {}  # phase -> lowest MemAvailable (kB) of the machine
        self.samples: dict[str, int] = {}
        self.timeline: list[tuple[float, str, dict[str, int]]] = []  # (s since start, phase, process -> VmRSS kB)
        self.started = time.monotonic()
        self.children: dict[str, list[int]] = {name: [] for name in pids}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def _refresh_children(self) -> None:
        parents = {}
        for pid in _all_pids():
            stat = _stat(pid)
            if stat is not None:
                parents[pid] = stat[0]
        self.children = {name: _descendants(pid, parents) for name, pid in self.pids.items()}

    def run(self) -> None:
        last_refresh = 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            if now - last_refresh > 2.0:
                self._refresh_children()
                last_refresh = now
            readings = {}
            for name, pid in self.pids.items():
                total: dict[str, int] = {}
                for p in [pid, *self.children.get(name, [])]:
                    for key, kb in _status_kb(p).items():
                        total[key] = total.get(key, 0) + kb
                if total:
                    readings[name] = total
            available = mem_available_kb()
            with self._lock:
                phase = self.phase
                peaks = self.peaks.setdefault(phase, {})
                series = self.series.setdefault(phase, {})
                for name, total in readings.items():
                    peak = peaks.setdefault(name, {})
                    for key, kb in total.items():
                        peak[key] = max(peak.get(key, 0), kb)
                    series.setdefault(name, []).append(total.get("VmRSS", 0))
                self.min_available[phase] = min(self.min_available.get(phase, available), available)
                self.timeline.append((round(now - self.started, 2), phase,
                                      {n: t.get("VmRSS", 0) for n, t in readings.items()}))
                self.samples[phase] = self.samples.get(phase, 0) + 1
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - now)))

    def peak_mb(self, phase: str, name: str, key: str = "VmRSS") -> float | None:
        kb = self.peaks.get(phase, {}).get(name, {}).get(key)
        return round(kb / 1024, 1) if kb else None

    def start_mb(self, phase: str, name: str) -> float | None:
        """RSS as the phase began: its first sample (what a request alone grew from)."""
        values = self.series.get(phase, {}).get(name)
        return round(values[0] / 1024, 1) if values else None

    def median_mb(self, phase: str, name: str) -> float | None:
        values = self.series.get(phase, {}).get(name)
        return round(statistics.median(values) / 1024, 1) if values else None
