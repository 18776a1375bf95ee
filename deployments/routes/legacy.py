"""The seed servers' routes, kept as thin aliases of the OpenAI ones (their payloads, our limits)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi.responses import Response

from loading import Family

from ..audio import encode_audio_with_rate
from ..errors import InvalidRequestError
from ..limits import check_speech_text
from ..params import SpeechParams, TranscribeParams
from ..protocol import GenerateRequest, GenerateResponse, LegacySttForm, TtsRequest
from .common import ERRORS, MULTIPART, UPLOAD_LIMITS, IngressDep, WaitDep, check_form

router = APIRouter(tags=["legacy"], responses=ERRORS)


@router.post("/generate")
async def generate(body: GenerateRequest, ingress: IngressDep, wait_s: WaitDep) -> GenerateResponse:
    model = ingress.default_model(Family.LLM)
    messages = ([{"role": "system", "content": body.system_prompt}] if body.system_prompt else [])
    messages.append({"role": "user", "content": body.query})
    params = await ingress.chat_params(ingress.spec(model), messages, wait_s, max_new_tokens=body.max_new_tokens,
                                       max_tokens_param="max_new_tokens")
    return GenerateResponse(response=(await ingress.chat(params)).text, model=model)


@router.post("/stt", form_limits=UPLOAD_LIMITS)
async def stt(form: Annotated[LegacySttForm, MULTIPART], ingress: IngressDep, wait_s: WaitDep) -> dict:
    check_form(form, ingress.limits)
    model = ingress.default_model(Family.STT)
    audio, rate = await ingress.decode_audio(await form.audio.read(), model)
    result = await ingress.transcribe(TranscribeParams(model=model, audio=audio, sample_rate=rate, wait_s=wait_s))
    return {"text": result.text, "model": model}


@router.post("/tts", response_class=Response, responses={200: {"content": {"audio/wav": {}}}})
async def tts(body: TtsRequest, ingress: IngressDep, wait_s: WaitDep) -> Response:
    check_speech_text(body.text, ingress.limits, "text")
    try:
        result = await ingress.synthesize(SpeechParams(model=ingress.default_model(Family.TTS), text=body.text,
                                                       wait_s=wait_s))
    except InvalidRequestError as exc:  # the speech route's field is `input`; this one's is `text`
        if exc.param != "input":
            raise
        message = "text" + exc.message[len("input"):] if exc.message.startswith("input") else exc.message
        raise InvalidRequestError(message, param="text", code=exc.code) from None
    data, media_type, _ = encode_audio_with_rate(result.waveform, result.sample_rate, "wav")
    return Response(data, media_type=media_type)
