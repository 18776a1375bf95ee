"""The worker process of `isolated.IsolatedPool`: runs the tasks it is sent, one at a time, until its pipe closes.

`python -m deployments.decode_worker TASK_FD RESULT_FD [MEMORY_LIMIT_MB]`. Messages (isolated.send_message): in,
(task name, args); out, ("ok", value) or ("error", class name, message). Stdout and stderr stay the parent's,
for logs: nothing a library prints can break the protocol. MEMORY_LIMIT_MB bounds the worker's data (limit_memory).
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any

from .audio import decode_audio
from .isolated import receive_message, send_message
from .pixels import bounded_header_size, checked_image_size, decode_pixels

#: what a worker runs, by name: the parsers of untrusted bytes
TASKS: dict[str, Callable[..., Any]] = {
    "decode_audio": decode_audio,  # the ingress: uploads to transcribe
    "image_header": bounded_header_size,  # the ingress: an image's format and size, before it is accepted
    "image_size": checked_image_size,  # the VLM replica: sizes for its memory estimate
    "decode_image": decode_pixels,  # the VLM replica: pixels
}


def serve(task_fd: int, result_fd: int) -> None:
    while True:
        try:
            name, args = receive_message(task_fd)  # from the parent, which holds the other end of this pipe
        except EOFError:
            return  # the parent has gone
        # bytes sent out of band arrive as a read-only view of the bytearray read: the bytearray itself
        args = tuple(arg.obj if isinstance(arg, memoryview) and isinstance(arg.obj, bytearray) else arg
                     for arg in args)
        try:
            answer: tuple = ("ok", TASKS[name](*args))
        except Exception as exc:  # the task's own refusal (bad audio): the parent maps it by name
            answer = ("error", type(exc).__name__, str(exc))
        try:
            send_message(result_fd, answer)
        except BrokenPipeError:
            return  # the parent went while this task ran (its replica stopped): nobody waits for the answer
        del args, answer
        _release_memory()  # a long file's buffers would otherwise stay in the worker's heap (~190 MB idle)


#: above this resident size a worker hands freed memory back to the system after a task. Not after every
#: task: the next one would page in its buffers afresh (a 1024x1024 JPEG decoded in 8.8 ms after a trim, 4.5 without)
TRIM_ABOVE_BYTES = 96 * 2**20


def _release_memory() -> None:
    try:
        with open("/proc/self/statm") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if resident > TRIM_ABOVE_BYTES:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError, ValueError):  # not Linux, or not glibc
        pass


def limit_memory(limit_mb: int) -> None:
    """At most `limit_mb` of data (RLIMIT_DATA, the soft limit; the hard one where lower): past it an allocation
    fails, which numpy raises as MemoryError and C libraries report as their own errors, in this process only.
    RLIMIT_DATA rather than RLIMIT_AS: it counts writable private memory (heap, arrays, thread stacks), not the
    libraries' code and read-only mappings nor the allocator's reserved, inaccessible arenas."""
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = limit_mb * 2**20 if hard == resource.RLIM_INFINITY else min(limit_mb * 2**20, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


if __name__ == "__main__":
    # Ctrl-C of `serve run` reaches the whole process group: the worker ends when its parent does (EOF on
    # its task pipe), not with a KeyboardInterrupt traceback in the replica's log
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(sys.argv) > 3:
        limit_memory(int(sys.argv[3]))
    serve(int(sys.argv[1]), int(sys.argv[2]))
