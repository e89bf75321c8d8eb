"""Driving audio: decoding to 16 kHz mono float32, silence trimming and EBU R128 loudness, and the
speech as it goes into the output video (`SpeechTrack`: the file's own rate and channels).

Everything goes through PyAV (FFmpeg's decoders, resampler and ``ebur128`` filter), so any format
FFmpeg reads works: wav, mp3, flac, m4a/aac, ogg/opus, or the audio track of a video file.

The model hears 16 kHz mono (`load_audio`); the video's sound track is the user's own file, decoded again
at its own rate and with its own channels (`SpeechTrack.open`), so a 44.1 kHz stereo recording stays one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
    """Cuts leading and trailing silence: ``wave[start:stop]`` of `silence_bounds`."""
    wave = np.asarray(wave, dtype=np.float32)
    start, stop = silence_bounds(wave, sr, threshold_db, frame_ms)
    return wave[start:stop]


def silence_bounds(
    wave: np.ndarray, sr: int = SAMPLE_RATE, threshold_db: float = -40.0, frame_ms: float = 10.0
) -> tuple[int, int]:
    """(start, stop) sample indices of the sound between leading and trailing silence.

    The signal is cut into ``frame_ms`` frames; a frame is silent when its RMS is more than
    ``-threshold_db`` dB below the loudest frame's (relative, so the recording level does not
    matter). Keeps everything from the first to the last non-silent frame. All-zero input is
    kept whole rather than cut to nothing.
    """
    wave = np.asarray(wave, dtype=np.float32)
    frame = max(1, int(round(sr * frame_ms / 1000)))
    count = -(-len(wave) // frame)
    if count == 0:
        return 0, len(wave)
    padded = np.zeros(count * frame, dtype=np.float64)
    padded[: len(wave)] = wave
    rms = np.sqrt(np.mean(padded.reshape(count, frame) ** 2, axis=1))
    peak = rms.max()
    if peak == 0:
        return 0, len(wave)
    loud = np.flatnonzero(rms >= peak * 10 ** (threshold_db / 20))
    return int(loud[0] * frame), int(min((loud[-1] + 1) * frame, len(wave)))


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
    """Applies one constant gain (`loudness_gain`) so the integrated loudness (EBU R128) becomes
    ``target_lufs``. Silence and audio too short to measure are returned unchanged."""
    wave = np.asarray(wave, dtype=np.float32)
    gain = loudness_gain(wave, sr, target_lufs)
    if gain is None:
        return wave
    return (wave * np.float32(gain)).astype(np.float32)


def loudness_gain(wave: np.ndarray, sr: int = SAMPLE_RATE, target_lufs: float = -23.0) -> float | None:
    """The constant gain that brings the integrated loudness (EBU R128) of ``wave`` to ``target_lufs``,
    lowered if needed so that no sample exceeds full scale (no clipping, no compression); None for
    silence and audio too short to measure."""
    wave = np.asarray(wave, dtype=np.float32)
    loudness = integrated_loudness(wave, sr)
    if loudness <= _SILENCE_LUFS:
        return None
    gain = 10 ** ((target_lufs - loudness) / 20)
    peak = float(np.abs(wave).max())
    if peak * gain > 1.0:
        gain = 1.0 / peak
    return gain


# -- the speech as it goes into the output video ----------------------------------------------------

# The rates the AAC encoder takes. A file at another rate is muxed at the next one up (96 kHz at most).
AAC_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
# The sound track's bit rate: 192 kb/s for mono and stereo, 64 kb/s per channel beyond (AAC-LC at these
# rates is transparent for speech). The encoder lowers it where the rate cannot carry that many bits
# (6 bits per sample and channel: 96 kb/s for 16 kHz mono).
AUDIO_BITRATE = 192_000
MAX_OUTPUT_CHANNELS = 8  # more are mixed down to stereo


def aac_bitrate(channels: int) -> int:
    return max(AUDIO_BITRATE, 64_000 * channels)


def _aac_rate(rate: int) -> int:
    return next((r for r in AAC_SAMPLE_RATES if r >= rate), AAC_SAMPLE_RATES[-1])


_DEFAULT_LAYOUTS = {3: "3.0", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _aac_layout(layout: str, channels: int) -> str:
    """The channel layout the sound track keeps: the file's own (mono, stereo, 5.1, ...) where the AAC
    encoder takes it, else stereo."""
    if channels == 1:
        return "mono"
    if channels == 2:
        return "stereo"
    if channels <= MAX_OUTPUT_CHANNELS:
        if layout.endswith(" channels"):  # no positions given (a plain multichannel WAV): the usual ones
            layout = _DEFAULT_LAYOUTS.get(channels, layout)
        try:
            context = av.CodecContext.create("aac", "w")
            context.sample_rate, context.layout, context.format = 48000, layout, "fltp"
            context.open()
            return layout
        except (av.FFmpegError, ValueError):
            pass
    return "stereo"


@dataclass(frozen=True)
class SpeechTrack:
    """A stretch of an audio file as an output video's sound track: from ``start_s`` seconds of the file
    (as decoded: samples counted from its first one, like `load_audio`) for ``duration_s`` seconds (None:
    to its end), times ``gain``. `open()` reads it at the file's own rate and channels."""

    path: Path
    start_s: float = 0.0
    duration_s: float | None = None
    gain: float = 1.0

    def open(self) -> "TrackReader":
        return TrackReader(self)


class TrackReader:
    """Reads a `SpeechTrack` in order, decoding the file as it goes (memory stays flat for any length):
    float32 ``[channels, n]`` at ``sample_rate`` with the channel layout ``layout`` (the file's own, but
    for a rate or layout the AAC encoder does not take: see `AAC_SAMPLE_RATES`, `_aac_layout`)."""

    def __init__(self, track: SpeechTrack):
        self.track = track
        path = Path(track.path)
        require_readable_file(path, "audio")
        try:
            self._container = av.open(str(path), mode="r")
        except av.FFmpegError as exc:
            raise InputError(f"not a readable audio or video file: {path}: {exc}") from None
        try:
            if not self._container.streams.audio:
                raise InputError(f"file has no audio stream: {path}")
            stream = self._container.streams.audio[0]
            context = stream.codec_context
            self.source_rate = context.sample_rate
            self.source_channels = context.channels
            self.sample_rate = _aac_rate(self.source_rate)
            self.layout = _aac_layout(context.layout.name, context.channels)
            self.channels = av.AudioLayout(self.layout).nb_channels
        except BaseException:
            self._container.close()
            raise
        self._resampler = av.AudioResampler(format="fltp", layout=self.layout, rate=self.sample_rate)
        self._frames = self._container.decode(stream)
        self._skip = int(round(track.start_s * self.sample_rate))
        self._left = None if track.duration_s is None else max(0, int(round(track.duration_s * self.sample_rate)))
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._ended = False
        self._gain = np.float32(track.gain)

    def read(self, count: int) -> np.ndarray:
        """The next ``count`` samples, ``[channels, count]``; fewer at the end of the stretch, none after it."""
        if self._left is not None:
            count = min(count, self._left)
        while self._pending_samples < count and not self._ended:
            self._decode_more()
        pending = np.concatenate(self._pending, axis=1) if self._pending else np.zeros((self.channels, 0), np.float32)
        out, rest = pending[:, :count], pending[:, count:]
        self._pending, self._pending_samples = ([rest] if rest.shape[1] else []), rest.shape[1]
        if self._left is not None:
            self._left -= out.shape[1]
        if self._gain != 1:
            out = out * self._gain
        return np.ascontiguousarray(out, dtype=np.float32)

    def _decode_more(self) -> None:
        try:
            frame = next(self._frames, None)
            if frame is None:
                outs, self._ended = self._resampler.resample(None), True
            else:
                frame.pts = None  # samples are concatenated, as load_audio does
                outs = self._resampler.resample(frame)
        except av.FFmpegError as exc:
            raise InputError(f"audio data is corrupt: {self.track.path}: {exc}") from None
        for out in outs:
            samples = out.to_ndarray()
            if self._skip:
                dropped = min(self._skip, samples.shape[1])
                samples, self._skip = samples[:, dropped:], self._skip - dropped
            if samples.shape[1]:
                self._pending.append(samples)
                self._pending_samples += samples.shape[1]

    def peak(self) -> float:
        """The largest absolute sample of the rest of the stretch (reads it to its end)."""
        peak = 0.0
        while (chunk := self.read(1 << 16)).shape[1]:
            peak = max(peak, float(np.abs(chunk).max()))
        return peak

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "TrackReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
