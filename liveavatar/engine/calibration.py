"""Start-up calibration: how fast this machine runs a live session at each real-time candidate.

`serve --realtime` (and `app --realtime`) queue a `CalibrationTask` before any request: for each candidate
(size, steps) the speed table does not hold yet for this machine, in the chooser's order (largest size first,
4 steps then 3), it runs a real live session on a synthetic input (a drawn face, a buzzing tone pushed ahead
so that nothing waits for speech) for `CALIBRATION_BLOCKS` blocks and records its steady speed: the same
work per block as a session (speech features, the steps, the decode, the muxing), measured from block
`STEADY_FROM` on. It stops at the first candidate that keeps up: that is the preset the chooser picks.

On a GPU each new size compiles first (about a minute with the fast path), so the candidates are few (three
sizes x two step counts) and a table entry, once measured, is reused by later starts on the same kind of GPU.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from liveavatar.engine.live import SAMPLE_RATE, BlockPublished, LiveSession, SessionOptions
from liveavatar.engine.realtime import STEADY_FROM, Realtime, preference_order
from liveavatar.engine.worker import Task

log = logging.getLogger(__name__)

CALIBRATION_BLOCKS = STEADY_FROM + 8  # 7 measured intervals after the warm-up (ring, sink, CUDA graphs)
BLOCK_SECONDS = 0.48


def synthetic_image(path: Path, size: int = 512) -> Path:
    """A drawn face (the content does not change the speed, only the size does)."""
    img = Image.new("RGB", (size, size), (70, 110, 160))
    draw = ImageDraw.Draw(img)
    s = size
    draw.ellipse((s * 0.25, s * 0.15, s * 0.75, s * 0.8), fill=(225, 185, 150))
    for x in (0.38, 0.62):
        draw.ellipse((s * (x - 0.04), s * 0.38, s * (x + 0.04), s * 0.44), fill=(40, 40, 40))
    draw.rectangle((s * 0.42, s * 0.62, s * 0.58, s * 0.65), fill=(150, 60, 60))
    img.save(path)
    return path


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-sounding buzz (harmonics of 140 Hz with a syllable-rate envelope and a little noise), never silent."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * 140 * h * t) / h for h in range(1, 8))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(seed).normal(0, 0.02, len(t))
    return (0.15 * voice * envelope + noise).astype(np.float32)


def measure(pipe, realtime: Realtime, size: str, steps: int, blocks: int = CALIBRATION_BLOCKS,
            steady_from: int = STEADY_FROM, image: Path | None = None) -> float | None:
    """Runs one calibration session at (size, steps) and returns the speed it recorded (None: too few blocks)."""
    with tempfile.TemporaryDirectory(prefix="liveavatar-calibration-") as folder:
        image = image or synthetic_image(Path(folder) / "face.png")
        options = SessionOptions(image, "A person is talking to the camera.", size, steps, on_slow="keep",
                                 max_lag_s=None, measure_as="calibration", steady_from=steady_from)
        session = LiveSession(options, realtime)
        # Speech for every block and one more, pushed at once: no block waits for it.
        session.push(synthetic_speech((blocks + 1) * BLOCK_SECONDS))

        def count(event):
            if isinstance(event, BlockPublished) and event.info.index >= blocks - 1:
                session.close()

        session.subscribe(count)
        t0 = time.perf_counter()
        session.run(pipe)
        fps = dict(session.speeds_measured).get((size, steps))
        log.info("calibration: %s at %d steps took %.1f s for %d blocks", size, steps, time.perf_counter() - t0, blocks)
        del session, count
        _release(pipe)
        return fps


def _release(pipe) -> None:
    """Frees what a finished stream held before the next one allocates (its caches, at up to the largest size)."""
    import gc

    import torch

    gc.collect()
    if pipe.device.type == "cuda":
        torch.cuda.empty_cache()


def calibrate(pipe, realtime: Realtime, redo: bool = False, blocks: int = CALIBRATION_BLOCKS,
              steady_from: int = STEADY_FROM, stop_when_found: bool = True) -> list[dict]:
    """Measures the candidates the table lacks (all with `redo`) in the chooser's order, stopping at the first
    that keeps up; logs the preset it leads to, and why. Returns what it measured."""
    state = realtime.calibration
    state.state, state.error = "running", None
    measured = []
    try:
        order = preference_order(realtime.sizes, realtime.steps)
        log.info("real-time calibration: up to %d candidates (%s), %d blocks each on a synthetic input; on a GPU each "
                 "new size compiles first (about a minute)", len(order), ", ".join(f"{s}/{n}" for s, n in order), blocks)
        for size, steps in order:
            known = realtime.speeds().get((size, steps))
            if known is None or redo:
                log.info("calibrating %s at %d steps", size, steps)
                fps = measure(pipe, realtime, size, steps, blocks, steady_from)
                entry = {"size": size, "sample_steps": steps, "fps": None if fps is None else round(fps, 3)}
                measured.append(entry)
                state.measured.append(entry)
                state.log.append(f"{size} at {steps} steps: " + ("too few blocks to measure" if fps is None else
                                                                 f"{fps:.2f} FPS"))
                known = fps
            if stop_when_found and known is not None and known >= realtime.needed_fps:
                break
        state.state = "done"
    except Exception as e:
        state.state, state.error = "failed", f"{type(e).__name__}: {e}"
        log.exception("real-time calibration failed")
        raise
    choice = realtime.choice()
    if choice.size is None:
        log.warning("real-time preset: none (%s)", choice.reason)
    else:
        log.info("real-time preset: %s at %d steps (%s)", choice.size, choice.steps, choice.reason)
    return measured


class CalibrationTask(Task):
    """The calibration as the engine's first task (the engine thread owns the model)."""

    def __init__(self, realtime: Realtime, redo: bool = False, blocks: int = CALIBRATION_BLOCKS,
                 steady_from: int = STEADY_FROM):
        super().__init__(kind="calibration")
        self.realtime, self.redo, self.blocks, self.steady_from = realtime, redo, blocks, steady_from
        realtime.calibration.state = "queued"

    def run(self, pipe) -> bool:
        calibrate(pipe, self.realtime, self.redo, self.blocks, self.steady_from)
        return True
