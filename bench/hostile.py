"""python -m bench.hostile: what the worst requests cost in memory, per process, on a live `serve run`.

    python -m bench.hostile              # ~5-8 min on 2 cores; writes bench/HOSTILE.md
    python -m bench.hostile --out X.json --results X.md

Starts the shipped serve_config.yaml exactly as tests/serve/live_server.py does (one pinned replica
per family, its own Ray cluster, a temp LOCAL_MODELS_DIR), samples the resident memory (VmRSS, with
any child processes) of every replica, the ingress, the Serve controller and the HTTP proxy every
~50 ms in a background thread, and fires:

  (a) each of the worst cases of tests/serve/test_hostile.py's corpus alone,
  (b) all of them at once (3 copies of each),
  (c) the largest requests the limits *accept*: each kind alone, then all of them at once.

Every status is recorded: (a)/(b) must be the corpus's 4xx, (c) 200 or 503 (overloaded); never a
500 or a dropped connection. (c) at once sends as many of its eight 8-image VLM chats as the machine's
free memory allows with a margin (~2 GiB each; all 8 need ~22 GiB free), and says so when it sends
fewer. Afterwards every family must still answer with the same replica pids. Figures go to
bench/runs/hostile-<stamp>.json (raw, with the serve run's log beside it) and bench/HOSTILE.md (tables).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import requests

from . import report
from .memory import Sampler, find_serve_actors, mem_available_kb

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "serve"))

import test_hostile  # noqa: E402

import live_server  # noqa: E402  (tests/serve, on the path above)

log = logging.getLogger("bench.hostile")
MB = 2**20
PROCESSES = ("ingress", "llm", "vlm", "stt", "tts", "controller", "proxy")

# The corpus's worst cases: the biggest bodies, prompts, images, audio and JSON structures.
WORST = (
    "50 MB chat body (Content-Length)", "50 MB chat body, chunked", "50 MB speech body", "50 MB /generate body",
    "2 MB prompt", "2 MB /generate query", "prompt over the context, tokenized",
    "prompt plus max_tokens over the context",
    "10000x10000 image (a few kB)", "9 images",
    "12 min silent 8-channel FLAC (past the model's max_audio_seconds)", "31 min of audio by an alias",
    "30 MB upload", "30 MB voice upload", "100k nested arrays", "5000-digit integer",
)
COPIES_AT_ONCE = 3
# (c) at once took ~16 GB beyond the baseline at one instant, ~2 GB per 8-image VLM chat (ingress + VLM replica
# together): on a machine others share, send as many of those as fit what is free, keeping a margin, so that no
# Ray memory monitor on the machine (95% of it) is driven to kill workers.
GIB_PER_VLM8 = 2.0
GIB_FOR_THE_REST = 2.0  # the other accepted requests of (c) together
GIB_MARGIN = 4.0


# --- requests ------------------------------------------------------------------------------------------


def send(url: str, method: str, path: str, kwargs: dict, timeout: float = 300) -> dict[str, Any]:
    """One request on a fresh connection: its status (or the exception that replaced it), time, error."""
    started = time.monotonic()
    try:
        response = requests.request(method, url + path, timeout=timeout, **kwargs)
    except requests.RequestException as exc:
        return {"status": None, "seconds": round(time.monotonic() - started, 2),
                "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out: dict[str, Any] = {"status": response.status_code, "seconds": round(time.monotonic() - started, 2)}
    if response.status_code != 200:
        try:
            error = response.json()["error"]
            out["error"] = {"code": error.get("code"), "param": error.get("param"),
                            "message": error.get("message", "")[:300]}
        except (ValueError, KeyError, TypeError):
            out["error"] = response.text[:300]
    else:
        try:
            usage = response.json().get("usage")
            if usage:
                out["usage"] = usage
        except ValueError:
            pass
    return out


def fresh_kwargs(case: test_hostile.Case) -> dict:
    """A case's request arguments, with a new generator for the chunked body (a generator is spent once)."""
    if case.name == "50 MB chat body, chunked":
        return {**case.kwargs, "data": test_hostile.chunked(test_hostile.big_body(50 * MB))}
    return case.kwargs


def fire(url: str, jobs: list[tuple[str, Callable[[], dict]]], workers: int | None = None) -> list[dict]:
    """Every job at once from its own thread; [{"name", "status", "seconds", ...}] in job order."""
    barrier = threading.Barrier(len(jobs))

    def run(job):
        name, call = job
        barrier.wait()
        return {"name": name, **call()}

    with ThreadPoolExecutor(max_workers=workers or len(jobs)) as pool:
        return list(pool.map(run, jobs))


# --- the accepted worst: inputs just under the limits --------------------------------------------------


def max_pixels_png(side: int = 4096) -> bytes:
    """A 4096x4096 RGB PNG (= max_image_pixels) that still compresses to ~1 MiB, so that 8 of them fit one
    JSON body under max_json_body_bytes: a tiled noise pattern over a gradient."""
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels = np.tile(tile, (side // 64, side // 64, 1)) // 2
    pixels = (pixels + (np.arange(side, dtype=np.uint16)[None, :, None] // 32).astype(np.uint8)).astype(np.uint8)
    return _png(pixels)


def noise_png(side: int) -> bytes:
    """Incompressible RGB noise: the largest encoded image for its pixels."""
    return _png(np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8))


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def long_flac(seconds: float, rate: int = 48000) -> bytes:
    """Two tones in stereo (FLAC of a tone compresses ~7:1, so 10 minutes of 48 kHz stereo fit 25 MiB)."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    audio = np.stack([0.2 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], axis=1).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, audio, rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def calibrate_prompt(url: str, context: int) -> tuple[int, int]:
    """The most 'hello ' words whose chat prompt stays under the context (one token left to generate)."""
    def tokens(words: int) -> int | None:
        r = send(url, "POST", test_hostile.CHAT, test_hostile.chat("hello " * words, max_tokens=1), timeout=60)
        return r.get("usage", {}).get("prompt_tokens") if r["status"] == 200 else None

    low, high = 1, 2000
    low_tokens = tokens(low)
    while high - low > 1:
        mid = (low + high) // 2
        t = tokens(mid)
        if t is not None and t <= context - 1:
            low, low_tokens = mid, t
        else:
            high = mid
    return low, low_tokens or 0


def accepted_jobs(url: str, inputs: dict, vlm8: int = 8) -> list[tuple[str, Callable[[], dict]]]:
    """The largest requests the limits accept: 16 LLM, 8 TTS, 2 + `vlm8` VLM and 8 STT requests."""
    chat, stt, speech = test_hostile.CHAT, test_hostile.STT, test_hostile.SPEECH
    vlm8_chat = test_hostile.image_chat(inputs["max_pixels_uri"], count=8)
    vlm_bytes = test_hostile.image_chat(inputs["max_bytes_uri"])
    transcription = {"files": {"file": ("long.flac", inputs["flac"])}, "data": {"model": "tiny-whisper"}}
    speech_body = {"json": {"model": "tiny-vits", "input": inputs["speech_text"]}}
    near_context = test_hostile.chat("hello " * inputs["prompt_words"])
    # smallest first: sent alone in this order, a request can reuse at most what the one before it
    # freed but the allocator kept, so each one's own growth shows
    kinds = [
        ("llm: prompt just under the context", chat, near_context, 16),
        ("tts: 4096 characters", speech, speech_body, 8),
        ("vlm: 1 noise image near max_image_bytes", chat, vlm_bytes, 2),
        ("stt: 599 s of 48 kHz stereo FLAC", stt, transcription, 8),
        ("vlm: 8 images of 4096x4096", chat, vlm8_chat, vlm8),
    ]
    jobs = []
    for name, path, kwargs, count in kinds:
        for _ in range(count):
            jobs.append((name, lambda path=path, kwargs=kwargs: send(url, "POST", path, kwargs)))
    return jobs


def accepted_inputs(url: str, context: int, speech_chars: int) -> dict:
    started = time.monotonic()
    max_pixels = max_pixels_png()
    noise_side = 2000
    noise = noise_png(noise_side)
    flac = long_flac(599)
    words, prompt_tokens = calibrate_prompt(url, context)
    text = ("The quick brown fox jumps over the lazy dog. " * 200)[:speech_chars]
    inputs = {
        "max_pixels_uri": "data:image/png;base64," + base64.b64encode(max_pixels).decode(),
        "max_bytes_uri": "data:image/png;base64," + base64.b64encode(noise).decode(),
        "flac": flac, "speech_text": text, "prompt_words": words,
    }
    described = {
        "max_pixels_png": {"side": 4096, "encoded_mb": round(len(max_pixels) / MB, 2),
                           "json_body_mb_with_8": round(8 * len(inputs["max_pixels_uri"]) / MB, 2)},
        "noise_png": {"side": noise_side, "encoded_mb": round(len(noise) / MB, 2),
                      "json_body_mb": round(len(inputs["max_bytes_uri"]) / MB, 2)},
        "flac": {"seconds": 599, "rate": 48000, "channels": 2, "encoded_mb": round(len(flac) / MB, 2)},
        "speech_chars": len(text), "prompt_words": words, "prompt_tokens": prompt_tokens,
        "build_s": round(time.monotonic() - started, 1),
    }
    return inputs, described


# --- the run ------------------------------------------------------------------------------------------


def warm_up(url: str) -> dict[str, int]:
    return test_hostile.answers_of_every_family(url)


def memory_status(server: live_server.LiveServer) -> dict[str, dict]:
    """Each family's memory gate (budget, estimate in use, peak estimate admitted) from /health."""
    out = {}
    for info in server.health()["models"].values():
        memory = (info.get("replica") or {}).get("memory")
        if memory and info.get("family"):
            out[info["family"]] = memory
    return out


def estimates(models_dir: Path, described: dict) -> dict[str, float]:
    """What deployments/admission.py estimates for this run's accepted requests (MiB), from the models' configs."""
    from transformers import AutoConfig

    from deployments import admission
    from deployments.options import SpeechOptions, TranscriptionOptions

    out = {}
    try:
        llm = AutoConfig.from_pretrained(models_dir / "tiny-llm")
        tokens = described["prompt_tokens"]
        out["llm: prompt just under the context"] = admission.chat_request_bytes(llm, tokens, max(1, 512 - tokens)) / MB
        out["llm: per 1000 prompt tokens (linear part)"] = (admission.chat_request_bytes(llm, 1000, 0)
                                                           - admission.chat_request_bytes(llm, 0, 0)) / MB
        vlm = AutoConfig.from_pretrained(models_dir / "tiny-llava")
        out["vlm: 8 images of 4096x4096"] = admission.chat_request_bytes(vlm, 200, 32, images=8) / MB
        out["vlm: per image"] = admission._vision_bytes(vlm) / MB
        stt = AutoConfig.from_pretrained(models_dir / "tiny-whisper")
        chunks = TranscriptionOptions.model_fields["max_chunks_per_call"].default
        out["stt: 599 s of 48 kHz stereo FLAC"] = admission.transcription_request_bytes(stt, 599 * 16000, chunks) / MB
        tts = AutoConfig.from_pretrained(models_dir / "tiny-vits")
        per_call = SpeechOptions.model_fields["max_chars_per_call"].default
        out["tts: 4096 characters"] = admission.speech_request_bytes(tts, min(described["speech_chars"], per_call)) / MB
    except Exception as exc:  # the figures are context, never a reason to lose the run
        out["error"] = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def run(result: dict, tmp: Path, log_copy: Path) -> None:
    models_dir = tmp / "models"
    models_dir.mkdir()
    started = time.monotonic()
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = live_server.start(tmp, models_dir, env=env)
    result["startup_s"] = round(time.monotonic() - started, 1)
    sampler = None
    try:
        url = server.url
        log.info("serve run healthy after %.0f s at %s; warming up every family", result["startup_s"], url)
        result["warm_up"] = warm_up(url)
        pids = server.replica_pids()
        actors = find_serve_actors(os.getsid(server.process.pid))
        pids.update(actors)
        result["pids_before"] = pids
        missing = [p for p in PROCESSES if p not in pids]
        if missing:
            result["notes"].append(f"processes not found: {missing}")
        sampler = Sampler(pids)
        sampler.start()

        # inputs for (c) first: calibrating the prompt warms the LLM a little more, before the baseline
        limits = _limits()
        context = 512
        log.info("building the accepted worst-case inputs (images, 10 min FLAC, prompt calibration)")
        sampler.set_phase("prepare")
        inputs, result["accepted_inputs"] = accepted_inputs(url, context, limits["max_speech_input_chars"])
        cases = {case.name: case for case in test_hostile.corpus()}
        worst = [cases[name] for name in WORST]
        time.sleep(2)

        sampler.set_phase("baseline")
        time.sleep(4)
        result["memory_gates"] = {"baseline": memory_status(server)}

        # (a) each worst case alone
        result["phases"] = {}
        alone = []
        phase_started = time.monotonic()
        for case in worst:
            sampler.set_phase(f"a:{case.name}")
            outcome = {"name": case.name, "expected": case.status,
                       **send(url, case.method, case.path, fresh_kwargs(case), timeout=120)}
            time.sleep(0.5)  # let a late allocation show in the samples
            alone.append(outcome)
            log.info("(a) %-70s %s in %.2f s", case.name, outcome["status"], outcome["seconds"])
        result["phases"]["a"] = {"wall_s": round(time.monotonic() - phase_started, 1), "requests": alone}
        sampler.set_phase("between")
        time.sleep(1)

        # (b) all at once, 3 copies each
        sampler.set_phase("b")
        jobs = [(case.name, lambda case=case: {"expected": case.status,
                                               **send(url, case.method, case.path, fresh_kwargs(case), timeout=180)})
                for case in worst for _ in range(COPIES_AT_ONCE)]
        phase_started = time.monotonic()
        together = fire(url, jobs)
        result["phases"]["b"] = {"wall_s": round(time.monotonic() - phase_started, 1), "requests": together}
        time.sleep(1)
        log.info("(b) %d requests at once in %.1f s: %s", len(jobs), result["phases"]["b"]["wall_s"],
                 _count(together))
        sampler.set_phase("between")
        time.sleep(2)
        result["memory_gates"]["after_b"] = memory_status(server)

        # (c) the largest accepted requests: each kind alone, then all at once
        kinds = {}
        for name, call in accepted_jobs(url, inputs):
            kinds.setdefault(name, call)
        singles = []
        phase_started = time.monotonic()
        for name, call in kinds.items():
            sampler.set_phase(f"c1:{name}")
            outcome = {"name": name, **call()}
            time.sleep(0.5)
            singles.append(outcome)
            log.info("(c, alone) %-50s %s in %.2f s", name, outcome["status"], outcome["seconds"])
        result["phases"]["c_alone"] = {"wall_s": round(time.monotonic() - phase_started, 1), "requests": singles}
        sampler.set_phase("between")
        time.sleep(2)
        available_gib = mem_available_kb() / 2**20
        vlm8 = min(8, int((available_gib - GIB_MARGIN - GIB_FOR_THE_REST) / GIB_PER_VLM8))
        result["vlm8_at_once"] = max(vlm8, 0)
        if vlm8 < 8:
            result["notes"].append(f"(c) at once: {available_gib:.1f} GiB free on the machine, so {max(vlm8, 0)} "
                                   "8-image VLM chats instead of 8 (about 2 GiB each, with a 4 GiB margin)")
            log.warning("%s", result["notes"][-1])
        if vlm8 < 1:
            result["notes"].append("(c) at once skipped: too little memory free on the machine")
        else:
            sampler.set_phase("c")
            jobs = accepted_jobs(url, inputs, vlm8)
            phase_started = time.monotonic()
            together = fire(url, jobs)
            result["phases"]["c"] = {"wall_s": round(time.monotonic() - phase_started, 1), "requests": together}
            time.sleep(1)
            log.info("(c) %d accepted requests at once in %.1f s: %s", len(jobs), result["phases"]["c"]["wall_s"],
                     _count(together))
        sampler.set_phase("after")
        result["memory_gates"]["after_c"] = memory_status(server)
        time.sleep(3)

        # afterwards: every family answers, no replica replaced
        result["answers_after"] = warm_up(url)
        pids_after = server.replica_pids()
        pids_after.update(find_serve_actors(os.getsid(server.process.pid)))
        result["pids_after"] = pids_after
        result["health_after"] = server.health()["status"]
        time.sleep(1)
    finally:
        try:
            if sampler is not None:
                sampler.stop()
                result["memory"] = summarize(sampler)
            result["serve_log_tail"] = server.tail(80)
            result["serve_log"] = log_findings(server.log) | {"path": str(log_copy)}
        finally:
            live_server.stop(server)
        log_copy.parent.mkdir(parents=True, exist_ok=True)
        log_copy.write_bytes(server.log.read_bytes())  # the temp dir goes; the log stays with the JSON


def uncommitted_changes() -> list[str]:
    """Tracked files that differ from the commit in meta.git_commit: what was measured is the working tree."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, cwd=REPO, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.splitlines() if line[3:].startswith(("deployments/", "loading/", "serve_config"))]


def _limits() -> dict:
    from deployments.limits import RequestLimits

    return RequestLimits().model_dump()


def _count(outcomes: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = str(o["status"]) if o["status"] is not None else "no answer"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _labelled_count(outcomes: list[dict]) -> dict[str, int]:
    """Like _count, with a 503 split into the ingress's call timeout and an overload refusal."""
    counts: dict[str, int] = {}
    for o in outcomes:
        key = str(o["status"]) if o["status"] is not None else "no answer"
        if o["status"] == 503:
            key += " (timeout)" if _timed_out(o) else " (overloaded)"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _timed_out(outcome: dict) -> bool:
    return "did not answer within" in json.dumps(outcome.get("error"))


def log_findings(path: Path) -> dict[str, Any]:
    """What the serve run log says went wrong: exceptions by type, 5xx answers, kills and restarts."""
    import re

    text = path.read_text(errors="replace")
    lines = text.splitlines()
    exceptions: dict[str, int] = {}
    for line in lines:
        match = re.search(r"\b([A-Za-z_][\w.]*(?:Error|Exception)): (.*)", line)
        if match is None or " File " in line or "Traceback" in line:
            continue
        message = re.sub(r"\d[\d,.]*", "N", match.group(2))[:90]
        key = f"{match.group(1)}: {message}".strip()
        exceptions[key] = exceptions.get(key, 0) + 1
    status = re.compile(r"(GET|POST) (\S+) (5\d\d) ([\d.]+)ms")
    fivexx: dict[str, int] = {}
    for line in lines:
        m = status.search(line)
        if m:
            key = f"{m.group(1)} {m.group(2)} {m.group(3)}"
            fivexx[key] = fivexx.get(key, 0) + 1
    kill_words = ("OutOfMemory", "memory monitor", "Killed", "killed", "died", "unexpectedly", "RayActorError",
                  "ActorDiedError", "restarting", "Restarting", "SIGKILL", "exit code")
    kills = [line[:300] for line in lines if any(w in line for w in kill_words)]
    return {"exceptions": dict(sorted(exceptions.items(), key=lambda kv: -kv[1])), "5xx": fivexx,
            "kills_or_restarts": kills[-30:], "tracebacks": text.count("Traceback (most recent call last)"),
            "error_lines": sum(" ERROR " in line for line in lines), "lines": len(lines)}


def summarize(sampler: Sampler) -> dict:
    out: dict[str, Any] = {"samples": sampler.samples, "min_available_mb": {
        phase: round(kb / 1024) for phase, kb in sampler.min_available.items()}, "processes": {}}
    a_phases = [p for p in sampler.peaks if p.startswith("a:")]
    c1_phases = [p for p in sampler.peaks if p.startswith("c1:")]
    for name in sampler.pids:
        baseline = sampler.median_mb("baseline", name)
        entry: dict[str, Any] = {"pid": sampler.pids[name], "children": sampler.children.get(name, []),
                                 "baseline_mb": baseline, "baseline_peak_mb": sampler.peak_mb("baseline", name)}
        for label, phases in (("a", a_phases), ("c_alone", c1_phases)):
            per = {p.split(":", 1)[1]: sampler.peak_mb(p, name) for p in phases}
            entry[f"peak_{label}_by_request_mb"] = per
            entry[f"start_{label}_by_request_mb"] = {p.split(":", 1)[1]: sampler.start_mb(p, name) for p in phases}
            entry[f"peak_{label}_mb"] = max((v for v in per.values() if v), default=None)
        for phase in ("b", "c", "after"):
            entry[f"peak_{phase}_mb"] = sampler.peak_mb(phase, name)
        entry["peak_anon_mb"] = {p: sampler.peak_mb(p, name, "RssAnon") for p in ("baseline", "b", "c")}
        entry["peak_shmem_mb"] = {p: sampler.peak_mb(p, name, "RssShmem") for p in ("baseline", "b", "c")}
        out["processes"][name] = entry
    sums: dict[str, int] = {}
    for _, phase, rss in sampler.timeline:
        key = phase.split(":", 1)[0]
        sums[key] = max(sums.get(key, 0), sum(rss.values()))
    out["sum_peak_mb"] = {phase: round(kb / 1024) for phase, kb in sums.items()}
    # every 0.5 s of the phases with requests at once, MB per process (the raw shape of the peaks)
    out["timeline"] = [[t, phase, {n: round(kb / 1024) for n, kb in rss.items()}]
                       for i, (t, phase, rss) in enumerate(sampler.timeline)
                       if i % 10 == 0 and (phase in ("b", "c") or phase.startswith("c1:"))]
    return out


# --- the report --------------------------------------------------------------------------------------------


def check(result: dict) -> list[str]:
    """Every way the run fell short of the issue's promise."""
    problems = []
    for phase in ("a", "b"):
        for o in result.get("phases", {}).get(phase, {}).get("requests", []):
            if o["status"] != o["expected"]:
                problems.append(f"({phase}) {o['name']}: {o['status']} (expected {o['expected']}): {o.get('error')}")
    for phase in ("c_alone", "c"):
        for o in result.get("phases", {}).get(phase, {}).get("requests", []):
            if o["status"] != 200 and not (o["status"] == 503 and _overloaded(o)):
                problems.append(f"({phase}) {o['name']}: {o['status']}: {o.get('error')}")
    if result.get("answers_after") and set(result["answers_after"].values()) != {200}:
        problems.append(f"families afterwards: {result['answers_after']}")
    if (result.get("serve_log") or {}).get("kills_or_restarts"):
        problems.append(f"the serve log speaks of kills or restarts: {result['serve_log']['kills_or_restarts'][:3]}")
    before, after = result.get("pids_before"), result.get("pids_after")
    if before and after and before != after:
        problems.append(f"pids changed: before {before}, after {after}")
    return problems


def _overloaded(outcome: dict) -> bool:
    error = outcome.get("error")
    text = json.dumps(error) if not isinstance(error, str) else error
    return any(w in text.lower() for w in ("overload", "max_ongoing", "max_queued", "max_concurrent", "retry"))


def _mb(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _delta(peak, base) -> str:
    return "-" if peak is None or base is None else f"{peak - base:+,.0f}"


def markdown(result: dict, json_path: Path) -> str:
    meta = result["meta"]
    memory = result.get("memory", {})
    procs = memory.get("processes", {})
    phases = result.get("phases", {})
    problems = result.get("problems", [])
    lines = [
        "# Hostile and worst-case requests: memory per process",
        "",
        f"`python -m bench.hostile` on {meta['date']} (git {meta['git_commit'] or '?'}"
        + (f" plus uncommitted changes to {', '.join(meta['uncommitted'])}" if meta.get("uncommitted") else "")
        + "), "
        f"{meta.get('total_s', '?')} s in all (serve run healthy after {result.get('startup_s', '?')} s). "
        f"Machine: {meta['cpu']}, {meta['cpus']} CPUs, {meta['memory_gib']} GiB, device {meta['device']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in meta['load_average_at_start'])} "
        "(other jobs shared the machine). Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        "",
        "The shipped `serve_config.yaml` under `serve run`, as tests/serve/live_server.py starts it (one pinned "
        "replica per family, default `limits`). Resident memory (VmRSS, plus child processes: there were "
        f"{'none' if not any(p.get('children') for p in procs.values()) else 'some'}) of each process sampled every "
        "50 ms; baseline = median while idle after one warm-up request per family; peak = highest sample during "
        "the phase; delta = peak - baseline. MB = MiB.",
        "",
        "- **(a) alone**: each of the corpus's worst cases on its own (" + ", ".join(WORST) + "); "
        "the column is the highest peak over those requests.",
        f"- **(b) at once**: the same {len(WORST)} cases, {COPIES_AT_ONCE} copies each, "
        f"{len(WORST) * COPIES_AT_ONCE} requests fired together from threads.",
        "- **(c) accepted, alone / at once**: the largest requests the limits accept, each kind alone, then "
        + _accepted_description(result) + " all fired together.",
        "",
        f"Raw figures: `{json_path.name}` (bench/runs/, not committed).",
        "",
        "## Peak RSS per process (MB)",
        "",
    ]
    header = ["process", "pid", "baseline", "(a) alone", "Δ", "(b) at once", "Δ", "(c) alone", "Δ",
              "(c) at once", "Δ"]
    rows = []
    for name in PROCESSES:
        p = procs.get(name)
        if not p:
            continue
        base = p["baseline_mb"]
        rows.append([name, str(p["pid"]), _mb(base), _mb(p["peak_a_mb"]), _delta(p["peak_a_mb"], base),
                     _mb(p["peak_b_mb"]), _delta(p["peak_b_mb"], base), _mb(p["peak_c_alone_mb"]),
                     _delta(p["peak_c_alone_mb"], base), _mb(p["peak_c_mb"]), _delta(p["peak_c_mb"], base)])
    total_base = sum(procs[n]["baseline_mb"] or 0 for n in procs)
    rows.append(["**all**", "", _mb(total_base)] + sum(
        ([_mb(s), _delta(s, total_base)] for s in (
            _sum_of(procs, "peak_a_mb"), _sum_of(procs, "peak_b_mb"), _sum_of(procs, "peak_c_alone_mb"),
            _sum_of(procs, "peak_c_mb"))), []))
    lines += report._table(header, rows)
    instant = memory.get("sum_peak_mb") or _instant_sums(memory.get("timeline", []))
    lines += ["(The **all** row adds each process's own peak, which need not fall at the same instant: an upper "
              "bound. At one instant, all of them together peaked at " + ", ".join(
                  f"{instant[k]:,} MB in {label}" for k, label in (("baseline", "baseline"), ("a", "(a)"), ("b", "(b)"),
                                                                   ("c1", "(c) alone"), ("c", "(c) at once"))
                  if k in instant) + ".) Lowest MemAvailable of the machine: " + ", ".join(
                  f"{k} {v:,} MB" for k, v in memory.get("min_available_mb", {}).items()
                  if k in ("baseline", "b", "c")) + ".", ""]
    lines += _meaning(result)
    lines += ["## Statuses", ""]
    for phase, title in (("a", "(a) each worst case alone"), ("b", "(b) all at once"),
                         ("c_alone", "(c) accepted, alone"), ("c", "(c) accepted, at once")):
        data = phases.get(phase)
        if not data:
            continue
        lines += [f"### {title}: {len(data['requests'])} requests, {data['wall_s']} s", ""]
        lines += report._table(["request", "expected", "statuses", "seconds (max)", "largest growth (MB)"],
                               _status_rows(result, phase))
        timeouts = [o for o in data["requests"] if o["status"] == 503 and _timed_out(o)]
        if timeouts:
            lines += [f"503 (timeout): {len(timeouts)} requests got the ingress's \"did not answer within "
                      "`request_timeout_s`\" and the family replica cancelled the call (the log says CANCELLED): one "
                      "replica per family on shared cores could not finish them in time. The client waited up to "
                      f"{max(o['seconds'] for o in timeouts):.0f} s: the timeout bounds the call to the family, not "
                      "the wait for one of the ingress's `media_workers` decode slots before it.", ""]
    lines += ["## Afterwards", "",
              f"- Every family answers: {result.get('answers_after')}; /health status "
              f"`{result.get('health_after')}`.",
              f"- Pids before: `{result.get('pids_before')}`; after: `{result.get('pids_after')}` "
              f"({'unchanged' if result.get('pids_before') == result.get('pids_after') else '**CHANGED**'}).",
              "- Memory gates (/health, each family's `memory_budget_mb` and the highest sum of admission "
              "estimates it admitted at once, MiB): " + ", ".join(
                  f"{family} {gate['peak_mb']:,.1f} of {gate['budget_mb'] or 0:,.0f}"
                  for family, gate in sorted(result.get("memory_gates", {}).get("after_c", {}).items())) + ".",
              "- Problems: " + ("none" if not problems else ""), ""]
    lines += [f"  - {p}" for p in problems]
    if problems:
        lines.append("")
    found = result.get("serve_log") or {}
    if found:
        lines += [f"The serve run's log (`{Path(found['path']).name}` next to the JSON, {found['lines']:,} lines): "
                  f"{found['error_lines']} ERROR lines, {found['tracebacks']} tracebacks (Ray Serve logs every "
                  "exception a replica raises, the 4xx ones included); 5xx answers logged: "
                  + (", ".join(f"`{k}` x{v}" for k, v in found["5xx"].items()) or "none")
                  + "; kills or restarts: " + (str(len(found["kills_or_restarts"])) + " lines (below)"
                                               if found["kills_or_restarts"] else "none") + ".", ""]
        if found["exceptions"]:
            lines += report._table(["exception in the log (numbers as N)", "times"],
                                   [[f"`{k[:140]}`", str(v)] for k, v in found["exceptions"].items()])
        if found["kills_or_restarts"]:
            lines += ["```"] + found["kills_or_restarts"] + ["```", ""]
    if result.get("notes"):
        lines += ["Notes:", ""] + [f"- {note}" for note in result["notes"]] + [""]
    lines += sizing(result)
    return "\n".join(lines) + "\n"


def _instant_sums(timeline: list) -> dict[str, int]:
    """Highest sum over processes at one sample, per phase, from the (0.5 s) timeline of older runs' JSON."""
    sums: dict[str, int] = {}
    for _, phase, rss in timeline:
        key = phase.split(":", 1)[0]
        sums[key] = max(sums.get(key, 0), sum(rss.values()))
    return sums


def _sum_of(procs: dict, key: str) -> float | None:
    values = [p.get(key) for p in procs.values()]
    return None if any(v is None for v in values) else sum(values)


def _accepted_description(result: dict) -> str:
    d = result.get("accepted_inputs", {})
    if not d:
        return "(not run)"
    return (f"16 chats of a {d['prompt_tokens']}-token prompt (tiny LLM context 512), "
            f"{result.get('vlm8_at_once', 8)} VLM chats each with 8 "
            f"4096x4096 PNGs ({d['max_pixels_png']['encoded_mb']} MiB each encoded, a "
            f"{d['max_pixels_png']['json_body_mb_with_8']} MiB body), 2 VLM chats with one {d['noise_png']['side']}²"
            f" noise PNG ({d['noise_png']['encoded_mb']} MiB, a {d['noise_png']['json_body_mb']} MiB body), 8 "
            f"transcriptions of 599 s of 48 kHz stereo FLAC ({d['flac']['encoded_mb']} MiB) and 8 speech requests of "
            f"{d['speech_chars']} characters:")


def _status_rows(result: dict, phase: str) -> list[list]:
    requests_ = result["phases"][phase]["requests"]
    procs = result.get("memory", {}).get("processes", {})
    key = {"a": "peak_a_by_request_mb", "c_alone": "peak_c_alone_by_request_mb"}.get(phase)
    rows, seen = [], {}
    for o in requests_:
        seen.setdefault(o["name"], []).append(o)
    for name, outcomes in seen.items():
        counts = _labelled_count(outcomes)
        growth = "-"
        if key and procs:
            deltas = [(p, _growth(procs[p], key.replace("peak_", "").replace("_by_request_mb", ""), name))
                      for p in procs]
            top = max(deltas, key=lambda d: d[1])
            growth = f"{top[0]} {top[1]:+,.0f}" if top[1] >= 1 else "none"
        expected = str(outcomes[0].get("expected", "200/503"))
        statuses = ", ".join(f"{k} x{v}" if len(outcomes) > 1 else k for k, v in counts.items())
        rows.append([name, expected, statuses, f"{max(o['seconds'] for o in outcomes):.2f}", growth])
    return rows


def _growth(process: dict, label: str, request: str) -> float:
    """How much one process grew during one request sent alone: its peak less its RSS as the request began."""
    peak = (process.get(f"peak_{label}_by_request_mb") or {}).get(request)
    start = (process.get(f"start_{label}_by_request_mb") or {}).get(request)
    return 0.0 if peak is None or start is None else peak - start


def _meaning(result: dict) -> list[str]:
    procs = result.get("memory", {}).get("processes", {})
    if not procs:
        return []
    def d(name, key):
        p = procs.get(name, {})
        return (p.get(key) or 0) - (p.get("baseline_mb") or 0)
    worst_b = max(procs, key=lambda n: d(n, "peak_b_mb"))
    worst_c = max(procs, key=lambda n: d(n, "peak_c_mb"))
    if not procs[worst_c].get("peak_c_mb"):
        worst_c = max(procs, key=lambda n: d(n, "peak_c_alone_mb"))
    return [
        "What it means: the refused worst cases (a, b) cost at most "
        f"{d(worst_b, 'peak_b_mb'):+,.0f} MB in any one process ({worst_b}, all "
        f"{len(WORST) * COPIES_AT_ONCE} at once): "
        "bodies past the limits are refused from Content-Length or while being counted, prompts past the "
        "context before they are tokenized, images and audio from their headers. What the limits accept costs "
        f"more: {d(worst_c, 'peak_c_mb'):+,.0f} MB in {worst_c} with every accepted worst case in flight at once. "
        "Before the guard, one 50 MB body or one 2 MB prompt grew the LLM replica to ~20 GB.",
        "",
    ]


def sizing(result: dict) -> list[str]:
    """Draft of README's "Sizing the limits": memory per unit of each limit, from this run."""
    procs = result.get("memory", {}).get("processes", {})
    d = result.get("accepted_inputs", {})
    if not procs or not d:
        return []
    def grow(name, kind):
        return _growth(procs[name], "c_alone", kind) if name in procs else None
    est = result.get("estimates", {})
    vlm8, noise = "vlm: 8 images of 4096x4096", "vlm: 1 noise image near max_image_bytes"
    stt, tts, llm = "stt: 599 s of 48 kHz stereo FLAC", "tts: 4096 characters", "llm: prompt just under the context"
    body_mb = d["noise_png"]["json_body_mb"]
    rows = [
        ["JSON body (`max_json_body_bytes`)", f"one {body_mb} MiB body (1 noise image)",
         _per(grow("ingress", noise), body_mb, "MB per MB of body"), _per(grow("vlm", noise), body_mb, "MB per MB"),
         "-"],
        ["image pixels (`max_image_pixels`, `max_images`)", "8 images of 4096x4096 in one chat",
         _per(grow("ingress", vlm8), 8, "MB per image"), _per(grow("vlm", vlm8), 8, "MB per image"),
         _est(est.get("vlm: per image"), "per image")],
        ["audio (`max_audio_seconds`)", "599 s, 48 kHz stereo",
         _per(grow("ingress", stt), 599 / 60, "MB per minute"), _per(grow("stt", stt), 599 / 60, "MB per minute"),
         _est(None if est.get(stt) is None else est[stt] / (599 / 60), "per minute")],
        ["speech text (`max_speech_input_chars`)", f"{d['speech_chars']} characters",
         _per(grow("ingress", tts), d["speech_chars"] / 1000, "MB per 1000 chars"),
         _per(grow("tts", tts), d["speech_chars"] / 1000, "MB per 1000 chars"),
         _est(est.get(tts), "per request (one max_chars_per_call piece)")],
        ["prompt tokens (context, `max_prompt_tokens`)", f"{d['prompt_tokens']} tokens (tiny LLM)",
         _per(grow("ingress", llm), d["prompt_tokens"] / 1000, "MB per 1000 tokens"),
         _per(grow("llm", llm), d["prompt_tokens"] / 1000, "MB per 1000 tokens"),
         _est(est.get(llm), "for this request")],
    ]
    lines = [
        "## Sizing the limits (draft for the README)",
        "",
        "Measured growth of one process's RSS for one request at each limit, alone on an idle server (phase (c) "
        "alone: its peak less the RSS as it began; sent smallest first, so memory an earlier request freed but the "
        "allocator kept can hide little of a later one's), divided by how much of the limit it used; against it, "
        "what deployments/admission.py estimates for the same request (what the replica's `memory_budget_mb` is "
        "charged). The tiny demo models make the model-side figures small; the ingress's figures (bodies, "
        "decoded media) do not depend on the model.",
        "",
    ]
    lines += report._table(["limit", "request", "ingress", "family replica", "admission estimate"], rows)
    limits = result.get("limits", {})
    per_image_ingress, per_image_vlm = grow("ingress", vlm8), grow("vlm", vlm8)
    per_image_est = est.get("vlm: per image")
    if per_image_ingress and per_image_vlm and per_image_est is not None and per_image_vlm / 8 > 10 * per_image_est:
        images, concurrent = limits.get("max_images", 8), limits.get("max_concurrent_requests", 256)
        lines += [
            f"**Images are not in the estimates.** A {int(limits.get('max_image_pixels', 0) ** 0.5)}² image costs "
            f"~{per_image_ingress / 8:,.0f} MB in the ingress and ~{per_image_vlm / 8:,.0f} MB in the VLM replica "
            "(the decoded full-size image travels from the ingress to the replica, where the processor shrinks it), "
            f"while the replica's memory gate is charged {per_image_est:,.2f} MB per image (the processor's output). "
            f"So `memory_budget_mb` does not bound it: by extrapolation, `max_images`={images} x "
            f"`max_concurrent_requests`={concurrent} such images would be "
            f"~{per_image_ingress / 8 * images * concurrent / 1024:,.0f} GB "
            "in the ingress. Until the estimate counts decoded pixels, size `max_image_pixels` x `max_images` x the "
            "VLM's `max_ongoing_requests` + `max_queued_requests` (about 4 bytes per pixel, ~2-3 copies) to the "
            "node's memory.",
            "",
        ]
    base = {n: p.get("baseline_mb") for n, p in procs.items()}
    conc = {n: (p.get("peak_c_mb") or 0) - (p.get("baseline_mb") or 0) for n, p in procs.items()}
    lines += [
        "How an operator sizes them:",
        "",
        f"- **Per replica**: RSS at rest (here ingress {_mb(base.get('ingress'))}, llm {_mb(base.get('llm'))}, vlm "
        f"{_mb(base.get('vlm'))}, stt {_mb(base.get('stt'))}, tts {_mb(base.get('tts'))} MB with the tiny models; "
        "real models add their weights) plus the growth of the worst mix it admits at once (here, every "
        f"accepted worst case together: ingress {conc.get('ingress', 0):+,.0f}, llm {conc.get('llm', 0):+,.0f}, "
        f"vlm {conc.get('vlm', 0):+,.0f}, stt {conc.get('stt', 0):+,.0f}, tts {conc.get('tts', 0):+,.0f} MB). "
        "The sum over every replica on a node must stay under Ray's memory-monitor threshold (95% of the node), "
        "or the monitor kills workers of every deployment on it.",
        "- **The ingress** holds what clients send: bodies up to `max_json_body_bytes` / `max_upload_bytes` while "
        "they are read, and decoded media (`media_workers` decodes at a time, but decoded images and audio stay "
        "in memory until the family answers). Its worst case is about `max_concurrent_requests` x the per-request "
        "figures above; lower `max_concurrent_requests`, `max_images` or `max_image_pixels` when that does not fit.",
        "- **Family replicas** are charged the admission estimate against `memory_budget_mb` "
        "(`args.families.<family>.memory_budget_mb`); a request that alone exceeds it is a 413, others wait. Set "
        "the budget to the memory the replica may use beyond its weights; where the measured growth above "
        "exceeds the estimate (the raw media a request carries is not in the estimate), leave that margin too.",
        "- **Per model**: `max_prompt_tokens` (below the context) and `max_audio_seconds` bound the token and "
        "sample counts the estimates grow with: KV cache and prefill grow linearly with tokens, attention scores "
        "quadratically; decoded audio costs 4 bytes per 16 kHz sample (~3.7 MB per minute) plus one sub-batch of "
        "`max_chunks_per_call` 30 s chunks.",
        "",
    ]
    return lines


def _per(value, units, label) -> str:
    if value is None or not units:
        return "-"
    return f"{value:+,.0f} MB ({value / units:,.1f} {label})"


def _est(value, label) -> str:
    return "-" if value is None else f"{value:,.2f} MB {label}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="JSON output (default bench/runs/hostile-<timestamp>.json)")
    p.add_argument("--results", type=Path, default=HERE / "HOSTILE.md", help="Markdown output")
    p.add_argument("--render", type=Path, default=None, help="only write the Markdown again from this run's JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s bench.hostile %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.render:
        args.results.write_text(markdown(json.loads(args.render.read_text()), args.render))
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or HERE / "runs" / f"hostile-{stamp}.json"
    result: dict[str, Any] = {"meta": report.machine_meta(), "limits": _limits(), "notes": []}
    result["meta"]["uncommitted"] = uncommitted_changes()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        try:
            run(result, Path(tmp), out.with_suffix(".log"))
            result["estimates"] = estimates(Path(tmp) / "models", result.get("accepted_inputs", {}))
        finally:
            result["meta"]["total_s"] = round(time.perf_counter() - started, 1)
            result["problems"] = check(result)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=str))
            args.results.write_text(markdown(result, out))
            log.info("wrote %s and %s", out, args.results)
    for problem in result["problems"]:
        log.error("problem: %s", problem)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
