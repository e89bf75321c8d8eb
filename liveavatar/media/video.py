"""Streaming MP4 output: H.264 + AAC in fragmented MP4, safe to kill and resumable.

Design, and why:

* Each ``write()`` call is one block of frames, encoded by its own fresh libx264 encoder. A block
  is therefore one closed GOP that starts with an IDR frame, and its bytes depend only on its own
  frames and the settings. That is what makes a resumed run reproduce the uninterrupted one: the
  blocks after the cut are encoded exactly as they would have been. B-frames are off so that
  decode timestamps stay monotonic across the independently encoded blocks.
* Fragmented MP4 cuts a fragment at every keyframe, i.e. at every block. A file cut at any
  moment (SIGKILL) plays up to its last complete fragment. libavformat writes a fragment when the
  next one starts (PyAV offers no call to force it out earlier), so the newest block reaches the
  disk with the following ``write()`` or at ``close()``; memory never holds more than one block.
* ``delay_moov`` lets the muxer write an edit list for the AAC encoder's priming samples; with
  a plain ``empty_moov`` the audio would play 1024 samples (64 ms at 16 kHz) late.
* The audio is known in full up front: samples in memory, or a `SpeechTrack` (a stretch of the
  user's file, muxed at its own rate and channels and decoded as it is needed). It is encoded ahead
  by one long-lived AAC encoder (192 kb/s), and after the first ``k`` frames exactly the AAC packets
  that start before ``k / fps`` are muxed, so every prefix of the file has matching audio and video,
  and the final audio stops with the video (like ffmpeg's ``-shortest``) or, if shorter, ends first.
* The file is written as ``<path>.partial`` and moved into place by ``close()`` with
  ``os.replace``; after an error the partial file stays for inspection or ``resume``.
"""

from __future__ import annotations

import io
import os
import struct
from collections import deque
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import av.bitstream
import numpy as np
import torch

from liveavatar.errors import InputError
from liveavatar.media.audio import SpeechTrack, TrackReader, aac_bitrate

PARTIAL_SUFFIX = ".partial"
# Kept while a resume copies the old partial file's prefix; removed once that prefix is on disk.
RESUME_SOURCE_SUFFIX = ".resume-source"

_MOVFLAGS = "frag_keyframe+empty_moov+delay_moov+default_base_moof"
_CONTAINER_OPTIONS = {
    "movflags": _MOVFLAGS,
    # Hand every packet to the OS at once, so a killed process loses nothing already muxed.
    "flush_packets": "1",
    # We mux in time order ourselves; without this the interleaver may hold video for up to
    # 10 s waiting for audio packets that never come (audio shorter than the video).
    "max_interleave_delta": "1",
}


def frames_to_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """Decoded video in [-1, 1], ``[3, N, H, W]`` (or ``[1, 3, N, H, W]``), to uint8 ``[N, H, W, 3]``.

    Same arithmetic as the reference's saver: clamp, map to [0, 1], scale by 255 and truncate,
    computed in float32.
    """
    x = torch.as_tensor(video)
    if x.dim() == 5 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"expected video of shape [3, N, H, W], got {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32).clamp(-1, 1)
    x = ((x + 1) / 2 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def _as_uint8_frames(frames, height: int, width: int) -> np.ndarray:
    """Checks a block of frames and returns it as contiguous uint8 ``[N, H, W, 3]``."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames_to_uint8(frames) if frames.is_floating_point() else frames.numpy()
    frames = np.asarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        frames = frames_to_uint8(frames)
    if frames.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 [N, H, W, 3] or float [3, N, H, W] in [-1, 1], got {frames.dtype}"
        )
    if frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
        raise ValueError(f"frames must have shape [N, {height}, {width}, 3], got {frames.shape}")
    return np.ascontiguousarray(frames)


class _ArrayReader:
    """Reads samples ``[channels, n]`` (or mono ``[n]``) held in memory, in order, like a TrackReader."""

    def __init__(self, audio: np.ndarray, sample_rate: int):
        audio = np.asarray(audio, dtype=np.float32)
        self._audio = np.ascontiguousarray(audio.reshape(1, -1) if audio.ndim <= 1 else audio)
        self.sample_rate = sample_rate
        self.channels = self._audio.shape[0]
        self.layout = {1: "mono", 2: "stereo"}.get(self.channels)
        if self.layout is None:
            raise ValueError(f"audio held in memory must be mono [n] or [1 or 2, n], got {audio.shape}")
        self._position = 0

    def read(self, count: int) -> np.ndarray:
        chunk = self._audio[:, self._position : self._position + count]
        self._position += chunk.shape[1]
        return chunk

    def close(self) -> None:
        pass


def open_sound(audio: np.ndarray | SpeechTrack, sample_rate: int) -> TrackReader | _ArrayReader:
    """A reader of a sound track given as a stretch of a file or as samples held in memory at `sample_rate`."""
    return audio.open() if isinstance(audio, SpeechTrack) else _ArrayReader(audio, sample_rate)


class _AudioTrack:
    """Encodes the whole audio with one AAC encoder, ahead of need (reading its source as it goes), and
    hands out its packets in order up to a time limit. Deterministic: the same audio always yields the
    same packets."""

    def __init__(self, stream: av.audio.stream.AudioStream, reader):
        self._stream = stream
        self._reader = reader
        self._sample_rate = reader.sample_rate
        self._position = 0
        self._flushed = False
        self._pending: deque = deque()
        stream.codec_context.open()
        self._frame_size = stream.codec_context.frame_size

    def _encode_next(self) -> None:
        chunk = self._reader.read(self._frame_size)
        if chunk.shape[1]:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self._reader.layout)
            frame.sample_rate = self._sample_rate
            frame.time_base = Fraction(1, self._sample_rate)
            frame.pts = self._position
            self._position += chunk.shape[1]
            self._pending.extend(self._stream.encode(frame))
        else:
            self._pending.extend(self._stream.encode(None))
            self._flushed = True

    def packets_before(self, seconds: Fraction) -> list:
        """All not yet returned packets that start before ``seconds``."""

        def start(packet) -> Fraction:
            return packet.pts * packet.time_base

        while not self._flushed and (not self._pending or start(self._pending[-1]) < seconds):
            self._encode_next()
        packets = []
        while self._pending and start(self._pending[0]) < seconds:
            packets.append(self._pending.popleft())
        return packets

    def close(self) -> None:
        self._reader.close()


class FragmentedMP4Writer:
    """Writes uint8 frames block by block to a fragmented H.264/AAC MP4 (see the module notes).

    ``audio``: float32 samples at ``sample_rate`` (mono ``[n]``, or ``[channels, n]`` for one or two
    channels), or a `SpeechTrack` (read at the file's own rate and channels; ``sample_rate`` is then not
    used), or None for a silent video. ``audio_bitrate``: the AAC bit rate (default `aac_bitrate`).
    ``crf`` and ``preset`` are libx264's quality and speed settings. ``threads`` is fixed (not
    "auto") because x264's output depends on its thread count, and a resumed run must encode
    exactly like the original, possibly on another machine.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: int | Fraction = 25,
        audio: np.ndarray | SpeechTrack | None = None,
        sample_rate: int = 16000,
        crf: int = 18,
        preset: str = "medium",
        threads: int = 4,
        audio_bitrate: int | None = None,
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even (yuv420p), got {width}x{height}")
        self.path = Path(path)
        self.partial_path = Path(str(self.path) + PARTIAL_SUFFIX)
        self.width, self.height = width, height
        self.fps = Fraction(fps)
        self.sample_rate = sample_rate
        self.audio_channels = 0  # the sound track's channels (0: none)
        self.frames_written = 0
        self._encoder_options = {
            "crf": str(crf),
            "preset": preset,
            "threads": str(threads),
            # Keyframes exactly at block starts, never inside a block (resume cuts at keyframes).
            "x264-params": "keyint=infinite:scenecut=0",
        }
        self._resume_source: Path | None = None
        self._closed = False

        reader = None if audio is None else open_sound(audio, sample_rate)
        self._audio: _AudioTrack | None = None
        try:
            self.partial_path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(
                str(self.partial_path), mode="w", format="mp4", container_options=_CONTAINER_OPTIONS
            )
        except BaseException:
            if reader is not None:
                reader.close()
            raise
        try:
            # A stream without an encoder: packets come from the per-block encoders, and the
            # SPS/PPS they carry in-band are lifted into the MP4 header by PyAV.
            self._video = self._container.add_mux_stream("h264", rate=self.fps, width=width, height=height)
            if reader is not None:
                self.sample_rate, self.audio_channels = reader.sample_rate, reader.channels
                stream = self._container.add_stream("aac", rate=reader.sample_rate, layout=reader.layout)
                stream.bit_rate = audio_bitrate or aac_bitrate(reader.channels)
                self._audio = _AudioTrack(stream, reader)
        except BaseException:
            self._container.close()
            if reader is not None:
                reader.close()
            raise

    # -- writing ---------------------------------------------------------------------------

    def _new_encoder(self) -> av.VideoCodecContext:
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height = self.width, self.height
        encoder.pix_fmt = "yuv420p"
        encoder.time_base = 1 / self.fps
        encoder.framerate = self.fps
        encoder.max_b_frames = 0
        encoder.options = dict(self._encoder_options)
        return encoder

    def write(self, frames) -> None:
        """Encodes one block (uint8 ``[N, H, W, 3]``, or float ``[3, N, H, W]`` in [-1, 1]) as one
        GOP, and muxes it with the audio that starts before the block's end."""
        if self._closed:
            raise ValueError("write() on a closed FragmentedMP4Writer")
        frames = _as_uint8_frames(frames, self.height, self.width)
        if len(frames) == 0:
            return
        encoder = self._new_encoder()
        packets = []
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")
            frame.pts = self.frames_written + index
            frame.time_base = encoder.time_base
            packets.extend(encoder.encode(frame))
        packets.extend(encoder.encode(None))
        # Mux only once the whole block is encoded, so a failure leaves no half block behind.
        self._mux_video(packets)
        self.frames_written += len(frames)
        self._mux_audio_until_now()
        self._drop_resume_source()

    def _mux_video(self, packets) -> None:
        for packet in packets:
            packet.stream = self._video
            self._container.mux(packet)

    def _mux_audio_until_now(self) -> None:
        if self._audio is not None:
            self._container.mux(self._audio.packets_before(self.frames_written / self.fps))

    def _drop_resume_source(self) -> None:
        # After a resume, the copied prefix is completely on disk once a later block started a
        # new fragment (or the file was finalised); only then is the old file no longer needed.
        if self._resume_source is not None:
            self._resume_source.unlink(missing_ok=True)
            self._resume_source = None

    # -- finishing -------------------------------------------------------------------------

    def close(self) -> Path:
        """Finalises the file and moves it atomically to ``path``; returns ``path``."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written, so there is no video to save at {self.path}")
        self._closed = True
        try:
            self._container.close()
        finally:
            self._close_audio()
        with open(self.partial_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial_path, self.path)
        self._drop_resume_source()
        return self.path

    def abort(self) -> None:
        """Stops writing and keeps ``<path>.partial`` (complete up to its last block)."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            finally:
                self._close_audio()

    def _close_audio(self) -> None:
        if self._audio is not None:
            self._audio.close()

    def __enter__(self) -> FragmentedMP4Writer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- resuming --------------------------------------------------------------------------

    @staticmethod
    def resume_points(partial_path: str | os.PathLike) -> list[int]:
        """Frame counts at which a resume can cut ``partial_path``: the start of every block in
        its complete fragments, plus the number of complete frames. ``[0]`` if nothing is usable."""
        source = Path(partial_path)
        if not source.exists():
            raise InputError(f"partial video not found: {source}")
        return _scan_partial(source)

    @classmethod
    def resume(
        cls,
        partial_path: str | os.PathLike,
        keep_frames: int,
        width: int,
        height: int,
        fps: int | Fraction = 25,
        audio: np.ndarray | SpeechTrack | None = None,
        sample_rate: int = 16000,
        **settings,
    ) -> FragmentedMP4Writer:
        """Re-opens a partial file left by an interrupted run, keeps its first ``keep_frames``
        frames and continues after them.

        The kept video packets are copied (not re-encoded); ``keep_frames`` must be one of
        :meth:`resume_points`. The audio, width, height, fps and settings must be those of the
        interrupted run: the audio is re-encoded from the start (the AAC encoder's state at the
        cut cannot be restored otherwise; it is fast), which reproduces its packets exactly.
        """
        partial_path = Path(partial_path)
        if not partial_path.name.endswith(PARTIAL_SUFFIX):
            raise ValueError(f"not a partial file (name must end in {PARTIAL_SUFFIX}): {partial_path}")
        final_path = partial_path.with_name(partial_path.name[: -len(PARTIAL_SUFFIX)])
        source = Path(str(partial_path) + RESUME_SOURCE_SUFFIX)
        # A leftover source means an earlier resume died before its copy reached the disk; the
        # partial file next to it is that incomplete copy, so the source is the one to use.
        existing = source if source.exists() else partial_path
        if not existing.exists():
            raise InputError(f"partial video not found: {partial_path}")
        points = _scan_partial(existing, width, height, fps)
        if keep_frames not in points:
            raise InputError(
                f"cannot resume {partial_path} at frame {keep_frames}: cuts are possible only at "
                f"block starts; it has {points[-1]} complete frames and valid cuts {points}"
            )
        # The new file takes the partial file's name, so the old one moves aside while it is read.
        if existing != source:
            os.replace(partial_path, source)

        writer = cls(final_path, width, height, fps, audio, sample_rate, **settings)
        try:
            if keep_frames > 0:
                writer._copy_prefix(source, keep_frames)
                writer._resume_source = source
            else:
                source.unlink()
        except BaseException:
            writer.abort()
            raise
        return writer

    def _copy_prefix(self, source: Path, keep_frames: int) -> None:
        """Muxes the first ``keep_frames`` video packets of ``source`` and the audio up to them."""
        with _open_complete(source) as container:
            stream = container.streams.video[0]
            # MP4 stores H.264 length-prefixed; the new blocks come from x264 as Annex B. Convert
            # the old ones to Annex B too, so the muxer sees one format (and reads the SPS/PPS).
            to_annexb = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", in_stream=stream)
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if self.frames_written == keep_frames:
                    break
                if packet.is_keyframe:
                    # Block boundary: add the previous block's audio first, as write() did.
                    self._mux_audio_until_now()
                self._mux_video(to_annexb.filter(packet))
                self.frames_written += 1
            self._mux_video(to_annexb.filter(None))
        self._mux_audio_until_now()


@contextmanager
def _open_complete(source: Path):
    """Opens the complete fragments of a partial MP4 for demuxing (a fragment cut short at the
    end, e.g. by a kill during its write, is invisible); yields None if there are none."""
    with _PrefixFile(source, _complete_length(source)) as handle:
        try:
            container = av.open(handle, mode="r", format="mp4")
        except (av.FFmpegError, OSError):
            yield None  # not even the header is on disk yet
            return
        with container:
            yield container


def _scan_partial(source: Path, width=None, height=None, fps=None) -> list[int]:
    """The valid resume cut points of a partial MP4 (the keyframe indices plus the number of
    complete frames). Checks its video size and rate against ``width``, ``height`` and ``fps``
    when given. Read-only."""
    with _open_complete(source) as container:
        if container is None:
            return [0]
        if not container.streams.video:
            raise InputError(f"partial file has no video stream: {source}")
        stream = container.streams.video[0]
        if width is not None and (stream.codec_context.width, stream.codec_context.height) != (width, height):
            raise InputError(
                f"partial file is {stream.codec_context.width}x{stream.codec_context.height}, "
                f"resume asked for {width}x{height}: {source}"
            )
        if fps is not None and stream.average_rate is not None and stream.average_rate != Fraction(fps):
            raise InputError(f"partial file is {stream.average_rate} fps, resume asked for {fps}: {source}")
        points, count = [], 0
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if packet.is_keyframe:
                points.append(count)
            count += 1
    if not points or points[-1] != count:
        points.append(count)
    return points


class _PrefixFile(io.RawIOBase):
    """A read-only file that ends after its first ``length`` bytes."""

    def __init__(self, path: Path, length: int):
        super().__init__()
        self._file = open(path, "rb")
        self._length = length

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = max(self._length - self._file.tell(), 0)
        view = memoryview(buffer)[:remaining]
        return self._file.readinto(view)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            return self._file.seek(self._length + offset)
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


def _complete_length(path: Path) -> int:
    """Byte length of the leading complete top-level MP4 boxes, ending after a complete mdat
    (a moof without its mdat, or a box cut short, is dropped)."""
    file_size = path.stat().st_size
    complete = position = 0
    with open(path, "rb") as handle:
        while position + 8 <= file_size:
            handle.seek(position)
            box_size, box_type = struct.unpack(">I4s", handle.read(8))
            header = 8
            if box_size == 1:  # 64-bit size follows the type
                if position + 16 > file_size:
                    break
                (box_size,) = struct.unpack(">Q", handle.read(8))
                header = 16
            if box_size < header or position + box_size > file_size:
                break  # size 0 ("to end of file") is never written by the fragmenting muxer
            position += box_size
            if box_type != b"moof":
                complete = position
    return complete


@contextmanager
def _open_for_reading(path: Path):
    """Opens a media file; for an MP4 only its complete boxes, so a partial file whose last
    fragment was cut short reads (like it plays) up to its last complete fragment."""
    with open(path, "rb") as handle:
        is_mp4 = handle.read(8)[4:8] == b"ftyp"
    if not is_mp4:
        with av.open(str(path)) as container:
            yield container
        return
    with _open_complete(path) as container:
        if container is None:
            raise InputError(f"no complete video data in {path}")
        yield container


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float, np.ndarray | None, int | None]:
    """Decodes a video file: (uint8 frames ``[N, H, W, 3]``, fps, mono float32 audio or None,
    audio sample rate or None). For tests and verification; loads everything into memory."""
    path = Path(path)
    with _open_for_reading(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    video = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)

    audio, sample_rate = None, None
    with _open_for_reading(path) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            sample_rate = stream.codec_context.sample_rate
            resampler = av.AudioResampler(format="fltp", rate=sample_rate)
            chunks = []
            for frame in container.decode(stream):
                chunks.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().mean(axis=0) for out in resampler.resample(None))
            audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return video, fps, audio, sample_rate


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int, str] | None:
    """Decodes a media file's first audio stream as it is stored: (float32 ``[channels, n]``, sample rate,
    channel layout), or None without one. For tests and verification; loads everything into memory."""
    with _open_for_reading(Path(path)) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate, layout = stream.codec_context.sample_rate, stream.codec_context.layout.name
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        channels = stream.codec_context.channels
    planes = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    return planes.astype(np.float32, copy=False), rate, layout
