"""Images named in chat messages: data: URIs always, local files only under allowed directories.

Remote URLs are refused: the server must not fetch arbitrary addresses on a client's behalf
(and here has no outbound network at all). Every image is bounded before it is decoded: its
encoded size, then its pixel count from the header; only then are its pixels read.

Pillow has a bound of its own (Image.MAX_IMAGE_PIXELS, 89,478,485 pixels; twice that is an error):
it follows `limits.max_image_pixels` where that is higher, in the ingress from the limits, in the
model's replica (which has no limits) from the images the ingress let through, so that an image
within the configured limit is never refused by Pillow's default.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from .errors import InvalidRequestError, RequestTooLargeError
from .isolated import IsolatedPool, WorkerCrashed, WorkerError, WorkerOutOfMemory, WorkerTimedOut
from .limits import RequestLimits
from .pixels import checked_image_size, decode_pixels, follow_pixel_limit, header_size


def take_images(messages: list[dict[str, Any]], limits: RequestLimits, allowed_dirs: list[str],
                decoders: IsolatedPool | None = None) -> list[bytes]:
    """The image parts of chat messages, in order of appearance, as encoded bytes whose header (format,
    pixels) has been checked; each part keeps `{"type": "image"}` for the chat template, its url is
    consumed. Pixels are decoded by the model's replica, under its memory budget (`decode_image`):
    the ingress never holds decoded images (a 4096x4096 one is ~170 MB once decoded and converted)."""
    if Image.MAX_IMAGE_PIXELS is not None and limits.max_image_pixels > Image.MAX_IMAGE_PIXELS:
        follow_pixel_limit(limits.max_image_pixels)
    parts = [(m, p, part) for m, message in enumerate(messages) if isinstance(message.get("content"), list)
             for p, part in enumerate(message["content"]) if part.get("type") == "image"]
    # OpenAI's rule: tool and assistant content is text. An image there was left out of the prompt by the
    # tool-message rendering, yet still counted against the prompt's image tokens (a 400 naming no part).
    for m, p, _ in parts:
        role = messages[m].get("role")
        if role in ("assistant", "tool"):
            raise InvalidRequestError(f"a {role} message's content is text; an image goes in a user message "
                                      "(a tool's screenshot: a user message after the tool's answer)",
                                      param=f"messages.{m}.content.{p}")
    if len(parts) > limits.max_images:
        raise RequestTooLargeError(
            f"the request carries {len(parts)} images; at most max_images={limits.max_images} are accepted",
            param="messages")
    return [load_image(part.pop("url"), limits, allowed_dirs, f"messages.{m}.content.{p}.image_url", decoders)
            for m, p, part in parts]


def load_image(url: str, limits: RequestLimits, allowed_dirs: list[str], param: str,
               decoders: IsolatedPool | None = None) -> bytes:
    scheme = url[:7].lower()  # a URL's scheme is case-insensitive (RFC 3986): DATA: is a data: URI
    if scheme.startswith("data:"):
        data = _from_data_uri(url, limits, param)
    elif scheme == "file://" or url.startswith("/"):
        data = _from_local_file(url, limits, allowed_dirs, param)
    else:
        raise InvalidRequestError(
            f"image URL {url[:60]!r} is not fetched by this server; send the image inline as a "
            "data:image/...;base64 URI",
            param=param,
        )
    _check_header(data, limits, param, decoders)
    return data


def _check_header(data: bytes, limits: RequestLimits, param: str, decoders: IsolatedPool | None = None) -> None:
    """Format and size from the header alone; no pixel is decoded. With `decoders`, Pillow reads the header
    in one of their worker processes: some of its plugins open a file in C (WebP's, AVIF's), and a crash
    there would end the ingress."""
    try:
        width, height = _read_header(data, limits, decoders)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard fires in Image.open for huge headers, before our check could
        raise RequestTooLargeError(
            f"the image has more than {Image.MAX_IMAGE_PIXELS:,} pixels; at most max_image_pixels="
            f"{limits.max_image_pixels:,} are accepted", param=param, code="image_too_large") from None
    except Exception as exc:  # a crafted header: Pillow's plugins raise NotImplementedError, ...
        raise image_refusal(exc, "the image", "reading the image's header", "limits.media_decode_timeout_s",
                            param) from None
    if width * height > limits.max_image_pixels:
        raise RequestTooLargeError(
            f"the image is {width}x{height} = {width * height:,} pixels; at most "
            f"max_image_pixels={limits.max_image_pixels:,} are accepted", param=param, code="image_too_large")
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > limits.max_image_aspect_ratio:
        raise InvalidRequestError(
            f"the image is {width}x{height}, an aspect ratio of {ratio:,.0f}:1; at most "
            f"max_image_aspect_ratio={limits.max_image_aspect_ratio:g} is accepted (the model's processor would "
            "scale its short side up to its input size)", param=param, code="image_aspect_ratio")


_BOMB = ("DecompressionBombError", "DecompressionBombWarning")


def _read_header(data: bytes, limits: RequestLimits, decoders: IsolatedPool | None) -> tuple[int, int]:
    if decoders is None:
        return header_size(data)
    try:
        return decoders.run("image_header", data, limits.max_image_pixels, timeout_s=limits.media_decode_timeout_s)
    except WorkerError as exc:
        if exc.name in _BOMB:
            raise Image.DecompressionBombError(str(exc)) from None
        raise


image_size = checked_image_size  # (width, height) of an image the ingress has checked; in the model's replica


def decode_image(data: bytes, what: str = "the image") -> Image.Image:
    """An encoded image (header checked by the ingress) as RGB pixels, in this process (the VLM replica
    decodes in a worker process of its own: vlm.py)."""
    try:
        return Image.fromarray(decode_pixels(data))
    except Exception as exc:  # any plugin's error on crafted data, a decompression bomb included
        raise image_refusal(exc, what, f"decoding {what}", "image_decode_timeout_s", "messages") from None


def image_refusal(exc: Exception, what: str, doing: str, limit: str, param: str) -> InvalidRequestError:
    """How reading an image failed, as that request's 400, in this process or in a decoder process: Pillow's
    refusal (by its exception's name), the decoder's crash, or `limit` (named) stopping it while `doing`."""
    if isinstance(exc, WorkerCrashed):
        return InvalidRequestError(f"{what} crashed the image decoder ({exc.how}); no other request was affected",
                                   param=param)
    if isinstance(exc, WorkerOutOfMemory):
        return InvalidRequestError(f"{doing} needed more memory than {exc.setting}={exc.limit_mb} MB and was stopped",
                                   param=param)
    if isinstance(exc, WorkerTimedOut):
        return InvalidRequestError(f"{doing} took longer than {limit}={exc.seconds:g} s and was stopped", param=param)
    name = exc.name if isinstance(exc, WorkerError) else type(exc).__name__
    return InvalidRequestError(f"{what} could not be decoded ({name})", param=param)


#: ASCII whitespace, which a browser's "forgiving-base64 decode" of a data: URL skips (WHATWG Infra)
_BASE64_BLANKS = str.maketrans("", "", " \t\n\r\f")


def _from_data_uri(url: str, limits: RequestLimits, param: str) -> bytes:
    """The bytes of a base64 data: URI, read as a browser reads one: line breaks and blanks in the base64 (a
    `base64` command wraps its output at 76 columns) and its missing `=` padding are no error."""
    header, _, payload = url.partition(",")
    if ";base64" not in header.lower():
        raise InvalidRequestError("image data URIs must be base64: data:image/png;base64,<data>", param=param)
    payload = payload.translate(_BASE64_BLANKS)
    if not payload:
        raise InvalidRequestError("the image data URI holds no data after 'base64,'", param=param)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise RequestTooLargeError(
            f"the image is larger than max_image_bytes={limits.max_image_bytes:,} bytes", param=param,
            code="image_too_large")
    if len(payload) % 4 and not payload.endswith("="):
        payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("the image data URI is not valid base64 (A-Z, a-z, 0-9, '+', '/', '=' padding)",
                                  param=param) from None


def _from_local_file(url: str, limits: RequestLimits, allowed_dirs: list[str], param: str) -> bytes:
    path = unquote(urlparse(url).path) if url[:7].lower() == "file://" else url
    # realpath follows every symlink and `..`: what is checked is what would be read
    if "\0" in path:
        raise InvalidRequestError("a local image path cannot contain a NUL character", param=param)
    target = Path(os.path.realpath(path))
    if not any(target.is_relative_to(Path(os.path.realpath(d))) for d in allowed_dirs):
        raise InvalidRequestError(
            "this local image is outside the directories this server may read (allowed_media_dirs in "
            "serve_config.yaml)", param=param)
    if not target.is_file():
        raise InvalidRequestError("this local image does not exist", param=param)
    if target.stat().st_size > limits.max_image_bytes:
        raise RequestTooLargeError(
            f"the image is larger than max_image_bytes={limits.max_image_bytes:,} bytes", param=param,
            code="image_too_large")
    return target.read_bytes()
