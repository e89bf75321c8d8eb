"""Live sessions: speech pushed in chunks while the avatar is generated, video out block by block.

A live session has no speech file. The client pushes 16 kHz mono samples as they are spoken; each block
of the stream takes the next window of speech (12 frames = 0.48 s at 25 fps) when it has arrived, or,
once real time has passed the window's end, whatever has arrived, with silence in front of it. Windows
with no speech at all give zero audio features, which is what the model sees past the end of a speech
file, so the avatar idles and the stream goes on until the session is closed. A window's real-time end is
never sooner than one window after the previous window was taken: a stream that fell behind takes full
windows again once it is back, rather than pieces of speech with silence between them.

The stream drops its first 3 frames (120 ms). As in a job (liveavatar.engine.job), the first window puts
120 ms of silence in front of the speech (it takes 0.36 s of speech, not 0.48 s), so the dropped frames
show that silence and every pushed sample is spoken and sent: the video's frame j shows the speech at j / 25 s
(plus whatever silence a late window got). The session's sound track is the pushed speech itself: 16 kHz
mono, the rate and channels the protocol carries.

Speech features are computed per window: wav2vec2 over the window with up to `CONTEXT_S` of the speech
before it and `RIGHT_PAD_FRAMES` of silence after it. A whole-file computation gives every frame the
whole file as context, including speech that a live stream has not heard yet, so live features cannot
equal it; they are those of a segment ending at the window, like the segmented features of long files.

Lag. Each pushed sample is *due* when the avatar could speak it at the earliest: when it was pushed, but
never sooner than right after the speech pushed before it (speech pushed faster than real time, a text's
sentence or a file, is due at the pace it is spoken). A session's lag is how long ago the oldest pushed
sample that no published block holds yet was due (0 when every pushed sample is out): for a microphone, the
age of the oldest speech still waiting for its video. It is in every block event and in the session's
status.

Catching up. A session that falls behind by more than `max_lag_s` (2 s) does not let speech queue up:

1. when it takes a window it first shortens the pauses in the queued speech: silences (20 ms frames under
   -40 dBFS) longer than `KEEP_PAUSE_S` lose their excess, up to what brings the lag back to half the bound.
   Only silence is dropped; every block says which pushed samples it skipped (`dropped`), so that spoken +
   dropped is exactly everything pushed, in order, nothing twice;
2. if the backlog is speech (the lag stays past the bound), a session that asked for it (`on_slow`
   "downgrade") steps down at the next clip boundary: the stream is restarted at the next cheaper
   (size, steps) of the real-time candidates (liveavatar.engine.realtime.next_rung; on a GPU only sizes
   already compiled in this process), its frames scaled to the session's video size, so the MP4 goes on.
   A restarted stream drops its first 3 frames like every stream; its first window starts with that much
   silence, so no speech is lost there (nor at the session's start). It never steps up again.

The session's video goes out as a fragmented MP4 (H.264 + AAC) made in memory: one long-lived encoder,
a keyframe at the start of every block, and one fragment per frame, so every block leaves the muxer
completely (but for its last frame, which follows with the next block) as soon as it is encoded.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import logging
import math
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch

from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.realtime import CANDIDATE_SIZES, STEADY_FROM, BlockMeter, normalize_size
from liveavatar.engine.stream import DROPPED_FIRST_FRAMES, StreamSettings
from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.media import image as image_io
from liveavatar.models.audio_encoder import SAMPLE_RATE, AudioEncoder

log = logging.getLogger(__name__)

CONTEXT_S = 2.0  # speech before a window that its features see
RIGHT_PAD_FRAMES = 2  # silence after a window, so the 30 fps resampling reaches its last frame
JITTER_S = 0.1  # how long past a window's real-time end a block waits for late chunks
LATE_S = 0.05  # a window taken later than its real-time end (and jitter) by more restarts the clock there
MAX_QUEUED_S = 30.0  # speech waiting to be spoken; more is refused (the client is too far ahead)
UNBOUNDED_CLIPS = 2**40  # a clip count no session reaches: the stream ends when the session is closed
LAG_BOUND_S = 2.0  # a session further behind catches up (see the module notes)
KEEP_PAUSE_S = 0.25  # what is left of a pause that is shortened to catch up
SILENCE_RMS = 0.01  # -40 dBFS: a 20 ms frame quieter than this is silence
SILENCE_FRAME = SAMPLE_RATE // 50  # 20 ms
FALLBACK_REALTIME = (CANDIDATE_SIZES[-1], 4)  # "auto" with nothing measured: the smallest preset
MESSAGES_KEPT = 20


class SessionClosed(LiveAvatarError):
    """The live session was closed while a block waited for speech."""


class SpeechQueueFull(InputError):
    """More speech was pushed than the session holds while it waits to be spoken."""


@dataclass
class SpeechWindow:
    """The speech a block spoke: `samples` (window length), of which the last `speech_samples` were pushed
    speech and the rest silence in front of it. It covers positions [speech_start, speech_end) of everything
    pushed, of which the `dropped` ranges were silence skipped to catch up (the spoken samples are the rest,
    in order). `taken_at`: when the window was taken (time.monotonic); `received_at`: when its first spoken
    sample was pushed (None without speech)."""

    samples: np.ndarray
    speech_start: int
    speech_samples: int
    speech_end: int = -1
    dropped: list[tuple[int, int]] = field(default_factory=list)
    taken_at: float = 0.0
    received_at: float | None = None

    def __post_init__(self):
        if self.speech_end < 0:
            self.speech_end = self.speech_start + self.speech_samples + self.dropped_samples

    @property
    def dropped_samples(self) -> int:
        return sum(end - start for start, end in self.dropped)

    @property
    def padded_samples(self) -> int:
        return len(self.samples) - self.speech_samples


def silent_frames(samples: np.ndarray, frame: int = SILENCE_FRAME, threshold: float = SILENCE_RMS) -> np.ndarray:
    """Per whole frame of `frame` samples: whether its RMS is under `threshold` (a partial last frame is left out)."""
    n = len(samples) // frame
    if n == 0:
        return np.zeros(0, bool)
    blocks = samples[: n * frame].reshape(n, frame).astype(np.float64)
    return np.sqrt(np.mean(blocks * blocks, axis=1)) < threshold


class LiveSpeech:
    """An AudioSource fed incrementally by `push()`, paced to real time (see the module notes).

    `block(k, frames)` is called by the stream in block order; it waits until the window's speech has
    arrived or its time has passed, and raises SessionClosed once `close()` is called. `max_lag_s` (None:
    never) is the lag past which it shortens pauses in the queued speech; the session tells it what is out
    with `mark_produced` (the lag counts from there).
    """

    def __init__(self, encoder: AudioEncoder, fps: int = 25, lead_in_frames: int = DROPPED_FIRST_FRAMES,
                 max_lag_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.encoder = encoder
        self.fps = fps
        self.samples_per_frame = SAMPLE_RATE // fps
        self.lead_in = lead_in_frames * self.samples_per_frame  # silence in front of the first window's speech
        self.max_lag_s = max_lag_s
        self.clock = clock
        config = encoder.model.config if encoder is not None else None
        self.feature_shape = (1, config.num_hidden_layers + 1, config.hidden_size) if config is not None else None
        self._queue: list[tuple[int, np.ndarray]] = []  # (position of its first sample, samples), in order
        self._queued = 0
        self._pushed = 0  # samples pushed so far
        self._taken = 0  # position after the newest window taken (dropped silence included)
        self._produced = 0  # position after the speech of the newest block out (mark_produced)
        self._pushes: deque[tuple[int, int, float, float]] = deque()  # (start, end, pushed at, due of its start)
        self._due_end = -math.inf  # when the newest pushed sample is due to have been spoken
        self._history = np.zeros(0, np.float32)  # the last CONTEXT_S of windows, for left context
        self._windows: dict[int, SpeechWindow] = {}
        self._window_size = 12 * self.samples_per_frame
        self._clock_start: float | None = None
        self._closed = False
        self.waited_s = 0.0  # time block() spent waiting for speech, in all
        self.dropped_samples = 0  # silence dropped to catch up, in all
        self._lock = threading.Condition()

    def push(self, samples: np.ndarray, at: float | None = None) -> int:
        """Queues 16 kHz mono float32 speech to be spoken after what was pushed before; returns the position of
        its first sample in everything pushed (a block's `speech_start` counts the same way). `at`: when it was
        pushed (its clock's time), if before now."""
        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        with self._lock:
            if self._closed:
                raise SessionClosed("the live session is closed")
            if (self._queued + len(samples)) / SAMPLE_RATE > MAX_QUEUED_S:
                raise SpeechQueueFull(
                    f"speech queue full: {self._queued / SAMPLE_RATE:.1f} s are waiting to be spoken (limit "
                    f"{MAX_QUEUED_S:.0f} s); push speech in real time"
                )
            start = self._pushed
            if len(samples):
                now = self.clock() if at is None else at
                due = max(now, self._due_end)
                self._due_end = due + len(samples) / SAMPLE_RATE
                self._pushes.append((start, start + len(samples), now, due))
                self._queue.append((start, samples))
                self._queued += len(samples)
                self._pushed += len(samples)
            self._lock.notify_all()
            return start

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    @property
    def queued_seconds(self) -> float:
        with self._lock:
            return self._queued / SAMPLE_RATE

    @property
    def pushed(self) -> int:
        return self._pushed

    # ------------------------------------------------------------------ lag
    def _push_of(self, position: int) -> tuple[int, int, float, float] | None:
        for push in self._pushes:
            if push[0] <= position < push[1]:
                return push
        return None

    def _due(self, position: int) -> float:
        push = self._push_of(position)
        if push is None:
            return self._pushes[0][3] if self._pushes and position < self._pushes[0][0] else self._due_end
        return push[3] + (position - push[0]) / SAMPLE_RATE

    def _lag(self, now: float) -> float:
        if self._produced >= self._pushed:
            return 0.0
        return max(0.0, now - self._due(self._produced))

    def lag(self, now: float | None = None) -> float:
        """Seconds since the oldest pushed sample not yet in a published block was due (see the module notes)."""
        with self._lock:
            return self._lag(self.clock() if now is None else now)

    def mark_produced(self, position: int) -> None:
        """Everything pushed before `position` is in published video."""
        with self._lock:
            self._produced = max(self._produced, position)
            while len(self._pushes) > 1 and self._pushes[0][1] <= self._produced:
                self._pushes.popleft()

    # ------------------------------------------------------------------ windows
    def _deadline(self, k: int) -> float:
        return self._clock_start + (k + 1) * self._window_size / SAMPLE_RATE + JITTER_S

    def ready(self, k: int) -> bool:
        """Whether block(k) would return without waiting now."""
        with self._lock:
            if self._closed or self._queued >= self._window_size:
                return True
            return self._clock_start is not None and self.clock() >= self._deadline(k)

    def _drop_silence(self, budget: int) -> int:
        """Shortens silences in the queued speech to KEEP_PAUSE_S, dropping at most `budget` samples, oldest
        first; returns how many were dropped."""
        if budget < SILENCE_FRAME or not self._queue:
            return 0
        data = np.concatenate([samples for _, samples in self._queue])
        positions = np.concatenate([np.arange(start, start + len(samples)) for start, samples in self._queue])
        silent = silent_frames(data)
        keep, left, f = -(-int(KEEP_PAUSE_S * SAMPLE_RATE) // SILENCE_FRAME), budget // SILENCE_FRAME, SILENCE_FRAME
        mask = np.ones(len(data), bool)
        i = 0
        while i < len(silent) and left > 0:
            if not silent[i]:
                i += 1
                continue
            j = i
            while j < len(silent) and silent[j]:
                j += 1
            cut = min(j - i - keep, left)
            if cut > 0:
                mask[(i + keep) * f : (i + keep + cut) * f] = False
                left -= cut
            i = j
        dropped = int((~mask).sum())
        if dropped:
            kept, where = data[mask], positions[mask]
            breaks = np.flatnonzero(np.diff(where) != 1) + 1
            self._queue = [(int(pos[0]), piece) for pos, piece in zip(np.split(where, breaks), np.split(kept, breaks))]
            self._queued = len(kept)
        return dropped

    def _catch_up(self, now: float) -> None:
        if self.max_lag_s is None or not self._queue:
            return
        lag = self._lag(now)
        if lag > self.max_lag_s:
            dropped = self._drop_silence(int((lag - self.max_lag_s / 2) * SAMPLE_RATE))
            if dropped:
                self.dropped_samples += dropped
                log.info("live session %.2f s behind: %.2f s of pauses dropped", lag, dropped / SAMPLE_RATE)

    def _take(self, count: int) -> tuple[np.ndarray, int, int, list[tuple[int, int]]]:
        """The next `count` queued samples, the position of the first, the position after the last and the
        dropped ranges among them."""
        pieces, dropped, cursor, left, first = [], [], self._taken, count, self._taken
        while left > 0 and self._queue:
            start, samples = self._queue[0]
            if start > cursor:
                dropped.append((cursor, start))
            if not pieces:
                first = start
            piece = samples[:left]
            pieces.append(piece)
            left -= len(piece)
            cursor = start + len(piece)
            if len(piece) == len(samples):
                self._queue.pop(0)
            else:
                self._queue[0] = (cursor, samples[len(piece) :])
        self._queued -= count - left
        self._taken = cursor
        return (np.concatenate(pieces) if pieces else np.zeros(0, np.float32)), first, cursor, dropped

    def _next_window(self, k: int, frames: int, lead: int | None = None) -> SpeechWindow:
        size = frames * self.samples_per_frame
        if lead is None:  # the session's first window starts with the lead-in silence
            lead = self.lead_in if k == 0 else 0
        with self._lock:
            self._window_size = size
            now = self.clock()
            if self._clock_start is None:
                self._clock_start = now
            deadline = self._deadline(k)
            want = size - lead
            self._catch_up(now)
            began = now
            while not self._closed and self._queued < want and now < deadline:
                self._lock.wait(deadline - now)
                now = self.clock()
            self.waited_s += now - began
            if self._closed:
                raise SessionClosed("the live session was closed")
            if now > deadline + LATE_S:  # behind: the next window gets its full time (and the jitter) from here
                self._clock_start += now - deadline + JITTER_S
            start = self._taken
            speech, first, end, dropped = self._take(min(want, self._queued))
            received = self._push_of(first) if len(speech) else None
        # Speech that arrived after the window started belongs at its end: it is the newest sound.
        samples = np.concatenate([np.zeros(size - len(speech), np.float32), speech])
        return SpeechWindow(samples, start, len(speech), end, dropped, now, received[2] if received else None)

    def block(self, k: int, frames: int, lead_samples: int | None = None) -> torch.Tensor:
        """Features of block k's window; `lead_samples`: silence the window starts with at least (the frames a
        stream drops at its start; default: the lead-in for block 0, none after)."""
        window = self._next_window(k, frames, lead_samples)
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


class _SegmentSource:
    """One stream's view of the session's speech: its block k is the session's block `base` + k, and its first
    block's window starts with `lead` samples of silence (the frames every stream drops at its start)."""

    def __init__(self, speech: LiveSpeech, base: int, lead: int):
        self.speech, self.base, self.lead = speech, base, lead

    def block(self, k: int, frames: int) -> torch.Tensor:
        return self.speech.block(self.base + k, frames, self.lead if k == 0 else 0)

    def ready(self, k: int) -> bool:
        return self.speech.ready(self.base + k)

    def window(self, k: int) -> SpeechWindow:
        return self.speech.window(self.base + k)


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
    speech_end: int = 0  # position after the pushed samples it covers: the next block's speech_start
    dropped_samples: int = 0  # pushed silence skipped to catch up ...
    dropped: list[tuple[int, int]] = field(default_factory=list)  # ... at these positions [start, end)
    lag_s: float = 0.0  # the session's lag once this block is out (see the module notes)
    size: str = ""  # what generated it: the pixel budget and the step count
    sample_steps: int = 0
    # For its first spoken sample: from its push to the window taken, to the frames ready, to the MP4 bytes out.
    latency_ms: dict[str, float] | None = None
    speech_media_s: float | None = None  # where that sample plays in the session's video (seconds)


@dataclass(frozen=True)
class VideoStarted:
    """A viewer's first bytes: the MP4 init segment (for a viewer joining late, followed by the newest block's
    fragments so far, from its keyframe)."""

    data: bytes


@dataclass(frozen=True)
class BlockPublished:
    """A block out: what it is, and its MP4 bytes."""

    info: LiveBlock
    data: bytes


@dataclass(frozen=True)
class SessionMessage:
    """What the session decided (the size it picked, silence dropped, a step down): a JSON event for the client."""

    message: dict


@dataclass(frozen=True)
class SessionEnded:
    """The last event: the error that ended the session (None when it was closed) and the stream's last bytes."""

    error: str | None
    data: bytes


SessionEvent = VideoStarted | BlockPublished | SessionMessage | SessionEnded


@dataclass(frozen=True)
class SessionOptions:
    image: Path
    prompt: str = "A person is talking."
    size: str = "384*256"  # "auto": the real-time preset (liveavatar.engine.realtime), picked when it starts
    sample_steps: int = 4
    seed: int = 42
    rolling_sink: bool = True
    decoder: str | None = None  # "wan" or "taew2_1" (StreamSettings.decoder); None: the service's --decoder
    on_slow: str = "keep"  # "downgrade": past max_lag_s with speech queued, step down at a clip boundary
    max_lag_s: float | None = LAG_BOUND_S  # the lag past which it catches up (None: never)
    measure_as: str = "session"  # what its measured speed counts as in the speed table
    steady_from: int = STEADY_FROM  # its stream's first block that counts for the speed


class LiveSession:
    """A live session: runs (on the engine's thread) until closed, publishing each block and its MP4 bytes.

    Viewers `subscribe(callback)`; the callback gets a SessionEvent: VideoStarted, then BlockPublished for
    every block, SessionMessage for what the session decided, and SessionEnded last; it runs on the engine
    thread and must not block. `realtime` (a liveavatar.engine.realtime.Realtime) resolves size "auto",
    offers the sizes to step down to, and records the speeds the session measures.
    """

    def __init__(self, options: SessionOptions, realtime=None):
        self.options = options
        self.realtime = realtime
        self.speech: LiveSpeech | None = None
        self.init_segment = b""
        self.blocks_done = 0
        self.size: str | None = None  # what runs now
        self.sample_steps: int | None = None
        self.plan_message: dict | None = None  # how the request became size and steps (realtime, downgrade)
        self.messages: deque[dict] = deque(maxlen=MESSAGES_KEPT)
        self.speeds_measured: list[tuple[tuple[str, int], float | None]] = []  # per stream: (size, steps), its FPS
        self._pending_speech: list[tuple[np.ndarray, float]] = []  # pushed before the stream exists, and when
        self._listeners: list[Callable[[SessionEvent], None]] = []
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
                start = sum(len(pending) for pending, _ in self._pending_speech)
                self._pending_speech.append((np.asarray(samples, np.float32), time.monotonic()))
                if sum(len(pending) for pending, _ in self._pending_speech) / SAMPLE_RATE > MAX_QUEUED_S:
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

    def subscribe(self, callback: Callable[[SessionEvent], None]) -> None:
        """Adds a viewer; one joining after the start gets the init segment and the stream from the newest block."""
        with self._lock:
            self._listeners.append(callback)
            if self.init_segment:
                callback(VideoStarted(self.init_segment + self._block_start))

    def unsubscribe(self, callback: Callable[[SessionEvent], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    def _publish(self, event: SessionEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback(event)

    def _message(self, message: dict) -> None:
        self.messages.append(message)
        self._publish(SessionMessage(message))

    def status(self) -> dict:
        """Lag, queue, what runs and what the session decided, for a status view."""
        speech = self.speech
        return {
            "lag_s": round(speech.lag(), 3) if speech is not None else 0.0,
            "queued_s": round(speech.queued_seconds, 3) if speech is not None else
            round(sum(len(pending) for pending, _ in self._pending_speech) / SAMPLE_RATE, 3),
            "dropped_s": round(speech.dropped_samples / SAMPLE_RATE, 3) if speech is not None else 0.0,
            "max_lag_s": self.options.max_lag_s, "size": self.size, "sample_steps": self.sample_steps,
            "plan": self.plan_message, "messages": list(self.messages),
        }

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
            self._publish(SessionEnded(message, self._tail))

    def _initial_rung(self) -> tuple[str, int]:
        o = self.options
        if normalize_size(o.size).strip().lower() != "auto":
            return normalize_size(o.size), o.sample_steps
        choice = self.realtime.choice() if self.realtime is not None else None
        if choice is not None and choice.size is not None:
            size, steps = choice.size, choice.steps
            message = {"type": "realtime", "size": size, "sample_steps": steps, "fps": round(choice.fps, 2),
                       "keeps_up": choice.keeps_up, "reason": choice.reason}
        else:
            size, steps = FALLBACK_REALTIME
            why = choice.reason if choice is not None else "this service measures no speeds"
            message = {"type": "realtime", "size": size, "sample_steps": steps, "fps": None, "keeps_up": None,
                       "reason": f"{why}: the smallest preset, {size} at {steps} steps"}
        self.plan_message = message
        self._message(message)
        return size, steps

    def _run(self, pipe: LiveAvatarPipeline) -> None:
        o = self.options
        rung = self._initial_rung()
        settings = StreamSettings(sample_steps=rung[1], seed=o.seed, rolling_sink=o.rolling_sink, decoder=o.decoder)
        # prepare() encodes the image and the prompt together with a speech file's features; a session has
        # no file, so it is given one block of silence and its audio source is replaced by the live one.
        silence = np.zeros(settings.video_frames_per_block * SAMPLE_RATE // settings.fps, np.float32)
        cond = pipe.prepare(o.image, silence, o.prompt, rung[0], fps=settings.fps, frames_per_clip=settings.frames_per_clip)
        encoder = pipe.audio_encoder
        if pipe.offload_encoders:  # live features are computed every block: keep wav2vec2 on the device
            encoder.to(pipe.device)
        try:
            speech = LiveSpeech(encoder, settings.fps, max_lag_s=o.max_lag_s)
            with self._lock:
                if self._closed:
                    return
                for samples, pushed_at in self._pending_speech:
                    speech.push(samples, at=pushed_at)
                self._pending_speech.clear()
                self.speech = speech
            muxer = LiveMP4Muxer(cond.width, cond.height, settings.fps)
            try:
                first_size = rung[0]
                while True:
                    settings = dataclasses.replace(settings, sample_steps=rung[1])
                    segment = cond if rung[0] == first_size else self._conditioning(pipe, cond, rung[0])
                    rung = self._stream_segment(pipe, segment, settings, speech, muxer, rung)
                    del segment
                    gc.collect()  # the stream that stopped holds its caches until collected
                    if pipe.device.type == "cuda":
                        torch.cuda.empty_cache()
            finally:
                # The last frame and audio still in the muxer end the stream (sent with SessionEnded).
                self._tail = muxer.close() if self.init_segment else b""
        finally:
            if pipe.offload_encoders:
                encoder.to("cpu")

    def _conditioning(self, pipe: LiveAvatarPipeline, cond, size: str):
        """The session's conditioning at another size: the image encoded again, the prompt's encoding kept."""
        img = image_io.load_image(self.options.image)
        height, width = image_io.output_size(img.height, img.width, image_io.parse_size(size))
        pixels = image_io.prepare_reference(img, height, width)
        ref, motion = pipe.encode_reference(pixels)
        return dataclasses.replace(cond, height=height, width=width, reference=pixels, ref_latent=ref,
                                   motion_latents=motion)

    def _stream_segment(self, pipe: LiveAvatarPipeline, cond, settings: StreamSettings, speech: LiveSpeech,
                        muxer: "LiveMP4Muxer", rung: tuple[str, int]) -> tuple[str, int]:
        """Streams at one (size, steps) until the session closes (SessionClosed) or steps down at a clip
        boundary: then returns the (size, steps) to go on with."""
        o = self.options
        base = self.blocks_done
        source = _SegmentSource(speech, base, DROPPED_FIRST_FRAMES * speech.samples_per_frame)
        stream = pipe.stream(dataclasses.replace(cond, audio=source, num_clips=UNBOUNDED_CLIPS), settings)
        # On the CPU "ahead" means computed before the block goes out: only a GPU overlaps it with the muxing.
        lookahead = pipe.device.type == "cuda"
        steerable = hasattr(stream, "lookahead")  # a stream that takes no speech ahead can stop at a boundary
        if steerable:
            stream.lookahead = lookahead
        self.size, self.sample_steps = rung
        if self.realtime is not None:
            self.realtime.warm_sizes.add(rung[0])
        meter = BlockMeter(o.steady_from)
        waited = speech.waited_s
        stepping_down = False
        per_block = settings.blocks_per_clip
        try:
            for block in stream.blocks(UNBOUNDED_CLIPS):
                ready_at = time.monotonic()
                meter.block(block.index, len(block.frames), speech.waited_s - waited)
                waited = speech.waited_s
                window = source.window(block.index)
                lag = self._publish_block(block, window, muxer, speech, rung, ready_at)
                if o.on_slow != "downgrade" or o.max_lag_s is None or not steerable:
                    continue
                # Behind with speech queued (pauses were shortened already): step down at the clip's end, with
                # nothing taken ahead of it, so that the next stream starts with the next window.
                if lag > o.max_lag_s and not stepping_down:
                    stepping_down = True
                    log.info("live session %.2f s behind (bound %.1f s): stepping down at the next clip boundary", lag,
                             o.max_lag_s)
                elif lag <= o.max_lag_s and stepping_down:
                    stepping_down = False
                    stream.lookahead = lookahead
                if not stepping_down:
                    continue
                if (block.index + 1) % per_block == 0 and not stream.has_ahead:
                    target = self._next_rung(pipe, rung)
                    if target is not None:
                        self._message({"type": "step_down", "block": self.blocks_done, "lag_s": round(lag, 3),
                                       "from": {"size": rung[0], "sample_steps": rung[1]},
                                       "to": {"size": target[0], "sample_steps": target[1]},
                                       "reason": f"{lag:.1f} s behind (more than {o.max_lag_s:g} s) with speech "
                                                 f"queued: restarted at a clip boundary at {target[0]}, {target[1]} steps"})
                        return target
                    stepping_down = False  # nothing cheaper: it stays, and silence is what it drops
                    stream.lookahead = lookahead
                    steerable = False
                elif (block.index + 2) % per_block == 0:
                    stream.lookahead = False
        finally:
            self.speeds_measured.append((rung, meter.fps))
            # The table holds the service's own decoder's speeds (liveavatar.engine.realtime.machine_name).
            if self.realtime is not None and o.decoder in (None, getattr(pipe, "decoder_name", None)):
                self.realtime.record(rung[0], rung[1], meter, o.measure_as)
        raise SessionClosed("the stream ended")  # unreachable: the stream is unbounded

    def _next_rung(self, pipe: LiveAvatarPipeline, rung: tuple[str, int]) -> tuple[str, int] | None:
        if self.realtime is None:
            return None
        # On a GPU a size not yet compiled in this process takes a minute: only warm sizes (or fewer steps).
        return self.realtime.next_rung(rung[0], rung[1], warm_only=pipe.device.type == "cuda" and pipe.fast)

    def _publish_block(self, block, window: SpeechWindow, muxer: "LiveMP4Muxer", speech: LiveSpeech,
                       rung: tuple[str, int], ready_at: float) -> float:
        """Muxes a block and sends it to the viewers; returns the session's lag once it is out."""
        frames = fit_frames(block.frames.numpy(), muxer.video.height, muxer.video.width)
        sound = window.samples
        dropped_frames = DROPPED_FIRST_FRAMES if block.index == 0 else 0  # every stream drops its first frames
        sound = sound[dropped_frames * speech.samples_per_frame :]
        first_frame = muxer.frames
        data, keyframe_at = muxer.write_block(frames, sound)
        speech.mark_produced(window.speech_end)
        out_at = time.monotonic()
        lag = speech.lag(out_at)
        latency = media_s = None
        if window.speech_samples:
            latency = {"window": (window.taken_at - window.received_at) * 1000, "generation": (ready_at - window.taken_at) * 1000,
                       "mux": (out_at - ready_at) * 1000}
            latency = {k: round(max(0.0, v), 3) for k, v in latency.items()}
            media_s = (first_frame + window.padded_samples / speech.samples_per_frame - dropped_frames) / speech.fps
        info = LiveBlock(
            index=self.blocks_done, first_frame=first_frame, frames=len(frames),
            speech_start=window.speech_start, speech_samples=window.speech_samples,
            padded_samples=window.padded_samples, queued_s=speech.queued_seconds,
            timings_ms={k: round(v, 1) for k, v in block.timings_ms.items()},
            speech_end=window.speech_end, dropped_samples=window.dropped_samples,
            dropped=[list(r) for r in window.dropped], lag_s=round(lag, 3), size=rung[0], sample_steps=rung[1],
            latency_ms=latency, speech_media_s=None if media_s is None else round(max(0.0, media_s), 4),
        )
        events: list[SessionEvent] = []
        with self._lock:
            if not self.init_segment:
                length = init_segment_length(data)
                if length is None:
                    raise RuntimeError("the MP4 muxer wrote no init segment with the first block")
                self.init_segment, data = data[:length], data[length:]
                events.append(VideoStarted(self.init_segment))
            # Where this block's keyframe fragment starts in `data` (it always lies within it).
            self._block_start = data[max(0, len(data) - (muxer.sink.position - keyframe_at)) :]
            self.blocks_done += 1
            listeners = list(self._listeners)  # taken with _block_start: a viewer gets each block once
        events.append(BlockPublished(info, data))
        if window.dropped_samples:
            message = {"type": "catch_up", "action": "drop_silence", "block": info.index,
                       "dropped_s": round(window.dropped_samples / SAMPLE_RATE, 3), "lag_s": info.lag_s}
            self.messages.append(message)
            events.append(SessionMessage(message))
        for event in events:
            for callback in listeners:
                callback(event)
        return lag


def fit_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames [n, h, w, 3] uint8 at another size scaled (bilinear) to cover height x width and cropped to it
    around the centre; frames of that size unchanged."""
    n, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    size = (max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale)))
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
