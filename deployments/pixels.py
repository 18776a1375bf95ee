"""Pillow's part of an image: its header, its pixels as RGB. No limits, no HTTP: this module is what an image
decoder worker process (decode_worker.py) imports, and media.py builds its checks on it.

Pillow has a bound of its own (Image.MAX_IMAGE_PIXELS, 89,478,485 pixels; twice that is an error): it follows
`limits.max_image_pixels` where that is higher (media.py, from the limits; here, from an image the ingress let
through), so that an image within the configured limit is never refused by Pillow's default.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

_PILLOW_BOUND = threading.Lock()  # Image.MAX_IMAGE_PIXELS is Pillow's module global


def follow_pixel_limit(pixels: int) -> None:
    """Raise Pillow's decompression-bomb bound to `pixels` where it is lower; it is never lowered (our
    own header check applies the configured limit, whatever Pillow's is)."""
    with _PILLOW_BOUND:
        bound = Image.MAX_IMAGE_PIXELS
        if bound is not None and pixels > bound:
            Image.MAX_IMAGE_PIXELS = pixels


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an encoded image's header, under Pillow's bound (the ingress's check)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            return image.size


def follow_checked_image(data: bytes) -> None:
    """In the replica, which has no limits: an image the ingress let through may be past Pillow's bound
    (limits.max_image_pixels set above it). Its header is read once with Pillow's bound off, and the bound
    raised to its size; frames inside it (a GIF's, an ICO's) are still held to that bound as they decode."""
    try:
        header_size(data)
        return
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        pass
    except Exception:
        return  # not an image Pillow reads: decoding it says so
    with _PILLOW_BOUND:
        bound, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception:
            return
        finally:
            Image.MAX_IMAGE_PIXELS = bound
    follow_pixel_limit(width * height)


def bounded_header_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """header_size with Pillow's bound following `max_pixels` (limits.max_image_pixels): the ingress's check."""
    follow_pixel_limit(max_pixels)
    return header_size(data)


def checked_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header of an image the ingress has checked; in the model's replica."""
    follow_checked_image(data)
    return header_size(data)


def decode_pixels(data: bytes) -> np.ndarray:
    """An encoded image (header checked by the ingress) as RGB pixels (height, width, 3) of uint8, turned as its
    EXIF says. Raises whatever Pillow raises on a file it cannot decode."""
    follow_checked_image(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        opened = Image.open(io.BytesIO(data))
        opened.load()
    return np.asarray(as_rgb(upright(opened)))


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says, as a browser (and OpenAI) shows a phone's photo; as
    stored where that metadata cannot be read (an eXIf chunk without a TIFF header: no rotation, not no image)."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def as_rgb(image: Image.Image) -> Image.Image:
    """The picture the client sees, as RGB: transparency painted onto white (as transformers' convert_to_rgb
    and vLLM do; a plain convert drops alpha, so a logo's transparent background became black, and a GIF's
    transparent colour made the processor whiten every pixel of that colour), and 16-bit grey scaled to 8
    bits (Pillow's convert clips it: a 16-bit scan came out all white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(pixels.max()), 1.0)
        grey = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        clear = image.info.get("transparency")  # a grey level drawn transparent: kept as alpha (LA)
        image = (Image.fromarray(np.stack([grey, np.where(pixels == clear, 0, 255).astype(np.uint8)], axis=-1))
                 if isinstance(clear, int) else Image.fromarray(grey))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
