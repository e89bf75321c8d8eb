"""The engine behind the web UI and the server: one thread owns the model and runs tasks one at a time.

Every request (a file job or a live session) becomes a task in a bounded first-in-first-out queue; the
engine thread runs them in order with the one pipeline loaded at start, so requests never compete for
the GPU. A task is cancelled by flag: a queued one never starts, a running one stops at the next block.

A task may own a folder of files in a service's work folder (its uploads and outputs). When the task ends,
whatever way, everything in it but the job's video (finished or partial) is deleted: inputs, resume states
(the services never resume) and temporary files; when the worker forgets the task, the folder goes too.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import queue
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from liveavatar.engine.job import JobResult, JobSpec, Progress, run_job
from liveavatar.engine.live import LiveSession
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.realtime import BlockMeter
from liveavatar.errors import JobStopped, LiveAvatarError
from liveavatar.media.video import PARTIAL_SUFFIX

log = logging.getLogger(__name__)


class TaskState(str, enum.Enum):
    """Where a task is. A str (as enum.StrEnum, which Python 3.10 lacks): it equals, prints and serialises
    as its value, "queued", "running", ..., which is what the services' JSON and messages carry."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def finished(self) -> bool:
        """Whether the task has ended (whatever way): its state changes no more."""
        return self in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


class QueueFull(LiveAvatarError):
    """The engine's queue holds as many tasks as allowed."""


@dataclass
class Task:
    kind: str  # "job" or "session"
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: TaskState = TaskState.QUEUED
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    folder: Path | None = None  # the task's own files, cleaned up as the module notes say

    def kept_files(self) -> set[Path]:
        """The files of `folder` to keep once the task has ended."""
        return set()

    def attach_realtime(self, realtime) -> None:
        """Given the worker's liveavatar.engine.realtime.Realtime (if any) when submitted: where speeds go."""

    def run(self, pipe: LiveAvatarPipeline) -> bool:
        """Runs the task; False if it stopped early because it was cancelled."""
        raise NotImplementedError


@dataclass
class JobTask(Task):
    """A file job (`run_job`); `events()` subscribers get every Progress and the JobResult (or the end)."""

    spec: JobSpec | None = None
    progress: Progress | None = None  # the latest counts (its block is dropped: a finished task keeps no frames)
    result: JobResult | None = None
    first_block_s: float | None = None  # from start to the first block written
    _subscribers: list[queue.Queue] = field(default_factory=list)
    _realtime: object | None = None  # records the job's steady speed (liveavatar.engine.realtime)

    def attach_realtime(self, realtime) -> None:
        self._realtime = realtime

    def subscribe(self) -> queue.Queue:
        """A queue that receives each Progress, then the JobResult, then None when the task has ended."""
        q: queue.Queue = queue.Queue()
        self._subscribers.append(q)
        if self.state.finished:
            q.put(None)
        return q

    def _send(self, item) -> None:
        for q in list(self._subscribers):
            q.put(item)

    def run(self, pipe: LiveAvatarPipeline) -> bool:
        meter = BlockMeter()
        try:
            # A cancelled job stops after its current block with a playable partial MP4 (and a resume state).
            for item in run_job(pipe, self.spec, should_stop=self.cancel_requested.is_set):
                if isinstance(item, Progress):
                    meter.block(item.block.index, len(item.block.frames))
                    self.progress = dataclasses.replace(item, block=None)
                    if self.first_block_s is None:
                        self.first_block_s = time.time() - self.started
                else:
                    self.result = item
                self._send(item)
        except JobStopped:
            return False
        finally:
            if self._realtime is not None:
                self._realtime.record(self.spec.size, self.spec.sample_steps, meter, "job")
        return True

    def kept_files(self) -> set[Path]:
        return {self.spec.output, Path(str(self.spec.output) + PARTIAL_SUFFIX)}


@dataclass
class SessionTask(Task):
    session: LiveSession | None = None
    connected: bool = False  # a client has claimed the session (it pushes the speech)

    def run(self, pipe: LiveAvatarPipeline) -> bool:
        self.session.run(pipe)
        return True  # closing is how every session ends

    def attach_realtime(self, realtime) -> None:
        if self.session.realtime is None:
            self.session.realtime = realtime


class EngineWorker:
    """Runs tasks on one thread with one pipeline; at most `max_queue` tasks wait at a time."""

    def __init__(self, pipe: LiveAvatarPipeline, max_queue: int = 8, keep_finished: int = 100, realtime=None):
        """realtime: a liveavatar.engine.realtime.Realtime that the tasks' measured speeds go to."""
        self.pipe = pipe
        self.realtime = realtime
        self.max_queue = max_queue
        self.tasks: dict[str, Task] = {}
        self._waiting: deque[Task] = deque()
        self._finished: deque[str] = deque()
        self._keep_finished = keep_finished
        self.running: Task | None = None
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="liveavatar-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    def submit(self, task: Task) -> Task:
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._waiting)} requests waiting); try again later")
            if self.realtime is not None:
                task.attach_realtime(self.realtime)
            self.tasks[task.id] = task
            self._waiting.append(task)
            self._lock.notify_all()
        return task

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def position(self, task: Task) -> int | None:
        """1 for the next task to run, None unless waiting."""
        with self._lock:
            return self._waiting.index(task) + 1 if task in self._waiting else None

    def cancel(self, task: Task) -> None:
        with self._lock:
            task.cancel_requested.set()
            if task in self._waiting:
                self._waiting.remove(task)
                self._finish(task, TaskState.CANCELLED)
        if isinstance(task, SessionTask):
            task.session.close()

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            for task in list(self._waiting):
                self._waiting.remove(task)
                self._finish(task, TaskState.CANCELLED)
            running = self.running
            self._lock.notify_all()
        if running is not None:
            self.cancel(running)
        self._thread.join()

    # ------------------------------------------------------------------ the engine thread
    def _finish(self, task: Task, state: TaskState, error: str | None = None) -> None:
        task.state, task.error, task.finished = state, error, time.time()
        if isinstance(task, JobTask):
            task._send(None)
            task._subscribers.clear()  # each subscriber holds its own queue; the task need not keep them
        if task.folder is not None:
            _remove_all_but(task.folder, task.kept_files())
        self._finished.append(task.id)
        while len(self._finished) > self._keep_finished:
            forgotten = self.tasks.pop(self._finished.popleft(), None)
            if forgotten is not None and forgotten.folder is not None:
                shutil.rmtree(forgotten.folder, ignore_errors=True)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                task = self._waiting.popleft()
                task.state, task.started = TaskState.RUNNING, time.time()
                self.running = task
            state, error = TaskState.DONE, None
            try:
                if not task.run(self.pipe):
                    state = TaskState.CANCELLED
            except LiveAvatarError as e:
                state, error = TaskState.FAILED, str(e)
            except Exception as e:  # one failed request must not stop the engine
                log.exception("task %s failed", task.id)
                state, error = TaskState.FAILED, f"{type(e).__name__}: {e}"
            finally:
                if self.pipe.device.type == "cuda":
                    torch.cuda.empty_cache()
            with self._lock:
                self.running = None
                self._finish(task, state, error)


def _remove_all_but(folder: Path, keep: set[Path]) -> None:
    """Deletes everything in `folder` but the files in `keep`, and the folder itself if none of them exists."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
