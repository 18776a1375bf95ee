"""A request waiting for memory keeps what it already holds counted in the replica's memory gate.

A VLM chat's images are decoded and processed under a hold of their decoded size; an STT request's
samples are held as it is admitted. Each then grows that hold to its whole estimate. Before, a chat let
go of the images' hold first, and an STT request held nothing until its turn, so up to
`max_ongoing_requests` waiting requests each kept processed images (Qwen2-VL's largest: ~300 MB per
image) or audio (~115 MB for 30 minutes) that no budget saw.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
from PIL import Image

from deployments.admission import FLOAT_BYTES, MB, MemoryGate, decoded_image_bytes
from deployments.options import ChatOptions, TranscriptionOptions
from deployments.params import ChatParams, TranscribeParams
from deployments.stt import STTServer
from deployments.vlm import VLMServer
from loading import ModelSpec
from loading.tiny import build_tiny


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (200, 60, 40)).save(buf, format="PNG")
    return buf.getvalue()


def image_chat() -> ChatParams:
    content = [{"type": "text", "text": "What is here?"}, {"type": "image"}]
    return ChatParams(model="tiny-llava", messages=[{"role": "user", "content": content}], max_new_tokens=8,
                      temperature=0, images=[png()], wait_s=60)


async def while_others_hold(gate: MemoryGate, room: int, request):
    """`request` (a coroutine function) alone, then again while others leave only `room` bytes free;
    returns both answers and (held while waiting, in use) as the second waited."""
    alone = await request()
    release = asyncio.Event()

    async def others():
        async with gate.hold(gate.budget - room, "the others"):
            await release.wait()

    filler = asyncio.ensure_future(others())
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(request())
    for _ in range(500):
        if gate.waiting_held:
            break
        await asyncio.sleep(0.01)
    held = (gate.waiting_held, gate.in_use)
    release.set()
    answer = await asyncio.wait_for(waiting, 60)
    await filler
    assert gate.in_use == 0 and gate.waiting_held == 0
    return alone, answer, held


def test_a_waiting_image_chat_holds_its_images_and_answers_once_there_is_room(tmp_path):
    spec = ModelSpec(name="tiny-llava", source=str(build_tiny("vlm", tmp_path / "tiny-llava")), max_new_tokens=8)
    server = VLMServer([spec], ChatOptions(memory_budget_mb=1))
    decoded = decoded_image_bytes([png()])
    # room for the images, not for the rest of the request's estimate
    alone, answer, held = asyncio.run(while_others_hold(server.memory, decoded + 1024, lambda: server.chat(image_chat())))
    assert held == (decoded, 1 * MB - 1024)  # the images stay held (and in use) while it waits
    assert answer.text == alone.text and answer.completion_tokens == alone.completion_tokens


def test_a_waiting_transcription_holds_its_samples_and_answers_once_there_is_room(tmp_path):
    spec = ModelSpec(name="tiny-whisper", source=str(build_tiny("stt", tmp_path / "tiny-whisper")))
    server = STTServer([spec], TranscriptionOptions(memory_budget_mb=512, fallback_temperatures=[0.0]))
    audio = (0.1 * np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    samples = len(audio) * FLOAT_BYTES

    def transcribe():
        return server.transcribe(TranscribeParams(model="tiny-whisper", audio=audio, sample_rate=16000, wait_s=60))

    alone, answer, held = asyncio.run(while_others_hold(server.memory, samples + 1024, transcribe))
    assert held == (samples, 512 * MB - 1024)
    assert answer.text == alone.text
