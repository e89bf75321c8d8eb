"""What every rank runs: the block loop over its own denoising steps, the messages between ranks, and the
denoising ranks' life between jobs.

Two process groups connect the ranks:

* the job group (NCCL on GPUs, gloo on the CPU) carries only latents: one [16, F, h, w] float32 tensor per
  block from each rank to the next, and with it the step's residual stream [1, tokens, dim] float32 where a
  rank's share ends inside a step (point-to-point; no collective ever waits on it);
* the host group (gloo, CPU tensors) carries everything else: the job itself (broadcast by the output
  rank; with several people in the picture it holds their routing mask), one message per block from the
  output rank to every denoising rank (the block's audio features, every person's in multi-person mode,
  and, with the first block of clip 1, the rolling sink frame; or the end of the job), sent ahead of need,
  and each rank's timings when the job ends. Idle denoising ranks wait here for the next job, so an idle
  pipeline has no NCCL operation pending: no watchdog or heartbeat can fire, however long it idles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.distributed as dist

from liveavatar.engine.device_io import BusyClock, busy_summary, peak_memory_gb, synchronize, to_device
from liveavatar.engine.runtime import RuntimeOptions, apply_to_transformer, choose_attention
from liveavatar.engine.steps import StepPart, StepRunner
from liveavatar.engine.stream import StreamSettings
from liveavatar.models.dit import S2VTransformer
from liveavatar.parallel.schedule import Schedule

LATENT_CHANNELS = 16
_END = -1  # block index of the message that ends a job


class RankTransformer:
    """A rank's transformer with the pipeline's runtime options applied, and the shares of streams it runs."""

    def __init__(self, dit: S2VTransformer, options: RuntimeOptions):
        apply_to_transformer(dit, options, dit.device)
        self.dit, self.options = dit, options

    def steps_of(self, text_context, ref_latent, motion_latents, settings: StreamSettings, parts: list[StepPart],
                 cuda_graphs: bool, actor_mask: torch.Tensor | None = None) -> StepRunner:
        """The share of a stream's steps this rank runs: the caches of its steps' layers. cuda_graphs: replay its
        steady steps as CUDA graphs (as the options say), where no other thread of the process uses the GPU
        meanwhile (a capture forbids that). actor_mask: the actors' injection weights of a multi-person stream."""
        options = self.options if cuda_graphs else replace(self.options, cuda_graphs=False)
        steps = StepRunner(self.dit, text_context, ref_latent, motion_latents, settings, options, parts, actor_mask)
        choose_attention(self.dit, options, steps)  # as LiveAvatarPipeline.stream
        return steps


@dataclass
class Job:
    """A stream's conditioning as the output rank broadcasts it (host tensors, computed once there), and the
    cut of the work between the ranks that this stream runs (the output rank may cut again between streams)."""

    settings: StreamSettings
    schedule: Schedule
    text_context: torch.Tensor  # [L, 4096]
    ref_latent: torch.Tensor  # [1, 16, 1, h, w]
    motion_latents: torch.Tensor  # [1, 16, 19, h, w]
    # Several people (multi-person mode): [A, tokens of a block, 1] weights of each actor's audio injection;
    # every block's audio then has A rows.
    actor_mask: torch.Tensor | None = None

    @property
    def num_actors(self) -> int:
        return 1 if self.actor_mask is None else self.actor_mask.shape[0]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One block's latents as they travel between ranks."""
        h, w = self.ref_latent.shape[-2:]
        return (LATENT_CHANNELS, self.settings.latent_frames_per_block, h, w)

    def token_shape(self, dim: int) -> tuple[int, ...]:
        """A step's residual stream for one block, as it travels where a step is split between ranks."""
        _, frames, h, w = self.latent_shape
        return (1, frames * (h // 2) * (w // 2), dim)


@dataclass
class BlockWork:
    """What a denoising rank needs for block k besides its latents."""

    block: int
    audio: torch.Tensor  # [actors, layers, channels, video_frames_per_block] float32, on the host
    new_ref: torch.Tensor | None = None  # the rolling sink frame [1, 16, 1, h, w], with the first block of clip 1


# ---------------------------------------------------------------------------------------------- messages
def send_block_work(work: BlockWork | None, dst: int, group) -> list:
    """Sends a block's message (None: the end of the job) without waiting; returns the pending sends (their
    tensors must stay alive until they are done)."""
    if work is None:
        return [dist.isend(torch.tensor([_END, 0, 0, 0]), dst, group=group)]
    _, layers, channels, _ = work.audio.shape
    header = torch.tensor([work.block, int(work.new_ref is not None), layers, channels])
    pending = [dist.isend(header, dst, group=group), dist.isend(work.audio.contiguous(), dst, group=group)]
    if work.new_ref is not None:
        pending.append(dist.isend(work.new_ref.contiguous(), dst, group=group))
    return pending


def block_work_receiver(src: int, job: Job, device: torch.device, group) -> Callable[[], BlockWork | None]:
    """Takes the output rank's messages in order; None once the job has ended."""
    expected = 0

    def take() -> BlockWork | None:
        nonlocal expected
        header = torch.empty(4, dtype=torch.int64)
        dist.recv(header, src, group=group)
        block, has_ref, layers, channels = header.tolist()
        if block == _END:
            return None
        if block != expected:
            raise RuntimeError(f"the message of block {block} arrived where block {expected} was due")
        expected += 1
        # Pinned, so that the copy to the GPU does not wait for the work already queued there.
        pinned = device.type == "cuda"
        audio = torch.empty(job.num_actors, layers, channels, job.settings.video_frames_per_block, pin_memory=pinned)
        dist.recv(audio, src, group=group)
        new_ref = None
        if has_ref:
            new_ref = torch.empty(job.ref_latent.shape)
            dist.recv(new_ref, src, group=group)
        return BlockWork(block, audio, new_ref)

    return take


class LatentSender:
    """Sends each block's latents (and the residual stream of a step split between ranks) to the next rank
    while this rank goes on with the next block; at most one block is in flight (its tensors must stay
    untouched until it is done)."""

    def __init__(self, dst: int, group):
        self.dst, self.group = dst, group
        self._pending: list = []

    def send(self, x: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        self.flush()
        self._pending = [dist.isend(t.contiguous(), self.dst, group=self.group)
                         for t in (x, tokens) if t is not None]

    def flush(self) -> None:
        for send in self._pending:
            send.wait()
        self._pending = []


def latent_receiver(src: int, shape: tuple[int, ...], token_shape: tuple[int, ...] | None, device: torch.device,
                    group) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    """Receives (latents, residual stream or None) of each block from `src`; token_shape None: latents only."""
    def receive() -> tuple[torch.Tensor, torch.Tensor | None]:
        x = torch.empty(shape, device=device)
        dist.recv(x, src, group=group)
        tokens = None
        if token_shape is not None:
            tokens = torch.empty(token_shape, device=device)
            dist.recv(tokens, src, group=group)
        return x, tokens

    return receive


def receiver_of(schedule: Schedule, rank: int, job: Job, dim: int | None, device: torch.device, group):
    """What `rank` receives from the previous rank for each block (None: rank 0 starts from noise). dim: the
    transformer's width, for a rank that continues a step (None where the rank has no transformer)."""
    previous = schedule.previous(rank)
    if previous is None:
        return None
    token_shape = job.token_shape(dim) if schedule.receives_tokens(rank) else None
    return latent_receiver(previous, job.latent_shape, token_shape, device, group)


# ---------------------------------------------------------------------------------------------- the loop
def run_blocks(
    steps: StepRunner | None,
    take: Callable[[], BlockWork | None],
    receive: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None,
    deliver: Callable[[int, torch.Tensor, torch.Tensor | None], None],
    clock: BusyClock,
) -> float:
    """One rank's share of a job: for every block it is given, take the latents (noise on rank 0, else what
    the previous rank sent, with the residual stream of a step it continues), run this rank's parts of the
    denoising steps (none on a dedicated decode rank: steps None) and deliver the result. Returns the time
    spent prefilling the sink again (ms)."""
    sink_ms = 0.0
    while (work := take()) is not None:
        k = work.block
        if steps is not None and work.new_ref is not None:
            t0 = time.perf_counter()
            steps.replace_sink(work.new_ref)
            synchronize(steps.dit.device)  # once per job, so that the time is the prefill's own
            sink_ms = (time.perf_counter() - t0) * 1000
        if receive is None:
            x, tokens = to_device(steps.noise_for_block(k), steps.dit.device), None
        else:
            x, tokens = receive()
        if steps is not None:
            audio = to_device(work.audio, steps.dit.device)
            clock.start()
            for part in steps.parts:
                x, tokens = steps.denoise_part(k, part, x, tokens, audio)
            clock.stop()
        deliver(k, x, tokens)
    return sink_ms


# ---------------------------------------------------------------------------------------------- a denoising rank
def serve(transformer: RankTransformer, schedule: Schedule, rank: int, job_group, host_group) -> None:
    """A denoising rank's life: wait on the host group for a job, run its share (as the job's schedule cuts
    it), report its timings, until the output rank sends None (shutdown)."""
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=schedule.output_rank, group=host_group)
        job = message[0]
        if job is None:
            return
        stats = run_job_share(transformer, job.schedule, rank, job, job_group, host_group)
        dist.send_object_list([stats], dst=schedule.output_rank, group=host_group)


@torch.no_grad()
def run_job_share(transformer: RankTransformer, schedule: Schedule, rank: int, job: Job, job_group, host_group) -> dict:
    """This denoising rank's part of one job; returns its timings."""
    device = transformer.dit.device
    t0 = time.perf_counter()
    steps = transformer.steps_of(job.text_context, job.ref_latent, job.motion_latents, job.settings,
                                 schedule.parts_of(rank), cuda_graphs=True, actor_mask=job.actor_mask)
    synchronize(device)
    setup_ms = (time.perf_counter() - t0) * 1000
    receive = receiver_of(schedule, rank, job, transformer.dit.config.dim, device, job_group)
    sender = LatentSender(schedule.next(rank), job_group)
    clock = BusyClock(device)
    take = block_work_receiver(schedule.output_rank, job, device, host_group)
    sink_ms = run_blocks(steps, take, receive, lambda k, x, tokens: sender.send(x, tokens), clock)
    sender.flush()
    return {"rank": rank, "role": schedule.describe(rank), "setup_ms": setup_ms, "sink_refill_ms": sink_ms,
            "peak_memory_gb": peak_memory_gb(device), **busy_summary(clock.intervals_ms())}
