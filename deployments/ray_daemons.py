"""Ray's processes that no request passes through run at a low CPU priority on every node with a replica.

Why: on a CPU node, a model's forward runs on every core, and its threads meet at a barrier after each
operation, so any process that wakes on a core delays the whole forward by its burst (bench/IDLE.md: 0.2 of
a core of 1 ms bursts made SmolLM2's chat 1.22x slower in-process; the same bursts at nice 19 made it 1.06x).
Ray's dashboard (with its module processes), log monitor and dashboard agent wake every few ms at rest and
serve no request; at nice 19 they run on what the serving processes leave, and they still get it at rest.

The Serve controller goes to 15 at most (Ray's worker_niceness, where Ray itself puts every worker; serve.env
sets that to 0 so that HAProxy and the replicas' event loops are not below the inference threads): lower, a
starved controller would health-check and scale late. Left at their priority: the raylet (replicas it starts
would inherit a lower one and could not raise it back), the GCS, HAProxy's manager (HAProxy is started from
it), and the HTTP proxy actor unless HAProxy serves the HTTP port (then the actor is only HAProxy's backup).

Setting: MODELFLEET_RAY_DAEMONS_NICE (serve.env; 19 when unset, 0 leaves every process as it is).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

NICE_SETTING = "MODELFLEET_RAY_DAEMONS_NICE"
DEFAULT_NICE = 19

# process kind -> a part of one of its first four arguments that only that kind has (Ray renames some)
OFF_PATH_DAEMONS: dict[str, str] = {
    "dashboard": "ray/dashboard/dashboard.py",
    "dashboard module": "ray-dashboard-",  # the dashboard's subprocess modules (ray-dashboard-NodeHead-0, ...)
    "dashboard module forkserver": "ray.dashboard.subprocesses.module",  # a module restarted comes from it
    "dashboard agent": "ray::DashboardAgent",
    "log monitor": "ray/_private/log_monitor.py",
    "autoscaler monitor": "ray/autoscaler/_private/monitor.py",
    "serve controller": "ray::ServeController",
}
# the HTTP proxy actor, only while HAProxy answers the HTTP port (RAY_SERVE_ENABLE_HA_PROXY=1)
HTTP_PROXY_ACTOR = "ray::ProxyActor"
# kind -> the lowest priority it is given whatever the setting: the Serve controller at Ray's own worker_niceness
# (15), where Ray puts it by default; lower, on a loaded node it would health-check and scale late
MOST_NICE: dict[str, int] = {"serve controller": 15}


def configured_nice(environ: Mapping[str, str] | None = None) -> int:
    """The nice value from MODELFLEET_RAY_DAEMONS_NICE; a bad value names itself and the range."""
    text = (os.environ if environ is None else environ).get(NICE_SETTING, "").strip()
    if not text:
        return DEFAULT_NICE
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise ValueError(f"{NICE_SETTING}={text!r} is not a nice value from 0 (leave Ray's processes as they are) "
                         f"to 19 (the lowest priority, the default)")
    return value


def daemon_markers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """kind -> marker of every process this node's pass lowers."""
    markers = dict(OFF_PATH_DAEMONS)
    if (os.environ if environ is None else environ).get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1":
        markers["http proxy actor"] = HTTP_PROXY_ACTOR
    return markers


@dataclass
class Lowered:
    """What one pass found: kind -> pids whose threads now run at the nice value (the controller at 15 at most)."""

    nice: int
    processes: dict[str, list[int]] = field(default_factory=dict)

    def __str__(self) -> str:
        found = ", ".join(f"{kind} {len(pids)}" for kind, pids in sorted(self.processes.items())) or "none found"
        return f"Ray's off-path processes at nice {self.nice}: {found}"


def kind_of(pid: int | str, markers: Mapping[str, str], proc: str = "/proc") -> str | None:
    """The kind whose marker is in one of the process's first four arguments, if any (OSError if it ended)."""
    with open(f"{proc}/{pid}/cmdline", "rb") as f:
        arguments = f.read().decode(errors="replace").split("\0")[:4]
    return next((kind for kind, marker in markers.items() if any(marker in a for a in arguments)), None)


def _lower_threads(pid: str, nice: int, proc: str) -> None:
    """Every thread of `pid` to at least `nice` (nice is per thread on Linux; new threads inherit their
    creator's). Raising a process's own nice needs no privilege; lowering it would, so none is lowered."""
    for tid in os.listdir(f"{proc}/{pid}/task"):
        if os.getpriority(os.PRIO_PROCESS, int(tid)) < nice:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def lower_off_path_daemons(nice: int | None = None, environ: Mapping[str, str] | None = None,
                           proc: str = "/proc") -> Lowered:
    """One pass over this node's processes of this user: Ray's off-path daemons to `nice`. Idempotent (every
    replica of the node runs it when it starts); a process that ends meanwhile, or that the user may not
    change, is skipped."""
    nice = configured_nice(environ) if nice is None else nice
    result = Lowered(nice)
    if nice <= 0 or not os.path.isdir(proc):
        return result
    markers = daemon_markers(environ)
    uid = os.getuid()
    for pid in os.listdir(proc):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if os.stat(f"{proc}/{pid}").st_uid != uid:
                continue
            kind = kind_of(pid, markers, proc)
            if kind is None:
                continue
            _lower_threads(pid, min(nice, MOST_NICE.get(kind, nice)), proc)
            result.processes.setdefault(kind, []).append(int(pid))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return result


def lower_at_replica_start() -> None:
    """Called from each replica's constructor; never fails a replica (a bad setting is logged)."""
    try:
        log.info("%s", lower_off_path_daemons())
    except (ValueError, OSError) as e:
        log.warning("Ray's daemons keep their priority: %s", e)
