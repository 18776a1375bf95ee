"""Text-to-speech in-process on tiny VITS models: the same text is the same audio on every path, `voice`
picks a speaker of a multi-speaker model, `speed` is in the memory estimate, generation_timeout_s is one
rule, and over-long words are cut between graphemes (found by review)."""

from __future__ import annotations

import asyncio
import json
import unicodedata

import numpy as np
import pytest

from deployments.admission import speech_request_bytes
from deployments.errors import InvalidRequestError
from deployments.options import SpeechOptions
from deployments.params import SpeechParams
from deployments.text_split import split_text, stream_pieces
from deployments.tts import TTSServer
from loading import Family, ModelSpec
from loading.tiny import build_tiny

TEXT = "Hello there. How are you today? I am fine, thank you."


@pytest.fixture(scope="module")
def vits_dirs(tmp_path_factory):
    """A one-speaker tiny VITS, and the same architecture with 4 speakers (as VITS-VCTK has 109)."""
    import torch
    from transformers import VitsConfig, VitsModel

    root = tmp_path_factory.mktemp("vits")
    single = build_tiny("tts", root / "single")
    multi = build_tiny("tts", root / "multi")
    config = json.loads((multi / "config.json").read_text())
    config.update(num_speakers=4, speaker_embedding_size=16)
    torch.manual_seed(0)
    VitsModel(VitsConfig.from_dict(config)).save_pretrained(multi)
    return single, multi


def _server(path, **spec) -> TTSServer:
    return TTSServer([ModelSpec(name="vits", source=str(path), family=Family.TTS, **spec)], SpeechOptions())


def _say(server: TTSServer, text: str, **fields):
    async def both():
        plain = await server.synthesize(SpeechParams(model="vits", text=text, wait_s=60, **fields))
        pieces = [p async for p in server.synthesize_stream(SpeechParams(model="vits", text=text, wait_s=60,
                                                                         **fields))]
        return plain, pieces

    return asyncio.run(both())


def test_the_same_text_is_the_same_audio_whole_or_streamed(vits_dirs):
    """flac and mp3 are made whole, wav/pcm/opus and SSE streamed: VITS samples per model call, so both
    must call it with the same pieces (before, "Hello there. ..." gave 12,224 samples whole, 8,512 streamed)."""
    plain, pieces = _say(_server(vits_dirs[0]), TEXT)
    assert len(pieces) > 1
    assert np.array_equal(plain.waveform, np.concatenate([p.waveform for p in pieces]))
    assert plain.tokens == sum(p.tokens for p in pieces)


def test_voice_picks_a_speaker_of_a_multi_speaker_model(vits_dirs):
    server = _server(vits_dirs[1])

    def audio(voice):
        return asyncio.run(server.synthesize(SpeechParams(model="vits", text="hello world", voice=voice,
                                                          wait_s=60))).waveform

    zero, three = audio("0"), audio("3")
    assert not (len(zero) == len(three) and np.allclose(zero, three))  # the voice reaches the model
    assert np.array_equal(audio("alloy"), zero) and np.array_equal(audio("ash"), audio("1"))  # OpenAI names: i -> i
    assert np.array_equal(audio(None), zero)
    for wrong in ("no-such-voice", "4", "-1"):
        with pytest.raises(InvalidRequestError, match="has 4 speakers") as refused:
            audio(wrong)
        assert refused.value.param == "voice"
    streamed = _say(server, "hello world", voice="3")[1]  # the stream speaks with the same voice
    assert np.array_equal(np.concatenate([p.waveform for p in streamed]), three)
    single = _server(vits_dirs[0])  # one speaker: any voice name is taken and changes nothing
    ignored = asyncio.run(single.synthesize(SpeechParams(model="vits", text="hi", voice="no-such-voice", wait_s=60)))
    assert np.array_equal(ignored.waveform,
                          asyncio.run(single.synthesize(SpeechParams(model="vits", text="hi", wait_s=60))).waveform)


def test_speed_is_in_the_memory_estimate(vits_dirs):
    """A slower voice makes more audio: ~1/speed (2.9x the samples at 0.25 for 400 characters on the tiny model;
    about 2x for this short text, whose pieces' durations are rounded up)."""
    plain, _ = _say(_server(vits_dirs[0]), TEXT)
    slow, _ = _say(_server(vits_dirs[0]), TEXT, speed=0.25)
    assert len(slow.waveform) > 1.5 * len(plain.waveform)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(vits_dirs[0])
    assert speech_request_bytes(config, 400, 0.25) > 3.5 * speech_request_bytes(config, 400) / 1.1


def test_generation_timeout_is_one_rule_on_both_paths(vits_dirs):
    """A limit, as max_tokens is an LLM's: checked before each piece after the first, it ends the speech
    there, whole or streamed alike. Before, one sentence at a tiny bound was 200 as flac and 503 as wav,
    and the stream threw away audio it had made (found by review); a 503 after a streamed piece would cut
    the client's file off mid-way."""
    server = _server(vits_dirs[0], generation_timeout_s=1e-6)
    plain, pieces = _say(server, "Hello there.")
    assert len(pieces) == 1 and np.array_equal(plain.waveform, pieces[0].waveform)
    cut, cut_pieces = _say(server, TEXT)
    assert len(cut_pieces) == 1 and np.array_equal(cut.waveform, cut_pieces[0].waveform)
    whole, _ = _say(_server(vits_dirs[0]), TEXT)
    assert len(cut.waveform) < len(whole.waveform) and np.array_equal(cut.waveform, whole.waveform[:len(cut.waveform)])


@pytest.mark.parametrize("word", [
    "प्रतिनिधित्वविकेन्द्रीकरणराष्ट्रीयकरणअन्तर्राष्ट्रीयकरण" * 3,  # Devanagari vowel signs and viramas
    unicodedata.normalize("NFD", "éèêëàâäôöûüç" * 8),  # decomposed accents
    "👩‍👩‍👧‍👦" * 20,  # zero-width-joiner sequences
])
def test_an_over_long_word_is_cut_between_graphemes(word):
    for limit in (8, 10, 16):  # at least a grapheme: the family emoji is 7 code points
        for pieces in (split_text(word, limit), stream_pieces(word, limit)):
            assert "".join(pieces) == word and all(len(p) <= limit for p in pieces)
            for piece in pieces[1:]:
                assert unicodedata.category(piece[0]) not in ("Mn", "Mc", "Me") and piece[0] != "\u200d", \
                    (limit, piece)
                assert not piece[0:1] == "\u200d"


@pytest.mark.parametrize("reply", ["🙂", "Привет! Как дела?"])
def test_a_voice_reply_with_nothing_speakable_is_a_pause_on_a_voice_without_punctuation(vits_dirs, tmp_path, reply):
    """The round trip's pause for a reply with nothing speakable (an emoji, another script) was synthesized
    from "...": MMS-TTS's vocabulary has no punctuation, so it was empty and the round trip failed with a
    400 on `input`, a field the form does not have (streamed: an error event and no `done`)."""
    import base64
    import io
    import shutil

    import soundfile as sf
    from fastapi.testclient import TestClient
    from local_handles import LocalHandle as Handle
    from test_http_surface import Family as StandIn

    from deployments.api import build_api
    from deployments.app_config import AppConfig
    from deployments.ingress import Ingress

    mms = tmp_path / "mms-like"
    shutil.copytree(vits_dirs[0], mms)
    vocab = json.loads((mms / "vocab.json").read_text())
    (mms / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k.isalnum() or k in " '-"}))

    class Replying(StandIn):
        async def chat_stream(self, params):
            yield {"delta": reply}
            yield {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}

    families = {"llm": Handle(Replying()), "stt": Handle(StandIn()),
                "tts": Handle(TTSServer([ModelSpec(name="tts", source=str(mms), family=Family.TTS)], SpeechOptions()))}
    config = AppConfig.model_validate({"models": [{"name": "llm", "source": "llm", "family": "llm"},
                                                  {"name": "stt", "source": "stt", "family": "stt"},
                                                  {"name": "tts", "source": str(mms), "family": "tts"}]})
    client = TestClient(build_api(Ingress(families, config)), raise_server_exceptions=False)
    client.headers["X-Wait-For-Model"] = "60"
    upload = io.BytesIO()
    sf.write(upload, np.zeros(16000, np.float32), 16000, format="WAV")
    form = {"file": ("q.wav", upload.getvalue(), "audio/wav")}
    plain = client.post("/v1/audio/chat", files=form, data={"response_format": "wav"})
    assert plain.status_code == 200, plain.text
    audio, rate = sf.read(io.BytesIO(base64.b64decode(plain.json()["audio"])))
    assert rate == plain.json()["sample_rate"] and 0.2 < len(audio) / rate < 0.5 and not audio.any()
    streamed = client.post("/v1/audio/chat", files=form, data={"stream": "true"})
    kinds = [json.loads(line[6:]).get("type") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert kinds[-2:] == ["audio.delta", "done"], streamed.text[-500:]


def test_health_counts_the_syntheses_a_replica_made(vits_dirs):
    """/health's batching figures of a TTS replica stayed {model_calls: 0, requests: 0} however much it spoke
    (only `cancelled` moved): a whole text is one request and one model call, a stream one call per piece."""
    server = _server(vits_dirs[0])
    plain, pieces = _say(server, TEXT)
    stats = server.batch_stats
    assert (stats["requests"], stats["model_calls"], stats["largest_batch"]) == (2, 1 + len(pieces), 1)


def test_a_synthesis_waiting_for_the_inference_thread_is_queued_not_running(vits_dirs):
    """The metrics counted a TTS request running from its memory hold on, though it waited for the one
    inference thread behind others' syntheses: 20 requests of which one computed showed queue_depth 0 and
    running_requests 20."""
    import time

    server = _server(vits_dirs[0])

    async def scenario():
        await server.synthesize(SpeechParams(model="vits", text="hi", wait_s=60))
        busy = asyncio.ensure_future(server._infer(time.sleep, 0.5))  # another call holds the thread
        await asyncio.sleep(0.05)
        plain = asyncio.ensure_future(server.synthesize(SpeechParams(model="vits", text=TEXT)))
        stream = server.synthesize_stream(SpeechParams(model="vits", text=TEXT))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.2)
        waiting = (server.metrics._queued, server.metrics._running)
        await asyncio.gather(busy, plain, first)
        await stream.aclose()
        return waiting, (server.metrics._queued, server.metrics._running)

    waiting, after = asyncio.run(scenario())
    assert waiting == (2, 0) and after == (0, 0)


def test_a_speed_the_model_cannot_honour_is_a_400_naming_the_value_and_the_fix():
    """A model whose forward takes no speaking_rate answered 'model ... does not support speed': neither the
    value sent nor what to send instead."""
    from types import SimpleNamespace

    from deployments import synthesis

    class OneSpeed:
        config = SimpleNamespace(num_speakers=1)

        def forward(self, input_ids=None, attention_mask=None):
            raise AssertionError("not called")

    loaded = SimpleNamespace(model=OneSpeed())
    spec = ModelSpec(name="one-speed", source="x", family=Family.TTS)
    with pytest.raises(InvalidRequestError) as refused:
        synthesis.model_kwargs(spec, loaded, SpeechParams(model="one-speed", text="hi", speed=1.5))
    assert refused.value.param == "speed"
    assert "speed=1.5" in refused.value.message and "leave speed out or send 1.0" in refused.value.message
    assert synthesis.model_kwargs(spec, loaded, SpeechParams(model="one-speed", text="hi")) == {}
