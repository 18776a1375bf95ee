"""How many threads torch computes with in a replica, per model.

The replica's count (`torch_threads`, else its whole CPUs, else the node's cores) goes to the
environment before torch is imported. A small CPU model then computes on one thread: splitting its
operations saves nothing, and torch's OpenMP threads spin after every operation, which on a small
machine takes the cores the ingress and the other families need (bench/THREADS.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from loading import LoadedModel

from .cpu_turns import CpuTurns, node_turns
from .options import FamilyOptions


class ComputeThreads:
    def __init__(self, options: FamilyOptions):
        self.threads = replica_threads(options)
        self.explicit = options.torch_threads is not None
        self.single_below = options.single_thread_below_params
        # shared with the node's other replicas
        self.turns = (node_turns(options.cpu_turns_share_time, options.cpu_turn_weight) if options.cpu_turns
                      else None)

    def for_model(self, loaded: LoadedModel) -> int:
        parameters = loaded.report.parameters
        if self.explicit or loaded.device != "cpu" or parameters is None:
            return self.threads
        return 1 if parameters < self.single_below else self.threads

    def use(self, loaded: LoadedModel) -> None:
        """Before a call of `loaded`, on the inference thread (torch's count is process-wide)."""
        torch = sys.modules.get("torch")
        threads = self.for_model(loaded)
        if torch is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def _turns_for(self, loaded: LoadedModel) -> CpuTurns | None:
        """The node's turns where `loaded` takes them: forwards on the CPU with more than one thread,
        whose threads spin at each barrier. A one-thread model's forward runs at once: made to wait for
        an LLM step before each of its own small forwards, the demo's tiny Whisper and VITS took 3.6 s
        instead of 1.6 s to answer a voice turn at 8 sessions (bench/CPU_TURNS.md)."""
        return self.turns if loaded.device == "cpu" and self.for_model(loaded) > 1 else None

    @contextmanager
    def computing(self, loaded: LoadedModel) -> Iterator[None]:
        """Around one forward of `loaded` on the inference thread: its threads, and the node's turn."""
        self.use(loaded)
        turns = self._turns_for(loaded)
        with turns.hold() if turns is not None else nullcontext():
            yield

    @contextmanager
    def calling(self, loaded: LoadedModel) -> Iterator[None]:
        """Around a whole call of `loaded` (generate, a synthesis): its threads, and a turn for each
        forward it runs."""
        self.use(loaded)
        turns = self._turns_for(loaded)
        with turns.each_forward(loaded.model) if turns is not None else nullcontext():
            yield


def replica_threads(options: FamilyOptions) -> int:
    """Set the threads torch will use in this replica (it is imported later, by the first load), and
    return how many. Ray sets OMP_NUM_THREADS to the replica's whole CPUs, 1 for a fraction."""
    threads = options.torch_threads or (int(options.num_cpus) if options.num_cpus >= 1 else node_cores())
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    if "torch" in sys.modules:  # already imported (in tests, or by another model family in-process)
        sys.modules["torch"].set_num_threads(threads)
    return threads


def node_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
