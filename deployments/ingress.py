"""The ingress deployment: knows which family serves each model and calls it through handles.

Every call to a family is bounded by `request_timeout_s` (plus the X-Wait-For-Model wait its request
asked for): Ray leaves a call to a failed or pending deployment waiting forever, and a client deserves
a 503 (`timeout`) with the reason instead.
The HTTP routes live in routes/; /health's assembly in health.py; this class routes and composes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import numpy as np

from loading import Family, ModelSpec

from .app_config import AppConfig
from .audio import AudioBounds, AudioDecodeError, AudioTooLongError, StreamEncoder, encode_audio_with_rate
from .auth import KeyChecker, load_admin_keys, load_keys
from .chat_server import resolve_max_new_tokens
from .errors import (
    SERVE_UNAVAILABLE,
    InvalidRequestError,
    OverloadedError,
    ServiceUnavailableError,
    UnknownModelError,
    as_api_error,
)
from .health import HealthMonitor
from .http_metrics import label_request
from .isolated import IsolatedPool, WorkerCrashed, WorkerOutOfMemory, WorkerTimedOut
from .media import take_images
from .params import (
    ChatParams,
    ChatResult,
    SpeechParams,
    SpeechResult,
    TokenizeResult,
    TokenizerQuery,
    TranscribeParams,
    TranscribeResult,
)
from .protocol import (
    VoiceAudioDelta,
    VoiceChatForm,
    VoiceChatResponse,
    VoiceDone,
    VoiceReplyDelta,
    VoiceTranscriptEvent,
    VoiceUsage,
)
from .ray_daemons import lower_at_replica_start
from .runtime_catalog import IngressCatalog, Snapshot
from .sse import event, guarded, prepend
from .voice import AudioPiece, ReplyDone, ReplyEvent, TextDelta, drain, spoken_reply

log = logging.getLogger(__name__)
T = TypeVar("T")


class Ingress:
    def __init__(self, handles: dict[str, Any], config: AppConfig, notes: list[str] | None = None,
                 resources: dict[str, dict[str, float]] | None = None):
        self.config = config
        lower_at_replica_start()
        self.limits = config.limits
        self.admin_keys = KeyChecker(load_admin_keys(config.auth))  # none: the admin routes answer 403
        # fails the replica with a clear message if keys are required; an admin key is an API key too
        self.keys = KeyChecker(load_keys(config.auth), also=load_admin_keys(config.auth))
        self.handles = handles  # family name -> DeploymentHandle
        self.streams = {family: handle.options(stream=True) for family, handle in handles.items()}
        self.catalog: dict[str, ModelSpec] = {n: s for s in config.models for n in s.all_names}
        # adapters and models added at run time (admin routes; runtime_catalog.py), in `catalog` too
        self.runtime = IngressCatalog(config.admin.catalog_poll_s, config.ingress.num_replicas > 1,
                                      self._runtime_changed)
        if self.admin_keys.enabled:  # the admin routes are on: have the catalog's actor ready for them
            self.runtime.prepare()
        self.notes = list(notes or [])
        self.health = HealthMonitor(config, self._call, list(handles), self.notes, dict(resources or {}),
                                    served=self.served_models)
        self._media = asyncio.Semaphore(self.limits.media_workers)  # decodes off the event loop, bounded
        # audio decoders and image header readers in processes of their own (isolated.py): a crash or a
        # hang fails one request
        self.decoders = IsolatedPool({"AudioDecodeError": AudioDecodeError, "AudioTooLongError": AudioTooLongError},
                                     self.limits.media_worker_memory_mb, "limits.media_worker_memory_mb")
        self.decoders.prestart()
        if self.keys.enabled:
            log.info("API keys: %d configured; every route but /health needs one", len(self.keys._digests))

    def __serve_build_asgi_app__(self):
        from .api import build_api

        return build_api(self)

    # -- lookup -----------------------------------------------------------------------------------
    def served_models(self) -> list[ModelSpec]:
        """The configured models, then those added at run time."""
        return list(self.config.models) + [record.spec for record in self.runtime.snapshot.records]

    def _runtime_changed(self, snapshot: Snapshot) -> None:
        self.catalog = {n: s for s in self.served_models() for n in s.all_names}

    def spec(self, name: str, *families: Family, param: str = "model") -> ModelSpec:
        # here, not only before family calls: a request for a model another ingress replica added is refused
        # (404) before any family call, and one whose every request was for it never read the catalog again
        self.runtime.maybe_refresh()
        spec = self.catalog.get(name)
        if spec is None or (families and spec.family not in families):
            fitting = [s.name for s in self.served_models() if not families or s.family in families]
            raise UnknownModelError(name, fitting, param, family=family_name(spec) if spec is not None else None)
        label_request(spec.family.value if spec.family else "", spec.name)
        return spec

    def _names(self, family: Family) -> list[str]:
        return [s.name for s in self.config.models if s.family is family]

    def default_model(self, family: Family) -> str:
        for spec in self.config.models:
            if spec.family is family:
                return spec.name
        raise ServiceUnavailableError(f"no {family.value} model is configured in serve_config.yaml")

    # -- media, decoded off the event loop ----------------------------------------------------------
    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a decode in a thread, at most `limits.media_workers` at once; a request that cannot get
        a turn within request_timeout_s is refused (503), not left waiting past its timeout."""
        limit = self.config.request_timeout_s
        try:
            await asyncio.wait_for(self._media.acquire(), limit)
        except asyncio.TimeoutError:
            raise OverloadedError(f"no media decoder was free within {limit:g} s (limits.media_workers="
                                  f"{self.limits.media_workers}); retry shortly", retry_after_s=5) from None
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self._media.release()

    async def decode_audio(self, data: bytes, model: str | None = None) -> tuple[Any, int]:
        """An upload as float32 mono, bounded by the app's limits and the model's own max_audio_seconds."""
        limits = self.limits
        seconds = limits.max_audio_seconds
        spec = self.catalog.get(model or "")
        if spec is not None and spec.max_audio_seconds is not None:
            seconds = min(seconds, spec.max_audio_seconds)
        bounds = AudioBounds(limits.min_sample_rate, limits.max_sample_rate, limits.max_audio_channels, seconds,
                             limits.max_audio_links)
        timeout = limits.media_decode_timeout_s
        try:
            return await self._off_loop(functools.partial(self.decoders.run, "decode_audio", timeout_s=timeout),
                                        data, bounds)
        except WorkerCrashed as exc:
            raise AudioDecodeError(f"The audio decoder crashed on this file ({exc.how}); no other request was "
                                   "affected. Check that the file plays, or convert it to WAV or FLAC.") from None
        except WorkerOutOfMemory as exc:
            raise AudioDecodeError(f"Decoding this audio file needed more memory than {exc.setting}={exc.limit_mb} MB "
                                   "and was stopped; no other request was affected. Convert it to WAV or FLAC, "
                                   "or raise the limit.") from None
        except WorkerTimedOut:
            raise AudioDecodeError(f"Decoding this audio file took longer than limits.media_decode_timeout_s="
                                   f"{timeout:g} s and was stopped. Convert it to WAV or FLAC, or raise the limit.") \
                from None

    def _orders_by_priority(self, spec: ModelSpec) -> bool:
        """Whether the chat family serving `spec` takes waiting requests by `priority` (else in arrival order)."""
        return getattr(self.config.family_options(chat_family(spec)), "scheduling_policy", "fcfs") == "priority"

    def voice_priority(self, llm: ModelSpec) -> int:
        """ingress.voice_priority where the voice's chat family orders by priority, else 0."""
        return self.config.ingress.voice_priority if self._orders_by_priority(llm) else 0

    async def chat_params(self, spec: ModelSpec, messages: list[dict], wait_s: float, **sampling: Any) -> ChatParams:
        priority = sampling.get("priority", 0)
        family = chat_family(spec)
        if priority and not self._orders_by_priority(spec):
            raise InvalidRequestError(
                f"priority={priority}, but the {family.value} family serves requests in arrival order (its "
                f"scheduling_policy is fcfs); send priority 0, or set families.{family.value}.scheduling_policy: "
                "priority in serve_config.yaml", param="priority")
        if (requested := sampling.get("max_new_tokens")) is not None:  # before any image is decoded
            resolve_max_new_tokens(spec, requested, param=sampling.get("max_tokens_param", "max_tokens"))
        has_images = any(part.get("type") == "image" for m in messages if isinstance(m.get("content"), list)
                         for part in m["content"])
        if has_images and spec.family is not Family.VLM:  # refused before any image is decoded
            raise InvalidRequestError(
                f"model {spec.name!r} is a text-only {family_name(spec).upper()} and cannot read images; "
                f"use a VLM model ({', '.join(self._names(Family.VLM)) or 'none configured'})",
                param="messages",
            )
        images = []
        if has_images:
            images = await self._off_loop(take_images, messages, self.limits, self.config.allowed_media_dirs,
                                          self.decoders)
        return ChatParams(model=spec.name, messages=messages, images=images, wait_s=wait_s, **sampling)

    # -- calls through handles --------------------------------------------------------------------
    async def _call(self, family: Family, method: str, *args: Any, timeout: float | None = None) -> Any:
        handle = self.handles.get(family.value)
        if handle is None:
            raise ServiceUnavailableError(f"no {family.value} deployment is configured")
        response = self._remote(handle, method, args)
        limit = timeout or self._call_limit(args)
        try:
            return await asyncio.wait_for(response, limit)
        except asyncio.TimeoutError:
            response.cancel()
            raise self._timed_out(family, "did not answer", limit, args) from None
        except asyncio.CancelledError:
            response.cancel()  # the client went away: the family drops the work at its next step
            raise
        except SERVE_UNAVAILABLE as exc:  # in our error shape, with Retry-After (see errors.py)
            raise as_api_error(exc) from None

    def _remote(self, handle: Any, method: str, args: tuple, stream: bool = False) -> Any:
        """`handle.method.remote(*args)`; once models were added at run time, through the family's `call`,
        which first applies the runtime catalog up to this ingress's token (runtime_catalog.py)."""
        self.runtime.maybe_refresh()
        token = self.runtime.token
        if not token:
            return getattr(handle, method).remote(*args)
        return (handle.call_stream if stream else handle.call).remote(token, method, *args)

    def _resource_hint(self) -> str:
        return f" ({'; '.join(self.notes)})" if self.notes else ""

    def _call_limit(self, args: tuple) -> float:
        """How long a family call may take: request_timeout_s, plus the X-Wait-For-Model wait its params
        carry (the model may load for up to wait_s, then the request still needs its usual time)."""
        wait_s = _wait_of(args)
        return self.config.request_timeout_s + wait_s

    def _timed_out(self, family: Family, what: str, limit: float, args: tuple) -> ServiceUnavailableError:
        wait_s = _wait_of(args)
        waited = f" + the X-Wait-For-Model wait of {wait_s:g} s" if wait_s else ""
        return ServiceUnavailableError(
            f"the {family.value} deployment {what} within {limit:g} s (request_timeout_s="
            f"{self.config.request_timeout_s:g}{waited}): its replicas may still be starting, pending for "
            f"resources{self._resource_hint()}, or overloaded; retry later, or raise request_timeout_s in "
            "serve_config.yaml", retry_after_s=5, code="timeout")

    async def chat(self, params: ChatParams) -> ChatResult:
        spec = self.spec(params.model, Family.LLM, Family.VLM)
        return await self._call(chat_family(spec), "chat", params)

    def chat_stream(self, params: ChatParams) -> AsyncGenerator[dict, None]:
        """Chunks from the family; the first is awaited under the timeout so errors come before headers."""
        spec = self.spec(params.model, Family.LLM, Family.VLM)
        return self._stream(chat_family(spec), "chat_stream", params)

    async def _stream(self, family: Family, method: str, params: Any) -> AsyncGenerator[Any, None]:
        """A family's streaming method through its stream handle. The first item is awaited under
        request_timeout_s (plus the params' wait_s), so that errors come before a response's headers;
        closing the iterator (the client left, a barge-in) cancels the family's work."""
        handle = self.streams.get(family.value)
        if handle is None:
            raise ServiceUnavailableError(f"no {family.value} deployment is configured")
        generator = self._remote(handle, method, (params,), stream=True)
        limit = self._call_limit((params,))
        try:
            first = await asyncio.wait_for(generator.__anext__(), limit)
        except SERVE_UNAVAILABLE as exc:
            raise as_api_error(exc) from None
        except asyncio.TimeoutError:
            generator.cancel()
            raise self._timed_out(family, "did not start streaming", limit, (params,)) from None
        except StopAsyncIteration:
            return
        except BaseException:
            generator.cancel()
            raise
        try:
            yield first
            async for chunk in generator:
                yield chunk
        finally:
            generator.cancel()  # a no-op once it has finished; stops the family's work if the client left

    # -- the tokenizer routes (routes/tokenize.py): answered by the replica that holds the tokenizer ---------
    def tokenizer_model(self, name: str | None) -> ModelSpec:
        """The LLM or VLM a tokenizer route asks (404 for another); none named: the first configured LLM,
        else VLM, as vLLM answers for its one model (lm-evaluation-harness's remote tokenizer names none)."""
        if name is None:
            name = next((s.name for f in (Family.LLM, Family.VLM) for s in self.config.models if s.family is f), None)
            if name is None:
                raise InvalidRequestError("this app serves no LLM or VLM model, whose tokenizer this route uses",
                                          param="model")
        return self.spec(name, Family.LLM, Family.VLM)

    async def tokenize(self, params: ChatParams, with_strs: bool) -> TokenizeResult:
        return await self._call(chat_family(self.spec(params.model, Family.LLM, Family.VLM)), "tokenize", params,
                                with_strs)

    async def detokenize(self, query: TokenizerQuery) -> str:
        return await self._call(chat_family(self.spec(query.model, Family.LLM, Family.VLM)), "detokenize", query)

    async def tokenizer_info(self, query: TokenizerQuery) -> dict[str, Any]:
        return await self._call(chat_family(self.spec(query.model, Family.LLM, Family.VLM)), "tokenizer_info", query)

    def synthesize_stream(self, params: SpeechParams) -> AsyncGenerator[SpeechResult, None]:
        """The speech piece by piece (sentence, or clause), as the TTS family makes it."""
        params.model = self.spec(params.model, Family.TTS).name  # canonical: metric labels and logs
        return self._stream(Family.TTS, "synthesize_stream", params)

    def transcribe_stream(self, params: TranscribeParams) -> AsyncGenerator[dict, None]:
        """{"segment", "words"} per piece of the audio (cut at silences), then {"result"}."""
        params.model = self.spec(params.model, Family.STT).name  # canonical: metric labels and logs
        return self._stream(Family.STT, "transcribe_stream", params)

    async def transcribe(self, params: TranscribeParams) -> TranscribeResult:
        params.model = self.spec(params.model, Family.STT).name  # canonical: metric labels and logs
        return await self._call(Family.STT, "transcribe", params)

    async def check_transcription_language(self, model: str, language: str) -> None:
        """A 400 on `language` where the STT model cannot transcribe in it."""
        await self._call(Family.STT, "check_language", self.spec(model, Family.STT).name, language)

    async def check_speech_speed(self, model: str, speed: float) -> None:
        """A 400 on `speed` where the TTS model speaks at one speed only."""
        await self._call(Family.TTS, "check_speed", self.spec(model, Family.TTS).name, speed)

    async def end_of_turn(self, model: str, heard: str, answered: str | None) -> float | None:
        """The chat model's probability that a speaker's words `heard` end their turn (Realtime's
        semantic_vad); None where its chat template gives nothing to score."""
        spec = self.spec(model, Family.LLM, Family.VLM)
        return await self._call(chat_family(spec), "end_of_turn", spec.name, heard, answered)

    async def synthesize(self, params: SpeechParams) -> SpeechResult:
        params.model = self.spec(params.model, Family.TTS).name  # canonical: metric labels and logs
        return await self._call(Family.TTS, "synthesize", params)

    # -- the voice round trip ----------------------------------------------------------------------
    async def _voice_turn(self, form: VoiceChatForm, upload: bytes, wait_s: float
                          ) -> tuple[dict[Family, str], TranscribeResult, ChatParams]:
        """What was said (STT) and the chat request answering it; every model checked first."""
        asked = {Family.STT: form.stt_model, Family.LLM: form.llm_model, Family.TTS: form.tts_model}
        names = {family: name or self.default_model(family) for family, name in asked.items()}
        stt = self.spec(names[Family.STT], Family.STT, param="stt_model")
        llm = self.spec(names[Family.LLM], Family.LLM, Family.VLM, param="llm_model")
        self.spec(names[Family.TTS], Family.TTS, param="tts_model")
        if form.max_tokens is not None:  # refused before the upload is decoded and heard
            resolve_max_new_tokens(llm, form.max_tokens)
        audio, rate = await self.decode_audio(upload, stt.name)
        heard = await self.transcribe(TranscribeParams(model=names[Family.STT], audio=audio, sample_rate=rate,
                                                       language=form.language, wait_s=wait_s))
        messages = [{"role": "system", "content": form.system_prompt}] if form.system_prompt else []
        messages.append({"role": "user", "content": heard.text or "(silence)"})
        chat = await self.chat_params(llm, messages, wait_s, max_new_tokens=form.max_tokens,
                                      temperature=form.temperature, priority=self.voice_priority(llm),
                                      messages_param="system_prompt" if form.system_prompt else "file")
        return names, heard, chat

    def _speech_template(self, model: str, wait_s: float) -> SpeechParams:
        return SpeechParams(model=model, text="", wait_s=wait_s)

    async def voice_chat(self, form: VoiceChatForm, upload: bytes, wait_s: float) -> VoiceChatResponse:
        """The voice-agent round trip: what was said (STT), the answer (LLM), spoken (TTS) sentence by
        sentence while the LLM writes the next (voice.spoken_reply)."""
        names, heard, chat = await self._voice_turn(form, upload, wait_s)
        done, pieces = await drain(spoken_reply(self, chat, self._speech_template(names[Family.TTS], wait_s),
                                                self._tts_chars(),
                                                self.config.ingress.voice_first_piece_chars))
        if not pieces:  # nothing speakable in the reply
            pieces = [await self._pause(names[Family.TTS], wait_s)]
        waveform = np.concatenate([p.waveform for p in pieces])
        data, _, written_rate = await self._off_loop(
            encode_audio_with_rate, waveform, pieces[0].sample_rate, form.response_format)
        return VoiceChatResponse(transcript=heard.text, reply=done.text, audio=base64.b64encode(data).decode(),
                                 audio_format=form.response_format, sample_rate=written_rate,
                                 models={family.value: name for family, name in names.items()})

    async def voice_chat_stream(self, form: VoiceChatForm, upload: bytes, wait_s: float) -> AsyncIterator[str]:
        """The round trip as server-sent events. Speech-to-text, the checks and the LLM's start run before
        the first event (their errors, the LLM's refusals and 503s included, are plain HTTP errors, as a
        streamed chat's); later failures are in-band error events."""
        names, heard, chat = await self._voice_turn(form, upload, wait_s)
        models = {family.value: name for family, name in names.items()}
        reply = spoken_reply(self, chat, self._speech_template(names[Family.TTS], wait_s), self._tts_chars(),
                             self.config.ingress.voice_first_piece_chars)
        try:
            first = await reply.__anext__()  # the reply's first text (or its end)
        except BaseException:
            await reply.aclose()
            raise
        return guarded(self._voice_events(form, names, heard, first, reply, models, wait_s))

    async def _voice_events(self, form: VoiceChatForm, names: dict[Family, str], heard: TranscribeResult,
                            first: ReplyEvent, reply: AsyncGenerator[ReplyEvent, None], models: dict[str, str],
                            wait_s: float) -> AsyncGenerator[str, None]:
        yield event(VoiceTranscriptEvent(text=heard.text))
        encoder: StreamEncoder | None = None
        async with contextlib.aclosing(reply):  # the client gone: the LLM and the TTS stop at once
            async for item in prepend(first, reply):
                if isinstance(item, TextDelta):
                    yield event(VoiceReplyDelta(delta=item.text))
                elif isinstance(item, AudioPiece):
                    encoder = encoder or StreamEncoder(form.response_format, item.speech.sample_rate)
                    data = await self._off_loop(encoder.write, item.speech.waveform)
                    if data:
                        yield event(VoiceAudioDelta(audio=base64.b64encode(data).decode()))
                elif isinstance(item, ReplyDone):  # (no ToolCall: the round trip asks for no tools)
                    if encoder is None:  # nothing speakable in the reply
                        pause = await self._pause(names[Family.TTS], wait_s)
                        encoder = StreamEncoder(form.response_format, pause.sample_rate)
                        if data := await self._off_loop(encoder.write, pause.waveform):
                            yield event(VoiceAudioDelta(audio=base64.b64encode(data).decode()))
                    if data := await self._off_loop(encoder.close):
                        yield event(VoiceAudioDelta(audio=base64.b64encode(data).decode()))
                    usage = VoiceUsage(prompt_tokens=item.usage.get("prompt_tokens", 0),
                                       completion_tokens=item.usage.get("completion_tokens", 0),
                                       transcription_tokens=heard.tokens,
                                       speech_input_tokens=item.usage.get("tts_tokens", 0))
                    yield event(VoiceDone(transcript=heard.text, reply=item.text, finish_reason=item.finish_reason,
                                          audio_format=form.response_format,
                                          sample_rate=encoder.written_rate,
                                          models=models, usage=usage))

    async def _pause(self, tts: str, wait_s: float) -> SpeechResult:
        """The voice round trip's answer to a reply with nothing speakable: a short pause."""
        return await self._call(Family.TTS, "silence", SpeechParams(model=self.spec(tts, Family.TTS).name, text="",
                                                                    wait_s=wait_s))

    def _tts_chars(self) -> int:
        """Longest piece of a reply sent to the TTS at once (its family's max_chars_per_call)."""
        return self.config.families.tts.max_chars_per_call


def family_name(spec: ModelSpec) -> str:
    return spec.family.value if spec.family else "unknown"


def chat_family(spec: ModelSpec) -> Family:
    """The family serving a chat model (the builder detects every model's family before serving)."""
    return spec.family or Family.LLM


def _wait_of(args: tuple) -> float:
    """The X-Wait-For-Model seconds a family call's params carry (0 for a call without params)."""
    wait_s = getattr(args[0], "wait_s", 0.0) if args else 0.0
    return float(wait_s) if isinstance(wait_s, (int, float)) and wait_s > 0 else 0.0
