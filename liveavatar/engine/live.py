"""Live sessions: speech pushed in chunks while the avatar is generated, video out block by block.

A live session has no speech file. The client pushes 16 kHz mono samples as they are spoken; each block
of the stream takes the next window of speech (12 frames = 0.48 s at 25 fps) when it has arrived, or,
once real time has passed the window's end, whatever has arrived, with silence in front of it. Windows
with no speech at all give zero audio features, which is what the model sees past the end of a speech
file, so the avatar idles and the stream goes on until the session is closed.

The stream drops its first 3 frames (120 ms). As in a job (liveavatar.engine.job), the first window puts
120 ms of silence in front of the speech (it takes 0.36 s of speech, not 0.48 s), so the dropped frames
show that silence and every pushed sample is spoken and sent: the video's frame j shows the speech at j / 25 s
(plus whatever silence a late window got). The session's sound track is the pushed speech itself: 16 kHz
mono, the rate and channels the protocol carries.

Speech features are computed per window: wav2vec2 over the window with up to `CONTEXT_S` of the speech
before it and `RIGHT_PAD_FRAMES` of silence after it. A whole-file computation gives every frame the
whole file as context, including speech that a live stream has not heard yet, so live features cannot
equal it; they are those of a segment ending at the window, like the segmented features of long files.

The session's video goes out as a fragmented MP4 (H.264 + AAC) made in memory: one long-lived encoder,
a keyframe at the start of every block, and one fragment per frame, so every block leaves the muxer
completely (but for its last frame, which follows with the next block) as soon as it is encoded.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch

from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.stream import DROPPED_FIRST_FRAMES, StreamSettings
from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.models.audio_encoder import SAMPLE_RATE, AudioEncoder

log = logging.getLogger(__name__)

CONTEXT_S = 2.0  # speech before a window that its features see
RIGHT_PAD_FRAMES = 2  # silence after a window, so the 30 fps resampling reaches its last frame
JITTER_S = 0.1  # how long past a window's real-time end a block waits for late chunks
MAX_QUEUED_S = 30.0  # speech waiting to be spoken; more is refused (the client is too far ahead)
UNBOUNDED_CLIPS = 2**40  # a clip count no session reaches: the stream ends when the session is closed


class SessionClosed(LiveAvatarError):
    """The live session was closed while a block waited for speech."""


class SpeechQueueFull(InputError):
    """More speech was pushed than the session holds while it waits to be spoken."""


@dataclass
class SpeechWindow:
    """The speech a block spoke: `samples` (window length), of which the last `speech_samples` were pushed
    speech (positions [speech_start, speech_start + speech_samples) of everything pushed) and the rest
    silence in front of it."""

    samples: np.ndarray
    speech_start: int
    speech_samples: int


class LiveSpeech:
    """An AudioSource fed incrementally by `push()`, paced to real time (see the module notes).

    `block(k, frames)` is called by the stream in block order; it waits until the window's speech has
    arrived or its time has passed, and raises SessionClosed once `close()` is called.
    """

    def __init__(self, encoder: AudioEncoder, fps: int = 25, lead_in_frames: int = DROPPED_FIRST_FRAMES):
        self.encoder = encoder
        self.fps = fps
        self.samples_per_frame = SAMPLE_RATE // fps
        self.lead_in = lead_in_frames * self.samples_per_frame  # silence in front of the first window's speech
        config = encoder.model.config
        self.feature_shape = (1, config.num_hidden_layers + 1, config.hidden_size)
        self._queue: list[np.ndarray] = []
        self._queued = 0
        self._pushed = 0  # samples pushed so far
        self._spoken = 0  # samples of them taken into windows
        self._history = np.zeros(0, np.float32)  # the last CONTEXT_S of windows, for left context
        self._windows: dict[int, SpeechWindow] = {}
        self._clock_start: float | None = None
        self._closed = False
        self._lock = threading.Condition()

    def push(self, samples: np.ndarray) -> int:
        """Queues 16 kHz mono float32 speech to be spoken after what was pushed before; returns the position of
        its first sample in everything pushed (a block's `speech_start` counts the same way)."""
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._closed:
                raise SessionClosed("the live session is closed")
            if (self._queued + len(samples)) / SAMPLE_RATE > MAX_QUEUED_S:
                raise SpeechQueueFull(
                    f"speech queue full: {self._queued / SAMPLE_RATE:.1f} s are waiting to be spoken (limit "
                    f"{MAX_QUEUED_S:.0f} s); push speech in real time"
                )
            self._queue.append(samples)
            self._queued += len(samples)
            self._pushed += len(samples)
            self._lock.notify_all()
            return self._pushed - len(samples)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    @property
    def queued_seconds(self) -> float:
        with self._lock:
            return self._queued / SAMPLE_RATE

    def _take(self, count: int) -> np.ndarray:
        out = np.concatenate(self._queue) if self._queue else np.zeros(0, np.float32)
        taken, rest = out[:count], out[count:]
        self._queue = [rest] if len(rest) else []
        self._queued = len(rest)
        return taken

    def _next_window(self, k: int, frames: int) -> SpeechWindow:
        size = frames * self.samples_per_frame
        wanted = size - (self.lead_in if k == 0 else 0)  # the first window starts with the lead-in silence
        with self._lock:
            if self._clock_start is None:
                self._clock_start = time.monotonic()
            deadline = self._clock_start + (k + 1) * size / SAMPLE_RATE + JITTER_S
            while not self._closed and self._queued < wanted and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            if self._closed:
                raise SessionClosed("the live session was closed")
            speech = self._take(wanted)
            start = self._spoken
            self._spoken += len(speech)
        # Speech that arrived after the window started belongs at its end: it is the newest sound.
        samples = np.concatenate([np.zeros(size - len(speech), np.float32), speech])
        return SpeechWindow(samples, start, len(speech))

    def block(self, k: int, frames: int) -> torch.Tensor:
        window = self._next_window(k, frames)
        self._windows[k] = window
        context = self._history
        self._history = np.concatenate([context, window.samples])[-int(CONTEXT_S * SAMPLE_RATE) :]
        if window.speech_samples == 0:
            return torch.zeros(*self.feature_shape, frames)
        # The context is whole video frames long (windows are), so window frame i is piece frame offset + i.
        offset = len(context) // self.samples_per_frame
        piece = np.concatenate([context, window.samples, np.zeros(RIGHT_PAD_FRAMES * self.samples_per_frame, np.float32)])
        features = self.encoder.features(piece, fps=self.fps, frames_per_clip=frames).embedding
        return features[..., offset : offset + frames].float().cpu()

    def window(self, k: int) -> SpeechWindow:
        """The speech block k spoke (once, after its block() call)."""
        return self._windows.pop(k)


class FragmentSink(io.RawIOBase):
    """Collects what the MP4 muxer writes; `drain()` hands it over."""

    def __init__(self):
        super().__init__()
        self._chunks: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        self.position += len(data)
        return len(data)

    def drain(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class LiveMP4Muxer:
    """Fragmented MP4 (H.264 + AAC) in memory, a fragment per video frame, a keyframe at every block start.

    `write_block(frames, speech)` returns the bytes that left the muxer, and the offset in the whole output
    where the block's keyframe fragment starts (a late viewer can start there after the init segment).
    """

    def __init__(self, width: int, height: int, fps: int = 25, sample_rate: int = SAMPLE_RATE, crf: int = 23):
        self.sink = FragmentSink()
        # A fragment is cut when a packet arrives for a track that already has a frame's worth of time in
        # it. Audio packets are muxed right after the video frame they belong to, so only video packets cut
        # (movenc's frag_every_frame also cuts at audio packets and then writes wrong video timestamps).
        # delay_moov lets the AAC priming get an edit list (see media/video.py); the moov still goes out
        # with the first block. No interleaving queue: packets are muxed in time order and leave at once.
        self.container = av.open(
            self.sink, mode="w", format="mp4",
            container_options={"movflags": "empty_moov+delay_moov+default_base_moof", "frag_duration": str(10**6 // fps),
                               "flush_packets": "1", "max_interleave_delta": "1"},
        )
        self.fps = fps
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        # zerolatency: no lookahead or B-frames, so each frame's packet comes out when it goes in.
        self.video.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        self.audio = self.container.add_stream("aac", rate=sample_rate, layout="mono")
        self.sample_rate = sample_rate
        self.frames = 0
        self.samples = 0
        self._audio_packets: list[av.Packet] = []

    def write_block(self, frames: np.ndarray, speech: np.ndarray) -> tuple[bytes, int]:
        audio = av.AudioFrame.from_ndarray(np.ascontiguousarray(speech, np.float32)[None], format="fltp", layout="mono")
        audio.sample_rate, audio.pts, audio.time_base = self.sample_rate, self.samples, Fraction(1, self.sample_rate)
        self.samples += len(speech)
        self._audio_packets.extend(self.audio.encode(audio))
        keyframe_offset = None
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = self.frames
            frame.pict_type = av.video.frame.PictureType.I if i == 0 else av.video.frame.PictureType.NONE
            self.frames += 1
            for packet in self.video.encode(frame):
                self._mux_frame(packet)
                if keyframe_offset is None:
                    # Muxing the keyframe cut the fragment before it: the block's own fragments start here.
                    keyframe_offset = self.sink.position
        return self.sink.drain(), keyframe_offset if keyframe_offset is not None else self.sink.position

    def _mux_frame(self, packet: av.Packet) -> None:
        """Muxes a video packet and then the audio packets that start before its frame ends."""
        packet.duration = 1  # the encoder leaves it 0; the muxer needs it to time the fragment's last frame
        self.container.mux(packet)
        end = Fraction(self.frames, self.fps)
        while self._audio_packets and self._audio_packets[0].pts * self._audio_packets[0].time_base < end:
            self.container.mux(self._audio_packets.pop(0))

    def close(self) -> bytes:
        for packet in self.video.encode(None):
            self._mux_frame(packet)
        self._audio_packets.extend(self.audio.encode(None))
        self.container.mux(self._audio_packets)
        self._audio_packets.clear()
        self.container.close()
        return self.sink.drain()


def init_segment_length(data: bytes) -> int | None:
    """Length of the leading ftyp + moov boxes of an MP4 byte stream (None until the moov is complete)."""
    position = 0
    while position + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        if size < 8 or position + size > len(data):
            return None
        position += size
        if kind == b"moov":
            return position
    return None


def mime_type(init_segment: bytes) -> str:
    """The MIME type with codecs (RFC 6381) of a LiveMP4Muxer stream, as Media Source Extensions need it."""
    at = init_segment.find(b"avcC")
    if at < 0:
        raise ValueError("no avcC box in the init segment")
    profile, compatibility, level = init_segment[at + 5 : at + 8]
    return f'video/mp4; codecs="avc1.{profile:02x}{compatibility:02x}{level:02x}, mp4a.40.2"'


@dataclass
class LiveBlock:
    """One block of a live session, as sent to its viewers."""

    index: int
    first_frame: int
    frames: int
    speech_start: int  # position of its first pushed speech sample (see SpeechWindow)
    speech_samples: int
    padded_samples: int  # silence in front of the speech (a window whose speech was late or began mid-way)
    queued_s: float  # speech still waiting after this block
    timings_ms: dict[str, float]  # the stream's stage timings; "audio" includes the wait for speech


@dataclass(frozen=True)
class SessionOptions:
    image: Path
    prompt: str = "A person is talking."
    size: str = "384*256"
    sample_steps: int = 4
    seed: int = 42
    rolling_sink: bool = True
    decoder: str | None = None  # "wan" or "taew2_1" (StreamSettings.decoder); None: the service's --decoder


class LiveSession:
    """A live session: runs (on the engine's thread) until closed, publishing each block and its MP4 bytes.

    Viewers `subscribe(callback)`; the callback gets ("init", bytes), then ("block", LiveBlock, bytes)
    for every block, and ("end", error message or None, the stream's last bytes) last; it runs on the
    engine thread and must not block.
    """

    def __init__(self, options: SessionOptions):
        self.options = options
        self.speech: LiveSpeech | None = None
        self.init_segment = b""
        self.blocks_done = 0
        self._pending_speech: list[np.ndarray] = []  # pushed before the stream exists
        self._listeners: list[Callable] = []
        self._block_start = b""  # bytes since the newest block's keyframe fragment, for viewers joining late
        self._tail = b""
        self._closed = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ client side
    def push(self, samples: np.ndarray) -> int:
        """Queues speech (see LiveSpeech.push); returns the position of its first sample in everything pushed."""
        with self._lock:
            if self._closed:
                raise SessionClosed("the live session is closed")
            if self.speech is None:
                start = sum(map(len, self._pending_speech))
                self._pending_speech.append(np.asarray(samples, np.float32))
                if sum(map(len, self._pending_speech)) / SAMPLE_RATE > MAX_QUEUED_S:
                    self._pending_speech.pop()
                    raise SpeechQueueFull(f"speech queue full: more than {MAX_QUEUED_S:.0f} s pushed before the session started")
                return start
        return self.speech.push(samples)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            speech = self.speech
        if speech is not None:
            speech.close()

    def subscribe(self, callback: Callable) -> None:
        """Adds a viewer; one joining after the start gets the init segment and the stream from the newest block."""
        with self._lock:
            self._listeners.append(callback)
            if self.init_segment:
                callback(("init", self.init_segment + self._block_start))

    def unsubscribe(self, callback: Callable) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def _publish(self, event: tuple) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback(event)

    # ------------------------------------------------------------------ engine side
    def run(self, pipe: LiveAvatarPipeline) -> None:
        """Runs until closed; an error ends the session (viewers get its message) and is raised."""
        message = None
        try:
            self._run(pipe)
        except SessionClosed:
            pass
        except LiveAvatarError as e:
            message = str(e)
            raise
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.close()
            self._publish(("end", message, self._tail))

    def _run(self, pipe: LiveAvatarPipeline) -> None:
        o = self.options
        settings = StreamSettings(sample_steps=o.sample_steps, seed=o.seed, rolling_sink=o.rolling_sink,
                                  decoder=o.decoder)
        # prepare() encodes the image and the prompt together with a speech file's features; a session has
        # no file, so it is given one block of silence and its audio source is replaced by the live one.
        silence = np.zeros(settings.video_frames_per_block * SAMPLE_RATE // settings.fps, np.float32)
        cond = pipe.prepare(o.image, silence, o.prompt, o.size, fps=settings.fps, frames_per_clip=settings.frames_per_clip)
        encoder = pipe.audio_encoder
        if pipe.offload_encoders:  # live features are computed every block: keep wav2vec2 on the device
            encoder.to(pipe.device)
        try:
            speech = LiveSpeech(encoder, settings.fps)
            with self._lock:
                if self._closed:
                    return
                for samples in self._pending_speech:
                    speech.push(samples)
                self._pending_speech.clear()
                self.speech = speech
            cond = dataclasses.replace(cond, audio=speech, num_clips=UNBOUNDED_CLIPS)
            stream = pipe.stream(cond, settings)
            muxer = LiveMP4Muxer(cond.width, cond.height, settings.fps)
            try:
                self._stream_blocks(stream, speech, muxer)
            finally:
                # The last frame and audio still in the muxer end the stream (sent with the "end" event).
                self._tail = muxer.close() if self.init_segment else b""
        finally:
            if pipe.offload_encoders:
                encoder.to("cpu")

    def _stream_blocks(self, stream, speech: LiveSpeech, muxer: LiveMP4Muxer) -> None:
        for block in stream.blocks(UNBOUNDED_CLIPS):
            window = speech.window(block.index)
            sound = window.samples
            if block.index == 0:  # the stream's first frames are dropped, and with them the lead-in silence
                sound = sound[DROPPED_FIRST_FRAMES * speech.samples_per_frame :]
            data, keyframe_at = muxer.write_block(block.frames.numpy(), sound)
            info = LiveBlock(
                index=block.index, first_frame=block.first_frame, frames=len(block.frames),
                speech_start=window.speech_start, speech_samples=window.speech_samples,
                padded_samples=len(window.samples) - window.speech_samples, queued_s=speech.queued_seconds,
                timings_ms={k: round(v, 1) for k, v in block.timings_ms.items()},
            )
            events = []
            with self._lock:
                if not self.init_segment:
                    length = init_segment_length(data)
                    if length is None:
                        raise RuntimeError("the MP4 muxer wrote no init segment with the first block")
                    self.init_segment, data = data[:length], data[length:]
                    events.append(("init", self.init_segment))
                # Where this block's keyframe fragment starts in `data` (it always lies within it).
                self._block_start = data[max(0, len(data) - (muxer.sink.position - keyframe_at)) :]
                self.blocks_done += 1
                listeners = list(self._listeners)  # taken with _block_start: a viewer gets each block once
            events.append(("block", info, data))
            for event in events:
                for callback in listeners:
                    callback(event)
