"""Audio through PyAV (ffmpeg's demuxers, decoders and AAC encoder in one wheel): what libsndfile cannot do.

In: WebM/Matroska (Chrome's and Firefox's MediaRecorder: Opus), MP4/M4A (Safari's: AAC; also ALAC, MP3),
ADTS AAC, and MP3 (libsndfile reads an MP3 only as far as its header's frame count: a VBR MP3 without a Xing
header, 32 s of audio, decoded as 4.3 s; MP3s joined end to end stopped after the first). Out: ADTS AAC.

Only bytes in memory are read, with the demuxer chosen here from the first bytes (never ffmpeg's probe among its
~350 demuxers: hls, concat and others open the files and URLs a playlist names), and no protocol allowed for a
nested open. Only speech codecs are decoded; the caller bounds rate, channels and length block by block.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av

#: demuxer -> what the caller is told it was
CONTAINERS = {"matroska": "WebM/Matroska", "mov": "MP4/M4A", "aac": "AAC (ADTS)", "mp3": "MP3"}
#: the decoders run, and raw PCM (others, of ffmpeg's ~250 audio decoders, are refused by name before a packet
#: is decoded)
CODECS = frozenset({"aac", "opus", "vorbis", "mp3float", "mp2float", "flac", "alac"})
#: ALAC's cookie states its frame length (Apple writes 4096); ffmpeg takes up to 4096 * 4096 and sizes its
#: buffers by it: 64 MiB per channel for a few bytes of upload
MAX_ALAC_FRAME = 1 << 16
#: decoded frames are gathered into blocks of about this many frames for the caller (mixing, resampling)
BLOCK_FRAMES = 1 << 16
#: the share of an upload's packets that may fail to decode (each skipped, a few ms of audio lost) or of the
#: length it states that may be missing, before it is refused as damaged rather than transcribed with gaps
MAX_DAMAGED_SHARE = 0.1
#: PyAV's to_ndarray reads a planar frame's planes from a fixed array of 8 (AV_NUM_DATA_POINTERS): an AAC frame
#: whose program config element states 35 channels (found in 25 MiB of random bytes behind an ADTS header)
#: crashed the process with a segmentation fault. Frames with more channels are refused before conversion.
MAX_PLANES = 8
# no nested open (a reference in a file to another file or URL) can succeed; the demuxer is never probed
_OPTIONS = {"protocol_whitelist": "none"}


class AvDecodeError(ValueError):
    """The upload is not audio PyAV decodes here; the message says why, for the user."""


def demuxer_for(data: bytes) -> str | None:
    """The PyAV demuxer for `data` from its first bytes, or None for what libsndfile reads (WAV, FLAC, Ogg, AIFF,
    and anything unknown, whose error libsndfile words). The file name and Content-Type are not consulted."""
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: WebM, Matroska
        return "matroska"
    if data[4:8] == b"ftyp":  # ISO base media: MP4, M4A, MOV, 3GP
        return "mov"
    start = _id3_size(data)
    head = data[start:start + 2]  # not data[start:][:2]: a copy of the whole upload
    if len(head) == 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # ADTS: 12 sync bits, layer 00
            return "aac"
        if head[1] & 0xE0 == 0xE0 and head[1] & 0x06:  # MPEG audio: 11 sync bits, layer I, II or III
            return "mp3"
    return None


def _id3_size(data: bytes) -> int:
    """Bytes of an ID3v2 tag at the start (MP3s and some AAC files carry one), else 0."""
    if len(data) < 10 or data[:3] != b"ID3" or any(b & 0x80 for b in data[6:10]):
        return 0
    size = int.from_bytes(bytes(data[6:10]), "big")
    size = (size & 0x7F) | (size >> 8 & 0x7F) << 7 | (size >> 16 & 0x7F) << 14 | (size >> 24 & 0x7F) << 21
    return 10 + size + (10 if data[5] & 0x10 else 0)  # a footer repeats the header


def _reason(exc: BaseException) -> str:
    # ffmpeg's words ("Invalid data found when processing input"), not the exception's repr with a file name
    return getattr(exc, "strerror", None) or type(exc).__name__


class AvAudio:
    """One upload opened with PyAV: its first audio stream's rate, channels and stated length (0 where the
    container only estimates it), then `blocks()`, none of more than `max_channels`. Use as a context manager."""

    def __init__(self, data: bytes, demuxer: str, max_channels: int = MAX_PLANES):
        import av  # here, not at the top: 17 MB and 35 ms in every process that imports errors.py, most never decode

        name = CONTAINERS[demuxer]
        try:
            self._container = av.open(io.BytesIO(data), "r", format=demuxer, options=_OPTIONS)
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            hint = (": it has no index (moov atom), as a file cut short or still being written"
                    if demuxer == "mov" and b"moov" not in data else f" ({_reason(exc)})")
            raise AvDecodeError(f"Could not read the audio file as {name}{hint}.") from exc
        try:
            if not self._container.streams.audio:
                raise AvDecodeError(f"The {name} file has no audio stream.")
            self._stream = self._container.streams.audio[0]
            context = self._stream.codec_context
            # no decoder in this ffmpeg for the codec the file names (a damaged codec id): PyAV gives no context
            codec = context.codec.name if context is not None else "a codec ffmpeg does not know"
            if codec not in CODECS and not codec.startswith("pcm_"):
                raise AvDecodeError(f"The {name} file's audio is {codec}; accepted codecs are AAC, Opus, "
                                    "Vorbis, MP3, FLAC, ALAC and PCM.")
            if codec == "alac" and int.from_bytes((context.extradata or b"")[12:16], "big") > MAX_ALAC_FRAME:
                raise AvDecodeError(f"The ALAC audio states frames of more than {MAX_ALAC_FRAME} samples.")
            self.name, self.rate, self.channels = name, int(context.sample_rate), int(context.channels)
            self.max_channels = max_channels
            # MP4 and Matroska state the length (a MediaRecorder WebM does not); ADTS and MP3 only estimate it
            # from the bit rate (a VBR MP3 without a Xing header: 2-80x off, a false 413)
            self.stated_s = 0.0
            if demuxer in ("mov", "matroska"):
                if self._stream.duration and self._stream.time_base:
                    self.stated_s = float(self._stream.duration * self._stream.time_base)
                elif self._container.duration:
                    self.stated_s = self._container.duration / av.time_base
            self.frames = int(self.stated_s * self.rate)
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> AvAudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self._container.close()

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(rate, float32 samples of shape (frames, channels)) as decoded, in blocks of ~BLOCK_FRAMES: a new
        block where the rate or the channel count changes (joined MP3s of other rates). The caller stops
        iterating past its length limit: nothing beyond one block past it is decoded.

        A packet the decoder refuses is skipped, as ffmpeg's command line and every player do (one flipped byte
        in an M4A loses 21 ms of audio, not the upload), up to MAX_DAMAGED_SHARE of the packets."""
        import av

        held: list[np.ndarray] = []
        rate = frames = packets = damaged = 0
        seconds, reason = 0.0, ""
        try:
            for packet in self._container.demux(self._stream):  # the last, empty, packet flushes the decoder
                packets += packet.size > 0
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError as exc:
                    damaged, reason = damaged + 1, reason or _reason(exc)
                    continue
                for frame in decoded:
                    if frame.sample_rate <= 0 or not frame.samples:  # random bytes decoded so: no audio
                        damaged += 1
                        continue
                    self._check_channels(frame.layout.nb_channels, seconds)  # a stream's frames may differ
                    samples = _float_frames(frame)
                    if held and (frame.sample_rate != rate or samples.shape[1] != held[0].shape[1]):
                        yield rate, np.concatenate(held)
                        held, frames = [], 0
                    rate = frame.sample_rate
                    held.append(samples)
                    frames += len(samples)
                    seconds += len(samples) / rate
                    if frames >= BLOCK_FRAMES:
                        yield rate, np.concatenate(held)
                        held, frames = [], 0
        except av.error.FFmpegError as exc:  # the container itself, past its header
            raise AvDecodeError(f"The {self.name} file is damaged {seconds:.1f} s in ({_reason(exc)}).") from exc
        if damaged > MAX_DAMAGED_SHARE * packets:
            raise AvDecodeError(f"{damaged} of the {packets} packets of the {self.name} audio do not decode "
                                f"({reason}): the file is damaged.")
        if held:
            yield rate, np.concatenate(held)
        # ffmpeg's demuxers skip damaged bytes to the next readable block without an error (a WebM with 10 kB of
        # garbage mid-way decoded half its length): where the file states its length, far less is refused
        if seconds < (1 - MAX_DAMAGED_SHARE) * self.stated_s - 0.1:
            raise AvDecodeError(f"The {self.name} file states {self.stated_s:.1f} s of audio, but only "
                                f"{seconds:.1f} s of it decode: the file is damaged or cut short.")


    def _check_channels(self, channels: int, seconds: float) -> None:
        if channels > self.max_channels:
            raise AvDecodeError(f"The audio has {channels} channels ({seconds:.1f} s in); at most "
                                f"max_audio_channels={self.max_channels} are accepted.")
        if channels > MAX_PLANES:
            raise AvDecodeError(f"The {self.name} audio has {channels} channels ({seconds:.1f} s in); at most "
                                f"{MAX_PLANES} are decoded from {self.name}.")


_FULL_SCALE = {"s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _float_frames(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as float32 (frames, channels) in [-1, 1]: planar or packed, float or integer."""
    array = frame.to_ndarray()
    channels = frame.layout.nb_channels
    samples = array.T if frame.format.is_planar else array.reshape(-1, channels)
    kind = frame.format.name.rstrip("p")
    if kind == "u8":
        return (samples.astype(np.float32) - 128.0) / 128.0
    if kind in _FULL_SCALE:
        return (samples / _FULL_SCALE[kind]).astype(np.float32)
    return samples.astype(np.float32, copy=False)


# --- AAC out ------------------------------------------------------------------------------------------------

#: the rates ffmpeg's AAC encoder takes (others are resampled up to the next one)
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
AAC_BIT_RATE = 64000  # mono speech; ffmpeg's default (128 kb/s) is for stereo music


class _Sink:
    """A write-only file for the muxer: what it wrote since the last `take()` (no seek: ADTS needs none)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class AdtsEncoder:
    """Mono float32 samples at one of AAC_RATES in, ADTS AAC bytes out as each 1024-sample frame is encoded
    (ADTS frames are self-delimiting, so the bytes stream; a decoder sees ffmpeg's 1024 samples of priming
    first, as from any AAC encoder)."""

    def __init__(self, rate: int):
        import av

        self._sink = _Sink()
        # flush_packets: each frame reaches the sink at once, not when avio's 32 kB buffer fills
        self._container = av.open(self._sink, "w", format="adts", options={"flush_packets": "1"})
        self._stream = self._container.add_stream("aac", rate=rate, layout="mono")
        self._stream.codec_context.bit_rate = AAC_BIT_RATE
        self._rate, self._pts = rate, 0

    def write(self, samples: np.ndarray) -> bytes:
        import av

        if len(samples):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None], format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = self._rate, self._pts
            self._pts += len(samples)
            self._container.mux(self._stream.encode(frame))
        return self._sink.take()

    def close(self) -> bytes:
        self._container.mux(self._stream.encode(None))
        self._container.close()
        return self._sink.take()
