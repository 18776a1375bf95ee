"""HTTP routes: parse, convert to internal params, call the ingress, shape the response.

OpenAI-compatible routes plus the seed servers' routes as thin aliases. Every error from
here on is rendered by errors.install_error_handlers in OpenAI's error shape.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from loading import Family

from .audio import AudioDecodeError, decode_audio, encode_audio_with_rate, format_srt, format_vtt
from .errors import InvalidRequestError, install_error_handlers, to_error
from .ingress import Ingress
from .params import ChatParams, SpeechParams, TranscribeParams
from .protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    SpeechRequest,
    TranscriptionForm,
    TranscriptionSegment,
    TranscriptionVerboseResponse,
    TtsRequest,
    UsageInfo,
    VoiceChatResponse,
    new_completion_id,
)

WAIT_HEADER = "x-wait-for-model"  # seconds a request may wait for a model that is still loading
MAX_WAIT_S = 600.0
MAX_UPLOAD_BYTES = 100 * 2**20


def _wait_s(request: Request) -> float:
    raw = request.headers.get(WAIT_HEADER, "0")
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequestError(f"header {WAIT_HEADER}={raw!r} must be a number of seconds", param=WAIT_HEADER) from None
    return min(max(value, 0.0), MAX_WAIT_S)


async def _json_body(request: Request, model: type) -> Any:
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON", param=None) from None
    return model.model_validate(payload)  # ValidationError -> 400 naming the field


async def _form(request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Multipart fields (repeated keys -> lists) and uploaded files' bytes."""
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise InvalidRequestError("this route takes multipart/form-data with an audio file", param="file")
    form = await request.form()
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            data = await value.read()
            if len(data) > MAX_UPLOAD_BYTES:
                raise InvalidRequestError(f"{key} is larger than {MAX_UPLOAD_BYTES // 2**20} MiB", param=key)
            files[key] = data
        elif key.endswith("[]"):
            fields.setdefault(key[:-2], []).append(value)
        else:
            fields[key] = value
    return fields, files


def _audio(files: dict[str, bytes], field: str):
    if field not in files:
        raise InvalidRequestError(f"the multipart field {field!r} with an audio file is missing", param=field)
    try:
        return decode_audio(files[field])
    except AudioDecodeError as exc:
        raise InvalidRequestError(str(exc), param=field) from None


def build_api(ingress: Ingress) -> FastAPI:
    app = FastAPI(title="modelfleet", description="OpenAI-compatible LLM, STT, TTS and VLM serving on Ray Serve")
    install_error_handlers(app)
    created = int(time.time())

    # -- status -------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        models = await ingress.model_status()
        states = {info["state"] for info in models.values()}
        # lazy models not loaded yet and families scaled to zero are fine: they start on first use
        settled = {"ready", "not_loaded", "scaled_to_zero"}
        status = "degraded" if states & {"failed", "unavailable"} else "loading" if states - settled else "ok"
        body: dict[str, Any] = {"status": status, "models": models}
        if ingress.notes:
            body["notes"] = ingress.notes
        if any(info.get("demo") for info in models.values()):
            body["demo"] = "Demo models have random weights: their output is gibberish by design."
        return body

    def card(name: str, info: dict) -> ModelCard:
        spec = ingress.spec(name)
        return ModelCard(id=spec.name, created=created, family=spec.family.value, state=info.get("state"),
                         device=info.get("device"), loading_strategy=info.get("loading_strategy"),
                         demo=spec.is_demo, aliases=spec.aliases)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        status = await ingress.model_status()
        return ModelList(data=[card(s.name, status.get(s.name, {})) for s in ingress.config.models])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        spec = ingress.spec(model)
        return card(spec.name, (await ingress.model_status()).get(spec.name, {}))

    # -- chat ---------------------------------------------------------------------------------------
    def chat_params(body: ChatCompletionRequest, request: Request) -> ChatParams:
        spec = ingress.spec(body.model, Family.LLM, Family.VLM)
        return ingress.chat_params(
            spec, body.to_messages(), _wait_s(request), max_new_tokens=body.requested_max_tokens(),
            temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=body.seed,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request, ChatCompletionRequest)
        params = chat_params(body, request)
        if body.stream:
            chunks = ingress.chat_stream(params)
            first = await chunks.__anext__()  # errors before the first chunk are plain HTTP errors
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(body.model, first, chunks, include_usage), media_type="text/event-stream")
        result = await ingress.chat(params)
        usage = UsageInfo(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                          total_tokens=result.prompt_tokens + result.completion_tokens)
        return ChatCompletionResponse(
            id=new_completion_id(), model=body.model, usage=usage,
            choices=[ChatCompletionChoice(index=0, message=ChatCompletionMessage(content=result.text),
                                          finish_reason=result.finish_reason)],
        )

    # -- audio --------------------------------------------------------------------------------------
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        fields, files = await _form(request)
        form = TranscriptionForm.model_validate(fields)
        if "word" in form.timestamp_granularities:
            raise InvalidRequestError("word timestamps are not supported; use segment", param="timestamp_granularities")
        audio, rate = _audio(files, "file")
        result = await ingress.transcribe(TranscribeParams(
            model=form.model, audio=audio, sample_rate=rate, language=form.language, prompt=form.prompt,
            temperature=form.temperature, detect_language=form.response_format == "verbose_json",
            wait_s=_wait_s(request)))
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

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        body = await _json_body(request, SpeechRequest)
        result = await ingress.synthesize(SpeechParams(model=body.model, text=body.input, voice=body.voice,
                                                       speed=body.speed, wait_s=_wait_s(request)))
        data, media_type, _ = encode_audio_with_rate(result.waveform, result.sample_rate, body.response_format)
        return Response(data, media_type=media_type)

    @app.post("/v1/audio/chat")
    async def voice_chat(request: Request) -> VoiceChatResponse:
        """The voice-agent round trip: audio -> STT -> LLM -> TTS -> audio, in one request."""
        fields, files = await _form(request)
        audio, rate = _audio(files, "file")
        wait = _wait_s(request)
        names = {family: fields.get(f"{family.value}_model") or ingress.default_model(family)
                 for family in (Family.STT, Family.LLM, Family.TTS)}
        fmt = fields.get("response_format", "wav")
        heard = await ingress.transcribe(TranscribeParams(model=names[Family.STT], audio=audio, sample_rate=rate,
                                                          language=fields.get("language"), wait_s=wait))
        messages = ([{"role": "system", "content": fields["system_prompt"]}] if fields.get("system_prompt") else [])
        messages.append({"role": "user", "content": heard.text or "(silence)"})
        llm = ingress.spec(names[Family.LLM], Family.LLM, Family.VLM)
        reply = await ingress.chat(ingress.chat_params(llm, messages, wait, max_new_tokens=_int_field(fields, "max_tokens")))
        spoken = await ingress.synthesize(SpeechParams(model=names[Family.TTS], text=reply.text or "...", wait_s=wait))
        try:
            data, _, written_rate = encode_audio_with_rate(spoken.waveform, spoken.sample_rate, fmt)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="response_format") from None
        return VoiceChatResponse(transcript=heard.text, reply=reply.text, audio=base64.b64encode(data).decode(),
                                 audio_format=fmt, sample_rate=written_rate,
                                 models={family.value: name for family, name in names.items()})

    # -- the seed servers' routes, kept as thin aliases ------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request) -> GenerateResponse:
        body = await _json_body(request, GenerateRequest)
        model = ingress.default_model(Family.LLM)
        messages = ([{"role": "system", "content": body.system_prompt}] if body.system_prompt else [])
        messages.append({"role": "user", "content": body.query})
        params = ingress.chat_params(ingress.spec(model), messages, _wait_s(request), max_new_tokens=body.max_new_tokens)
        return GenerateResponse(response=(await ingress.chat(params)).text, model=model)

    @app.post("/stt")
    async def stt(request: Request) -> dict:
        _, files = await _form(request)
        audio, rate = _audio(files, "audio")
        model = ingress.default_model(Family.STT)
        result = await ingress.transcribe(TranscribeParams(model=model, audio=audio, sample_rate=rate,
                                                           wait_s=_wait_s(request)))
        return {"text": result.text, "model": model}

    @app.post("/tts")
    async def tts(request: Request) -> Response:
        body = await _json_body(request, TtsRequest)
        result = await ingress.synthesize(SpeechParams(model=ingress.default_model(Family.TTS), text=body.text,
                                                       wait_s=_wait_s(request)))
        data, media_type, _ = encode_audio_with_rate(result.waveform, result.sample_rate, "wav")
        return Response(data, media_type=media_type)

    return app


def _int_field(fields: dict, name: str) -> int | None:
    if fields.get(name) in (None, ""):
        return None
    try:
        return int(fields[name])
    except ValueError:
        raise InvalidRequestError(f"{name}={fields[name]!r} must be an integer", param=name) from None


async def _sse(model: str, first: dict, chunks: AsyncIterator[dict], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: role, content deltas, finish_reason, optional usage, [DONE]."""
    completion_id, created = new_completion_id(), int(time.time())

    def event(choices: list, usage: UsageInfo | None = None) -> str:
        chunk = ChatCompletionChunk(id=completion_id, created=created, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    yield event([ChatCompletionChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))])

    async def all_chunks():
        yield first
        async for item in chunks:
            yield item

    try:
        async for item in all_chunks():
            if "delta" in item:
                yield event([ChatCompletionChunkChoice(index=0, delta=DeltaMessage(content=item["delta"]))])
                continue
            yield event([ChatCompletionChunkChoice(index=0, delta=DeltaMessage(), finish_reason=item["finish_reason"])])
            if include_usage:
                u = item["usage"]
                total = u["prompt_tokens"] + u["completion_tokens"]
                yield event([], UsageInfo(total_tokens=total, **u))
    except Exception as exc:  # headers are sent: report the failure in-band, then end the stream
        _, error, _ = to_error(exc)
        yield f"data: {error.model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"
