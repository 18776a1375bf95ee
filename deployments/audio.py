"""Audio in and out without an ffmpeg binary or torchaudio: libsndfile (via soundfile), PyAV and scipy.

Decoding: libsndfile for what it reads well and cheaply (WAV, FLAC, Ogg Vorbis/Opus, AIFF), PyAV (`audio_av`)
for what browsers and phones record (WebM, MP4/M4A, AAC) and for MP3, which libsndfile cuts short.
Encoding formats are registered only when this machine can write them, so `SPEECH_FORMATS` says what it
can actually produce.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import soundfile as sf

from .audio_av import AAC_RATES, AdtsEncoder, AvAudio, AvDecodeError, demuxer_for

DECODABLE = "WAV, FLAC, OGG (Vorbis/Opus), MP3, WebM (Opus/Vorbis), MP4/M4A (AAC/ALAC), AAC (ADTS), AIFF"


class AudioDecodeError(ValueError):
    """The uploaded bytes are empty or not audio that can be decoded here."""


class UnsupportedAudioFormat(ValueError):
    """An output format that is not registered in `SPEECH_FORMATS` on this machine."""


# --- decoding and resampling ------------------------------------------------------------


@dataclass(frozen=True)
class AudioBounds:
    """What an upload may be, checked from its header before decoding (see limits.RequestLimits)."""

    min_rate: int = 8000
    max_rate: int = 192000
    max_channels: int = 8
    max_seconds: float = 1800.0
    #: streams of a chained Ogg file (files joined end to end), each opened and decoded in turn
    max_links: int = 64
    #: decoded audio above this rate is resampled down to it block by block (speech models take 16 kHz)
    target_rate: int = 16000


BLOCK_FRAMES = 1 << 20  # frames decoded at a time: memory stays ~channels x 4 MiB whatever the file


class AudioTooLongError(AudioDecodeError):
    """The audio is longer than the limit that applies (413)."""


def decode_audio(data: bytes, bounds: AudioBounds = AudioBounds()) -> tuple[np.ndarray, int]:
    """Decode an audio file to float32 mono samples in [-1, 1] and its sample rate.

    WAV, FLAC, Ogg and AIFF go to libsndfile; WebM, MP4/M4A, AAC and MP3 to PyAV (`audio_av`), chosen by the
    first bytes. The header is read first: rates, channels and a stated duration out of bounds are refused
    before a sample is decoded. Decoding runs block by block, mixing down and resampling each block, and
    stops at the first block past the length limit, so a file that compresses well (a silent 8-channel FLAC
    is ~4000:1) never expands into gigabytes."""
    if not data:
        raise AudioDecodeError(f"The audio file is empty. Supported formats: {DECODABLE}.")
    demuxer = demuxer_for(data)
    pieces: list[np.ndarray] = []
    out_rate, seconds = 0, 0.0  # the first block's rate (at most target_rate), the seconds decoded so far
    try:
        for source in _av_sources(data, demuxer, bounds) if demuxer else _sndfile_sources(data, bounds):
            _check_header(source.rate, source.channels, source.frames, bounds, seconds)
            rate, resampler = 0, StreamResampler(1, 1)  # replaced at the first block
            for block_rate, block in source.blocks:
                _check_header(block_rate, block.shape[1], 0, bounds)  # a stream may change both (joined MP3s)
                if block_rate != rate:  # one resampler per run of a rate: no seam at each block's edges
                    pieces.append(resampler.flush())
                    rate, out_rate = block_rate, out_rate or min(block_rate, bounds.target_rate)
                    resampler = StreamResampler(rate, out_rate)
                seconds += block.shape[0] / rate
                if seconds > bounds.max_seconds:  # a header that under-states the length, or states none
                    raise AudioTooLongError(_too_long(seconds, bounds))
                mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
                # float files may hold NaN, inf or values past full scale: one NaN made every
                # log-mel feature NaN (a 200 with a garbage transcript)
                mono = np.clip(np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
                pieces.append(resampler.feed(np.ascontiguousarray(mono)))
            pieces.append(resampler.flush())
    except AudioDecodeError:
        raise
    except AvDecodeError as exc:
        raise AudioDecodeError(f"{exc} Supported formats: {DECODABLE}.") from exc
    except (sf.SoundFileError, sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile's own words, not the exception's text (it quotes a Python object repr)
        reason = getattr(exc, "error_string", None) or type(exc).__name__
        raise AudioDecodeError(f"Could not decode the audio file ({reason}). Supported formats: {DECODABLE}.") from exc
    if seconds == 0:
        raise AudioDecodeError("The audio file contains no samples.")
    return np.ascontiguousarray(np.concatenate(pieces), dtype=np.float32), out_rate


@dataclass
class _Source:
    """One stream to decode: its header (frames 0: not stated, or only estimated) and its (rate, block) pairs,
    each block float32 of shape (frames, channels)."""

    rate: int
    channels: int
    frames: int
    blocks: Iterator[tuple[int, np.ndarray]]


def _sndfile_sources(data: bytes, bounds: AudioBounds) -> Iterator[_Source]:
    """Each link of a chained Ogg file, or the one file, read by libsndfile."""
    for link in _ogg_links(data, bounds.max_links) if data.startswith(b"OggS") else [data]:
        with sf.SoundFile(io.BytesIO(link)) as f:
            # an MP3's frame count is an estimate unless a Xing/Info header states it (MP3s go to PyAV, but one
            # with bytes before its first frame comes here): over-stated 2-80x, a false 413
            yield _Source(int(f.samplerate), f.channels, 0 if f.format == "MP3" else f.frames, _sndfile_blocks(f))


def _sndfile_blocks(f: sf.SoundFile) -> Iterator[tuple[int, np.ndarray]]:
    # read until the decoder has no more: SoundFile.blocks() reads as many frames as the header says, and past
    # the real end yields its reused buffer (57.5 s of speech heard as 132.6 s)
    while len(block := f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)):
        yield int(f.samplerate), block


def _av_sources(data: bytes, demuxer: str, bounds: AudioBounds) -> Iterator[_Source]:
    with AvAudio(data, demuxer, bounds.max_channels) as audio:
        yield _Source(audio.rate, audio.channels, audio.frames, audio.blocks())


def _ogg_links(data: bytes, max_links: int) -> list[bytes]:
    """A chained Ogg file's links, each a whole Ogg file. Streams one after another (files joined end to end,
    a radio dump) are one valid Ogg file, and libsndfile decodes only the first: the rest was dropped without
    a word. A link starts at a page that begins a stream (BOS) right after one that ended one (EOS); streams
    that begin together (multiplexed) stay one link. Bytes that are not Ogg pages stay with the last link."""
    starts, pos, ended = [0], 0, False
    while pos + 27 <= len(data) and data.startswith(b"OggS", pos):
        kind, count = data[pos + 5], data[pos + 26]
        if kind & 0x02 and ended:
            if len(starts) == max_links:  # each costs a decoder's set-up (~1 ms), whatever audio it holds
                raise AudioDecodeError(f"The Ogg file chains more than {max_links} streams; at most "
                                       f"max_audio_links={max_links} are accepted.")
            starts.append(pos)
        ended = bool(kind & 0x04)
        pos += 27 + count + sum(data[pos + 27:pos + 27 + count])
    return [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]


def _too_long(seconds: float, bounds: AudioBounds) -> str:
    return f"The audio is {seconds:,.1f} s long; the limit is max_audio_seconds={bounds.max_seconds:g} s."


def _check_header(rate: int, channels: int, frames: int, bounds: AudioBounds, before_s: float = 0.0) -> None:
    if not bounds.min_rate <= rate <= bounds.max_rate:
        raise AudioDecodeError(
            f"The audio's sample rate is {rate} Hz; accepted are {bounds.min_rate}-{bounds.max_rate} Hz "
            "(limits.min_sample_rate / max_sample_rate).")
    if channels > bounds.max_channels:
        raise AudioDecodeError(
            f"The audio has {channels} channels; at most max_audio_channels={bounds.max_channels} are accepted.")
    if 0 < frames and before_s + frames / rate > bounds.max_seconds:
        raise AudioTooLongError(_too_long(before_s + frames / rate, bounds))


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Polyphase resampling (float32); returns the input unchanged when the rates match."""
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate:
        return samples
    # Imported here so that decoding, encoding and error mapping work without scipy.
    from scipy.signal import resample_poly

    up, down = resample_ratio(from_rate, to_rate)
    return resample_poly(samples, up, down).astype(np.float32, copy=False)


#: largest denominator of a resampling ratio (see resample_ratio)
MAX_RATIO_TERMS = 1000


def resample_ratio(from_rate: int, to_rate: int) -> tuple[int, int]:
    """(up, down) for polyphase resampling from `from_rate` to `to_rate`: the exact ratio wherever its
    denominator is at most MAX_RATIO_TERMS (every rate in use: 44100 -> 16000 is 160/441, 11025 -> 16000
    640/441), else the nearest ratio that is. resample_poly designs a filter of 20 x max(up, down) taps on
    every call, so a rate sharing no factor with the target (191999 Hz -> 16 kHz: 16000/191999) took 0.3 s
    of CPU per second of audio: a 71 kB FLAC of 120 s cost 33 s to decode, 1800 s about 8 minutes. The
    nearest ratio is off by at most 0.05% (5 ppm for 191999 Hz), a pitch and time error no one hears."""
    ratio = Fraction(int(to_rate), int(from_rate)).limit_denominator(MAX_RATIO_TERMS)  # exact where it fits
    return ratio.numerator, ratio.denominator


class StreamResampler:
    """Resamples a stream that arrives in pieces of any size, giving what `resample` gives for the whole
    stream at once (up to rounding). Each piece resampled alone would get its length rounded up and
    zero-padded edges, so a stream sent in small pieces (a browser's 128-sample audio blocks) would run
    ahead of its clock and distort at every seam. An output sample is given once every input sample its
    filter reaches has arrived (resample_poly's filter: ~15 input samples either side at 24 -> 16 kHz)."""

    def __init__(self, from_rate: int, to_rate: int):
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.up, self.down = resample_ratio(from_rate, to_rate)
        self.margin = -(-10 * max(self.up, self.down) // self.up) + 1  # input samples an output reaches, each side
        self.pending = np.zeros(0, dtype=np.float32)  # the input from `start` on that later outputs need
        self.start = 0  # stream index of pending[0], a multiple of `down`, so outputs line up with the whole's
        self.emitted = 0  # outputs given so far

    def feed(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32)
        if self.up == self.down:
            return samples
        self.pending = np.concatenate([self.pending, samples])
        end = self.start + len(self.pending)
        return self._emit(max(0, (end - self.margin) * self.up // self.down + 1))

    def flush(self) -> np.ndarray:
        """The rest, as the whole stream's resampling ends (its end zero-padded)."""
        if self.up == self.down:
            return np.zeros(0, dtype=np.float32)
        end = self.start + len(self.pending)
        return self._emit(-(-end * self.up // self.down))

    def _emit(self, ready: int) -> np.ndarray:
        if ready <= self.emitted:
            return np.zeros(0, dtype=np.float32)
        from scipy.signal import resample_poly

        out = resample_poly(self.pending, self.up, self.down).astype(np.float32, copy=False)
        base = self.start * self.up // self.down
        piece = out[self.emitted - base:ready - base]
        self.emitted = ready
        keep = max(self.start, (self.emitted * self.down // self.up - self.margin) // self.down * self.down)
        self.pending, self.start = self.pending[keep - self.start:], keep
        return piece


def chunk(samples: np.ndarray, rate: int, chunk_s: float = 30.0) -> list[tuple[float, np.ndarray]]:
    """Split audio into consecutive `(start_seconds, samples)` pieces of at most `chunk_s`.

    Whisper-style models see 30 s windows; the pieces cover the whole signal, the last one
    shorter. Empty input gives an empty list.
    """
    if chunk_s <= 0:
        raise ValueError(f"chunk_s must be positive, got {chunk_s}")
    size = max(1, int(round(chunk_s * rate)))
    return [(start / rate, samples[start : start + size]) for start in range(0, len(samples), size)]


# --- encoding ---------------------------------------------------------------------------

# Rates the codecs accept; other rates are resampled up to the next one (or the highest).
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def _supported_rate(rate: int, allowed: tuple[int, ...]) -> int:
    return rate if rate in allowed else next((r for r in allowed if r >= rate), allowed[-1])


def _prepare(waveform: np.ndarray) -> np.ndarray:
    # Models return (n,), (1, n) or (n, 1); NaNs or peaks over 1 would wrap around in PCM_16.
    samples = np.asarray(waveform, dtype=np.float32).squeeze()
    if samples.ndim != 1:
        raise ValueError(f"expected a mono waveform, got shape {np.shape(waveform)}")
    return np.clip(np.nan_to_num(samples), -1.0, 1.0)


def _soundfile_encoder(
    format: str, subtype: str, rates: tuple[int, ...] | None = None
) -> Callable[[np.ndarray, int], tuple[bytes, int]]:
    def encode(samples: np.ndarray, rate: int) -> tuple[bytes, int]:
        if rates is not None:
            target = _supported_rate(rate, rates)
            samples, rate = resample(samples, rate, target), target
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format=format, subtype=subtype)
        return buffer.getvalue(), rate

    return encode


def _pcm16(samples: np.ndarray, rate: int) -> tuple[bytes, int]:
    # clipped again here: resampling overshoots a full-scale waveform, and int16 would wrap the peaks around
    return (np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")).tobytes(), rate


#: `pcm` has no header to say its rate: OpenAI's is 24 kHz, and clients play it so (the openai package's
#: LocalAudioPlayer, browsers' Realtime code), so every model's audio is written at that rate
PCM_RATE = 24000


def _pcm16_at_pcm_rate(samples: np.ndarray, rate: int) -> tuple[bytes, int]:
    return _pcm16(resample(samples, rate, PCM_RATE), PCM_RATE)


def _aac(samples: np.ndarray, rate: int) -> tuple[bytes, int]:
    target = _supported_rate(rate, AAC_RATES)
    encoder = AdtsEncoder(target)
    return encoder.write(resample(samples, rate, target)) + encoder.close(), target


def _writable(format: str, subtype: str) -> bool:
    return format in sf.available_formats() and subtype in sf.available_subtypes(format)


#: name -> (media type, encoder taking (mono float32 samples, rate) -> (bytes, rate written))
_CANDIDATES: dict[str, tuple[str, Callable[[np.ndarray, int], tuple[bytes, int]], tuple[str, str] | None]] = {
    "wav": ("audio/wav", _soundfile_encoder("WAV", "PCM_16"), ("WAV", "PCM_16")),
    "flac": ("audio/flac", _soundfile_encoder("FLAC", "PCM_16"), ("FLAC", "PCM_16")),
    "pcm": ("audio/pcm", _pcm16_at_pcm_rate, None),
    "mp3": ("audio/mpeg", _soundfile_encoder("MP3", "MPEG_LAYER_III", _MP3_RATES), ("MP3", "MPEG_LAYER_III")),
    "opus": ("audio/ogg", _soundfile_encoder("OGG", "OPUS", _OPUS_RATES), ("OGG", "OPUS")),
    "aac": ("audio/aac", _aac, None),  # ADTS, through PyAV's AAC encoder
}

SPEECH_FORMATS: Mapping[str, tuple[str, Callable[[np.ndarray, int], tuple[bytes, int]]]] = {
    name: (media_type, encoder)
    for name, (media_type, encoder, needs) in _CANDIDATES.items()
    if needs is None or _writable(*needs)
}

#: /v1/audio/speech's format when the request names none: OpenAI's default, where it can be written here
DEFAULT_SPEECH_FORMAT = "mp3" if "mp3" in SPEECH_FORMATS else "wav"


def encode_audio_with_rate(waveform: np.ndarray, rate: int, fmt: str) -> tuple[bytes, str, int]:
    """Like `encode_audio`, also returning the sample rate actually written.

    mp3, opus and aac accept only some rates; other rates are resampled up to a supported one.
    """
    try:
        media_type, encoder = SPEECH_FORMATS[fmt]
    except KeyError:
        raise UnsupportedAudioFormat(
            f"Audio format {fmt!r} is not supported here; choose one of: {', '.join(SPEECH_FORMATS)}."
        ) from None
    data, written_rate = encoder(_prepare(waveform), int(rate))
    return data, media_type, written_rate


def encode_audio(waveform: np.ndarray, rate: int, fmt: str) -> tuple[bytes, str]:
    """Encode a mono float waveform as `fmt` (a key of `SPEECH_FORMATS`): (bytes, media type)."""
    data, media_type, _ = encode_audio_with_rate(waveform, rate, fmt)
    return data, media_type


# --- streaming encoding -------------------------------------------------------------------

#: formats whose bytes can be sent while later audio is still being made; the others (flac, mp3) are
#: written once the audio is complete (libsndfile rewrites their headers when it closes them)
STREAMED_FORMATS = ("pcm", "wav", "opus", "aac")


def streaming_wav_header(rate: int) -> bytes:
    """A 16-bit mono WAV header for audio of unknown length (RIFF and data sizes 0xFFFFFFFF, as
    streaming servers send it; libsndfile, Python's wave and scipy read such a file to its end)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


class StreamEncoder:
    """Encodes audio that arrives piece by piece into one `fmt` byte stream: `write(piece)` returns the
    bytes that piece adds (pcm and wav at once, opus page by page, aac frame by frame), `close()` the rest
    (all of it for flac and mp3). The source rate must stay the same across pieces."""

    def __init__(self, fmt: str, rate: int):
        if fmt not in SPEECH_FORMATS:
            raise UnsupportedAudioFormat(
                f"Audio format {fmt!r} is not supported here; choose one of: {', '.join(SPEECH_FORMATS)}.")
        self.fmt, self.rate = fmt, int(rate)
        self.media_type = SPEECH_FORMATS[fmt][0]
        self.streamed = fmt in STREAMED_FORMATS
        self.written_rate = {"opus": _supported_rate(self.rate, _OPUS_RATES), "pcm": PCM_RATE,
                             "aac": _supported_rate(self.rate, AAC_RATES)}.get(fmt, self.rate)
        self._held: list[np.ndarray] = []  # flac/mp3: the whole audio, encoded at close
        self._file: Any = None
        self._resampler = StreamResampler(self.rate, self.written_rate)  # opus, pcm, aac: one stream, no seams
        self._buffer = io.BytesIO()
        self._sent = 0
        self._started = False

    def write(self, waveform: np.ndarray) -> bytes:
        samples = _prepare(waveform)
        if self.fmt == "pcm":
            self._started = True
            return _pcm16(self._resampler.feed(samples), PCM_RATE)[0]
        if self.fmt == "wav":
            head = b"" if self._started else streaming_wav_header(self.rate)
            self._started = True
            return head + _pcm16(samples, self.rate)[0]
        if self.fmt == "opus":
            if self._file is None:
                self._file = sf.SoundFile(self._buffer, "w", samplerate=self.written_rate, channels=1,
                                          format="OGG", subtype="OPUS")
            self._file.write(self._resampler.feed(samples))
            return self._take()
        if self.fmt == "aac":
            self._file = self._file or AdtsEncoder(self.written_rate)
            return self._file.write(self._resampler.feed(samples))
        self._held.append(samples)
        return b""

    def close(self) -> bytes:
        if self.fmt == "pcm":
            return _pcm16(self._resampler.flush(), PCM_RATE)[0]
        if self.fmt == "wav":
            return b"" if self._started else self.write(np.zeros(0, dtype=np.float32))
        if self.fmt == "opus":
            if self._file is None:
                return b""
            rest = self._resampler.flush()
            if len(rest):
                self._file.write(rest)
            self._file.close()
            return self._take()
        if self.fmt == "aac":
            if self._file is None:
                return b""
            return self._file.write(self._resampler.flush()) + self._file.close()
        data, _, self.written_rate = encode_audio_with_rate(
            np.concatenate(self._held) if self._held else np.zeros(0, dtype=np.float32), self.rate, self.fmt)
        return data

    def _take(self) -> bytes:
        data = self._buffer.getvalue()[self._sent:]
        self._sent += len(data)
        return data


# --- subtitles --------------------------------------------------------------------------


def _field(segment: Any, name: str) -> Any:
    return segment[name] if isinstance(segment, Mapping) else getattr(segment, name)


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, int(round(float(seconds) * 1000)))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def _cues(segments: Iterable[Any], separator: str) -> list[str]:
    return [
        f"{_timestamp(_field(s, 'start'), separator)} --> {_timestamp(_field(s, 'end'), separator)}\n"
        f"{str(_field(s, 'text')).strip()}\n"
        for s in segments
    ]


def format_srt(segments: Iterable[Any]) -> str:
    """SubRip subtitles from segments (objects or dicts with start, end, text)."""
    return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(_cues(segments, ","), start=1))


def format_vtt(segments: Iterable[Any]) -> str:
    """WebVTT subtitles from segments (objects or dicts with start, end, text)."""
    return "WEBVTT\n\n" + "\n".join(_cues(segments, "."))
