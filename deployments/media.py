"""Images named in chat messages: data: URIs always, local files only under allowed directories.

Remote URLs are refused: the server must not fetch arbitrary addresses on a client's behalf
(and here has no outbound network at all).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .errors import InvalidRequestError

MAX_IMAGE_BYTES = 20 * 2**20


def load_image(url: str, allowed_dirs: list[str], param: str) -> Image.Image:
    if url.startswith("data:"):
        data = _from_data_uri(url, param)
    elif url.startswith("file://") or url.startswith("/"):
        data = _from_local_file(unquote(urlparse(url).path) if url.startswith("file://") else url, allowed_dirs, param)
    else:
        raise InvalidRequestError(
            f"image URL {url[:60]!r} is not fetched by this server; send the image inline as a "
            "data:image/...;base64 URI",
            param=param,
        )
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequestError(f"the image could not be decoded ({exc})", param=param) from None
    return image.convert("RGB")


def _from_data_uri(url: str, param: str) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header or not payload:
        raise InvalidRequestError("image data URIs must be base64: data:image/png;base64,<data>", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("the image data URI is not valid base64", param=param) from None
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(f"image is larger than {MAX_IMAGE_BYTES // 2**20} MiB", param=param)
    return data


def _from_local_file(path: str, allowed_dirs: list[str], param: str) -> bytes:
    target = Path(path).resolve()
    if not any(target.is_relative_to(Path(d).resolve()) for d in allowed_dirs):
        raise InvalidRequestError(
            f"local image {path!r} is outside the directories this server may read "
            "(allowed_media_dirs in serve_config.yaml)",
            param=param,
        )
    if not target.is_file():
        raise InvalidRequestError(f"local image {path!r} does not exist", param=param)
    return target.read_bytes()
