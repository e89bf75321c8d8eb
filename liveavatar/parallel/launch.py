"""Starting the ranks: the calling process becomes the output rank (it decodes, writes the video and takes
the jobs), the denoising ranks are spawned beside it, one per GPU, all on this host.

    pipe = start_pipeline(CheckpointModels("ckpt"), world_size=2)    # what `liveavatar generate --gpus 2` does
    ...  # run_job(pipe, spec), as many jobs as wanted; idle ranks wait on the host group
    pipe.close()

Rank r uses cuda:r (set CUDA_VISIBLE_DEVICES to choose the GPUs), or the CPU with gloo for tests. Each rank
loads only what it runs: the denoising ranks the transformer, the output rank the VAE and the encoders
(and the transformer too when it also denoises).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from liveavatar.engine.device_io import synchronize
from liveavatar.engine.runtime import RuntimeOptions, apply_to_vae
from liveavatar.errors import LiveAvatarError
from liveavatar.models.audio_encoder import AudioEncoder
from liveavatar.models.dit import S2VConfig, S2VTransformer
from liveavatar.models.taehv import DecoderChoice, TinyDecoder
from liveavatar.models.text_encoder import TextEncoder
from liveavatar.models.vae import WanVAE
from liveavatar.parallel.pipeline import ParallelPipeline
from liveavatar.parallel.schedule import DECODE_COST, LIGHT_DECODE_COST, Schedule
from liveavatar.parallel.worker import RankTransformer, serve

log = logging.getLogger(__name__)

# A job's latents: a neighbour silent this long during a job is gone (NCCL's own default).
DEFAULT_OP_TIMEOUT = timedelta(minutes=10)
# Ranks meeting at the start (spawning and imports; model loading comes after).
STARTUP_TIMEOUT = timedelta(minutes=5)
# The host group, where idle ranks wait for the next job. gloo has no watchdog, and a rank that exits closes
# its sockets (the others' waits fail at once), so this only bounds an output rank that is alive but silent.
IDLE_TIMEOUT = timedelta(days=365)


class ModelSource(Protocol):
    """Builds the models a rank needs on its device (picklable: it is sent to the spawned ranks)."""

    def num_layers(self) -> int:
        """The transformer's depth (the schedule splits steps between ranks by layers), known before loading."""
        ...

    def load_dit(self, device: torch.device) -> S2VTransformer: ...

    def load_vae(self, device: torch.device) -> WanVAE: ...

    def load_tiny_decoder(self, device: torch.device, choice: DecoderChoice) -> TinyDecoder | None:
        """The light decoder that decodes the streams when `choice` names it, else None: the VAE does."""
        ...

    def load_encoders(self, device: torch.device) -> tuple[TextEncoder | None, AudioEncoder | None]: ...


@dataclass(frozen=True)
class CheckpointModels:
    """The released weights (Wan2.2-S2V-14B + the Live Avatar LoRA), as LiveAvatarPipeline.from_pretrained loads them."""

    ckpt_dir: Path
    lora_file: Path | None = None
    dtype: torch.dtype = torch.bfloat16

    def _layout(self):
        from liveavatar.weights.checkpoint import CheckpointLayout

        return CheckpointLayout.from_dir(self.ckpt_dir, self.lora_file)

    def num_layers(self) -> int:
        return S2VConfig.from_json(self._layout().dit_config).num_layers

    def load_dit(self, device: torch.device) -> S2VTransformer:
        layout = self._layout()
        return S2VTransformer.from_pretrained(layout.wan_dir, lora_file=layout.lora_file, device=device, dtype=self.dtype)

    def load_vae(self, device: torch.device) -> WanVAE:
        return WanVAE.from_checkpoint(self._layout().vae_file, device=device, dtype=self.dtype)

    def load_tiny_decoder(self, device: torch.device, choice: DecoderChoice) -> TinyDecoder | None:
        return choice.load(device, self.dtype)

    def load_encoders(self, device: torch.device) -> tuple[TextEncoder, AudioEncoder]:
        layout = self._layout()
        text = TextEncoder.from_pretrained(layout.wan_dir, device=device, dtype=self.dtype)
        audio = AudioEncoder.from_pretrained(layout.wav2vec2_dir, device=device, dtype=torch.float32)
        return text, audio


def estimated_decode_cost(decoder: DecoderChoice) -> float:
    """A block's decode in denoising steps, to cut the work by until a stream has measured it."""
    return DECODE_COST if decoder.name == "wan" else LIGHT_DECODE_COST


def start_pipeline(
    models: ModelSource,
    world_size: int,
    sample_steps: int = 4,
    device_type: str = "cuda",
    options: RuntimeOptions = RuntimeOptions(),
    cpu_threads: int | None = None,
    op_timeout: timedelta = DEFAULT_OP_TIMEOUT,
    decode_cost: float | None = None,
) -> ParallelPipeline:
    """Spawns ranks 0..world_size-2, makes this process the output rank, and returns its pipeline once every
    rank has loaded its models. options: how the models run (the transformer's options on every rank; the
    encoders' and the VAE's here; the ranks never stream blocks from host memory). cpu_threads: torch
    threads per rank on the CPU (default: the cores shared out). decode_cost: a block's decode in denoising
    steps, for sharing the work out evenly (liveavatar.parallel.schedule); None (the default) starts from
    the estimate for the decoder the options name and cuts again after every stream with the cost measured in it."""
    try:
        schedule = Schedule(world_size, sample_steps, models.num_layers(),
                            estimated_decode_cost(options.decoder) if decode_cost is None else decode_cost)
    except ValueError as e:
        raise LiveAvatarError(str(e)) from None
    if device_type == "cuda" and torch.cuda.device_count() < world_size:
        raise LiveAvatarError(f"{world_size} GPUs asked for, {torch.cuda.device_count()} visible")
    if device_type == "cpu" and cpu_threads is None:
        cpu_threads = max(1, (os.cpu_count() or 1) // world_size)
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=STARTUP_TIMEOUT)
    spawn = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    processes = []
    try:
        for rank in range(world_size - 1):
            process = spawn.Process(target=_run_rank, name=f"liveavatar-rank{rank}", daemon=True,
                                    args=(rank, schedule, store.port, models, options, device_type, cpu_threads,
                                          op_timeout))
            process.start()
            processes.append(process)
        rank = schedule.output_rank
        device = _rank_device(rank, device_type, cpu_threads)
        job_group, host_group = _join(store, schedule, rank, device, op_timeout)
        transformer = RankTransformer(models.load_dit(device), options) if schedule.parts_of(rank) else None
        vae = models.load_vae(device)
        tiny_decoder = models.load_tiny_decoder(device, options.decoder)
        apply_to_vae(vae, options)
        text, audio = models.load_encoders(device)
        if options.offload_encoders:
            for encoder in (text, audio):
                if encoder is not None:
                    encoder.to("cpu")
        _connect_neighbours(schedule, rank, device, job_group)
    except BaseException:
        for process in processes:
            process.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    log.info("%d ranks ready: %s", world_size, "; ".join(f"rank {r}: {schedule.describe(r)}" for r in range(world_size)))
    return ParallelPipeline(transformer, vae, text, audio, schedule, job_group, host_group, processes, options,
                            recut=decode_cost is None, tiny_decoder=tiny_decoder)


def _run_rank(rank: int, schedule: Schedule, port: int, models: ModelSource, options: RuntimeOptions, device_type: str,
              cpu_threads: int | None, op_timeout: timedelta) -> None:
    """A spawned denoising rank, from start to shutdown."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    device = _rank_device(rank, device_type, cpu_threads)
    store = dist.TCPStore("127.0.0.1", port, schedule.world_size, is_master=False, timeout=STARTUP_TIMEOUT)
    job_group, host_group = _join(store, schedule, rank, device, op_timeout)
    try:
        transformer = RankTransformer(models.load_dit(device), options)
        _connect_neighbours(schedule, rank, device, job_group)
        serve(transformer, schedule, rank, job_group, host_group)
    finally:
        dist.destroy_process_group()


def _rank_device(rank: int, device_type: str, cpu_threads: int | None) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    torch.set_num_threads(cpu_threads)
    return torch.device("cpu")


def _join(store, schedule: Schedule, rank: int, device: torch.device, op_timeout: timedelta):
    """(job group, host group): NCCL (gloo on the CPU) for the latents, gloo for everything else. The default
    group only gathers the ranks (its timeout covers their start)."""
    cuda = device.type == "cuda"
    dist.init_process_group("gloo", store=store, rank=rank, world_size=schedule.world_size, timeout=STARTUP_TIMEOUT)
    job_group = dist.new_group(backend="nccl" if cuda else "gloo", timeout=op_timeout, device_id=device if cuda else None)
    host_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return job_group, host_group


def _connect_neighbours(schedule: Schedule, rank: int, device: torch.device, group) -> None:
    """One message on every hop of the chain now, so that its connections are set up before the first block."""
    token = torch.zeros(1, device=device)
    previous, following = schedule.previous(rank), schedule.next(rank)
    if previous is not None:
        dist.recv(token, previous, group=group)
    if following is not None:
        dist.send(token, following, group=group)
    synchronize(device)
