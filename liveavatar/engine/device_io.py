"""Moving tensors between the host and the device without making the host wait, and timing device work
without making the host wait: what the single-process stream and the ranks of the multi-device pipeline share.

On a GPU the copies go through pinned host memory and the clocks are CUDA events read once the work is done;
on the CPU, where everything is synchronous, the copies are no-ops and the clocks read the wall clock.
"""

from __future__ import annotations

import time

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without making the host wait for the work queued there (from pinned memory); t itself
    where it is on `device` already."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts the copy of a device tensor into pinned host memory: valid once the current stream gets there,
    so the host need not wait here. A CPU tensor comes back as it is (contiguous)."""
    if t.device.type == "cpu":
        return t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [1, 3, n, H, W] in [-1, 1] -> [n, H, W, 3] uint8 on the same device, with the arithmetic of
    liveavatar.media.video.frames_to_uint8 (float32 (x+1)/2*255, truncated), so the GPU ships 4x fewer bytes."""
    x = video[0].to(torch.float32).clamp(-1, 1)
    return ((x + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def synchronize(device: torch.device) -> None:
    """Waits for the device's work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    """The allocator's peak on this GPU so far (models, caches and activations; 0 on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _mark(cuda: bool):
    """A point in time: a CUDA event recorded on the current stream, or the wall clock."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed_ms(start, end, cuda: bool) -> float:
    if not cuda:
        return (end - start) * 1000
    end.synchronize()
    return start.elapsed_time(end)


class StageClock:
    """Durations of one block's named stages (`with clock.stage("decode"): ...`), read once the block is done."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, tuple] = {}

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)

    def read(self) -> dict[str, float]:
        """ms per stage (waits for the GPU to reach the last mark)."""
        return {name: _elapsed_ms(start, end, self.cuda) for name, (start, end) in self.marks.items()}


class _Stage:
    def __init__(self, clock: StageClock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        self.start = _mark(self.clock.cuda)

    def __exit__(self, *exc):
        self.clock.marks[self.name] = (self.start, _mark(self.clock.cuda))


class BusyClock:
    """When a rank's stage was busy, for its stage time and idle fraction. Clocks that share an origin can be
    read together."""

    def __init__(self, device: torch.device, origin=None):
        self.cuda = device.type == "cuda"
        self.origin = _mark(self.cuda) if origin is None else origin
        self._marks: list[tuple] = []
        self._start = None

    def start(self) -> None:
        self._start = _mark(self.cuda)

    def stop(self) -> None:
        self._marks.append((self._start, _mark(self.cuda)))

    def intervals_ms(self) -> list[tuple[float, float]]:
        """The busy intervals, in ms since the origin (waits for the GPU to reach them)."""
        return [(_elapsed_ms(self.origin, a, self.cuda), _elapsed_ms(self.origin, b, self.cuda))
                for a, b in self._marks]


def busy_summary(intervals: list[tuple[float, float]], blocks: int | None = None) -> dict:
    """stage_ms: mean busy time per block; idle_fraction: the share of the time from the first start to the
    last end that the stage waited (for latents from upstream, or for downstream to take them)."""
    if not intervals:
        return {"blocks": 0, "stage_ms": 0.0, "idle_fraction": 0.0}
    blocks = len(intervals) if blocks is None else blocks
    busy = sum(b - a for a, b in intervals)
    span = max(b for _, b in intervals) - min(a for a, _ in intervals)
    return {"blocks": blocks, "stage_ms": busy / blocks, "idle_fraction": max(0.0, 1 - busy / span) if span > 0 else 0.0}
