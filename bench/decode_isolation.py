"""What decoding audio in a worker process costs against decoding it in a thread of the ingress.

    python -m bench.decode_isolation [--rounds 7]
    python -m bench.decode_isolation --memory

Prints Markdown tables: median ms per decode of WAV and FLAC uploads (the ingress) and of JPEG and PNG images
(the VLM replica), in-process and through `isolated.IsolatedPool` (the bytes to the worker, the samples or
pixels back), plus a worker's start and its idle RSS. `--memory`: the lowest worker memory limit (MB,
RLIMIT_DATA, by bisection) at which the largest uploads and images the default limits admit still decode,
against what `limits.audio_decode_mb` / `image_decode_mb` reserve for them. Results are written down in
bench/HOSTILE.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import soundfile as sf
from PIL import Image

from deployments.audio import AudioBounds, decode_audio
from deployments.isolated import IsolatedPool, WorkerOutOfMemory
from deployments.limits import audio_decode_mb, image_decode_mb
from deployments.media import decode_image
from deployments.vlm import decode_in_worker


def upload(seconds: float, fmt: str, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def image(side: int, fmt: str) -> bytes:
    """A photo-like picture (smooth gradients and noise), as a camera or a screenshot tool would send."""
    y, x = np.mgrid[0:side, 0:side]
    noise = np.random.default_rng(0).integers(0, 24, (side, side, 3))
    pixels = np.stack([x * 255 // side, y * 255 // side, (x + y) * 127 // side], axis=-1) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def opus(seconds: int) -> bytes:
    """Stereo 48 kHz noise as Ogg Opus at 16 kbit/s: the longest upload at the highest rate a phone records,
    in few bytes (a half hour is ~3 MB)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ogg") as container:
        stream = container.add_stream("libopus", rate=48000)
        stream.bit_rate, stream.layout = 16000, "stereo"
        rng = np.random.default_rng(0)
        for second in range(seconds):
            frame = av.AudioFrame.from_ndarray((0.05 * rng.standard_normal((2, 48000))).astype(np.float32),
                                               format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = 48000, second * 48000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def lowest_limit_mb(task: str, *args, low: int = 128, high: int = 2048) -> int:
    """The lowest memory limit (MB, within 8) at which `task` on `args` succeeds in a fresh worker."""
    while high - low > 8:
        middle = (low + high) // 2
        pool = IsolatedPool(memory_limit_mb=middle)
        try:
            pool.run(task, *args, timeout_s=300)
            high = middle
        except WorkerOutOfMemory:
            low = middle
        finally:
            pool.close()
    return high


def memory() -> None:
    print("| input | bytes | lowest limit that decodes it (MB) | reserved for it (MB) |\n|---|---:|---:|---:|")
    bounds = AudioBounds()
    for name, data, seconds in (("1790 s Opus, 48 kHz stereo", opus(1790), 1790),
                                ("1790 s WAV, 8 kHz mono", upload(1790, "WAV", 8000), 1790)):
        print(f"| {name} | {len(data):,} | {lowest_limit_mb('decode_audio', data, bounds)} | "
              f"{audio_decode_mb(seconds, len(data))} |")
    for fmt in ("JPEG", "PNG"):
        data = image(4096, fmt)
        print(f"| 4096x4096 {fmt} | {len(data):,} | {lowest_limit_mb('decode_image', data)} | "
              f"{image_decode_mb(4096 * 4096, len(data))} |")


def main(argv=None) -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=7)
    args.add_argument("--memory", action="store_true", help="the lowest worker memory limits instead")
    parsed = args.parse_args(argv)
    if parsed.memory:
        memory()
        return
    rounds = parsed.rounds
    bounds = AudioBounds()
    started = time.perf_counter()
    pool = IsolatedPool()
    pool.run("decode_audio", upload(1, "WAV"), bounds, timeout_s=60)
    first_ms = (time.perf_counter() - started) * 1000
    print("| upload | bytes | in a thread (ms) | in a worker process (ms) |\n|---|---:|---:|---:|")
    for seconds, fmt in ((5, "WAV"), (30, "WAV"), (30, "FLAC"), (600, "WAV"), (600, "FLAC")):
        data = upload(seconds, fmt)
        thread = median_ms(lambda data=data: decode_audio(data, bounds), rounds)
        worker = median_ms(lambda data=data: pool.run("decode_audio", data, bounds, timeout_s=60), rounds)
        print(f"| {seconds} s {fmt} | {len(data):,} | {thread:.1f} | {worker:.1f} |")
    print("\n| image | bytes | in a thread (ms) | in a worker process (ms) |\n|---|---:|---:|---:|")
    for side, fmt in ((512, "JPEG"), (1024, "JPEG"), (1024, "PNG"), (4096, "JPEG")):
        data = image(side, fmt)
        thread = median_ms(lambda data=data: decode_image(data), rounds)
        worker = median_ms(lambda data=data: decode_in_worker(pool, data, "the image", 60), rounds)
        print(f"| {side}x{side} {fmt} | {len(data):,} | {thread:.1f} | {worker:.1f} |")
    print(f"\nA worker's start plus a 1 s decode: {first_ms:.0f} ms; idle RSS after these decodes: "
          f"{', '.join(f'{rss_mb(pid):.0f} MB' for pid in pool.pids())}")
    pool.close()


if __name__ == "__main__":
    main()
