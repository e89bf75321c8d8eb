"""Real time: what this machine sustains per (size, steps), and which of them a live session can afford.

A live session keeps up only if it makes video at least as fast as it plays (25 FPS), with some margin for
the host's other work: `REALTIME_FACTOR` x 25 = 27.5 FPS. Whether a (size, steps) does depends on the GPU
and the mode (bf16, FP8, offloading, GPUs, decoder), so it is measured, never assumed:

* a speed table (`SpeedTable`, a JSON file, by default ~/.cache/liveavatar/speed.json) keeps the measured
  FPS per machine (the GPU's name and the mode, `machine_name`), size and step count;
* it is filled from the blocks that jobs and sessions generate (`BlockMeter`: the wall-clock time between
  consecutive blocks of a stream from its steady state on, leaving out every interval in which the stream
  waited for speech) and from the start-up calibration of `serve --realtime` (liveavatar.engine.calibration);
* `choose` (a pure function of such a table) picks the real-time preset: the largest size first, then at
  that size the distilled sampler's step counts the seeds recommend, 4 then 3, whose measured speed reaches
  the factor; `plan_session` applies a live session's request (a size, or real time) and its policy for a
  size that cannot keep up (`ON_SLOW`).

Sizes are pixel budgets ("704*384"): the output keeps the image's aspect, so its pixel count, and the cost,
is about that of the budget whatever the image.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

log = logging.getLogger(__name__)

VIDEO_FPS = 25
REALTIME_FACTOR = 1.1  # a preset must make this many times the video's frame rate
CANDIDATE_SIZES = ("704*384", "688*368", "384*256")  # presets tried by the calibration, largest first
CANDIDATE_STEPS = (4, 3)  # the distilled sampler's step counts, preferred first
# The first blocks of a stream are not its steady state: clip 0 fills the rings, the sink is replaced at
# block 4, and on a GPU the steps' CUDA graphs are captured in blocks 5-8 (docs/benchmarks.md).
STEADY_FROM = 8
MIN_INTERVALS = 3  # a stream measures a speed from this many steady intervals on
WAIT_TOLERANCE_S = 0.005  # an interval in which the stream waited longer for speech is paced, not measured
TABLE_VERSION = 1
SOURCES = ("calibration", "session", "job")  # who measured an entry; a job's muxing runs on its own thread
ON_SLOW = ("downgrade", "refuse", "keep")  # what a live session asks for when its size cannot keep up
HISTORY_WEIGHT = 24  # blocks an entry's earlier measurements weigh at most against a new one

_SIZE = re.compile(r"^\s*(\d+)\s*[*xX]\s*(\d+)\s*$")


def normalize_size(size: str) -> str:
    """ "704x384" -> "704*384" (a table's key); other text unchanged."""
    match = _SIZE.match(str(size))
    return f"{match.group(1)}*{match.group(2)}" if match else str(size)


def size_area(size: str) -> int:
    match = _SIZE.match(str(size))
    if match is None:
        raise ValueError(f"invalid size {size!r}")
    return int(match.group(1)) * int(match.group(2))


def needed_fps(factor: float = REALTIME_FACTOR, video_fps: float = VIDEO_FPS) -> float:
    return round(factor * video_fps, 6)  # 1.1 x 25 is 27.5, not 27.500000000000004


def preference_order(sizes: Iterable[str] = CANDIDATE_SIZES, steps: Iterable[int] = CANDIDATE_STEPS) -> list[tuple[str, int]]:
    """(size, steps) in the order the chooser prefers them: the largest size first, then at each size the step
    counts in the order given (4, then 3)."""
    sizes = sorted({normalize_size(s) for s in sizes}, key=lambda s: (-size_area(s), s))
    steps = list(dict.fromkeys(steps))
    return [(size, n) for size in sizes for n in steps]


def _x(fps: float, video_fps: float) -> str:
    return f"{fps:.1f} FPS ({fps / video_fps:.2f}x real time)"


@dataclass(frozen=True)
class Choice:
    """The real-time preset: `size` and `steps` (None when nothing is measured), the measured `fps`, whether
    it keeps up (reaches the factor), why it was picked, and every candidate with its measured speed."""

    size: str | None
    steps: int | None
    fps: float | None
    keeps_up: bool
    reason: str
    needed_fps: float
    considered: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"size": self.size, "sample_steps": self.steps, "fps": _round(self.fps), "keeps_up": self.keeps_up,
                "needed_fps": _round(self.needed_fps), "reason": self.reason, "considered": list(self.considered)}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def choose(speeds: Mapping[tuple[str, int], float], sizes: Iterable[str] = CANDIDATE_SIZES,
           steps: Iterable[int] = CANDIDATE_STEPS, factor: float = REALTIME_FACTOR,
           video_fps: float = VIDEO_FPS) -> Choice:
    """The real-time preset from a table of measured speeds {(size, steps): FPS}: the first (size, steps) in
    `preference_order` whose speed is at least factor x video_fps. If none is, the fastest measured one (with
    keeps_up False); if none is measured, no size (the caller measures first or falls back)."""
    need = needed_fps(factor, video_fps)
    speeds = {(normalize_size(s), int(n)): float(v) for (s, n), v in speeds.items()}
    considered, notes = [], []
    picked = None
    for size, n in preference_order(sizes, steps):
        fps = speeds.get((size, n))
        keeps = fps is not None and fps >= need
        considered.append({"size": size, "sample_steps": n, "fps": _round(fps), "keeps_up": None if fps is None else keeps})
        if picked is None:
            if keeps:
                picked = (size, n, fps)
            else:
                notes.append(f"{size} at {n} steps: " + ("not measured" if fps is None else _x(fps, video_fps)))
    rule = f"the largest size, then the fewest steps, that makes at least {need:.1f} FPS ({factor:g}x {video_fps:g} FPS)"
    tried = f" ({'; '.join(notes)})" if notes else ""
    if picked is not None:
        size, n, fps = picked
        reason = f"{size} at {n} steps: {_x(fps, video_fps)}, {rule}{' after ' + '; '.join(notes) if notes else ''}"
        return Choice(size, n, fps, True, reason, need, tuple(considered))
    measured = [(v, s, n) for (s, n), v in speeds.items() if (s, n) in {(c["size"], c["sample_steps"]) for c in considered}]
    if measured:
        fps, size, n = max(measured)
        reason = (f"no candidate keeps up ({rule}){tried}; the fastest measured is {size} at {n} steps: "
                  f"{_x(fps, video_fps)}: a live session will fall behind and catch up by dropping silence")
        return Choice(size, n, fps, False, reason, need, tuple(considered))
    return Choice(None, None, None, False, f"nothing measured yet on this machine{tried}", need, tuple(considered))


@dataclass(frozen=True)
class Verdict:
    """Whether one (size, steps) keeps up: True, False, or None when it is not measured."""

    size: str
    steps: int
    fps: float | None
    keeps_up: bool | None


def verdict(speeds: Mapping[tuple[str, int], float], size: str, steps: int, factor: float = REALTIME_FACTOR,
            video_fps: float = VIDEO_FPS) -> Verdict:
    size = normalize_size(size)
    fps = speeds.get((size, int(steps)))
    return Verdict(size, int(steps), fps, None if fps is None else fps >= needed_fps(factor, video_fps))


@dataclass(frozen=True)
class SessionPlan:
    """What a live session runs: `size`/`steps` (None: real time, resolved when the session starts because
    nothing is measured yet), or `refused` (why, with the numbers); `message` tells the client what was
    picked or changed (a JSON event: {"type": "realtime" | "downgrade", ...})."""

    size: str | None
    steps: int | None
    refused: str | None = None
    message: dict | None = None


def plan_session(speeds: Mapping[tuple[str, int], float], size: str | None, steps: int, realtime: bool, on_slow: str,
                 sizes: Iterable[str] = CANDIDATE_SIZES, steps_options: Iterable[int] = CANDIDATE_STEPS,
                 factor: float = REALTIME_FACTOR, video_fps: float = VIDEO_FPS) -> SessionPlan:
    """A live session's request against the measured speeds.

    realtime (or size "auto"): the real-time preset (`choose`). Otherwise the requested (size, steps) runs if
    it keeps up or is not measured; if it is measured too slow, `on_slow` decides: "refuse" (refused, with
    the numbers and the preset to ask for), "downgrade" (the real-time preset, with a message; the request
    stays if nothing measured is faster), "keep" (the request, lag and all)."""
    if on_slow not in ON_SLOW:
        raise ValueError(f"on_slow must be one of {', '.join(ON_SLOW)}, not {on_slow!r}")
    steps_options = tuple(steps_options)
    if realtime or size is None or str(size).strip().lower() == "auto":
        choice = choose(speeds, sizes, steps_options, factor, video_fps)
        if choice.size is None:
            return SessionPlan(None, None, message={"type": "realtime", "size": None, "reason": choice.reason +
                                                    "; the size is picked when the session starts"})
        return SessionPlan(choice.size, choice.steps, message={"type": "realtime", **_brief(choice)})
    size = normalize_size(size)
    v = verdict(speeds, size, steps, factor, video_fps)
    if v.keeps_up is not False or on_slow == "keep":
        return SessionPlan(size, steps)
    need = needed_fps(factor, video_fps)
    choice = choose(speeds, sizes, steps_options, factor, video_fps)
    numbers = (f"{size} at {steps} steps makes {v.fps:.1f} FPS on this machine, below the {need:.1f} FPS a live "
               f"session needs to keep up ({factor:g}x {video_fps:g} FPS)")
    if on_slow == "refuse":
        if choice.size is not None and choice.keeps_up:
            hint = f"; the real-time preset here is {choice.size} at {choice.steps} steps ({choice.fps:.1f} FPS)"
        else:
            hint = "; no measured size keeps up here" + (f" (the fastest is {choice.size} at {choice.steps} steps, "
                                                         f"{choice.fps:.1f} FPS)" if choice.size else "")
        return SessionPlan(None, None, refused=f"{numbers}{hint}: ask for it, or for on_slow=downgrade")
    if choice.size is None or choice.fps <= v.fps:
        return SessionPlan(size, steps, message={"type": "downgrade", "size": size, "sample_steps": steps,
                                                 "requested": {"size": size, "sample_steps": steps, "fps": _round(v.fps)},
                                                 "reason": f"{numbers}; nothing measured is faster, so it stays"})
    return SessionPlan(choice.size, choice.steps, message={
        "type": "downgrade", **_brief(choice), "requested": {"size": size, "sample_steps": steps, "fps": _round(v.fps)},
        "reason": f"{numbers}; downgraded to {choice.size} at {choice.steps} steps ({choice.fps:.1f} FPS)"})


def _brief(choice: Choice) -> dict:
    return {"size": choice.size, "sample_steps": choice.steps, "fps": _round(choice.fps), "keeps_up": choice.keeps_up,
            "reason": choice.reason}


def next_rung(speeds: Mapping[tuple[str, int], float], size: str, steps: int, sizes: Iterable[str] = CANDIDATE_SIZES,
              steps_options: Iterable[int] = CANDIDATE_STEPS, factor: float = REALTIME_FACTOR,
              video_fps: float = VIDEO_FPS, allowed: Callable[[str, int], bool] | None = None) -> tuple[str, int] | None:
    """Where a live session that falls behind at (size, steps) steps down to: among the candidates that cost
    less (pixels x steps) and are `allowed`, the first in preference order measured to keep up, else the first
    one measured faster than the current, else the first that costs less. None: nothing cheaper."""
    size = normalize_size(size)
    cost = size_area(size) * steps
    current = speeds.get((size, steps))
    cheaper = [(s, n) for s, n in preference_order(sizes, steps_options)
               if size_area(s) * n < cost and (allowed is None or allowed(s, n))]
    if not cheaper:
        return None
    need = needed_fps(factor, video_fps)
    for rung in cheaper:
        if speeds.get(rung, 0.0) >= need:
            return rung
    if current is not None:
        for rung in cheaper:
            if speeds.get(rung, 0.0) > current:
                return rung
    return cheaper[0]


# ---------------------------------------------------------------------------------------------- measuring
class BlockMeter:
    """The sustained speed of one stream: video frames over the wall-clock time between consecutive blocks,
    from block `steady_from` on, leaving out each interval in which the stream waited for speech (a live
    session paced by its speaker shows the speaker's pace, not the machine's)."""

    def __init__(self, steady_from: int = STEADY_FROM, clock: Callable[[], float] = time.perf_counter):
        self.steady_from = steady_from
        self.clock = clock
        self.frames = 0
        self.seconds = 0.0
        self.intervals = 0
        self._last: tuple[int, float] | None = None

    def block(self, index: int, frames: int, waited_s: float = 0.0, now: float | None = None) -> None:
        """Block `index` (of its stream) with `frames` frames is ready `now`; the stream waited `waited_s` for
        speech since the previous block."""
        now = self.clock() if now is None else now
        last, self._last = self._last, (index, now)
        if last is None or last[0] != index - 1 or index <= self.steady_from or waited_s > WAIT_TOLERANCE_S:
            return
        self.frames += frames
        self.seconds += now - last[1]
        self.intervals += 1

    @property
    def fps(self) -> float | None:
        if self.intervals < MIN_INTERVALS or self.seconds <= 0:
            return None
        return self.frames / self.seconds


# ---------------------------------------------------------------------------------------------- the table
def default_table_path() -> Path:
    """$LIVEAVATAR_SPEED_TABLE, else liveavatar/speed.json in the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("LIVEAVATAR_SPEED_TABLE"):
        return Path(os.environ["LIVEAVATAR_SPEED_TABLE"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "liveavatar" / "speed.json"


def machine_name(pipe) -> str:
    """What a measured speed holds for: the device (the GPU's name, or the CPU with its thread count) and the
    mode that changes the speed (dtype, FP8, offloading, GPUs, decoder, compiled)."""
    import torch

    device = pipe.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"{device.type} {platform.machine()} ({torch.get_num_threads()} threads)"
    parts = []
    dit = getattr(pipe, "dit", None)
    if dit is not None:
        parts.append(str(getattr(dit, "dtype", "")).replace("torch.", ""))
        if any(type(m).__name__ == "FP8Linear" for m in dit.modules()):
            parts.append("fp8")
        if getattr(dit, "block_streamer", None) is not None:
            parts.append("offload")
    schedule = getattr(pipe, "schedule", None)
    if schedule is not None and getattr(schedule, "world_size", 1) > 1:
        parts.append(f"gpus={schedule.world_size}")
    decoder = getattr(pipe, "decoder_name", None)
    if decoder:
        parts.append(f"decoder={decoder}")
    if getattr(pipe, "fast", False):
        parts.append("compiled")
    return f"{name} | {' '.join(p for p in parts if p) or 'default'}"


class SpeedTable:
    """Measured FPS per machine, size and step count, in a JSON file shared by every run on this computer
    (None: in memory only). One table object serves one machine; it is thread-safe and each write merges with
    what other processes wrote meanwhile.

        {"version": 1, "machines": {"NVIDIA H100 80GB HBM3 | bfloat16 fp8 compiled":
            {"704*384": {"4": {"fps": 13.2, "blocks": 7, "source": "calibration", "updated": "2026-12-06T10:00:00"}}}}}
    """

    def __init__(self, path: str | Path | None, machine: str):
        self.path = Path(path) if path is not None else None
        self.machine = machine
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, dict]] = self._read().get(machine, {})

    def _read(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != TABLE_VERSION or not isinstance(data.get("machines"), dict):
                raise ValueError(f"not a version {TABLE_VERSION} speed table")
            return data["machines"]
        except (OSError, ValueError, AttributeError) as e:
            log.warning("speed table %s not read (%s): starting an empty one", self.path, e)
            return {}

    def speeds(self) -> dict[tuple[str, int], float]:
        with self._lock:
            return {(size, int(n)): e["fps"] for size, by_steps in self._entries.items() for n, e in by_steps.items()}

    def entries(self) -> list[dict]:
        """Every entry of this machine, largest size first."""
        with self._lock:
            rows = [{"size": size, "sample_steps": int(n), **e} for size, by_steps in self._entries.items()
                    for n, e in by_steps.items()]
        return sorted(rows, key=lambda r: (-size_area(r["size"]), -r["sample_steps"]))

    def record(self, size: str, steps: int, fps: float, blocks: int, source: str) -> dict:
        """Adds a measurement. A calibration replaces the entry; a session's merges with it (earlier ones weigh
        at most HISTORY_WEIGHT blocks); a job's (its muxing runs beside the stream, a session's does not) only
        fills an entry no session or calibration measured, and is kept beside one as `job_fps`."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        size = normalize_size(size)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        with self._lock:
            # Merge with what other processes wrote since this table was read.
            self._entries = {**self._entries, **self._read().get(self.machine, {})} if self.path else self._entries
            by_steps = self._entries.setdefault(size, {})
            old = by_steps.get(str(steps))
            if source == "job" and old is not None and old.get("source") != "job":
                entry = {**old, "job_fps": round(fps, 3)}
            elif old is None or source == "calibration" or old.get("source") != source and old.get("source") == "job":
                entry = {"fps": round(fps, 3), "blocks": blocks, "source": source, "updated": now}
            else:
                weight = min(old.get("blocks", 1), HISTORY_WEIGHT)
                merged = (old["fps"] * weight + fps * blocks) / (weight + blocks)
                entry = {**old, "fps": round(merged, 3), "blocks": old.get("blocks", 0) + blocks, "updated": now}
            by_steps[str(steps)] = entry
            self._write()
            return dict(entry)

    def _write(self) -> None:
        if self.path is None:
            return
        machines = self._read()
        machines[self.machine] = self._entries
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": TABLE_VERSION, "machines": machines}, indent=1))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache costs the persistence, not the service
            log.warning("speed table %s not written: %s", self.path, e)


# ---------------------------------------------------------------------------------------------- the service's view
@dataclass
class Calibration:
    state: str = "off"  # off (not asked for), queued, running, done, failed
    measured: list[dict] = field(default_factory=list)
    error: str | None = None
    log: list[str] = field(default_factory=list)


class Realtime:
    """A service's real-time knowledge: the speed table of its machine, the candidates, the chooser, the
    calibration's state; what `/capabilities`, `/health`, the app and live sessions read."""

    def __init__(self, table: SpeedTable, sizes: Iterable[str] = CANDIDATE_SIZES, steps: Iterable[int] = CANDIDATE_STEPS,
                 factor: float = REALTIME_FACTOR, video_fps: float = VIDEO_FPS, default: bool = False,
                 fixed_steps: int | None = None):
        """default: live sessions that name no size run the real-time preset (`serve --realtime`). fixed_steps:
        the one step count the pipeline runs (several GPUs), the only candidate step count then."""
        self.table = table
        self.sizes = tuple(normalize_size(s) for s in sizes)
        self.steps = (fixed_steps,) if fixed_steps is not None else tuple(steps)
        self.factor, self.video_fps = factor, video_fps
        self.default = default
        self.calibration = Calibration()
        self.warm_sizes: set[str] = set()  # sizes a stream ran at in this process (compiled, on a GPU)

    @property
    def needed_fps(self) -> float:
        return needed_fps(self.factor, self.video_fps)

    def speeds(self) -> dict[tuple[str, int], float]:
        return self.table.speeds()

    def choice(self) -> Choice:
        return choose(self.speeds(), self.sizes, self.steps, self.factor, self.video_fps)

    def plan(self, size: str | None, steps: int, realtime: bool, on_slow: str) -> SessionPlan:
        return plan_session(self.speeds(), size, steps, realtime, on_slow, self.sizes, self.steps, self.factor,
                            self.video_fps)

    def next_rung(self, size: str, steps: int, warm_only: bool = False) -> tuple[str, int] | None:
        """next_rung over this service's candidates; warm_only: only sizes already run in this process (on a
        GPU a new size compiles for about a minute, which a session that is behind cannot afford)."""
        allowed = (lambda s, n: s in self.warm_sizes or s == normalize_size(size)) if warm_only else None
        return next_rung(self.speeds(), size, steps, self.sizes, self.steps, self.factor, self.video_fps, allowed)

    def record(self, size: str, steps: int, meter: BlockMeter, source: str) -> dict | None:
        """Records a stream's speed if it measured one."""
        fps = meter.fps
        if fps is None:
            return None
        entry = self.table.record(size, steps, fps, meter.intervals, source)
        log.info("measured %s at %d steps: %.2f FPS over %d blocks (%s); table: %.2f FPS", size, steps, fps,
                 meter.intervals, source, entry.get("fps", fps))
        return entry

    def summary(self) -> dict:
        """For /health: the preset and the calibration's state."""
        choice = self.choice()
        return {"size": choice.size, "sample_steps": choice.steps, "fps": _round(choice.fps),
                "keeps_up": choice.keeps_up, "calibration": self.calibration.state}

    def capabilities(self) -> dict:
        rows = []
        for row in self.table.entries():
            rows.append({**row, "realtime_factor": round(row["fps"] / self.video_fps, 3),
                         "keeps_up": row["fps"] >= self.needed_fps})
        c = self.calibration
        return {
            "machine": self.table.machine, "video_fps": self.video_fps, "realtime_factor": self.factor,
            "needed_fps": round(self.needed_fps, 2), "candidates": {"sizes": list(self.sizes), "sample_steps": list(self.steps)},
            "speeds": rows, "realtime": self.choice().to_dict(), "sessions_default_to_realtime": self.default,
            "calibration": {"state": c.state, "measured": list(c.measured), "error": c.error},
            "speed_table": str(self.table.path) if self.table.path else None,
        }


def describe_speeds(realtime: Realtime) -> str:
    """A few lines for the app's page and the log: the preset and the measured speeds."""
    choice = realtime.choice()
    lines = [f"**Real time on this machine** ({realtime.table.machine}): needs {realtime.needed_fps:.1f} FPS "
             f"({realtime.factor:g}x {realtime.video_fps:g})."]
    if choice.size is None:
        lines.append(f"Nothing measured yet (calibration: {realtime.calibration.state}).")
    else:
        verdict_text = "keeps up" if choice.keeps_up else "does not keep up"
        lines.append(f"Preset: **{choice.size} at {choice.steps} steps**, {choice.fps:.1f} FPS ({verdict_text}).")
    for row in realtime.table.entries():
        lines.append(f"- {row['size']}, {row['sample_steps']} steps: {row['fps']:.1f} FPS "
                     f"({row['fps'] / realtime.video_fps:.2f}x real time; {row['source']}, {row['updated']})")
    return "\n".join(lines)
