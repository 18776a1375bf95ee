"""VLM inputs that were mishandled: a thin image the processor blows up, image and text-only requests in one
generate() batch, images in tool messages, and text that spells the image placeholder. In-process, on the
tiny LLaVA."""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers.image_utils import SizeDict

import deployments.chat_server as chat_server
from deployments.admission import decoded_image_bytes
from deployments.errors import InvalidRequestError, RequestTooLargeError, to_error
from deployments.limits import RequestLimits
from deployments.media import load_image, take_images
from deployments.options import ChatOptions
from deployments.params import ChatParams
from deployments.vlm import VLMServer
from loading import ModelSpec
from loading.tiny import build_tiny


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_tiny("vlm", tmp_path_factory.mktemp("vlm") / "tiny-llava")


def png(width: int = 40, height: int = 36, shade: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, shade)).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(images: int, text: str = "What is written here?") -> ChatParams:
    content = [{"type": "text", "text": text}] + [{"type": "image"}] * images
    return ChatParams(model="tiny-llava", messages=[{"role": "user", "content": content}], max_new_tokens=10,
                      temperature=0, images=[png()] * images, wait_s=60)


def test_a_thin_image_is_refused_by_its_shape_and_its_upscale_is_estimated():
    """A 476-byte 1 x 100,000 PNG passed every limit and the memory estimate (2.6 MiB): CLIP's processor scales
    the short side up to its size, and the replica grew by 1.1 GiB on the tiny model (a 1 x 16,777,216 one,
    within max_image_pixels, would need ~170 GiB). Ray's memory monitor then kills every worker on the node."""
    limits = RequestLimits()
    with pytest.raises(InvalidRequestError) as info:
        load_image(data_uri(png(1, 100_000)), limits, [], "messages.0.content.1.image_url")
    status, body, _ = to_error(info.value)
    assert status == 400 and body.error.param == "messages.0.content.1.image_url"
    assert body.error.code == "image_aspect_ratio"
    assert "1x100000" in body.error.message and "max_image_aspect_ratio=200" in body.error.message
    load_image(data_uri(png(1, 200)), limits, [], "p")  # at the bound: accepted
    assert load_image(data_uri(png(1, 300)), limits.model_copy(update={"max_image_aspect_ratio": 400}), [], "p")
    # within the bound the estimate follows the processor's upscale: 1 x 200 -> 32 x 6,400 on the tiny LLaVA.
    # transformers 5 holds `size` as a SizeDict (not a dict: the estimate once skipped it); a plain dict too
    for size in (SizeDict(shortest_edge=32), {"shortest_edge": 32}):
        clip = SimpleNamespace(size=size)
        assert decoded_image_bytes([png(1, 200)], clip) >= 32 * 6_400 * 3
        assert decoded_image_bytes([png(40, 36)], clip) == decoded_image_bytes([png(40, 36)])
    # Qwen2-VL's kind bounds pixels: shortest_edge is min_pixels (3136), not an edge of 3136 px
    qwen = SimpleNamespace(size=SizeDict(shortest_edge=56 * 56, longest_edge=28 * 28 * 1280), merge_size=2)
    assert decoded_image_bytes([png(1, 200)], qwen) == decoded_image_bytes([png(56, 56)])
    assert decoded_image_bytes([png(200, 100)], qwen) == decoded_image_bytes([png(200, 100)])


def test_a_thin_image_is_held_to_the_replicas_budget(llava_dir):
    """At the aspect bound and a large shortest edge the upscale is what the budget must see: a budget that
    cannot hold it refuses the request before the processor runs."""
    server = VLMServer([ModelSpec(name="tiny-llava", source=str(llava_dir), max_new_tokens=10)],
                       ChatOptions(memory_budget_mb=64))
    asyncio.run(server.chat(chat(1)))  # loaded, and a small image fits
    loaded = server.pool.handles["tiny-llava"].get(0)
    size = loaded.processor.image_processor.size
    assert isinstance(size, SizeDict)  # as loaded: what the estimate reads
    loaded.processor.image_processor.size = SizeDict(shortest_edge=336)  # a real LLaVA's: 1 x 200 -> 336 x 67,200
    try:
        params = chat(0)
        params.messages[0]["content"].append({"type": "image"})
        params.images = [png(1, 200)]
        with pytest.raises(RequestTooLargeError) as info:
            asyncio.run(server.chat(params))
        assert "memory_budget_mb" in str(info.value)
    finally:
        loaded.processor.image_processor.size = size


def test_image_and_text_only_requests_do_not_share_a_generate_batch(llava_dir, monkeypatch):
    """On the generate() path (Qwen2-VL's) requests were grouped by sampling alone and collate took the first
    row's inputs: a text row first dropped the image row's pixels (a wrong answer, 200); an image row first
    failed both requests (KeyError 'pixel_values')."""
    monkeypatch.setattr(chat_server, "uses_decode_loop", lambda loaded: False)
    server = VLMServer([ModelSpec(name="tiny-llava", source=str(llava_dir), max_new_tokens=10)],
                       ChatOptions(memory_budget_mb=2048, batch_wait_timeout_s=0.05))

    async def scenario():
        alone = (await server.chat(chat(1))).text
        text_alone = (await server.chat(chat(0))).text
        first = await asyncio.gather(server.chat(chat(0)), server.chat(chat(1)))
        second = await asyncio.gather(server.chat(chat(1)), server.chat(chat(0)))
        return alone, text_alone, first, second

    alone, text_alone, first, second = asyncio.run(scenario())
    assert [r.text for r in first] == [text_alone, alone]
    assert [r.text for r in second] == [alone, text_alone]


def test_rows_whose_token_inputs_differ_do_not_share_a_generate_batch():
    """Qwen2-VL's processor gives every chat mm_token_type_ids, which a /v1/completions prompt (input_ids and
    attention_mask) lacks; the batch key left the token inputs out, so a chat and a completion arriving
    together shared a generate() batch, collate refused it, and both requests failed with a 500."""
    tokens = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    chat_row = ChatParams(model="q", messages=[{"role": "user", "content": "hi"}], temperature=0)
    chat_row.inputs = {**tokens, "mm_token_type_ids": torch.zeros(1, 2, dtype=torch.long)}
    completion = ChatParams(model="q", messages=[], prompt="Once", temperature=0)
    completion.inputs = dict(tokens)
    assert chat_row.sampling_key() != completion.sampling_key()
    assert not chat_row.has_non_token_inputs()  # token inputs only: no reason to split by adapter
    twin = ChatParams(model="q", messages=[{"role": "user", "content": "hello"}], temperature=0)
    twin.inputs = dict(chat_row.inputs)
    assert twin.sampling_key() == chat_row.sampling_key()  # the same kinds still batch


def test_images_go_in_user_messages():
    """An image in a tool message (a screenshot tool) was left out of the prompt by the tool-message rendering
    yet counted: a 400 about '<image> tokens and 2 images' naming only `messages`. OpenAI takes images in
    user messages; the refusal names the part."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image", "url": data_uri(png())}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                               "function": {"name": "shot", "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c1",
         "content": [{"type": "text", "text": "here"}, {"type": "image", "url": data_uri(png())}]},
    ]
    with pytest.raises(InvalidRequestError) as info:
        take_images(messages, RequestLimits(), [])
    assert info.value.param == "messages.2.content.1" and "tool message" in str(info.value)
    assert len(take_images(messages[:1], RequestLimits(), [])) == 1


def test_text_that_spells_the_image_placeholder_is_text(llava_dir):
    """'<image>' in a user's text became LLaVA's image token: a question about the HTML tag was a 400 ("Found
    1 <image> tokens in the text but no images"), and with an image attached the counts never matched."""
    server = VLMServer([ModelSpec(name="tiny-llava", source=str(llava_dir), max_new_tokens=10)],
                       ChatOptions(memory_budget_mb=2048))
    text = "In HTML, what does the <image> tag do?"
    plain = asyncio.run(server.chat(chat(0, text)))
    with_image = asyncio.run(server.chat(chat(1, text)))
    assert plain.completion_tokens > 0 and with_image.completion_tokens > 0
    loaded = server.pool.handles["tiny-llava"].get(0)
    image_id = loaded.processor.tokenizer.convert_tokens_to_ids(loaded.processor.image_token)
    params = chat(1, text)
    ids = server.encode(loaded, params)["input_ids"][0].tolist()
    one_image = server.encode(loaded, chat(1))["input_ids"][0].tolist()
    assert ids.count(image_id) == one_image.count(image_id)  # the text added no image token


def _encoded(image, fmt: str, **save) -> bytes:
    import io as _io

    buffer = _io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_an_image_reaches_the_model_as_the_client_sees_it():
    """decode_image's plain convert('RGB'): a transparent logo's background became black (its alpha dropped;
    the processor would have painted it white), a GIF's transparent colour made the processor whiten every
    pixel of that colour, a phone photo's EXIF rotation was ignored (the model saw it sideways), and a 16-bit
    grey scan was clipped to white."""
    import numpy as np
    from PIL import Image

    from deployments.media import decode_image

    logo = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    logo.paste((0, 0, 0, 255), (2, 2, 6, 6))  # a black square on a transparent background
    for fmt, image in (("PNG", logo), ("PNG", logo.convert("LA")), ("GIF", logo.convert("P"))):
        pixels = np.asarray(decode_image(_encoded(image, fmt, **({"transparency": 0} if fmt == "GIF" else {}))))
        assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[3, 3].tolist() == [0, 0, 0], (fmt, image.mode)

    photo = Image.new("RGB", (64, 32), (200, 10, 10))
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    assert decode_image(_encoded(photo, "JPEG", exif=exif)).size == (32, 64)

    ramp = np.tile(np.arange(0, 65536, 1024, dtype=np.uint16), (4, 1))  # black to white, 64 steps
    scan = Image.fromarray(ramp)
    assert scan.mode == "I;16"
    row = np.asarray(decode_image(_encoded(scan, "PNG")))[0, :, 0]
    assert row[0] == 0 and row[-1] >= 250 and list(row) == sorted(row) and 100 < row[32] < 156
    with_clear = np.asarray(decode_image(_encoded(scan, "PNG", transparency=0)))[0, :2, 0]
    assert with_clear.tolist() == [255, row[1]]  # its transparent grey level painted white, as any other's


def test_an_image_whose_exif_cannot_be_read_is_served_as_stored():
    """exif_transpose raises on an eXIf chunk without a TIFF header (SyntaxError) or a WebP EXIF chunk of
    garbage: such images, which Pillow and browsers show, became a 400 with the EXIF fix."""
    import struct
    import zlib

    from PIL import Image

    from deployments.media import decode_image

    png = _encoded(Image.new("RGB", (16, 8), (10, 20, 30)), "PNG")
    body = b"\x00\x01\x02\x03garbage!"
    exif = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF)
    webp = _encoded(Image.new("RGB", (16, 8)), "WEBP", exif=b"\x00\x01garbage")
    for data in (png[:33] + exif + png[33:], webp):  # the chunk right after IHDR
        assert decode_image(data).size == (16, 8)
