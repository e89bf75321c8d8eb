"""Live sessions that cannot keep up (the tiny checkpoint on CPU, artificially slowed): they report their lag,
catch up as designed (pauses shortened, then a step down at a clip boundary) with no speech lost or repeated,
and the start-up calibration measures the candidates and picks the preset."""

import io
import queue
import threading
import time

import av
import numpy as np
import pytest
import torch

from conftest import CKPT, REPO, requires_golden

from liveavatar.engine.calibration import calibrate, synthetic_speech
from liveavatar.engine.live import (KEEP_PAUSE_S, BlockPublished, LiveSession, SessionEnded, SessionMessage,
                                   SessionOptions, VideoStarted)
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.realtime import Realtime, SpeedTable

pytestmark = requires_golden
FACE = REPO / "examples" / "face.png"
SR = 16000
WAIT_S = 300  # every wait is bounded


@pytest.fixture(scope="module")
def pipe():
    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


class SlowStream:
    """A stream whose every block comes `delay` seconds late (the session's own switches reach the real one)."""

    def __init__(self, stream, delay: float):
        object.__setattr__(self, "_stream", stream)
        object.__setattr__(self, "_delay", delay)

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def __setattr__(self, name, value):
        setattr(self._stream, name, value)

    def blocks(self, num_clips):
        for block in self._stream.blocks(num_clips):
            time.sleep(self._delay)
            yield block


class SlowPipe:
    """The tiny pipeline, slower than real time on any machine: each block of an H x W stream `delay(H * W)` late."""

    def __init__(self, pipe, delay):
        self._pipe, self._delay = pipe, delay

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, cond, settings):
        return SlowStream(self._pipe.stream(cond, settings), self._delay(cond.height * cond.width))


def tone(seconds, level=0.3, f=180.0):
    t = np.arange(int(seconds * SR)) / SR
    return (level * np.sin(2 * np.pi * f * t) * (0.7 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def run_session(pipe, session, pushed, done):
    """Runs the session on a thread and pushes `pushed` in real time (100 ms every 100 ms) from another; returns the
    events once `done(blocks)` says so (the session is then closed) and the session has ended."""
    events: queue.Queue = queue.Queue()
    session.subscribe(events.put)
    runner = threading.Thread(target=session.run, args=(pipe,), daemon=True)
    runner.start()

    def push():
        for at in range(0, len(pushed), 1600):
            session.push(pushed[at : at + 1600])
            time.sleep(0.1)

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    blocks, messages, video, end = [], [], bytearray(), None
    deadline = time.monotonic() + WAIT_S
    while end is None:
        event = events.get(timeout=max(1.0, deadline - time.monotonic()))
        assert time.monotonic() < deadline, "the session did not finish in time"
        if isinstance(event, VideoStarted):
            video += event.data
        elif isinstance(event, BlockPublished):
            blocks.append(event.info)
            video += event.data
            if not pusher.is_alive() and done(blocks):
                session.close()
        elif isinstance(event, SessionMessage):
            messages.append(event.message)
        elif isinstance(event, SessionEnded):
            video += event.data
            end = event
    runner.join(60)
    pusher.join(10)
    assert end.error is None, end.error
    return blocks, messages, bytes(video)


def all_spoken(total):
    """Every pushed sample is out (spoken or dropped) and the avatar idled for two blocks."""
    return lambda blocks: blocks[-1].speech_end == total and all(b.speech_samples == 0 for b in blocks[-2:])


def check_speech_accounting(blocks, pushed):
    """No speech lost or repeated: the blocks cover everything pushed, in order, once; what they skipped was silence;
    returns the spoken samples (what the blocks' windows hold after their padding) and the kept-sample mask."""
    assert [b.speech_start for b in blocks] == [0] + [b.speech_end for b in blocks[:-1]]
    assert blocks[-1].speech_end == len(pushed)
    assert all(b.speech_end - b.speech_start == b.speech_samples + b.dropped_samples for b in blocks)
    keep = np.ones(len(pushed), bool)
    for b in blocks:
        for start, end in b.dropped:
            assert b.speech_start <= start < end <= b.speech_end
            assert np.abs(pushed[start:end]).max(initial=0) < 0.02, "speech was dropped"
            keep[start:end] = False
    assert keep.sum() == sum(b.speech_samples for b in blocks)
    return keep


def check_video_sound(video, blocks, pushed, keep):
    """The session's MP4 carries the spoken samples where the blocks say (padding, then the block's speech)."""
    spoken = pushed[keep]
    expected, at = [], 0
    for b in blocks:
        window = np.concatenate([np.zeros(b.padded_samples, np.float32), spoken[at : at + b.speech_samples]])
        at += b.speech_samples
        # A stream's first 3 frames are dropped with their sound, the silence its first window starts with.
        expected.append(window[(12 - b.frames) * 640 :])
    expected = np.concatenate(expected)
    with av.open(io.BytesIO(video)) as container:
        frames = [(f.height, f.width) for f in container.decode(video=0)]
    with av.open(io.BytesIO(video)) as container:
        sound = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    n = min(len(sound), len(expected))
    assert n > 0.9 * len(expected) and np.corrcoef(sound[:n], expected[:n])[0, 1] > 0.9
    return frames


def test_slow_session_reports_lag_and_drops_pauses_to_catch_up(pipe):
    """0.8 s late per block (real time is 0.48 s a block): the lag grows past the bound, and from then on the pauses in
    the queued speech are shortened to KEEP_PAUSE_S; the speech itself is all spoken, in order, once."""
    bound = 1.0
    pushed = np.concatenate([np.concatenate([tone(0.8), np.zeros(int(1.6 * SR), np.float32)]) for _ in range(3)]
                            + [tone(0.8)])
    session = LiveSession(SessionOptions(FACE, size="64*64", max_lag_s=bound, on_slow="keep"))
    blocks, messages, video = run_session(SlowPipe(pipe, lambda area: 0.8), session, pushed, all_spoken(len(pushed)))
    lags = [b.lag_s for b in blocks]
    print(f"\nslow session: {len(blocks)} blocks, lag after each (s): {lags}; dropped "
          f"{sum(b.dropped_samples for b in blocks) / SR:.2f} s of {len(pushed) / SR:.1f} s pushed")
    assert all(lag >= 0 for lag in lags) and max(lags) > bound, "the session fell behind and said so"
    keep = check_speech_accounting(blocks, pushed)
    drops = [m for m in messages if m["type"] == "catch_up"]
    assert drops and all(m["action"] == "drop_silence" for m in drops)
    assert sum(m["dropped_s"] for m in drops) == pytest.approx(sum(b.dropped_samples for b in blocks) / SR, abs=0.01)
    # Every pause that was shortened keeps at least KEEP_PAUSE_S, and the tone is spoken whole.
    runs = np.flatnonzero(np.diff(np.concatenate([[0], (~keep).astype(int), [0]])))
    assert len(runs) and all(end - start <= int((1.6 - KEEP_PAUSE_S) * SR) for start, end in zip(runs[::2], runs[1::2]))
    assert all(keep[i * int(2.4 * SR) : i * int(2.4 * SR) + int(0.8 * SR)].all() for i in range(4))
    # Pauses are dropped only once the session is behind: the window of the first block that skipped one was taken
    # right after the block before it came out, with the lag past the bound.
    first = next(i for i, b in enumerate(blocks) if b.dropped_samples)
    assert max(lags[:first]) > bound - 0.25
    check_video_sound(video, blocks, pushed, keep)
    assert session.status()["dropped_s"] == pytest.approx(sum(b.dropped_samples for b in blocks) / SR, abs=1e-3)


def test_slow_session_steps_down_at_a_clip_boundary(pipe):
    """Continuous speech and a size that falls behind (128*128, 0.8 s late a block): with on_slow=downgrade the
    session restarts at the next cheaper candidate at the end of the clip; the video keeps its size and its sound."""
    realtime = Realtime(SpeedTable(None, "test"), sizes=["128*128", "64*64"], steps=[4])
    pushed = tone(5.0)  # no pause to shorten
    session = LiveSession(SessionOptions(FACE, size="128*128", max_lag_s=1.0, on_slow="downgrade"), realtime)
    slow = SlowPipe(pipe, lambda area: 0.8 if area == 128 * 128 else 0.0)
    blocks, messages, video = run_session(slow, session, pushed, all_spoken(len(pushed)))
    print(f"\nstep down: {[(b.index, b.size, b.lag_s) for b in blocks]}")
    steps = [m for m in messages if m["type"] == "step_down"]
    assert len(steps) == 1 and steps[0]["from"] == {"size": "128*128", "sample_steps": 4}
    assert steps[0]["to"] == {"size": "64*64", "sample_steps": 4} and steps[0]["lag_s"] > 1.0
    switch = steps[0]["block"]
    assert switch % 4 == 0, "at a clip boundary"
    assert [b.size for b in blocks] == ["128*128"] * switch + ["64*64"] * (len(blocks) - switch)
    # The restarted stream drops its first 3 frames like every stream; its window starts with that much silence.
    assert [b.frames for b in blocks[switch - 1 : switch + 2]] == [12, 9, 12]
    assert blocks[switch].padded_samples >= 3 * 640
    assert [b.first_frame for b in blocks] == list(np.cumsum([0] + [b.frames for b in blocks[:-1]]))
    keep = check_speech_accounting(blocks, pushed)
    assert keep.all(), "nothing to drop in continuous speech"
    frames = check_video_sound(video, blocks, pushed, keep)
    assert len(frames) == sum(b.frames for b in blocks) and set(frames) == {(128, 128)}
    assert session.status()["size"] == "64*64"


def test_calibration_measures_candidates_in_order_and_stops_at_the_first_that_keeps_up(pipe, caplog):
    caplog.set_level("INFO", logger="liveavatar")
    easy = Realtime(SpeedTable(None, "test"), sizes=["64*64", "128*128"], steps=[4], factor=0.01)  # 0.25 FPS needed
    measured = calibrate(pipe, easy, blocks=5, steady_from=1)
    assert [(m["size"], m["sample_steps"]) for m in measured] == [("128*128", 4)]  # the largest keeps up: done
    assert easy.calibration.state == "done" and easy.table.entries()[0]["source"] == "calibration"
    assert easy.choice().size == "128*128" and "real-time preset: 128*128 at 4 steps" in caplog.text
    assert calibrate(pipe, easy, blocks=5, steady_from=1) == []  # measured already: nothing to do
    hard = Realtime(SpeedTable(None, "test"), sizes=["64*64", "128*128"], steps=[4], factor=100)  # 2500 FPS needed
    measured = calibrate(pipe, hard, blocks=5, steady_from=1)
    assert [m["size"] for m in measured] == ["128*128", "64*64"] and all(m["fps"] > 0 for m in measured)
    choice = hard.choice()
    assert not choice.keeps_up and choice.size == max(measured, key=lambda m: m["fps"])["size"]
    assert "no candidate keeps up" in choice.reason


def test_synthetic_speech_is_never_silent():
    from liveavatar.engine.live import silent_frames

    assert not silent_frames(synthetic_speech(2.0)).any()
