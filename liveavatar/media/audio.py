"""Driving audio: decoding to 16 kHz mono float32, silence trimming and EBU R128 loudness.

Everything goes through PyAV (FFmpeg's decoders, resampler and ``ebur128`` filter), so any format
FFmpeg reads works: wav, mp3, flac, m4a/aac, ogg/opus, or the audio track of a video file.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import av.filter
import numpy as np

from liveavatar.errors import InputError
from liveavatar.media.files import require_readable_file

SAMPLE_RATE = 16000

# Below this integrated loudness (the R128 absolute gate) the audio is treated as silence.
_SILENCE_LUFS = -70.0


def _mono(planes: np.ndarray) -> np.ndarray:
    """[channels, samples] -> [samples], the mean of the channels (a single one is kept as is)."""
    return planes[0] if len(planes) == 1 else planes.mean(axis=0, dtype=np.float32)


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decodes the first audio stream of ``path`` to mono float32 at ``sample_rate``.

    The rate is converted by FFmpeg's resampler (libswresample), then the channels are averaged.
    A file that is already mono PCM at ``sample_rate`` passes through unchanged, so 16-bit samples
    come out as exactly int16 / 32768 (what librosa gives the reference pipeline).
    Raises InputError for a file that is missing, empty, corrupt, has no audio stream, or whose
    audio has no samples, or is longer than ``max_seconds``: by the duration the file declares, before
    decoding, and by the samples decoded (a few kilobytes of compressed silence can declare nothing and
    decode to hours).
    """
    path = Path(path)
    require_readable_file(path, "audio")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as exc:
        raise InputError(f"not a readable audio or video file: {path}: {exc}") from None
    with container:
        if not container.streams.audio:
            raise InputError(f"file has no audio stream: {path}")
        stream = container.streams.audio[0]
        if max_seconds is not None:
            declared = _declared_seconds(container, stream)
            if declared is not None and declared > max_seconds:
                raise _too_long(path, declared, max_seconds)
        limit = None if max_seconds is None else int(max_seconds * sample_rate) + 1
        decoded = 0
        # Resample every channel, then average them (librosa's downmix). FFmpeg's own downmix
        # would weight each channel by 0.707, making centred stereo 3 dB louder than the mean.
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        chunks = []
        try:
            for frame in container.decode(stream):
                # The timestamps are irrelevant here: samples are simply concatenated.
                frame.pts = None
                chunks.extend(_mono(out.to_ndarray()) for out in resampler.resample(frame))
                decoded += frame.samples * sample_rate / frame.sample_rate
                if limit is not None and decoded > limit:
                    raise _too_long(path, decoded / sample_rate, max_seconds, at_least=True)
            chunks.extend(_mono(out.to_ndarray()) for out in resampler.resample(None))
        except av.FFmpegError as exc:
            raise InputError(f"audio data is corrupt: {path}: {exc}") from None
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise InputError(f"audio stream has no samples (zero length): {path}")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _too_long(path: Path, seconds: float, limit: float, at_least: bool = False) -> InputError:
    length = f"{'more than ' if at_least else ''}{seconds:.1f} s"
    return InputError(f"audio is too long: {length}, the limit is {limit:g} s: {path}")


def trim_silence(
    wave: np.ndarray, sr: int = SAMPLE_RATE, threshold_db: float = -40.0, frame_ms: float = 10.0
) -> np.ndarray:
    """Cuts leading and trailing silence.

    The signal is cut into ``frame_ms`` frames; a frame is silent when its RMS is more than
    ``-threshold_db`` dB below the loudest frame's (relative, so the recording level does not
    matter). Keeps everything from the first to the last non-silent frame. All-zero input is
    returned unchanged rather than as an empty array.
    """
    wave = np.asarray(wave, dtype=np.float32)
    frame = max(1, int(round(sr * frame_ms / 1000)))
    count = -(-len(wave) // frame)
    if count == 0:
        return wave
    padded = np.zeros(count * frame, dtype=np.float64)
    padded[: len(wave)] = wave
    rms = np.sqrt(np.mean(padded.reshape(count, frame) ** 2, axis=1))
    peak = rms.max()
    if peak == 0:
        return wave
    loud = np.flatnonzero(rms >= peak * 10 ** (threshold_db / 20))
    start, stop = loud[0] * frame, min((loud[-1] + 1) * frame, len(wave))
    return wave[start:stop]


def integrated_loudness(wave: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    """EBU R128 integrated loudness of a mono signal in LUFS, measured by FFmpeg's ``ebur128``.

    Returns -70.0 (the absolute gate) or less for silence or audio too short to gate (<400 ms).
    """
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    time_base = Fraction(1, sr)
    graph = av.filter.Graph()
    source = graph.add_abuffer(format="flt", sample_rate=sr, layout="mono", time_base=time_base)
    meter = graph.add("ebur128", "metadata=1")
    graph.link_nodes(source, meter, graph.add("abuffersink")).configure()

    loudness = _SILENCE_LUFS

    def drain() -> None:
        nonlocal loudness
        while True:
            try:
                out = graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return
            value = out.metadata.get("lavfi.r128.I")
            if value is not None:
                loudness = float(value)

    chunk = 1 << 14
    for start in range(0, len(wave), chunk):
        frame = av.AudioFrame.from_ndarray(wave[None, start : start + chunk], format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = sr, start, time_base
        graph.push(frame)
        drain()
    graph.push(None)
    drain()
    return loudness


def normalize_loudness(wave: np.ndarray, sr: int = SAMPLE_RATE, target_lufs: float = -23.0) -> np.ndarray:
    """Applies one constant gain so the integrated loudness (EBU R128) becomes ``target_lufs``.

    The gain is lowered if needed so that no sample exceeds full scale (no clipping, no
    compression). Silence and audio too short to measure are returned unchanged.
    """
    wave = np.asarray(wave, dtype=np.float32)
    loudness = integrated_loudness(wave, sr)
    if loudness <= _SILENCE_LUFS:
        return wave
    gain = 10 ** ((target_lufs - loudness) / 20)
    peak = float(np.abs(wave).max())
    if peak * gain > 1.0:
        gain = 1.0 / peak
    return (wave * np.float32(gain)).astype(np.float32)
