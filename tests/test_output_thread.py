"""The job's output thread: the MP4 is written and resume states are saved off the generation thread, in the
order given, with a bounded backlog, and a failure there surfaces in the job with its own type."""

import errno
import threading
import time

import numpy as np
import pytest

from liveavatar.engine.job import OutputThread


class RecordingWriter:
    def __init__(self, events: list, delay_s: float = 0.0, fail_at: int | None = None):
        self.events, self.delay_s, self.fail_at = events, delay_s, fail_at
        self.written = 0

    def write(self, frames) -> None:
        time.sleep(self.delay_s)
        if self.written == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += 1
        self.events.append(("frames", int(frames[0, 0, 0, 0])))


class RecordingStore:
    def __init__(self, events: list):
        self.events = events

    def save(self, state: dict) -> None:
        self.events.append(("state", state["block"]))


def block(i: int) -> np.ndarray:
    return np.full((2, 4, 4, 3), i, np.uint8)


def test_frames_and_states_in_the_order_given():
    events: list = []
    output = OutputThread(RecordingWriter(events, delay_s=0.01))
    store = RecordingStore(events)
    for i in range(8):
        output.write(block(i))
        if i % 4 == 3:
            output.save_state(store, {"block": i})  # a state is saved only once its frames are in the file
    output.drain()
    output.stop()
    assert events == [("frames", 0), ("frames", 1), ("frames", 2), ("frames", 3), ("state", 3),
                      ("frames", 4), ("frames", 5), ("frames", 6), ("frames", 7), ("state", 7)]
    assert len(output.mux_ms) == 8 and all(ms >= 10 for ms in output.mux_ms)


def test_backlog_is_bounded():
    """A writer slower than the generation makes the job wait instead of piling up frames in memory."""
    release = threading.Event()

    class Blocked(RecordingWriter):
        def write(self, frames):
            release.wait(30)
            super().write(frames)

    events: list = []
    output = OutputThread(Blocked(events), max_waiting=2)
    output.write(block(0))  # taken by the thread, which then blocks
    time.sleep(0.1)
    output.write(block(1))
    output.write(block(2))
    third = threading.Thread(target=output.write, args=(block(3),))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a fourth block was accepted while two waited"
    release.set()
    third.join(30)
    output.drain()
    output.stop()
    assert [e[1] for e in events] == [0, 1, 2, 3]


def test_a_failure_surfaces_with_its_type_and_stops_the_rest():
    events: list = []
    output = OutputThread(RecordingWriter(events, fail_at=1))
    store = RecordingStore(events)
    output.write(block(0))
    output.write(block(1))  # fails on the thread: the disk is full
    output.save_state(store, {"block": 1})
    with pytest.raises(OSError) as failure:
        output.drain()
    assert failure.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        output.write(block(2))
    output.stop()  # returns at once, raises nothing
    assert events == [("frames", 0)], "nothing after the failure was written or saved"
