"""`modelfleet check`: a preflight against a running server. Each family it serves answers a real request.

Lists the models (GET /v1/models), reports every model that failed to load, and for each family present
checks one model (the first ready one, a base before an adapter): speech synthesis (a valid WAV with
samples), chat, streamed chat (deltas, first-token latency), a vision chat over a 1x1 PNG, a
transcription (of the synthesized speech when there is a TTS model, else of a tone), and the voice round
trip /v1/audio/chat. Exit 0: every check ok; 1: a check failed; 2: the server could not be checked
(unreachable, a refused API key, no model list).

Plain HTTP with `requests`: importing this module loads neither ray nor torch, so the check starts fast.
"""

from __future__ import annotations

import argparse
import array
import base64
import io
import json
import math
import os
import struct
import sys
import time
import wave
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

import requests

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 86400.0  # a day; a socket takes no timeout past ~9.2e9 s (OverflowError inside requests)
CONNECT_TIMEOUT_S = 3.0  # an unreachable server is reported in seconds, whatever --timeout says
FAMILIES = ("llm", "vlm", "stt", "tts")
EXIT_OK, EXIT_FAILED, EXIT_UNCHECKED = 0, 1, 2
# Which model of a family is checked: ready first; a lazy, scaled-to-zero or still loading one is loaded by
# the check's own request (every request waits up to --timeout for its model: X-Wait-For-Model).
STATE_RANK = {"ready": 0, "not_loaded": 1, "scaled_to_zero": 1, "loading": 2}
BROKEN_STATES = ("failed", "unavailable")
PROMPT = "Say hello in five words."
SPEECH_TEXT = "Hello from modelfleet check."
MAX_TOKENS = 8


@dataclass
class Check:
    status: str
    """`ok`, `FAIL` or `skip`."""
    name: str
    """`load`, `speech`, `chat`, `chat-stream`, `vision`, `transcription` or `voice`."""
    model: str | None
    latency_ms: float | None
    detail: str
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} {self.model}" if self.model else self.name


@dataclass
class Answer:
    """What a probe found: a short detail, facts for --json, and the speech it produced (for the listeners)."""

    detail: str
    facts: dict[str, Any] = field(default_factory=dict)
    audio: bytes | None = None


class CheckFailed(Exception):
    """A request failed or its answer was wrong; the message is the check's detail."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Unchecked(Exception):
    """The server cannot be checked at all (exit 2)."""


class Server:
    def __init__(self, url: str, api_key: str | None, timeout: float):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.session = requests.Session()
        self.session.headers["X-Wait-For-Model"] = f"{timeout:g}"  # a loading model is waited for, not a 503
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        timeout = (min(CONNECT_TIMEOUT_S, self.timeout), self.timeout)
        try:
            response = self.session.request(method, self.url + path, timeout=timeout, **kwargs)
        except requests.ConnectTimeout:
            raise CheckFailed(f"{method} {path}: no connection within {timeout[0]:g} s") from None
        except requests.ConnectionError as exc:
            raise CheckFailed(f"{method} {path}: cannot connect ({_root_cause(exc)})") from None
        except requests.Timeout:
            raise CheckFailed(f"{method} {path}: no answer within {self.timeout:g} s (--timeout)") from None
        except requests.RequestException as exc:  # a URL requests cannot use (InvalidURL, InvalidSchema, ...)
            raise CheckFailed(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise CheckFailed(f"HTTP {response.status_code} on {method} {path}: {_error_message(response)}",
                              response.status_code)
        return response


def _root_cause(exc: BaseException) -> str:
    """The innermost cause (`ConnectionRefusedError: ...`), not urllib3's pool wrapping of it."""
    for _ in range(8):
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return f"{type(exc).__name__}: {exc}"


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200] or response.reason


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise CheckFailed(f"not JSON: {response.text[:80]!r}") from None


# --- what to check --------------------------------------------------------------------------------


def list_models(server: Server) -> list[dict]:
    try:
        return list(_json(server.request("GET", "/v1/models"))["data"])
    except CheckFailed as exc:
        hint = "; pass --api-key or set MODELFLEET_API_KEY" if exc.status in (401, 403) else ""
        raise Unchecked(f"cannot check the server at {server.url}: {exc}{hint}") from None
    except (KeyError, TypeError):
        raise Unchecked(f"cannot check the server at {server.url}: GET /v1/models has no `data` list") from None


def health_models(server: Server) -> dict[str, dict]:
    """/health's per-model view (errors, adapters: with a key when keys are on); empty when it has none."""
    try:
        models = _json(server.request("GET", "/health")).get("models")
    except (CheckFailed, AttributeError):
        return {}
    return models if isinstance(models, dict) else {}


def is_adapter(model: dict, health: dict[str, dict]) -> bool:
    return bool(health.get(model["id"], {}).get("adapter"))


def choose(models: list[dict], family: str, health: dict[str, dict]) -> str | None:
    """The family's first ready model, a base before an adapter; else one a request can still load."""
    usable = [m for m in models if m.get("family") == family and m.get("state") in STATE_RANK]
    best = min(usable, key=lambda m: (STATE_RANK[m["state"]], is_adapter(m, health)), default=None)
    return best["id"] if best else None


def load_failure(model: dict, health: dict[str, dict]) -> Check:
    """A model that failed to load (or whose family did not answer): its error's first and last lines (what
    went wrong, and the loaders' errors end with what to do); all of it in facts."""
    error = str(health.get(model["id"], {}).get("error") or "no error shown (/health gives it to callers with a key)")
    lines = [line for line in error.splitlines() if line.strip()] or [error]
    short = _one_line(lines[0], 160) + (" ... " + _one_line(lines[-1], 160) if len(lines) > 1 else "")
    return Check("FAIL", "load", model["id"], None, f"{model['state']}: {short}", {"error": error})


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the probes: each one real request, raising CheckFailed when it or its answer is wrong ---------


def probe_speech(server: Server, model: str) -> Answer:
    body = {"model": model, "input": SPEECH_TEXT, "voice": "alloy", "response_format": "wav"}
    data = server.request("POST", "/v1/audio/speech", json=body).content
    rate, channels, pcm, width = read_wav(data)
    samples = len(pcm) // (width * channels)
    if samples == 0:
        raise CheckFailed(f"the WAV has no samples ({len(data)} bytes)")
    seconds = samples / rate
    return Answer(f"wav {rate} Hz, {channels} ch, {seconds:.2f} s", {"bytes": len(data), "sample_rate": rate,
                  "channels": channels, "samples": samples}, audio=write_wav(rate, channels, width, pcm))


def probe_chat(server: Server, model: str) -> Answer:
    return _chat_answer(server, {"model": model, "messages": [{"role": "user", "content": PROMPT}]})


def probe_vision(server: Server, model: str) -> Answer:
    content = [{"type": "text", "text": "What colour is this image?"},
               {"type": "image_url", "image_url": {"url": png_data_uri()}}]
    return _chat_answer(server, {"model": model, "messages": [{"role": "user", "content": content}]})


def _chat_answer(server: Server, body: dict) -> Answer:
    reply = _json(server.request("POST", "/v1/chat/completions", json={**body, "max_tokens": MAX_TOKENS,
                                                                         "temperature": 0}))
    try:
        choice, tokens = reply["choices"][0], reply["usage"]["completion_tokens"]
        text, finish = choice["message"]["content"] or "", choice["finish_reason"]
    except (KeyError, IndexError, TypeError):
        raise CheckFailed(f"not a chat completion: {str(reply)[:120]}") from None
    return Answer(f"{_quote(text)} ({tokens} tokens, {finish})", {"completion_tokens": tokens,
                                                                  "finish_reason": finish})


def probe_chat_stream(server: Server, model: str) -> Answer:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}
    start = time.perf_counter()
    first_ms: float | None = None
    deltas, text, done = 0, "", False
    with server.request("POST", "/v1/chat/completions", json=body, stream=True) as response:
        for data in sse_data(response.iter_lines()):
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise CheckFailed(f"error event after {deltas} deltas: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    deltas, text = deltas + 1, text + piece
                    first_ms = first_ms if first_ms is not None else _ms(start)
    if not done:
        raise CheckFailed(f"the stream ended without [DONE] after {deltas} deltas")
    first = f", first token {first_ms:.0f} ms" if first_ms is not None else ""
    return Answer(f"{deltas} deltas{first}: {_quote(text)}", {"deltas": deltas, "first_token_ms": first_ms})


def sse_data(lines: Iterator[bytes]) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream (UTF-8, whatever the response's charset says)."""
    for line in lines:
        if line.startswith(b"data:"):
            yield line[5:].decode().strip()


def probe_transcription(server: Server, model: str, audio: bytes, source: str) -> Answer:
    form = {"model": model, "response_format": "json"}
    reply = _json(server.request("POST", "/v1/audio/transcriptions", data=form,
                                 files={"file": ("check.wav", audio, "audio/wav")}))
    if not isinstance(reply, dict) or not isinstance(reply.get("text"), str):
        raise CheckFailed(f"no `text` in {str(reply)[:120]}")
    return Answer(f"{_quote(reply['text'])} (of {source})", {"text": reply["text"], "audio": source})


def probe_voice(server: Server, models: dict[str, str], audio: bytes, source: str) -> Answer:
    form = {"stt_model": models["stt"], "llm_model": models["llm"], "tts_model": models["tts"],
            "max_tokens": str(MAX_TOKENS), "response_format": "wav"}
    reply = _json(server.request("POST", "/v1/audio/chat", data=form,
                                 files={"file": ("check.wav", audio, "audio/wav")}))
    try:
        spoken = base64.b64decode(reply["audio"], validate=True)
        transcript, text = reply["transcript"], reply["reply"]
    except (KeyError, TypeError, ValueError):
        raise CheckFailed(f"not a voice round trip: {str(reply)[:120]}") from None
    rate, channels, pcm, width = read_wav(spoken)
    seconds = len(pcm) / (width * channels * rate)
    return Answer(f"heard {_quote(transcript, 20)}, replied {_quote(text, 20)}, {seconds:.2f} s of speech",
                  {"transcript": transcript, "reply": text, "audio_seconds": round(seconds, 3), "audio": source})


def _quote(text: str, limit: int = 32) -> str:
    text = " ".join(text.split())
    return json.dumps(text if len(text) <= limit else text[: limit - 3] + "...", ensure_ascii=False)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


# --- media made in code ---------------------------------------------------------------------------


def png_data_uri() -> str:
    """A 1x1 RGB PNG (one red pixel) as a data URI, written with zlib: no imaging library needed."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8 bits, RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xc8\x1e\x1e")) \
        + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def tone_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A 220 Hz tone with a 3 Hz tremolo, 16-bit mono WAV."""
    samples = array.array("h", (int(9000 * math.sin(2 * math.pi * 220 * i / rate)
                                    * (1 + 0.5 * math.sin(2 * math.pi * 3 * i / rate)) / 1.5)
                                for i in range(int(seconds * rate))))
    if sys.byteorder == "big":
        samples.byteswap()
    return write_wav(rate, 1, 2, samples.tobytes())


def read_wav(data: bytes) -> tuple[int, int, bytes, int]:
    """(sample rate, channels, PCM bytes, sample width) of a WAV. A streamed WAV's header gives no sizes
    (0xFFFFFFFF): the samples are whatever follows it."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            pcm = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise CheckFailed(f"not a valid WAV ({str(exc) or type(exc).__name__}; {len(data)} bytes, "
                          f"starting {data[:12]!r})") from None
    return rate, channels, pcm[: len(pcm) - len(pcm) % (width * channels)], width


def write_wav(rate: int, channels: int, width: int, pcm: bytes) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


# --- running them ---------------------------------------------------------------------------------


def timed(name: str, model: str, probe: Callable[[], Answer]) -> tuple[Check, Answer | None]:
    start = time.perf_counter()
    try:
        answer = probe()
    except CheckFailed as exc:
        return Check("FAIL", name, model, _ms(start), _one_line(str(exc))), None
    except (requests.RequestException, ValueError) as exc:  # a broken stream, bad JSON in an event
        return Check("FAIL", name, model, _ms(start), _one_line(f"{type(exc).__name__}: {exc}")), None
    return Check("ok", name, model, _ms(start), answer.detail, answer.facts), answer


def run_checks(server: Server, models: list[dict]) -> list[Check]:
    health = health_models(server)
    checks = [load_failure(m, health) for m in models if m.get("state") in BROKEN_STATES]
    present = {m.get("family") for m in models}
    chosen = {f: name for f in FAMILIES if (name := choose(models, f, health))}

    def skip(name: str, family: str) -> Check:
        why = f"no usable {family} model (see the load failures)" if family in present else f"no {family} model served"
        return Check("skip", name, None, None, why)

    def run(name: str, family: str, probe: Callable[[str], Answer]) -> Answer | None:
        if family not in chosen:
            checks.append(skip(name, family))
            return None
        check, answer = timed(name, chosen[family], lambda: probe(chosen[family]))
        checks.append(check)
        return answer

    speech = run("speech", "tts", lambda m: probe_speech(server, m))
    run("chat", "llm", lambda m: probe_chat(server, m))
    run("chat-stream", "llm", lambda m: probe_chat_stream(server, m))
    run("vision", "vlm", lambda m: probe_vision(server, m))
    audio, source = (speech.audio, "the speech check's audio") if speech and speech.audio \
        else (tone_wav(), "a 1 s tone")
    run("transcription", "stt", lambda m: probe_transcription(server, m, audio, source))
    missing = [f for f in ("stt", "llm", "tts") if f not in chosen]
    if missing:
        checks.append(Check("skip", "voice", None, None, f"needs stt, llm and tts; no usable {', '.join(missing)}"))
    else:
        voice_models = {f: chosen[f] for f in ("stt", "llm", "tts")}
        checks.append(timed("voice", "+".join(voice_models.values()),
                            lambda: probe_voice(server, voice_models, audio, source))[0])
    return checks


def url_problem(url: str) -> str | None:
    """Why `url` is no server address `check` can use, with the fix (None: it is one)."""
    try:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.hostname:
            return None
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
        return f"it is not a URL ({exc}); write one such as {DEFAULT_URL}"
    if "://" not in url:
        return f"it has no scheme; write it as http://{url}"
    return f"it is not an http(s) URL with a host, such as {DEFAULT_URL}"


def check(url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    """Every check against the server at `url`, as the report --json prints."""
    server = Server(url, api_key, timeout)
    start = time.perf_counter()
    report: dict[str, Any] = {"url": server.url, "models": [], "checks": [], "error": None}
    try:
        if problem := url_problem(url):
            raise Unchecked(f"cannot check the server at {url!r} (--url or MODELFLEET_URL): {problem}")
        models = list_models(server)
    except Unchecked as exc:
        return {**report, "exit_code": EXIT_UNCHECKED, "ok": False, "error": str(exc), "failed": [],
                "summary": {}, "total_ms": _ms(start)}
    checks = run_checks(server, models)
    failed = [c.label for c in checks if c.status == "FAIL"]
    return {**report, "exit_code": EXIT_FAILED if failed else EXIT_OK, "ok": not failed,
            "models": [{"id": m.get("id"), "family": m.get("family"), "state": m.get("state")} for m in models],
            "checks": [asdict(c) for c in checks], "failed": failed,
            "summary": {s: sum(c.status == s for c in checks) for s in ("ok", "FAIL", "skip")},
            "total_ms": _ms(start)}


def print_text(report: dict[str, Any], out: TextIO) -> None:
    if report["error"]:
        print(f"modelfleet check: {report['error']}", file=out)
        return
    families = sorted({m["family"] for m in report["models"] if m["family"]})
    print(f"modelfleet check {report['url']}: {len(report['models'])} models ({', '.join(families)})", file=out)
    width = min(max([len(c["model"] or "-") for c in report["checks"]] + [5]), 24)  # longer ones push the line
    for c in report["checks"]:
        latency = f"{c['latency_ms']:.0f} ms" if c["latency_ms"] is not None else "-"
        print(f"{c['status']:<4}  {c['name']:<13}  {c['model'] or '-':<{width}}  {latency:>8}  {c['detail']}",
              file=out)
    counts = report["summary"]
    line = f"{counts['ok']} ok, {counts['FAIL']} failed, {counts['skip']} skipped in {report['total_ms'] / 1000:.1f} s"
    print(line + (f"; FAILED: {', '.join(report['failed'])}" if report["failed"] else ""), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelfleet check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MODELFLEET_URL") or DEFAULT_URL,
                        help=f"the server (default: $MODELFLEET_URL, else {DEFAULT_URL})")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get("MODELFLEET_API_KEY") or None,
                        help="sent as `Authorization: Bearer` (default: $MODELFLEET_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--timeout", metavar="S", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds per request, waiting for a model still loading included "
                             f"(default {DEFAULT_TIMEOUT_S:g}, at most {MAX_TIMEOUT_S:g})")
    args = parser.parse_args(argv)
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # nan and inf too
        parser.error(f"--timeout {args.timeout:g} is out of range: give seconds above 0 and at most "
                     f"{MAX_TIMEOUT_S:g} (default {DEFAULT_TIMEOUT_S:g})")
    report = check(args.url, args.api_key, args.timeout)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_text(report, sys.stderr if report["error"] else sys.stdout)
    return int(report["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
