"""Audio routes: transcriptions, translations, speech, and the voice round trip (STT -> LLM -> TTS)."""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from loading import Family

from ..audio import (
    DEFAULT_SPEECH_FORMAT,
    STREAMED_FORMATS,
    StreamEncoder,
    encode_audio_with_rate,
    format_srt,
    format_vtt,
)
from ..errors import InvalidRequestError
from ..ingress import Ingress
from ..limits import check_speech_text
from ..params import SpeechParams, SpeechResult, TranscribeParams, TranscribeResult
from ..protocol import (
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechRequest,
    SpeechUsage,
    TranscriptionDurationUsage,
    TranscriptionForm,
    TranscriptionInputTokenDetails,
    TranscriptionResponse,
    TranscriptionSegment,
    TranscriptionUsage,
    TranscriptionVerboseResponse,
    TranscriptionWord,
    TranscriptTextDelta,
    TranscriptTextDone,
    TranslationForm,
    VoiceChatForm,
    VoiceChatResponse,
)
from ..sse import event, guarded, prepend
from ..vad import VadOptions
from .common import ERRORS, MULTIPART, UPLOAD_LIMITS, IngressDep, WaitDep, check_form

router = APIRouter(tags=["audio"], responses=ERRORS)

_AUDIO_TYPES = {"audio/wav": {}, "audio/flac": {}, "audio/pcm": {}, "audio/mpeg": {}, "audio/ogg": {}, "audio/aac": {}}
_TRANSCRIPT_RESPONSES = {200: {
    "model": TranscriptionResponse | TranscriptionVerboseResponse,
    "content": {"text/plain": {}, "text/vtt": {}, "text/event-stream": {}},
    "description": "json: {text}; verbose_json: with language, duration, segments and/or words; text/srt/vtt: "
                   "text; with `stream=true`: transcript.text.delta events, then transcript.text.done"}}
AUDIO_TOKENS_PER_S = 50  # Whisper's encoder positions: 1500 per 30 s window


def _usage(result: TranscribeResult) -> TranscriptionUsage:
    audio = math.ceil(result.duration * AUDIO_TOKENS_PER_S)
    given = audio + result.prompt_tokens
    return TranscriptionUsage(input_tokens=given, output_tokens=result.tokens, total_tokens=given + result.tokens,
                              input_token_details=TranscriptionInputTokenDetails(audio_tokens=audio,
                                                                                 text_tokens=result.prompt_tokens))


def _render(result: TranscribeResult, fmt: str, granularities: list[str], task: str) -> Response:
    # whisper-1's usage (gpt-4o-transcribe's is tokens, as the stream's done event has); none on translations
    usage = TranscriptionDurationUsage(seconds=math.ceil(result.duration)) if task == "transcribe" else None
    segments = [TranscriptionSegment(id=s.id, seek=round(s.start * 100), start=s.start, end=s.end, text=s.text,
                                     tokens=s.token_ids, temperature=s.temperature, avg_logprob=s.avg_logprob,
                                     compression_ratio=s.compression_ratio, no_speech_prob=s.no_speech_prob)
                for s in result.segments]
    if fmt == "json":
        return JSONResponse(TranscriptionResponse(text=result.text, usage=usage).model_dump(exclude_none=True))
    if fmt == "text":
        return PlainTextResponse(result.text)
    if fmt == "srt":
        return PlainTextResponse(format_srt(segments))
    if fmt == "vtt":
        return PlainTextResponse(format_vtt(segments), media_type="text/vtt")
    verbose = TranscriptionVerboseResponse(
        task=task,
        language="english" if task == "translate" else result.language_name or result.language or "unknown",
        duration=result.duration, text=result.text,
        segments=segments if "segment" in granularities else None,
        words=[TranscriptionWord(word=w.word, start=w.start, end=w.end) for w in result.words]
        if "word" in granularities else None, usage=usage)
    return JSONResponse(verbose.model_dump(exclude_none=True))


async def _transcript_events(items: AsyncGenerator[dict, None]) -> AsyncGenerator[str, None]:
    """OpenAI's streamed transcription: a delta per piece of the audio, then the whole text with usage."""
    said = False
    async for item in items:
        if "segment" in item:
            text = item["segment"].text
            if text:
                yield event(TranscriptTextDelta(delta=(" " if said else "") + text))
                said = True
        else:
            result: TranscribeResult = item["result"]
            yield event(TranscriptTextDone(text=result.text, usage=_usage(result)))


async def _transcribe(ingress: Ingress, params: TranscribeParams, fmt: str, granularities: list[str],
                      stream: bool) -> Response:
    if stream:
        items = ingress.transcribe_stream(params)
        first = await items.__anext__()  # errors before the first event are plain HTTP errors
        return StreamingResponse(guarded(_transcript_events(prepend(first, items))), media_type="text/event-stream")
    result = await ingress.transcribe(params)
    return _render(result, fmt, granularities, params.task)


@router.post("/v1/audio/transcriptions", form_limits=UPLOAD_LIMITS, response_model=None,
             responses=_TRANSCRIPT_RESPONSES)
async def create_transcription(form: Annotated[TranscriptionForm, MULTIPART], ingress: IngressDep, wait_s: WaitDep):
    check_form(form, ingress.limits, "prompt", "chunking_strategy")
    words = "word" in form.timestamp_granularities
    if words and form.response_format != "verbose_json":
        raise InvalidRequestError("word timestamps need response_format=verbose_json",
                                  param="timestamp_granularities")
    if form.stream and form.response_format not in ("json", "text"):  # refused before the upload is decoded
        raise InvalidRequestError(f"stream=true answers with server-sent events; response_format="
                                  f"{form.response_format!r} cannot be streamed (use json or text)", param="stream")
    chunking = form.vad_options()
    vad = None if chunking is None else VadOptions(chunking.threshold, chunking.prefix_padding_ms,
                                                   chunking.silence_duration_ms)
    spec = ingress.spec(form.model, Family.STT)
    audio, rate = await ingress.decode_audio(await form.file.read(), spec.name)
    params = TranscribeParams(
        model=form.model, audio=audio, sample_rate=rate, language=form.language, prompt=form.prompt,
        temperature=form.temperature, detect_language=form.response_format == "verbose_json" and not form.stream,
        wait_s=wait_s, word_timestamps=words, vad=vad)
    return await _transcribe(ingress, params, form.response_format, form.timestamp_granularities, form.stream)


@router.post("/v1/audio/translations", form_limits=UPLOAD_LIMITS, response_model=None,
             responses=_TRANSCRIPT_RESPONSES)
async def create_translation(form: Annotated[TranslationForm, MULTIPART], ingress: IngressDep, wait_s: WaitDep):
    """Speech in any language Whisper knows, as English text (Whisper's translate task)."""
    check_form(form, ingress.limits, "prompt")
    spec = ingress.spec(form.model, Family.STT)
    audio, rate = await ingress.decode_audio(await form.file.read(), spec.name)
    params = TranscribeParams(model=form.model, audio=audio, sample_rate=rate, prompt=form.prompt,
                              temperature=form.temperature, wait_s=wait_s, task="translate")
    return await _transcribe(ingress, params, form.response_format, ["segment"], False)


async def _speech_bytes(encoder: StreamEncoder,
                        pieces: AsyncGenerator[SpeechResult, None]) -> AsyncGenerator[bytes, None]:
    async for piece in pieces:
        data = await _encode(encoder, encoder.write, piece.waveform)
        if data:
            yield data
    if data := await _encode(encoder, encoder.close):
        yield data


async def _speech_events(encoder: StreamEncoder,
                         pieces: AsyncGenerator[SpeechResult, None]) -> AsyncGenerator[str, None]:
    tokens = 0
    async for piece in pieces:
        tokens += piece.tokens
        if data := await _encode(encoder, encoder.write, piece.waveform):
            yield event(SpeechAudioDelta(audio=base64.b64encode(data).decode()))
    if data := await _encode(encoder, encoder.close):
        yield event(SpeechAudioDelta(audio=base64.b64encode(data).decode()))
    yield event(SpeechAudioDone(usage=SpeechUsage(input_tokens=tokens, total_tokens=tokens)))


async def _encode(encoder: StreamEncoder, fn, *args) -> bytes:
    """wav is a cast of the samples; codecs and pcm's resampling to 24 kHz run off the event loop."""
    return fn(*args) if encoder.fmt == "wav" else await asyncio.to_thread(fn, *args)


@router.post("/v1/audio/speech", response_class=Response,
             responses={200: {"content": {**_AUDIO_TYPES, "text/event-stream": {}},
                              "description": "The audio in `response_format`, sent as it is synthesized (pcm, wav, "
                                             "opus, aac); with `stream_format: sse`, speech.audio.delta events"}})
async def create_speech(body: SpeechRequest, ingress: IngressDep, wait_s: WaitDep) -> Response:
    check_speech_text(body.input, ingress.limits, "input")
    params = SpeechParams(model=body.model, text=body.input, voice=body.voice_name, speed=body.speed, wait_s=wait_s)
    fmt = body.response_format or DEFAULT_SPEECH_FORMAT
    if body.stream_format == "audio" and fmt not in STREAMED_FORMATS:
        result = await ingress.synthesize(params)  # flac, mp3: one body, with its length
        # off the event loop: ~0.5 s of mp3 encoding for minutes of speech would hold up every other request
        data, media_type, _ = await ingress._off_loop(encode_audio_with_rate, result.waveform, result.sample_rate,
                                                      fmt)
        return Response(data, media_type=media_type)
    pieces = ingress.synthesize_stream(params)
    first = await pieces.__anext__()  # errors before the first piece are plain HTTP errors
    try:
        encoder = StreamEncoder(fmt, first.sample_rate)
    except Exception:
        await pieces.aclose()
        raise
    if body.stream_format == "sse":
        return StreamingResponse(guarded(_speech_events(encoder, prepend(first, pieces))),
                                 media_type="text/event-stream")
    return StreamingResponse(_speech_bytes(encoder, prepend(first, pieces)), media_type=encoder.media_type)


@router.post("/v1/audio/chat", form_limits=UPLOAD_LIMITS, response_model=VoiceChatResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "The round trip's result, or with `stream=true` its events: transcript, "
                                             "reply.delta, audio.delta, done"}})
async def voice_chat(form: Annotated[VoiceChatForm, MULTIPART], ingress: IngressDep, wait_s: WaitDep):
    """The voice-agent round trip: audio -> STT -> LLM -> TTS -> audio, in one request; each sentence of
    the reply is synthesized while the LLM writes the next."""
    check_form(form, ingress.limits, "system_prompt")
    upload = await form.file.read()
    if form.stream:
        return StreamingResponse(await ingress.voice_chat_stream(form, upload, wait_s), media_type="text/event-stream")
    return await ingress.voice_chat(form, upload, wait_s)
