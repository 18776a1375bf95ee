"""Audio decoded in worker processes (deployments/isolated.py): real child processes, real decodes, real signals."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from deployments.audio import AudioBounds, AudioDecodeError, AudioTooLongError, decode_audio
from deployments.isolated import (
    IsolatedPool,
    WorkerCrashed,
    WorkerError,
    WorkerOutOfMemory,
    WorkerTimedOut,
    _DataUnpickler,
)

ERRORS = {"AudioDecodeError": AudioDecodeError, "AudioTooLongError": AudioTooLongError}


def flac(seconds: float, rate: int = 48000) -> bytes:
    """Quiet noise: ~1.3 s to decode per 10 minutes at 48 kHz on this VM, ~2.5 MB a minute."""
    samples = np.random.default_rng(0).integers(-3, 4, size=int(rate * seconds)).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_until_busy(pid: int, within_s: float = 20) -> None:
    start, deadline = cpu_ticks(pid), time.monotonic() + within_s
    while cpu_ticks(pid) - start < 5:  # 50 ms of CPU: it is decoding, not starting
        assert time.monotonic() < deadline, "the worker never started decoding"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def pool():
    pool = IsolatedPool(ERRORS)
    yield pool
    pool.close()


def test_a_decode_in_a_worker_equals_one_in_process_and_refusals_keep_their_class(pool):
    data = flac(2.0, 16000)
    samples, rate = pool.run("decode_audio", data, AudioBounds(), timeout_s=30)
    expected, expected_rate = decode_audio(data)
    assert rate == expected_rate == 16000 and np.array_equal(samples, expected) and samples.flags.writeable
    with pytest.raises(AudioDecodeError, match="Could not decode the audio file"):
        pool.run("decode_audio", b"not audio at all", AudioBounds(), timeout_s=30)
    with pytest.raises(AudioTooLongError, match="the limit is max_audio_seconds=1 s"):
        pool.run("decode_audio", data, AudioBounds(max_seconds=1.0), timeout_s=30)
    with pytest.raises(WorkerError, match="AttributeError"):  # a bug, not a refusal: not dressed as one
        pool.run("decode_audio", data, None, timeout_s=30)
    assert len(pool.pids()) == 1  # refusals and errors leave the worker in service
    assert pool.crashed == pool.timed_out == 0


def test_a_worker_that_dies_mid_decode_fails_that_decode_alone(pool):
    long, short = flac(300), flac(1.0, 16000)
    with ThreadPoolExecutor(2) as threads:
        doomed = threads.submit(pool.run, "decode_audio", long, AudioBounds(), timeout_s=60)
        deadline = time.monotonic() + 20
        while not pool.pids():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        victim = pool.pids()[0]
        wait_until_busy(victim)
        other = threads.submit(pool.run, "decode_audio", short, AudioBounds(), timeout_s=60)  # a worker of its own
        assert other.result()[1] == 16000
        os.kill(victim, signal.SIGSEGV)
        with pytest.raises(WorkerCrashed, match="signal SIGSEGV") as caught:
            doomed.result()
    assert caught.value.how == "signal SIGSEGV"
    assert pool.crashed == 1 and victim not in pool.pids() and not alive(victim)
    assert pool.run("decode_audio", short, AudioBounds(), timeout_s=30)[1] == 16000  # the pool goes on


def test_a_decode_past_its_deadline_is_stopped_with_its_worker(pool):
    started = time.monotonic()
    with pytest.raises(WorkerTimedOut, match="longer than 0.3 s"):
        pool.run("decode_audio", flac(300), AudioBounds(), timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert pool.timed_out == 1 and pool.pids() == []
    assert pool.run("decode_audio", flac(1.0, 16000), AudioBounds(), timeout_s=30)[1] == 16000


def test_a_worker_killed_while_idle_is_replaced_without_failing_the_next_task(pool):
    pool.run("decode_audio", flac(0.5, 16000), AudioBounds(), timeout_s=30)
    (idle,) = pool.pids()
    os.kill(idle, signal.SIGKILL)
    while alive(idle):
        time.sleep(0.01)
    assert pool.run("decode_audio", flac(0.5, 16000), AudioBounds(), timeout_s=30)[1] == 16000
    assert idle not in pool.pids() and pool.crashed == 0


def test_prestart_has_a_worker_waiting_before_the_first_task(pool):
    pool.prestart()
    deadline = time.monotonic() + 20
    while not pool.pids():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (first,) = pool.pids()
    pool.run("decode_audio", flac(0.5, 16000), AudioBounds(), timeout_s=30)
    assert pool.pids() == [first]


def test_an_answer_naming_any_class_but_numpy_is_not_unpickled():
    """A worker has parsed hostile bytes: what it sends back may name only numpy's classes."""
    array = np.arange(4, dtype=np.float32)
    assert np.array_equal(_DataUnpickler(io.BytesIO(pickle.dumps(("ok", (array, 16000)), protocol=5))).load()[1][0],
                          array)
    with pytest.raises(pickle.UnpicklingError, match="subprocess.Popen"):
        _DataUnpickler(io.BytesIO(pickle.dumps(("ok", subprocess.Popen)))).load()


def test_workers_end_when_the_process_that_started_them_dies(tmp_path):
    """An ingress replica killed by Ray leaves no decoder behind: a worker reads EOF on its task pipe."""
    script = textwrap.dedent("""
        import sys, time
        from deployments.isolated import IsolatedPool
        pool = IsolatedPool()
        pool.prestart()
        while not pool.pids():
            time.sleep(0.01)
        print(pool.pids()[0], flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        worker = int(parent.stdout.readline())
        assert alive(worker)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(worker):
            assert time.monotonic() < deadline, "the worker outlived the process that started it"
            time.sleep(0.05)
    finally:
        parent.kill()


def test_concurrent_tasks_each_get_a_worker(pool):
    data = flac(0.5, 16000)
    barrier = threading.Barrier(3)

    def decode():
        barrier.wait()
        return pool.run("decode_audio", data, AudioBounds(), timeout_s=30)[1]

    with ThreadPoolExecutor(3) as threads:
        assert [f.result() for f in [threads.submit(decode) for _ in range(3)]] == [16000] * 3
    assert 1 <= len(pool.pids()) <= 3


def test_a_pool_dropped_without_close_leaves_no_worker_behind():
    """An Ingress built and dropped (the tests build several in one process) must not leak its decoders."""
    import gc

    pool = IsolatedPool()
    pool.run("decode_audio", flac(0.5, 16000), AudioBounds(), timeout_s=30)
    (worker,) = pool.pids()
    del pool
    gc.collect()
    deadline = time.monotonic() + 10
    while alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its pool"
        time.sleep(0.05)


def png(width: int, height: int, mode: str = "RGBA") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_decoded_by_the_vlm_s_worker_equals_one_decoded_in_process(pool):
    from deployments.errors import InvalidRequestError
    from deployments.media import decode_image
    from deployments.vlm import decode_in_worker

    data = png(64, 48)  # transparency painted onto white, as in process
    assert np.array_equal(np.asarray(decode_in_worker(pool, data, "image 0", 30)), np.asarray(decode_image(data)))
    for bad in (b"not an image", data[:200]):
        with pytest.raises(InvalidRequestError) as worker_refusal:
            decode_in_worker(pool, bad, "image 0", 30)
        with pytest.raises(InvalidRequestError) as in_process:
            decode_image(bad, "image 0")
        assert str(worker_refusal.value) == str(in_process.value)  # e.g. "image 0 could not be decoded (OSError)"
        assert worker_refusal.value.param == "messages"


def frozen_worker(pool: IsolatedPool) -> int:
    """The pool's one idle worker, stopped (SIGSTOP): a task sent to it waits until the test kills it, so the
    crash lands mid-task every time, whatever the machine's speed."""
    pool.run("decode_image", png(8, 8), timeout_s=30)
    (pid,) = pool.pids()
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_an_image_decoder_that_dies_mid_decode_is_that_request_s_400(pool):
    from deployments.errors import InvalidRequestError
    from deployments.vlm import decode_in_worker

    victim = frozen_worker(pool)
    with ThreadPoolExecutor(1) as threads:
        decoding = threads.submit(decode_in_worker, pool, png(32, 32), "image 1", 30)
        time.sleep(0.2)
        assert not decoding.done()
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(InvalidRequestError, match=r"image 1 crashed the image decoder \(signal SIGKILL\)"):
            decoding.result()
    assert pool.crashed == 1 and not alive(victim)
    assert np.asarray(decode_in_worker(pool, png(8, 8), "image 0", 30)).shape == (8, 8, 3)  # a new worker


def test_an_image_decode_past_its_deadline_is_a_400_naming_the_option(pool):
    from deployments.errors import InvalidRequestError
    from deployments.vlm import decode_in_worker

    victim = frozen_worker(pool)
    with pytest.raises(InvalidRequestError, match="image_decode_timeout_s=0.5 s"):
        decode_in_worker(pool, png(32, 32), "image 0", 0.5)
    assert pool.timed_out == 1 and not alive(victim)


def silent_flac(seconds: float, rate: int = 48000) -> bytes:
    """Silence compresses ~4000:1: a half-hour upload of a few hundred KB that decodes to ~115 MB of samples."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(rate * seconds), dtype=np.int16), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def worker_data_kb(pid: int) -> int:
    return int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("VmData:")))


def test_a_decode_past_the_worker_s_memory_limit_fails_alone_and_the_worker_is_replaced():
    """limits.media_worker_memory_mb: a file whose decode outgrows it costs its request and its worker, not the
    ingress (which Ray's memory monitor would kill, and every request it held, once the node ran short). The
    same file decodes under the default limit: a legitimate half hour fits (limits.audio_decode_mb)."""
    from deployments.limits import RequestLimits, audio_decode_mb

    data = silent_flac(1790)
    default = RequestLimits().media_worker_memory_mb
    assert audio_decode_mb(1790, RequestLimits().max_upload_bytes) <= default
    small = IsolatedPool(ERRORS, memory_limit_mb=256, memory_setting="limits.media_worker_memory_mb")
    roomy = IsolatedPool(ERRORS, memory_limit_mb=default)
    try:
        short = flac(1.0, 16000)
        small.run("decode_audio", short, AudioBounds(), timeout_s=30)
        (first,) = small.pids()
        with pytest.raises(WorkerOutOfMemory, match="needed more than limits.media_worker_memory_mb=256 MB"):
            small.run("decode_audio", data, AudioBounds(), timeout_s=120)
        assert small.out_of_memory == 1 and small.crashed == 0 and not alive(first)
        samples, rate = small.run("decode_audio", short, AudioBounds(), timeout_s=30)  # a new worker
        assert rate == 16000 and samples.size == 16000 and small.pids() != [first]
        assert worker_data_kb(small.pids()[0]) < 256 * 1024  # a worker at rest is well inside the limit

        samples, rate = roomy.run("decode_audio", data, AudioBounds(), timeout_s=120)
        assert rate == 16000 and samples.size == 1790 * 16000 and not samples.any()
        assert roomy.out_of_memory == 0
    finally:
        small.close()
        roomy.close()


def test_an_image_past_the_vlm_s_decoder_memory_is_a_400_naming_the_option():
    from PIL import Image

    from deployments.errors import InvalidRequestError
    from deployments.limits import image_decode_mb
    from deployments.options import ChatOptions
    from deployments.vlm import decode_in_worker

    ramp = np.linspace(0, 255, 4096).astype(np.uint8)  # smooth: a small file, 4096x4096 pixels all the same
    pixels = np.stack([np.tile(ramp, (4096, 1)), np.tile(ramp[:, None], (1, 4096)), np.full((4096, 4096), 90,
                                                                                           np.uint8)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=50)
    data = buffer.getvalue()
    # the default holds the largest image the default limits admit
    assert image_decode_mb(4096 * 4096, 12 * 2**20) <= ChatOptions().image_decode_memory_mb
    small = IsolatedPool(memory_limit_mb=256, memory_setting="image_decode_memory_mb")
    try:
        with pytest.raises(InvalidRequestError, match="decoding image 0 needed more memory than "
                                                      "image_decode_memory_mb=256 MB") as refused:
            decode_in_worker(small, data, "image 0", 60)
        assert refused.value.param == "messages" and small.out_of_memory == 1
        assert decode_in_worker(small, image_of(64, 64, "PNG", "RGB"), "image 0", 30).size == (64, 64)
    finally:
        small.close()


def test_an_upload_to_a_worker_that_stopped_reading_is_held_to_the_deadline(pool):
    """An upload larger than the pipe (1 MB) is written as the worker reads it: one that no longer reads (stopped,
    or stuck before its read) must not hold the writing thread, and the media turn it took, for good."""
    victim = frozen_worker(pool)
    started = time.monotonic()
    with pytest.raises(WorkerTimedOut):
        pool.run("decode_audio", flac(120), AudioBounds(), timeout_s=1.0)  # ~5 MB
    assert time.monotonic() - started < 10
    assert pool.timed_out == 1 and not alive(victim)
    samples, _ = pool.run("decode_audio", flac(1.0, 16000), AudioBounds(), timeout_s=30)  # a new worker
    assert samples.size == 16000


def image_of(width: int, height: int, fmt: str, mode: str = "1") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format=fmt)
    return buffer.getvalue()


def crafted_dds() -> bytes:
    data = bytearray(image_of(16, 16, "DDS", "RGB"))
    data[80:84] = (0x80).to_bytes(4, "little")  # pixel-format flags naming no format: NotImplementedError
    return bytes(data)


@pytest.mark.parametrize("name, data", [
    ("a PNG", image_of(40, 30, "PNG")),
    ("a WebP (Pillow opens it in C)", image_of(40, 30, "WEBP", "RGB")),
    ("bytes that are no image", b"GIF89a" + bytes(40)),
    ("a crafted DDS header", crafted_dds()),
    ("past max_image_pixels", image_of(5000, 4000, "PNG")),
    ("past Pillow's own bound", image_of(20000, 20000, "PNG")),
    ("too thin", image_of(1, 400, "PNG")),
])
def test_the_ingress_s_header_check_in_a_worker_answers_as_in_process(pool, name, data):
    """The ingress reads an image's header in a decoder process: the same size, or the same refusal word for
    word (the 413 of Pillow's decompression-bomb guard included)."""
    from deployments.errors import APIError
    from deployments.limits import RequestLimits
    from deployments.media import load_image

    limits = RequestLimits(max_image_pixels=16_000_000, max_image_aspect_ratio=200)
    url = "data:image/png;base64," + __import__("base64").b64encode(data).decode()

    def outcome(decoders):
        try:
            return ("ok", load_image(url, limits, [], "messages.0.content.0.image_url", decoders))
        except APIError as exc:
            return (type(exc).__name__, str(exc), exc.param, exc.code)

    assert outcome(pool) == outcome(None)


def test_an_image_header_that_crashes_its_reader_is_a_400_not_the_ingress_s_end(pool):
    from deployments.errors import InvalidRequestError
    from deployments.limits import RequestLimits
    from deployments.media import load_image

    pool.run("image_header", image_of(8, 8, "PNG"), 100, timeout_s=30)
    (victim,) = pool.pids()
    os.kill(victim, signal.SIGSTOP)
    url = "data:image/png;base64," + __import__("base64").b64encode(image_of(8, 8, "PNG")).decode()
    with ThreadPoolExecutor(1) as threads:
        reading = threads.submit(load_image, url, RequestLimits(), [], "messages.0.content.0.image_url", pool)
        time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(InvalidRequestError, match=r"the image crashed the image decoder \(signal SIGKILL\)"):
            reading.result()
    assert pool.crashed == 1


def test_a_ctrl_c_reaching_the_workers_leaves_them_serving(pool):
    """Ctrl-C of `serve run` signals the whole process group: a worker went down with a KeyboardInterrupt
    traceback in the replica's log; it ends with its parent instead."""
    pool.run("decode_audio", flac(0.5, 16000), AudioBounds(), timeout_s=30)
    (worker,) = pool.pids()
    os.kill(worker, signal.SIGINT)
    time.sleep(0.2)
    assert alive(worker)
    assert pool.run("decode_audio", flac(0.5, 16000), AudioBounds(), timeout_s=30)[1] == 16000
    assert pool.pids() == [worker]
