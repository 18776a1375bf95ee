"""G.711 (μ-law and A-law, 8 kHz, a byte a sample): the telephone's audio, which Realtime clients on phone
lines send and want back (Twilio's Media Streams carry μ-law), as OpenAI's `g711_ulaw` / `g711_alaw`.

The codecs of ITU-T G.711 as the reference implementation (Sun's g711.c, CPython's audioop) computes them,
vectorised: decoding is a table of the 256 codes, encoding the segment search over 16-bit samples.
"""

from __future__ import annotations

import numpy as np

RATE = 8000
LAWS = ("g711_ulaw", "g711_alaw")

_ULAW_BIAS, _ULAW_CLIP = 0x84, 8159
_ULAW_SEGMENT_ENDS = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEGMENT_ENDS = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def _ulaw_table() -> np.ndarray:
    code = ~np.arange(256) & 0xFF
    magnitude = (((code & 0x0F) << 3) + _ULAW_BIAS) << ((code & 0x70) >> 4)
    return np.where(code & 0x80, _ULAW_BIAS - magnitude, magnitude - _ULAW_BIAS).astype(np.int16)


def _alaw_table() -> np.ndarray:
    code = np.arange(256) ^ 0x55
    segment = (code & 0x70) >> 4
    base = ((code & 0x0F) << 4) + np.where(segment == 0, 8, 0x108)
    magnitude = np.where(segment > 1, base << np.maximum(segment - 1, 0), base)
    return np.where(code & 0x80, magnitude, -magnitude).astype(np.int16)


_DECODE = {"g711_ulaw": _ulaw_table(), "g711_alaw": _alaw_table()}


def decode(data: bytes, law: str) -> np.ndarray:
    """int16 samples (8 kHz) of G.711 bytes."""
    return _DECODE[law][np.frombuffer(data, dtype=np.uint8)]


def encode(samples: np.ndarray, law: str) -> bytes:
    """G.711 bytes of int16 samples (8 kHz)."""
    pcm = np.asarray(samples, dtype=np.int32)
    if law == "g711_ulaw":
        value = pcm >> 2
        mask = np.where(value < 0, 0x7F, 0xFF)
        value = np.minimum(np.abs(value), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
        segment = np.searchsorted(_ULAW_SEGMENT_ENDS, value)  # the first segment whose end is >= value
        code = np.where(segment >= 8, 0x7F, (segment << 4) | ((value >> (np.minimum(segment, 7) + 1)) & 0x0F))
    else:
        value = pcm >> 3
        mask = np.where(value >= 0, 0xD5, 0x55)
        value = np.where(value >= 0, value, -value - 1)
        segment = np.searchsorted(_ALAW_SEGMENT_ENDS, value)
        shift = np.where(segment < 2, 1, np.minimum(segment, 7))
        code = np.where(segment >= 8, 0x7F, (segment << 4) | ((value >> shift) & 0x0F))
    return (code ^ mask).astype(np.uint8).tobytes()
