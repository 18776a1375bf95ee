"""Untrusted media decoded in worker processes: a decoder's crash or hang costs one request, never the ingress.

libsndfile and ffmpeg (through PyAV) are C parsers fed bytes from the internet. In a thread of the ingress,
one segfault ended the ingress replica and every request it held (fuzzing found one in PyAV's conversion,
since refused before it runs), and a decoder that never returned held one of `limits.media_workers` turns
for good: a thread cannot be stopped. Here each task runs in a worker process that does nothing else. A
worker that dies during a task, or overruns the task's deadline, fails that task alone (WorkerCrashed,
WorkerTimedOut) and is replaced; the other workers and their requests go on.

The protocol is pickles over two pipes, large buffers out of band (`send_message`, `receive_message`): tasks
by name from the worker's registry (`decode_worker.py`), results as values, errors as (class name, message),
and nothing but plain data and numpy arrays is unpickled from a process that has parsed hostile bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BUFFERS = 64  # parts of one message: a pickle and the buffers it holds out of band
PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size
WORKER_MODULE = "deployments.decode_worker"
_REPO = Path(__file__).resolve().parents[1]  # where `deployments` is importable from


class WorkerCrashed(RuntimeError):
    """The worker process ended while it ran the task (a signal, or an exit)."""

    def __init__(self, returncode: int | None):
        self.returncode = returncode
        if returncode is not None and returncode < 0:
            try:
                how = f"signal {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"signal {-returncode}"
        else:
            how = f"exit status {returncode}"
        self.how = how
        super().__init__(f"the worker process ended ({how}) while it ran the task")


class WorkerTimedOut(RuntimeError):
    """The task ran past its deadline; its worker was killed."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        super().__init__(f"the task ran longer than {seconds:g} s and its worker was stopped")


class WorkerOutOfMemory(RuntimeError):
    """The task needed more memory than its worker may hold (`setting`, `limit_mb`); the worker was replaced."""

    def __init__(self, setting: str, limit_mb: int):
        self.setting, self.limit_mb = setting, limit_mb
        super().__init__(f"the task needed more than {setting}={limit_mb} MB and was stopped")


class WorkerError(RuntimeError):
    """The task raised an exception the caller did not list in `errors`: its class name and message."""

    def __init__(self, name: str, message: str):
        self.name = name
        super().__init__(f"{name}: {message}")


class _Worker:
    """One child process and its two pipes."""

    def __init__(self, memory_limit_mb: int | None = None) -> None:
        task_r, self._task_w = os.pipe()
        self._result_r, result_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH", "")) if p)
        env["OMP_NUM_THREADS"] = "1"  # a decoder needs no thread pool of its own
        try:
            limit = [] if memory_limit_mb is None else [str(memory_limit_mb)]
            self.process = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, str(task_r), str(result_w), *limit],
                                            pass_fds=(task_r, result_w), stdin=subprocess.DEVNULL, env=env,
                                            close_fds=True)
        finally:
            os.close(task_r)
            os.close(result_w)
        for fd in (self._task_w, self._result_r):  # decoded audio is MBs: fewer, larger pipe transfers
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        # an upload larger than the pipe is written as the worker reads it: without blocking, so that a worker that
        # stopped reading holds the task to its deadline, not for good
        os.set_blocking(self._task_w, False)
        # a worker dropped without stop() (its pool garbage-collected) still ends, and its pipes close
        self._finalizer = weakref.finalize(self, _end, self.process, (self._task_w, self._result_r))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, task: str, args: tuple, timeout_s: float) -> tuple:
        """Send one task and wait for its answer, at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s

        def wait(readable: list[int], writable: list[int]) -> None:
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(readable, writable, [], left)[:2]):
                raise WorkerTimedOut(timeout_s)

        try:
            send_message(self._task_w, (task, args), lambda: wait([], [self._task_w]))
            return receive_message(self._result_r, _DataUnpickler, lambda: wait([self._result_r], []))
        except (BrokenPipeError, EOFError):
            raise WorkerCrashed(self._returncode()) from None

    def _returncode(self) -> int | None:
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Kill the process (it holds nothing worth a graceful end) and close the pipes."""
        self._finalizer()


def _end(process: subprocess.Popen, fds: tuple[int, ...]) -> None:
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _DataUnpickler(pickle.Unpickler):
    """Answers hold plain values and numpy arrays: no other class is looked up (a worker has parsed hostile
    bytes; a pickle naming any class could run it here)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "numpy" or module.startswith("numpy."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a media worker's answer named {module}.{name}")


# -- the protocol: a count, the lengths, a pickle and its out-of-band buffers (pickle protocol 5) -----------
# An upload and decoded samples (MBs) travel as raw buffers, outside the pickle: no copy into it or out of it
# (10 minutes of audio: 240 -> 140 ms in all, against 70 in a thread).

def send_message(fd: int, value: Any, wait: Callable[[], None] | None = None) -> None:
    """`value` on `fd`; on a non-blocking `fd`, `wait` is called whenever the pipe is full (it raises to give up)."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    parts = [memoryview(body)] + [buffer.raw() for buffer in buffers]
    head = struct.pack(f">I{len(parts)}Q", len(parts), *(part.nbytes for part in parts))
    for part in [memoryview(head)] + parts:
        while part.nbytes:
            try:
                part = part[os.write(fd, part):]
            except BlockingIOError:
                if wait is None:
                    raise
                wait()


def receive_message(fd: int, unpickler: type[pickle.Unpickler] = pickle.Unpickler,
                    wait: Callable[[], None] | None = None) -> Any:
    """The next message on `fd` (EOFError if the other end has gone); `wait` is called before each read."""
    (count,) = struct.unpack(">I", _read_exactly(fd, 4, wait))
    if not 1 <= count <= MAX_BUFFERS:
        raise EOFError(f"a message of {count} parts: the other end is out of step")
    sizes = struct.unpack(f">{count}Q", _read_exactly(fd, 8 * count, wait))
    body, *buffers = (_read_exactly(fd, size, wait) for size in sizes)
    return unpickler(io.BytesIO(body), buffers=buffers).load()


def _read_exactly(fd: int, size: int, wait: Callable[[], None] | None) -> bytearray:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        if wait is not None:
            wait()
        n = os.readv(fd, [view[got:]])
        if not n:
            raise EOFError
        got += n
    return buf


class IsolatedPool:
    """Worker processes for named tasks (decode_worker.TASKS), one task per worker at a time.

    `run` blocks (call it from a thread). Idle workers are kept; one that has died is replaced when next
    taken. The caller bounds concurrency (the ingress's media semaphore); the pool starts a worker for a
    task that finds none idle.

    `memory_limit_mb` bounds each worker's data (RLIMIT_DATA: its heap and private mappings, the interpreter
    and libraries' ~100 MB included), named `memory_setting` in errors. A crafted file that makes a decoder
    allocate without end fails that task (WorkerOutOfMemory, or WorkerCrashed where a C library aborts)
    instead of growing the replica's process tree until Ray's memory monitor kills workers of the node."""

    def __init__(self, errors: dict[str, type[Exception]] | None = None, memory_limit_mb: int | None = None,
                 memory_setting: str = "memory_limit_mb"):
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self.memory_limit_mb, self.memory_setting = memory_limit_mb, memory_setting
        self._errors = dict(errors or {})  # class name in the worker -> the class raised here
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self.crashed = 0  # tasks whose worker died under them
        self.timed_out = 0  # tasks whose worker was stopped at the deadline
        self.out_of_memory = 0  # tasks that needed more than the worker's memory limit

    def prestart(self) -> None:
        """Start one worker now (from a background thread), so the first task does not wait for it."""
        threading.Thread(target=lambda: self._idle.put(self._start()), name="media-worker-start",
                         daemon=True).start()

    def _start(self) -> _Worker:
        worker = _Worker(self.memory_limit_mb)
        with self._lock:
            self._workers.add(worker)
        return worker

    def _take(self) -> _Worker:
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return self._start()
            if worker.alive:
                return worker
            self._drop(worker)  # ended while idle (killed from outside): not this task's doing

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.stop()

    def run(self, task: str, *args: Any, timeout_s: float) -> Any:
        worker = self._take()
        # bytes travel out of band (the worker gets a bytearray): an upload is not copied into the pickle
        args = tuple(pickle.PickleBuffer(arg) if isinstance(arg, bytes) else arg for arg in args)
        try:
            answer = worker.call(task, args, timeout_s)
        except (WorkerCrashed, WorkerTimedOut) as exc:
            if isinstance(exc, WorkerCrashed):
                self.crashed += 1
            else:
                self.timed_out += 1
            log.warning("media worker pid %d: %s (task %s)", worker.process.pid, exc, task)
            self._drop(worker)
            raise
        except BaseException:
            self._drop(worker)  # the protocol is out of step (an interrupt mid-message): not reusable
            raise
        if answer[0] == "ok":
            self._idle.put(worker)
            return answer[1]
        _, name, message = answer
        if name == "MemoryError" and self.memory_limit_mb is not None:
            # a decoder that hit the limit may have left its library's state half-built: a fresh worker
            self.out_of_memory += 1
            log.warning("media worker pid %d: out of its %d MB (task %s)", worker.process.pid,
                        self.memory_limit_mb, task)
            self._drop(worker)
            raise WorkerOutOfMemory(self.memory_setting, self.memory_limit_mb)
        self._idle.put(worker)
        raise self._errors[name](message) if name in self._errors else WorkerError(name, message)

    def pids(self) -> list[int]:
        with self._lock:
            return [worker.process.pid for worker in self._workers]

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers), set()
        for worker in workers:
            worker.stop()
