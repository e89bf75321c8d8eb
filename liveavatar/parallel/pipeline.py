"""The output rank: conditioning, job dispatch, its own denoising steps (if any), decoding and the video.

`ParallelPipeline` is a `LiveAvatarPipeline` whose streams run across all ranks, so whatever drives one GPU
(`run_job`, and with it the command line, the web UI, the server and live sessions) drives the ranks alike:

    pipe = start_pipeline(CheckpointModels("ckpt"), world_size=2)     # liveavatar.parallel.launch
    cond = pipe.prepare("face.png", wave, "A person talking")         # the encoders run here, once
    for block in pipe.stream(cond, StreamSettings(seed=42)).blocks(cond.num_clips):
        show(block.frames)
    pipe.close()

A stream runs three threads on this rank:
* the feeder takes each block's audio features from the audio source, in block order (a live source makes
  it wait for the speech), and sends them to every denoising rank up to LOOKAHEAD blocks ahead of need;
  the first block of clip 1 also carries the rolling sink frame, the first latent frame of block 0;
* the stage thread first sets up this rank's caches (when it also denoises) and warms the decoder up, while
  the other ranks already denoise the first block; then it receives each block's latents from the previous
  rank, runs this rank's own share of the steps, and enqueues the decode and the copy of the frames to the
  host right behind them, on the same CUDA stream: steps and decode share the GPU back to back rather than
  concurrently (concurrent they contend and the pair gets slower), and the block's frames are never queued
  behind the next block's steps; the thread goes on with the next block without waiting for the GPU;
* the caller's thread waits for each block's frames on the host and yields them, while later blocks are
  denoised and decoded.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from typing import Iterator

import torch
import torch.distributed as dist

from liveavatar.engine.device_io import BusyClock, busy_summary, peak_memory_gb, synchronize, to_host, to_uint8_frames
from liveavatar.engine.pipeline import Conditioning, LiveAvatarPipeline
from liveavatar.engine.runtime import RuntimeOptions
from liveavatar.engine.stream import Block, StreamSettings, decode_video, start_decoder, total_blocks
from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.models.audio_encoder import AudioEncoder
from liveavatar.models.taehv import TinyDecoder
from liveavatar.models.text_encoder import TextEncoder
from liveavatar.models.vae import WanVAE
from liveavatar.parallel.schedule import Schedule
from liveavatar.parallel.worker import BlockWork, Job, RankTransformer, receiver_of, run_blocks, send_block_work

log = logging.getLogger(__name__)

LOOKAHEAD = 8  # blocks whose messages may be out before rank 0 takes them (two clips; more for longer pipelines)
DECODE_QUEUE = 2  # decoded blocks the caller has not taken yet; beyond this the pipeline waits (bounded memory)
POLL_S = 0.5  # how often a waiting thread checks that the others (and the other ranks) are alive


class RankFailed(LiveAvatarError):
    """Another rank of the pipeline exited; the pipeline must be started again."""


class _Lane:
    """A daemon thread that runs one task at a time for as long as the pipeline lives. Every stream's feeder
    and stage run on the same two lanes, so per-thread GPU state outlives a stream: cuDNN's attention plans,
    for one, are cached per thread, and a new thread per stream would build them again for every stream."""

    def __init__(self, name: str):
        self._tasks: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, task, *args) -> threading.Event:
        """Runs task(*args) after the tasks before it (it must handle its own errors); the event is set when done."""
        done = threading.Event()
        self._tasks.put((task, args, done))
        return done

    def stop(self) -> None:
        self._tasks.put(None)

    def _run(self) -> None:
        while (item := self._tasks.get()) is not None:
            task, args, done = item
            try:
                task(*args)
            finally:
                done.set()


class ParallelPipeline(LiveAvatarPipeline):
    """The output rank's pipeline: encoders and VAE (and the light decoder, if chosen) here, the transformer here
    only if this rank also denoises. Built by `liveavatar.parallel.launch.start_pipeline`, which starts the
    other ranks."""

    def __init__(self, transformer: RankTransformer | None, vae: WanVAE, text_encoder: TextEncoder | None,
                 audio_encoder: AudioEncoder | None, schedule: Schedule, job_group, host_group, processes,
                 options: RuntimeOptions = RuntimeOptions(), recut: bool = False,
                 tiny_decoder: TinyDecoder | None = None):
        dit = None if transformer is None else transformer.dit
        super().__init__(dit, vae, text_encoder, audio_encoder, options, tiny_decoder)
        self.transformer = transformer
        self.schedule, self.job_group, self.host_group = schedule, job_group, host_group
        # Cut the work again after each stream from the stage times measured in it (not when this rank holds no
        # transformer: a cut that gave it layers could not run).
        self.recut = recut and transformer is not None
        self.processes = processes  # the other ranks (multiprocessing.Process), for liveness checks
        self._lock = threading.Lock()
        self._active: ParallelStream | None = None  # the ranks run one stream at a time
        self.broken: str | None = None
        self.lanes = {"feed": _Lane("liveavatar-feed"), "stage": _Lane("liveavatar-stage")}

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def fixed_sample_steps(self) -> int:
        return self.schedule.steps

    def stream(self, cond: Conditioning, settings: StreamSettings = StreamSettings()) -> ParallelStream:
        """Starts a job on all ranks (they set up their caches while the caller goes on). A stream whose
        blocks() never ran is ended first."""
        if settings.sample_steps != self.schedule.steps:
            raise InputError(f"sample_steps {settings.sample_steps}: this multi-GPU pipeline was started for "
                             f"{self.schedule.steps} steps")
        self.decoder_for(settings.decoder)  # refused here, before the ranks are sent the job
        with self._lock:
            self.check_ranks()
            if self._active is not None:
                self._active.close()
            self._active = ParallelStream(self, cond, settings)
            return self._active

    def cut_from(self, rank_stats: list[dict], min_blocks: int) -> None:
        """Cuts the work of the next streams with the decode's cost measured in the last one: the output rank's
        decode time per block over the time of one denoising step (all ranks' busy denoising time per block,
        over the steps). A stream of fewer than min_blocks blocks (a clip) is too short to go by."""
        out = rank_stats[-1]
        denoise_ms = sum(r["stage_ms"] for r in rank_stats[:-1]) + out["denoise_ms"]
        if out["blocks"] < min_blocks or denoise_ms <= 0 or out["decode_ms"] <= 0:
            return
        s = self.schedule
        decode_cost = round(out["decode_ms"] / (denoise_ms / s.steps), 3)
        if decode_cost != s.decode_cost:
            self.schedule = Schedule(s.world_size, s.steps, s.num_layers, decode_cost)
            log.info("next streams cut for a decode of %.2f steps (measured): %s", decode_cost,
                     "; ".join(f"rank {r}: {self.schedule.describe(r)}" for r in range(s.world_size)))

    def check_ranks(self) -> None:
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                self.broken = f"rank {rank} exited with code {process.exitcode}"
        if self.broken:
            raise RankFailed(f"the multi-GPU pipeline is broken ({self.broken}); start it again")

    def close(self) -> None:
        """Stops the other ranks (they are waiting for a job) and leaves the process group."""
        with self._lock:
            if self._active is not None and self.broken is None:
                self._active.close()
            if self.broken is None and self.schedule.world_size > 1:
                dist.broadcast_object_list([None], src=self.schedule.output_rank, group=self.host_group)
        for lane in self.lanes.values():
            lane.stop()
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()


class ParallelStream:
    """One job across the ranks, iterated like an AvatarStream (the same blocks, the same numbers)."""

    resumable = False  # its caches live in other processes; state_dict() cannot capture them

    def __init__(self, pipe: ParallelPipeline, cond: Conditioning, settings: StreamSettings):
        self.pipe, self.cond, self.settings, self.schedule = pipe, cond, settings, pipe.schedule
        self.rank = self.schedule.output_rank
        self.next_block = 0
        self.frames_emitted = 0
        self.rank_stats: list[dict] = []  # per rank, once the stream has ended
        device = pipe.vae.device
        self._cuda = device.type == "cuda"
        self._streams = {name: torch.cuda.Stream(device) for name in ("feed", "stage")} if self._cuda else {}

        actor_mask = cond.actor_weights(settings.latent_frames_per_block)
        job = Job(settings, self.schedule, cond.text_context.float().cpu(), cond.ref_latent.float().cpu(),
                  cond.motion_latents.float().cpu(), None if actor_mask is None else actor_mask.cpu())
        self._job = job
        if self.schedule.world_size > 1:
            dist.broadcast_object_list([job], src=self.rank, group=pipe.host_group)
        if self._cuda:  # the stage thread's work comes after the conditioning made on the caller's stream
            self._streams["stage"].wait_stream(torch.cuda.current_stream(device))
        # Made on the stage thread when the blocks start (_set_up): this rank's caches and the decoder's warm-up
        # then overlap the first block's steps on the other ranks instead of delaying them.
        self._part = None
        self._decoder = None
        self._setup_ms = 0.0

        self._lookahead = max(LOOKAHEAD, 2 * self.schedule.world_size)  # every rank has work queued
        self._feed_queue: queue.Queue = queue.Queue(maxsize=self._lookahead)  # this rank's own block messages
        self._decode_queue: queue.Queue = queue.Queue(maxsize=DECODE_QUEUE)
        self._cancelled = threading.Event()
        self._block0_final = threading.Event()
        self._new_ref: torch.Tensor | None = None
        self._failure: BaseException | None = None  # an error of this rank's threads: the pipeline is broken
        self._audio_error: BaseException | None = None  # the audio source ended the stream early
        self._running: dict[str, threading.Event] = {}  # the feeder and the stage of this stream, until they end
        self._done = False

    # ------------------------------------------------------------------ the caller's thread: frames out
    def blocks(self, num_clips: int, num_blocks: int | None = None) -> Iterator[Block]:
        """As AvatarStream.blocks: up to num_clips clips, or num_blocks blocks if that comes first."""
        s = self.settings
        total = total_blocks(s, num_clips, num_blocks)
        self._start(total)
        try:
            while self.next_block < total:
                t0 = time.perf_counter()
                item = self._take()
                if item is None:  # the feeder stopped before the last block
                    raise self._audio_error or RuntimeError("the stream ended before its last block")
                k, frames, latents, ready = item
                if ready is not None:
                    ready.synchronize()
                timings = {"wait": (time.perf_counter() - t0) * 1000}
                block = Block(k, k // s.blocks_per_clip, latents, frames, self.frames_emitted, timings)
                self.next_block += 1
                self.frames_emitted += len(frames)
                yield block
        except BaseException:
            self._finish()
            raise
        self._finish()
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Ends a stream whose blocks() never ran (the other ranks are told the job has no blocks)."""
        if not self._running:
            self._start(0)
            self._finish()
        elif not self._done:
            raise LiveAvatarError("the multi-GPU pipeline is running another stream")

    def _start(self, total: int) -> None:
        if self._running:
            raise LiveAvatarError("a multi-GPU stream runs once; make a new one with pipe.stream()")
        with self._on(self._streams.get("stage")):  # the caller's thread may have another current device
            self._stage_clock = BusyClock(self.pipe.vae.device)
            self._decode_clock = BusyClock(self.pipe.vae.device, origin=self._stage_clock.origin)
        self._running["stage"] = self.pipe.lanes["stage"].submit(self._stage, total)
        self._running["feed"] = self.pipe.lanes["feed"].submit(self._feed, total)

    def _take(self) -> tuple | None:
        while True:
            try:
                return self._decode_queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._failure is not None:
                    raise self._failure
                self.pipe.check_ranks()

    def _finish(self) -> None:
        """Ends the job. When the caller stopped early, the ranks still finish the blocks they were sent
        (nothing more is decoded), so that they are ready for the next job."""
        self._cancelled.set()
        try:
            for running in self._running.values():
                while not running.is_set() and self._failure is None:
                    with contextlib.suppress(queue.Empty):
                        while True:
                            self._decode_queue.get_nowait()
                    running.wait(POLL_S)
                    self.pipe.check_ranks()
            if self._failure is not None:  # the other ranks may be anywhere in the job: nothing more is sent
                self.pipe.broken = f"{type(self._failure).__name__}: {self._failure}"
                return
            own = {"rank": self.rank, "role": self.schedule.describe(self.rank), "setup_ms": self._setup_ms,
                   "sink_refill_ms": self._sink_ms}
            stage, decode = self._stage_clock.intervals_ms(), self._decode_clock.intervals_ms()
            own.update(busy_summary(stage + decode, blocks=len(decode)))  # the device's time: steps and decode
            own["denoise_ms"] = busy_summary(stage)["stage_ms"]
            own["decode_ms"] = busy_summary(decode)["stage_ms"]
            own["peak_memory_gb"] = peak_memory_gb(self.pipe.vae.device)
            self.rank_stats = sorted(self._worker_stats + [own], key=lambda r: r["rank"])
            for r in self.rank_stats:
                log.info("rank %d (%s): %s", r["rank"], r["role"],
                         {k: round(v, 3) for k, v in r.items() if isinstance(v, float)})
            if self.pipe.recut:
                self.pipe.cut_from(self.rank_stats, min_blocks=self.settings.blocks_per_clip)
        finally:
            self._done = True
            if self.pipe._active is self:
                self.pipe._active = None

    # ------------------------------------------------------------------ the feeder: block messages
    @torch.no_grad()
    def _feed(self, total: int) -> None:
        s = self.settings
        in_flight: deque[list] = deque()
        try:
            with self._on(self._streams.get("feed")):
                for k in range(total):
                    if len(in_flight) == self._lookahead:
                        for send in in_flight.popleft():
                            send.wait()
                    if self._cancelled.is_set():
                        break
                    try:
                        audio = self.cond.audio.block(k, s.video_frames_per_block).float().cpu()
                    except Exception as e:  # e.g. a live session was closed: the blocks before k still come
                        self._audio_error = e
                        break
                    new_ref = None
                    if k == s.blocks_per_clip and s.rolling_sink:
                        if not self._wait(self._block0_final):
                            break
                        new_ref = self._new_ref
                    work = BlockWork(k, audio, new_ref)
                    in_flight.append([send for rank in range(self.rank) for send in send_block_work(work, rank, self.pipe.host_group)])
                    self._hand_over(work)
        except BaseException as e:
            self._failure = e
        finally:
            try:
                for rank in range(self.rank):
                    in_flight.append(send_block_work(None, rank, self.pipe.host_group))
                for sends in in_flight:
                    for send in sends:
                        send.wait()
            except BaseException as e:
                self._failure = self._failure or e
            self._hand_over(None)

    def _hand_over(self, work: BlockWork | None) -> None:
        """Gives this rank's stage thread its message (it always takes them all, also after a cancel)."""
        while True:
            try:
                self._feed_queue.put(work, timeout=POLL_S)
                return
            except queue.Full:
                if self._running["stage"].is_set():
                    return

    def _wait(self, event: threading.Event) -> bool:
        while not event.wait(POLL_S):
            if self._cancelled.is_set() or self._running["stage"].is_set():
                return False
        return True

    # ------------------------------------------------------------------ the stage thread: latents
    @torch.no_grad()
    def _stage(self, total: int) -> None:
        try:
            with self._on(self._streams.get("stage")):
                if total:
                    self._set_up()
                dim = None if self.pipe.transformer is None else self.pipe.transformer.dit.config.dim
                receive = receiver_of(self.schedule, self.rank, self._job, dim, self.pipe.vae.device, self.pipe.job_group)
                self._sink_ms = run_blocks(self._part, self._feed_queue.get, receive, self._deliver, self._stage_clock)
            self._running["feed"].wait()  # its last sends are done before the host group is used again
            self._worker_stats = []
            for rank in range(self.rank):
                received = [None]
                dist.recv_object_list(received, src=rank, group=self.pipe.host_group)
                self._worker_stats.append(received[0])
        except BaseException as e:  # the caller's thread raises it
            self._failure = self._failure or e
            return
        self._put_decoded(None)  # the end: the caller stops here if the feeder stopped early

    def _set_up(self) -> None:
        """This rank's share of the stream (its caches, when it also denoises) and the decoder, warmed up on the
        motion latents. On the stage thread: its steps run there beside the feeder and the caller, so without
        CUDA graphs (a capture forbids other threads' CUDA calls), and so does the light decoder."""
        t0 = time.perf_counter()
        cond, device = self.cond, self.pipe.vae.device
        parts = self.schedule.parts_of(self.rank)
        if parts:
            self._part = self.pipe.transformer.steps_of(cond.text_context, cond.ref_latent, cond.motion_latents,
                                                        self.settings, parts, cuda_graphs=False,
                                                        actor_mask=self._job.actor_mask)
        self._decoder = start_decoder(self.pipe.decoder_for(self.settings.decoder), cond.motion_latents.to(device))
        synchronize(device)  # once per stream, so that the time is the set-up's own
        self._setup_ms = (time.perf_counter() - t0) * 1000

    def _deliver(self, k: int, x: torch.Tensor, tokens: None) -> None:
        """Block k's final latents: the rolling sink frame (block 0), then the decode and the copies to the host
        enqueued behind this rank's steps; the caller waits for them. (The last step always ends here, so no
        residual stream comes with them.)"""
        if k == 0:
            self._new_ref = x[None, :, :1].float().cpu()
            self._block0_final.set()
        if self._cancelled.is_set():
            return  # nothing more is decoded
        self._decode_clock.start()
        frames = to_uint8_frames(decode_video(self._decoder, k, x))
        self._decode_clock.stop()
        item = (k, to_host(frames), to_host(x.float()))
        ready = torch.cuda.Event() if self._cuda else None
        if ready is not None:
            ready.record()  # behind the copies
        self._put_decoded((*item, ready))

    def _put_decoded(self, item) -> None:
        while not self._cancelled.is_set():
            try:
                self._decode_queue.put(item, timeout=POLL_S)
                return
            except queue.Full:
                pass

    def _on(self, stream):
        """Work on `stream` (this rank's device), or on the CPU as it is."""
        if stream is None:
            return contextlib.nullcontext()
        ctx = contextlib.ExitStack()
        ctx.enter_context(torch.cuda.device(stream.device))
        ctx.enter_context(torch.cuda.stream(stream))
        return ctx
