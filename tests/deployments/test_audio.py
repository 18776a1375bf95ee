"""Audio decode/encode round trips, resampling, chunking and subtitle formats."""

import io
import itertools
import re
from types import SimpleNamespace
from typing import get_args

import numpy as np
import pytest
import soundfile as sf

from deployments.audio import (
    SPEECH_FORMATS,
    AudioBounds,
    AudioDecodeError,
    AudioTooLongError,
    StreamEncoder,
    StreamResampler,
    UnsupportedAudioFormat,
    chunk,
    decode_audio,
    encode_audio,
    encode_audio_with_rate,
    format_srt,
    format_vtt,
    resample,
)
from deployments.protocol import SpeechFormat


def sine(rate: int, seconds: float = 1.0, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


def decode_any(data: bytes, fmt: str, rate: int) -> tuple[np.ndarray, int]:
    if fmt == "pcm":  # headerless: the caller knows the rate
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, rate
    return decode_audio(data, AudioBounds(target_rate=48000))  # keep the written rate


def test_decoding_resamples_down_to_16k_block_by_block():
    data, _, _ = encode_audio_with_rate(sine(44100, seconds=2.0), 44100, "wav")
    samples, rate = decode_audio(data)
    assert rate == 16000 and len(samples) == pytest.approx(32000, abs=2)
    assert peak_hz(samples, rate) == pytest.approx(440, abs=5)


def test_every_format_the_api_accepts_is_registered_here():
    assert set(SPEECH_FORMATS) == set(get_args(SpeechFormat))


@pytest.mark.parametrize("fmt", sorted(SPEECH_FORMATS))
@pytest.mark.parametrize("rate", [16000, 22050])
def test_encode_decode_round_trip(fmt, rate):
    data, media_type, written_rate = encode_audio_with_rate(sine(rate), rate, fmt)
    assert media_type == SPEECH_FORMATS[fmt][0] and media_type.startswith("audio/")
    assert encode_audio(sine(rate), rate, fmt)[1] == media_type
    samples, decoded_rate = decode_any(data, fmt, written_rate)
    assert decoded_rate == written_rate
    # opus only takes 8/12/16/24/48 kHz: 22050 goes up to 24000; pcm is always 24 kHz (OpenAI's, and it has
    # no header to say otherwise); the others keep the rate
    expected_rate = 24000 if (fmt, rate) == ("opus", 22050) or fmt == "pcm" else rate
    assert written_rate == expected_rate
    # ADTS cannot say where the audio starts and ends: an AAC decoder gives the encoder's 1024 samples of
    # priming first and the last frame whole (1024 samples)
    extra = 2048 / written_rate if fmt == "aac" else 0.0
    assert len(samples) / decoded_rate == pytest.approx(1.0 + extra / 2, abs=0.03 + extra / 2)
    assert peak_hz(samples, decoded_rate) == pytest.approx(440, abs=5)
    # RMS, not peak: lossy codecs overshoot where the sine is cut off at the end
    assert np.sqrt(np.mean(samples**2)) == pytest.approx(0.5 / np.sqrt(2), abs=0.03)


def test_pcm_is_raw_little_endian_int16_at_24_khz():
    data, media_type = encode_audio(np.array([0.0, 1.0, -1.0, 0.5], dtype=np.float32), 24000, "pcm")
    assert media_type == "audio/pcm"
    assert np.frombuffer(data, dtype="<i2").tolist() == [0, 32767, -32767, 16384]
    tone = sine(16000, seconds=1.0, freq=440)  # a 16 kHz model's audio: 1.5x the samples, the same pitch
    whole = np.frombuffer(encode_audio(tone, 16000, "pcm")[0], dtype="<i2")
    assert len(whole) == 24000 and peak_hz(whole.astype(np.float32), 24000) == pytest.approx(440, abs=2)
    encoder = StreamEncoder("pcm", 16000)  # streamed in pieces: the same samples as whole
    streamed = b"".join([encoder.write(tone[i:i + 1234]) for i in range(0, len(tone), 1234)] + [encoder.close()])
    assert np.abs(np.frombuffer(streamed, dtype="<i2").astype(np.int32) - whole).max() <= 2


def test_encode_clips_and_accepts_model_shapes():
    loud = np.full((1, 1600), 2.0, dtype=np.float32)  # (1, n) as TTS models return it, over full scale
    samples, _ = decode_audio(encode_audio(loud, 16000, "wav")[0])
    assert samples.min() > 0.99  # clipped, not wrapped around to negative


def test_unknown_output_format():
    with pytest.raises(UnsupportedAudioFormat, match="choose one of: wav"):
        encode_audio(sine(16000), 16000, "wma")


def test_decode_mixes_channels_down():
    stereo = np.stack([np.full(800, 0.5), np.full(800, 0.25)], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 8000, format="FLAC")
    samples, rate = decode_audio(buffer.getvalue())
    assert (rate, samples.shape, samples.dtype) == (8000, (800,), np.float32)
    assert np.allclose(samples, 0.375, atol=1e-3)


@pytest.mark.parametrize("data", [b"", b"definitely not audio" * 50, b"RIFF\x00\x00"])
def test_decode_garbage_raises_naming_formats(data):
    with pytest.raises(AudioDecodeError, match="Supported formats: WAV, FLAC"):
        decode_audio(data)


def test_resample_length_and_pitch():
    out = resample(sine(44100), 44100, 16000)
    assert out.dtype == np.float32 and len(out) == 16000
    assert peak_hz(out, 16000) == pytest.approx(440, abs=2)
    same = sine(16000)
    assert resample(same, 16000, 16000) is same


def test_chunk_covers_the_whole_signal():
    rate = 1000
    samples = np.arange(65 * rate, dtype=np.float32)
    pieces = chunk(samples, rate, chunk_s=30.0)
    assert [start for start, _ in pieces] == [0.0, 30.0, 60.0]
    assert [len(piece) for _, piece in pieces] == [30000, 30000, 5000]
    assert np.array_equal(np.concatenate([piece for _, piece in pieces]), samples)
    ((start, short),) = chunk(samples[:10], rate)
    assert start == 0.0 and np.array_equal(short, samples[:10])
    assert chunk(samples[:0], rate) == []


SEGMENTS = [
    {"start": 0.0, "end": 2.5, "text": " Hello there."},
    SimpleNamespace(start=3661.0456, end=3662.2, text="General Kenobi! "),
]


def test_srt_exact():
    assert format_srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n"
        "\n"
        "2\n01:01:01,046 --> 01:01:02,200\nGeneral Kenobi!\n"
    )


def test_vtt_exact():
    assert format_vtt(SEGMENTS) == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nHello there.\n"
        "\n"
        "01:01:01.046 --> 01:01:02.200\nGeneral Kenobi!\n"
    )


@pytest.mark.parametrize("rates", [(24000, 16000), (16000, 24000), (44100, 16000), (48000, 16000)])
def test_a_stream_resampled_piece_by_piece_equals_the_whole_resampled_at_once(rates):
    """Realtime appends come in pieces of any size (a browser's 128 samples, or one sample): resampled
    alone, each piece's length rounds up and its edges are zero-padded."""
    rng = np.random.default_rng(0)
    samples = rng.standard_normal(9000).astype(np.float32)
    stream, pieces, i = StreamResampler(*rates), [], 0
    for size in itertools.cycle([1, 128, 7, 2400, 3]):
        if i >= len(samples):
            break
        pieces.append(stream.feed(samples[i:i + size]))
        i += size
    pieces.append(stream.flush())
    whole = resample(samples, *rates)
    streamed = np.concatenate(pieces)
    assert len(streamed) == len(whole)
    assert np.max(np.abs(streamed - whole)) < 1e-4


def _flac_at(rate: int, seconds: float) -> bytes:
    """A silent FLAC whose header says `rate` (libsndfile writes only the usual rates: one is written at
    192 kHz and its STREAMINFO rate, 20 bits at byte 18, rewritten, as other encoders write any rate)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(int(192000 * seconds), np.float32), 192000, format="FLAC", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    field = int.from_bytes(data[18:21], "big")
    data[18:21] = ((rate << 4) | (field & 0xF)).to_bytes(3, "big")
    return bytes(data)


def test_an_upload_at_a_rate_sharing_no_factor_with_16k_decodes_as_fast_as_any(monkeypatch):
    """resample_poly designs a filter of 20 x max(up, down) taps per call: at 191999 Hz (16000/191999 exact)
    a 71 kB FLAC of 120 s took 33 s of the ingress's CPU to decode (0.3 s per second of audio; 1800 s, the
    default limit, about 8 minutes), against 2 s at 192000 Hz. The ratio is now the nearest with terms of
    at most 1000, off by 5 ppm here; every rate in use keeps its exact ratio."""
    import scipy.signal

    from deployments import audio

    terms: list[int] = []
    real = scipy.signal.resample_poly
    monkeypatch.setattr(scipy.signal, "resample_poly",
                        lambda x, up, down, **kw: terms.append(max(up, down)) or real(x, up, down, **kw))
    samples, rate = decode_audio(_flac_at(191999, 12.0))
    assert rate == 16000 and sf.info(io.BytesIO(_flac_at(191999, 0.1))).samplerate == 191999
    assert len(samples) == pytest.approx(12.0 * 16000, rel=1e-4)
    assert terms and max(terms) <= 2000, terms  # before: 191999 on every block
    assert resample(sine(16000), 16000, 191999).size == pytest.approx(191999, rel=1e-4)
    for common, ratio in ((44100, (160, 441)), (11025, (640, 441)), (22050, (320, 441)), (48000, (1, 3)),
                          (8000, (2, 1)), (37800, (80, 189))):
        assert audio.resample_ratio(common, 16000) == ratio
    assert audio.resample_ratio(22050, 24000) == (160, 147)
    for odd in (191999, 44099, 8001, 176089, 47952):  # the nearest ratio is off by at most 0.05%
        up, down = audio.resample_ratio(odd, 16000)
        assert abs(up / down * odd / 16000 - 1) < 5.1e-4 and max(up, down) <= 2 * audio.MAX_RATIO_TERMS
    # a stream resampled piece by piece still equals the whole, at such a ratio too
    noise = np.random.default_rng(0).standard_normal(50000).astype(np.float32)
    stream = StreamResampler(44099, 16000)
    streamed = np.concatenate([stream.feed(noise[i:i + 777]) for i in range(0, len(noise), 777)] + [stream.flush()])
    whole = resample(noise, 44099, 16000)
    assert len(streamed) == len(whole) and np.max(np.abs(streamed - whole)) < 1e-4


def _without_xing_header(mp3: bytes) -> bytes:
    """The MP3 less its first frame, the Xing/Info frame LAME writes with the frame count (an encoder that
    cannot seek back, streams and many recorders leave none)."""
    header = int.from_bytes(mp3[:4], "big")
    assert header >> 21 == 0x7FF and (header >> 19) & 3 == 3, "an MPEG-1 frame"
    bitrate = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)[(header >> 12) & 15] * 1000
    length = 144 * bitrate // (44100, 48000, 32000)[(header >> 10) & 3] + ((header >> 9) & 1)
    assert b"Xing" in mp3[:length] or b"Info" in mp3[:length]
    return mp3[length:]


@pytest.mark.skipif("mp3" not in SPEECH_FORMATS, reason="this libsndfile cannot write mp3")
def test_an_mp3_without_a_xing_header_decodes_to_its_real_length():
    """libsndfile estimates such an MP3's frame count (here 2.3x too many), and SoundFile.blocks() read that
    many: past the real end it yielded its reused buffer, so 28.8 s of speech decoded as 66.3 s, the last
    block heard again (a transcript saying it twice), and a limit between the two was a false 413."""
    from pathlib import Path

    speech, rate = sf.read(Path(__file__).parents[1] / "serve" / "data" / "speech.flac", dtype="float32")
    spoken = resample(np.concatenate([speech] * 3), rate, 44100)  # 28.7 s: more than one decoded block
    data, _ = encode_audio(spoken, 44100, "mp3")
    bare = _without_xing_header(data)
    with sf.SoundFile(io.BytesIO(bare)) as f:
        stated, real = f.frames / 44100, len(f.read()) / 44100
    assert stated > 1.5 * real  # what the header says: the case under test
    samples, out_rate = decode_audio(bare)
    assert len(samples) / out_rate == pytest.approx(real, abs=0.05)
    assert len(samples) / out_rate == pytest.approx(decode_audio(data)[0].size / 16000, abs=0.1)
    limit = AudioBounds(max_seconds=real * 1.2)
    assert len(decode_audio(bare, limit)[0]) == len(samples)  # before: 413, "the audio is 66.3 s long"
    with pytest.raises(AudioDecodeError, match="max_audio_seconds"):  # still bounded as it is decoded
        decode_audio(bare, AudioBounds(max_seconds=real / 2))


def _ogg(seconds: float, rate: int, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, sine(rate, seconds), rate, format="OGG", subtype=subtype)
    return buffer.getvalue()


@pytest.mark.parametrize("subtype, rates", [("OPUS", (48000, 48000)), ("VORBIS", (16000, 44100))])
def test_a_chained_ogg_file_decodes_every_link(subtype, rates):
    """Ogg streams one after another (files joined end to end, a radio dump) are one valid Ogg file, and
    libsndfile decodes only its first link: 2 + 3 + 1 s decoded as 2 s, the rest dropped without a word.
    Each link is decoded now, at its own rate; the length limit counts them all."""
    chained = _ogg(2.0, rates[0], subtype) + _ogg(3.0, rates[1], subtype) + _ogg(1.0, rates[0], subtype)
    samples, rate = decode_audio(chained)
    assert rate == 16000 and len(samples) / rate == pytest.approx(6.0, abs=0.05)  # before: 2.0
    assert peak_hz(samples[-16000:], rate) == pytest.approx(440, abs=5)
    with pytest.raises(AudioTooLongError, match="max_audio_seconds=5"):
        decode_audio(chained, AudioBounds(max_seconds=5))
    assert len(decode_audio(_ogg(2.0, rates[0], subtype))[0]) == pytest.approx(32000, abs=20)  # one link as before


def test_the_links_of_a_chained_ogg_file_are_bounded():
    link = _ogg(0.05, 48000, "OPUS")
    assert len(decode_audio(link * 4, AudioBounds(max_links=4))[0]) == pytest.approx(4 * 800, abs=20)
    with pytest.raises(AudioDecodeError, match="max_audio_links=4"):
        decode_audio(link * 5, AudioBounds(max_links=4))


# --- what browsers and phones record, and MP3s libsndfile cut short (PyAV) ---------------------------------


def av_file(samples: np.ndarray, rate: int, container: str, codec: str, layout: str = "mono",
            options: dict | None = None) -> bytes:
    """`samples` encoded by PyAV (ffmpeg's muxers and encoders), as a browser or phone would write them."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        planes = np.tile(samples[None], (stream.layout.nb_channels, 1)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.mark.parametrize("name, rate, container, codec, layout, options", [
    ("Chrome/Firefox MediaRecorder: WebM Opus, live (no duration, no cues)", 48000, "webm", "libopus", "mono",
     {"live": "1"}),
    ("WebM Opus, stereo", 48000, "webm", "libopus", "stereo", None),
    ("iPhone voice memo: M4A AAC", 44100, "mp4", "aac", "stereo", None),
    ("Safari MediaRecorder: fragmented MP4 AAC (no length in its header)", 48000, "mp4", "aac", "mono",
     {"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
    ("ADTS AAC", 22050, "adts", "aac", "mono", None),
    ("M4A ALAC", 44100, "ipod", "alac", "mono", None),
    ("a camera's MOV: 24-bit PCM", 48000, "mov", "pcm_s24le", "stereo", None),
])
def test_what_browsers_and_phones_record_decodes(name, rate, container, codec, layout, options):
    data = av_file(sine(rate, seconds=2.0), rate, container, codec, layout, options)
    with pytest.raises(sf.LibsndfileError):  # none of them did before
        sf.info(io.BytesIO(data))
    samples, out_rate = decode_audio(data)
    assert out_rate == 16000
    # AAC's last frame comes whole (1024 samples); in ADTS also the encoder's priming (MP4's edit list drops it)
    extra = {"adts": 2048, "mp4": 1024}.get(container, 0) / rate
    assert len(samples) / out_rate == pytest.approx(2.0 + extra / 2, abs=0.01 + extra / 2)
    assert peak_hz(samples, out_rate) == pytest.approx(440, abs=5)
    assert np.sqrt(np.mean(samples**2)) == pytest.approx(0.5 / np.sqrt(2), abs=0.03)


def test_mp3s_that_libsndfile_cut_short_decode_whole():
    """libsndfile reads an MP3 as far as the frame count it estimates or a Xing header states: a VBR MP3 without
    a Xing header whose loud start made the estimate low (2 s of noise, then 30 s of quiet) decoded as 4.3 s, and
    two MP3s joined end to end (at two rates, here) stopped after the first. ffmpeg decodes every frame."""
    noisy = np.concatenate([0.5 * np.random.default_rng(0).standard_normal(2 * 44100).astype(np.float32),
                            sine(44100, 30.0, amplitude=0.01)])
    bare = _without_xing_header(encode_audio(noisy, 44100, "mp3")[0])
    with sf.SoundFile(io.BytesIO(bare)) as f:
        assert len(f.read()) / 44100 < 5  # the fault
    samples, rate = decode_audio(bare)
    assert len(samples) / rate == pytest.approx(32.0, abs=0.1)

    joined = encode_audio(sine(44100, 2.0), 44100, "mp3")[0] + encode_audio(sine(22050, 3.0), 22050, "mp3")[0]
    with sf.SoundFile(io.BytesIO(joined)) as f:
        assert len(f.read()) / 44100 == pytest.approx(2.0, abs=0.1)  # the fault
    samples, rate = decode_audio(joined)
    assert rate == 16000 and len(samples) / rate == pytest.approx(5.0, abs=0.1)
    assert peak_hz(samples[-16000:], rate) == pytest.approx(440, abs=5)  # the second part, resampled on its own
    with pytest.raises(AudioTooLongError, match="max_audio_seconds=4"):
        decode_audio(joined, AudioBounds(max_seconds=4))


def test_the_length_limit_holds_before_and_while_decoding():
    """An MP4 states its length: refused from the header. A MediaRecorder WebM states none: refused as it is
    decoded, at the first block past the limit (the message gives what was decoded by then, not 12 s)."""
    tone = sine(48000, seconds=12.0, amplitude=0.1)
    with pytest.raises(AudioTooLongError, match=r"is 12\.0 s long; the limit is max_audio_seconds=5 s"):
        decode_audio(av_file(tone, 48000, "mp4", "aac"), AudioBounds(max_seconds=5))
    with pytest.raises(AudioTooLongError, match="max_audio_seconds=5 s") as refused:
        decode_audio(av_file(tone, 48000, "webm", "libopus", options={"live": "1"}), AudioBounds(max_seconds=5))
    assert float(str(refused.value).split()[3]) < 7  # "The audio is 6.4 s long; ..."
    with pytest.raises(AudioDecodeError, match="max_audio_channels=1"):
        decode_audio(av_file(sine(48000), 48000, "webm", "libopus", "stereo"), AudioBounds(max_channels=1))


def test_a_corrupt_truncated_or_foreign_file_names_its_problem():
    m4a = av_file(sine(44100, 2.0), 44100, "mp4", "aac")
    webm = av_file(sine(48000, 2.0), 48000, "webm", "libopus")
    alac = av_file(sine(44100, 0.5), 44100, "ipod", "alac")
    cookie = alac.index(bytes.fromhex("00000024616c616300000000")) + 12  # ALAC's frame length: 4096
    huge_frames = alac[:cookie] + (4096 * 4096).to_bytes(4, "big") + alac[cookie + 4:]
    cases = {
        "Could not read the audio file as MP4/M4A: it has no index (moov atom)": m4a[:len(m4a) // 2],
        "Could not read the audio file as WebM/Matroska": webm[:40] + b"\x00garbage" * 200,
        # ffmpeg skips the damage without an error: 1.0 s of the 2.0 s decoded, and 0.2 s
        "The WebM/Matroska file states 2.0 s of audio, but only 1.0 s of it decode: the file is damaged":
            webm[:len(webm) // 2] + bytes(range(256)) * 40 + webm[len(webm) // 2:],
        "but only 0.2 s of it decode": bytes(b ^ 0x5A if 2000 < i < 4000 else b for i, b in enumerate(webm)),
        "audio is ac3; accepted codecs are AAC, Opus": av_file(sine(48000), 48000, "mp4", "ac3"),
        "audio is a codec ffmpeg does not know": webm.replace(b"A_OPUS", b"A_QQQQ"),  # was a 500 (AttributeError)
        "ALAC audio states frames of more than 65536 samples": huge_frames,
        "Format not recognised": b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
        "Format not recognised.": b"ffconcat version 1.0\nfile /etc/passwd\n",
    }
    for message, data in cases.items():
        with pytest.raises(AudioDecodeError, match=re.escape(message)):
            decode_audio(data)


def test_ffmpeg_opens_no_file_or_url_an_upload_names(tmp_path):
    """ffmpeg's hls demuxer, given a playlist in memory, reads the local files and URLs it lists (the classic
    ffmpeg file-disclosure upload). Uploads never reach such a demuxer (theirs is chosen from the first bytes:
    a playlist is libsndfile's "Format not recognised"), and the options every upload is opened with allow no
    nested open even if a demuxer tried."""
    import av

    from deployments.audio_av import _OPTIONS

    secret = tmp_path / "secret.aac"
    secret.write_bytes(av_file(sine(16000), 16000, "adts", "aac"))
    playlist = f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{secret}\n#EXT-X-ENDLIST\n".encode()
    with av.open(io.BytesIO(playlist), "r", format="hls") as plain:  # the attack, without our options
        assert sum(frame.samples for frame in plain.decode(audio=0)) > 16000
    with pytest.raises(av.error.FFmpegError):
        with av.open(io.BytesIO(playlist), "r", format="hls", options=dict(_OPTIONS)) as guarded:
            list(guarded.decode(audio=0))
    with pytest.raises(AudioDecodeError, match="Format not recognised"):
        decode_audio(playlist)


def test_a_video_gives_its_audio_track():
    """OpenAI's `mp4` is as often a video (a phone's): its audio track is decoded, its video packets skipped."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream("aac", rate=44100, layout="mono")
        for i in range(20):
            picture = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            picture.pts = i
            out.mux(video.encode(picture))
        out.mux(video.encode(None))
        frame = av.AudioFrame.from_ndarray(sine(44100, 2.0)[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 44100, 0
        out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    samples, rate = decode_audio(buffer.getvalue())
    assert len(samples) / rate == pytest.approx(2.0, abs=1024 / 44100 + 0.01)
    assert peak_hz(samples, rate) == pytest.approx(440, abs=5)


def test_a_frame_of_more_channels_than_pyav_converts_is_refused_not_a_crash():
    """25 MiB of random bytes (seed 1) behind an ADTS header: ffmpeg skips what does not decode, and ~1.6 MB in
    decodes an AAC frame whose program config element states 35 channels. PyAV's to_ndarray read its planes
    from a fixed array of 8, and the process died (SIGSEGV): an upload took the ingress down. Such a frame is
    refused by its channel count before conversion, whatever max_audio_channels allows. In a child process,
    so that a regression fails this test rather than ending the session."""
    import subprocess
    import sys
    from pathlib import Path

    code = """if True:
        import numpy as np
        from deployments.audio import AudioBounds, AudioDecodeError, decode_audio
        data = b"\\xff\\xf1\\x50\\x80" + np.random.default_rng(1).integers(0, 256, 25 * 2**20, dtype=np.uint8).tobytes()
        for max_channels in (8, 64):
            try:
                decode_audio(data, AudioBounds(max_channels=max_channels))
            except AudioDecodeError as exc:
                print(exc)
    """
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           cwd=Path(__file__).parents[2])
    assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
    said = child.stdout.splitlines()
    assert len(said) == 2, child.stdout
    assert said[0].startswith("The audio has 35 channels (0.1 s in); at most max_audio_channels=8"), said[0]
    assert said[1].startswith("The AAC (ADTS) audio has 35 channels (0.1 s in); at most 8 are decoded"), said[1]


def test_a_few_packets_that_do_not_decode_are_skipped_and_many_refused():
    """A packet the decoder refuses is skipped, as ffmpeg's command line and players do: 16 random bytes in an
    ADTS file lost one frame (46 ms) and its upload was a 400. Past MAX_DAMAGED_SHARE of the packets, the file
    is refused as damaged; random bytes behind a header have nearly none that decode."""
    adts = av_file(sine(22050, 4.0), 22050, "adts", "aac")
    middle = len(adts) // 2
    samples, rate = decode_audio(adts[:middle] + bytes(range(100, 116)) + adts[middle + 16:])
    assert len(samples) / rate == pytest.approx(4.0, abs=0.2)
    damaged = bytearray(adts)
    for start in range(200, len(adts), 1000):  # every few frames
        damaged[start:start + 64] = bytes(range(64))
    with pytest.raises(AudioDecodeError, match=r"of the \d+ packets of the AAC \(ADTS\) audio do not decode"):
        decode_audio(bytes(damaged))
