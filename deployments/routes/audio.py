"""Audio routes: transcriptions, speech, and the voice round trip (STT -> LLM -> TTS)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from loading import Family

from ..audio import encode_audio_with_rate, format_srt, format_vtt
from ..errors import InvalidRequestError
from ..limits import check_form_fields, check_speech_text
from ..params import SpeechParams, TranscribeParams
from ..protocol import (
    SpeechRequest,
    TranscriptionForm,
    TranscriptionResponse,
    TranscriptionSegment,
    TranscriptionVerboseResponse,
    VoiceChatForm,
    VoiceChatResponse,
)
from .common import ERRORS, MULTIPART, UPLOAD_LIMITS, IngressDep, WaitDep

router = APIRouter(tags=["audio"], responses=ERRORS)

_AUDIO_TYPES = {"audio/wav": {}, "audio/flac": {}, "audio/pcm": {}, "audio/mpeg": {}, "audio/ogg": {}}


@router.post(
    "/v1/audio/transcriptions", form_limits=UPLOAD_LIMITS, response_model=None,
    responses={200: {"model": TranscriptionResponse | TranscriptionVerboseResponse,
                     "content": {"text/plain": {}, "text/vtt": {}},
                     "description": "json: {text}; verbose_json: with language, duration, segments; text/srt/vtt: text"}},
)
async def create_transcription(form: Annotated[TranscriptionForm, MULTIPART], ingress: IngressDep, wait_s: WaitDep):
    check_form_fields({"prompt": form.prompt}, ingress.limits)
    if "word" in form.timestamp_granularities:
        raise InvalidRequestError("word timestamps are not supported; use segment", param="timestamp_granularities")
    spec = ingress.spec(form.model, Family.STT)
    audio, rate = await ingress.decode_audio(await form.file.read(), spec.name)
    result = await ingress.transcribe(TranscribeParams(
        model=form.model, audio=audio, sample_rate=rate, language=form.language, prompt=form.prompt,
        temperature=form.temperature, detect_language=form.response_format == "verbose_json", wait_s=wait_s))
    segments = [TranscriptionSegment(id=s.id, start=s.start, end=s.end, text=s.text) for s in result.segments]
    renderers = {
        "json": lambda: JSONResponse({"text": result.text}),
        "text": lambda: PlainTextResponse(result.text),
        "srt": lambda: PlainTextResponse(format_srt(segments)),
        "vtt": lambda: PlainTextResponse(format_vtt(segments), media_type="text/vtt"),
        "verbose_json": lambda: TranscriptionVerboseResponse(
            language=result.language or "unknown", duration=result.duration, text=result.text, segments=segments),
    }
    return renderers[form.response_format]()


@router.post("/v1/audio/speech", response_class=Response,
             responses={200: {"content": _AUDIO_TYPES, "description": "The audio, in `response_format`"}})
async def create_speech(body: SpeechRequest, ingress: IngressDep, wait_s: WaitDep) -> Response:
    check_speech_text(body.input, ingress.limits, "input")
    result = await ingress.synthesize(SpeechParams(model=body.model, text=body.input, voice=body.voice,
                                                   speed=body.speed, wait_s=wait_s))
    data, media_type, _ = encode_audio_with_rate(result.waveform, result.sample_rate, body.response_format)
    return Response(data, media_type=media_type)


@router.post("/v1/audio/chat", form_limits=UPLOAD_LIMITS)
async def voice_chat(form: Annotated[VoiceChatForm, MULTIPART], ingress: IngressDep, wait_s: WaitDep) -> VoiceChatResponse:
    """The voice-agent round trip: audio -> STT -> LLM -> TTS -> audio, in one request."""
    check_form_fields({"system_prompt": form.system_prompt}, ingress.limits)
    return await ingress.voice_chat(form, await form.file.read(), wait_s)
