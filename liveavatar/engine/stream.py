"""The block-causal generation loop: denoise each block of 3 latent frames in a few Euler steps against
per-step KV caches, then decode it to pixels right away with the streaming VAE decoder.

This is the real-time pipeline of Live Avatar (timestep-forcing pipeline parallelism) run as one loop;
spreading its steps over devices (liveavatar.parallel) is a schedule of the same computation and changes
no number. Per clip r (4 blocks, 48 video frames) and block k = 4r + b:

    x = noise_r[:, 3b:3b+3]
    for step s: x += (sigma[s+1] - sigma[s]) * DiT(x, t_s, cache_s, audio of block k, rd(seed, k, s))
    frames = decoder.decode(x)           # 12 frames; the very first block drops its first 3

The decoder is the Wan2.1 VAE's, or the light TAEW2.1 one (liveavatar.models.taehv, `--decoder taew2_1`): both
stream with the same frame counts and timing (their first decode call gives 4T-3 frames, every later one 4T).

After clip 0 the sink's reference becomes the first generated latent frame (the rolling sink frame) and
the sink is prefilled again; nothing else about the sink ever changes, and nothing grows with the video.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from liveavatar.engine.device_io import StageClock, to_device, to_host, to_uint8_frames
from liveavatar.engine.runtime import RuntimeOptions
from liveavatar.engine.steps import StepRunner
from liveavatar.errors import InputError
from liveavatar.models.dit import S2VTransformer
from liveavatar.models.fastpath import use_attention
from liveavatar.models.offload import fit_resident_blocks
from liveavatar.models.taehv import NAME as TINY_DECODER
from liveavatar.models.taehv import TinyDecoder, TinyStreamingDecoder
from liveavatar.models.vae import StreamingDecoder, WanVAE

log = logging.getLogger(__name__)

FRAMES_PER_LATENT = 4
DROPPED_FIRST_FRAMES = 3  # the first video frames of the stream are dropped (they follow the static warm-up)
DECODER_WARMUP_LATENTS = 7  # oldest motion latents decoded once to fill the decoder's causal caches


@dataclass(frozen=True)
class StreamSettings:
    frames_per_clip: int = 48  # --infer_frames: video frames per clip
    latent_frames_per_block: int = 3
    sample_steps: int = 4
    seed: int = 42
    fps: int = 25
    # Rolling sink frame: after clip 0 the reference becomes the first generated frame (the real-time
    # pipeline's behaviour). Off keeps the input image as the reference for the whole stream.
    rolling_sink: bool = True
    # Which of the pipeline's decoders makes the frames: "wan" (the Wan2.1 VAE) or "taew2_1" (the light one,
    # when the pipeline has it); None: the pipeline's own choice (LiveAvatarPipeline.decoder_name).
    decoder: str | None = None

    def __post_init__(self):
        if self.frames_per_clip % (FRAMES_PER_LATENT * self.latent_frames_per_block):
            raise ValueError(
                f"infer_frames must be a multiple of {FRAMES_PER_LATENT * self.latent_frames_per_block}, got {self.frames_per_clip}"
            )

    @property
    def latent_frames_per_clip(self) -> int:
        return self.frames_per_clip // FRAMES_PER_LATENT

    @property
    def blocks_per_clip(self) -> int:
        return self.latent_frames_per_clip // self.latent_frames_per_block

    @property
    def video_frames_per_block(self) -> int:
        return self.latent_frames_per_block * FRAMES_PER_LATENT


class AudioSource(Protocol):
    """Audio features per block: [1, layers, C, video_frames_per_block] for absolute block k."""

    def block(self, k: int, frames: int) -> torch.Tensor: ...


@dataclass
class Block:
    """One generated block, ready to show: decoded frames and the latents they came from."""

    index: int  # absolute block index k
    clip: int
    latents: torch.Tensor  # [16, F, h, w] float32, on CPU
    frames: torch.Tensor  # [n, H, W, 3] uint8, on CPU
    first_frame: int  # output frame index of frames[0]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def audio_time_span(self) -> tuple[float, float]:
        """Seconds of the input audio that these frames show (output frame j is input time (j+3)/fps)."""
        start = (self.first_frame + DROPPED_FIRST_FRAMES) / 25
        return start, start + len(self.frames) / 25


def total_blocks(settings: StreamSettings, num_clips: int, num_blocks: int | None = None) -> int:
    """The blocks a stream of num_clips clips runs, cut at num_blocks if given."""
    total = num_clips * settings.blocks_per_clip
    return total if num_blocks is None else min(total, num_blocks)


VideoDecoder = WanVAE | TinyDecoder  # what a stream decodes with (each has streaming_decoder())


def decoder_name(model: VideoDecoder) -> str:
    """The --decoder value of a decoder model: "wan" or "taew2_1"."""
    return TINY_DECODER if isinstance(model, TinyDecoder) else "wan"


def start_decoder(model: VideoDecoder, motion_latents: torch.Tensor,
                  cuda_graphs: bool = False) -> StreamingDecoder | TinyStreamingDecoder:
    """The stream's decoder: the oldest motion latents are decoded once and their frames thrown away, so
    its causal caches hold the still reference when the first block arrives (this first call also takes
    the stream's first-frame trim, so block 0 gives 12 frames with either decoder). cuda_graphs: the light
    decoder replays its block shape as a CUDA graph (the Wan VAE's decoder has none)."""
    if isinstance(model, TinyDecoder):
        decoder = model.streaming_decoder(cuda_graphs=cuda_graphs)
    else:
        decoder = model.streaming_decoder()
    decoder.decode(motion_latents[:, :, :DECODER_WARMUP_LATENTS])
    return decoder


def decode_video(decoder: StreamingDecoder | TinyStreamingDecoder, k: int, latents: torch.Tensor) -> torch.Tensor:
    """Final latents [16, F, h, w] of block k -> its video [1, 3, n, H, W] in [-1, 1] on the decoder's device,
    continuing the decoder's history; the very first block drops its first frames."""
    video = decoder.decode(latents[None])
    if k == 0:
        video = video[:, :, DROPPED_FIRST_FRAMES:]
    return video


class AvatarStream:
    """Generates blocks for one (reference, motion, text, audio) conditioning, resumable at block boundaries.

    The caller iterates `blocks(num_clips)`; `state_dict()` between blocks captures everything needed to
    continue bit-identically in a new process (`load_state_dict`).
    """

    resumable = True  # state_dict() holds everything (run_job saves it for --resume)

    def __init__(
        self,
        dit: S2VTransformer,
        vae: VideoDecoder,
        text_context: torch.Tensor,
        ref_latent: torch.Tensor,
        motion_latents: torch.Tensor,
        audio: AudioSource,
        settings: StreamSettings = StreamSettings(),
        options: RuntimeOptions = RuntimeOptions(),
        actor_mask: torch.Tensor | None = None,
    ):
        """vae: what decodes the blocks, the Wan2.1 VAE or the light TAEW2.1 decoder. options: how the steps run
        (liveavatar.engine.steps.StepRunner) and, with CUDA graphs on, the light decoder's blocks too.
        `options.concurrent_decode` runs the decoder on its own CUDA stream, concurrently with the next block's
        steps. Off by default: both saturate the GPU, and on an H100 sharing it made the pair slower than running
        them back to back (docs/benchmarks.md). Either way the host enqueues block k+1's steps before it waits for
        block k's frames, so muxing on the host overlaps the GPU's work.
        actor_mask: several people in the picture (multi-person mode): the audio source gives one row of
        features per actor, and this [A, tokens of a block, 1] weights each actor's audio injection
        (Conditioning.actor_weights)."""
        self.dit, self.vae, self.audio, self.settings = dit, vae, audio, settings
        if dit.block_streamer is not None and dit.device.type == "cuda":
            # The stream's own peak over its first clip decides how many blocks stay on the GPU (_denoise).
            torch.cuda.reset_peak_memory_stats(dit.device)
        self.steps = StepRunner(dit, text_context, ref_latent, motion_latents, settings, options,
                                actor_mask=actor_mask)
        device = dit.device
        # The steps of block k+1 are enqueued before the host waits for block k's frames. `_ahead` is that
        # block k+1: denoised (its keys/values are in the rings) but not yet decoded.
        self._decode_stream = (torch.cuda.Stream(device) if options.concurrent_decode and device.type == "cuda"
                               else None)
        self._ahead: tuple[int, torch.Tensor, StageClock] | None = None
        self.decoder_name = decoder_name(vae)
        with self._on_decode_stream():
            self.decoder = start_decoder(vae, self.steps.motion_latents, cuda_graphs=options.graphs_on(device))
        self.next_block = 0  # the next block `blocks()` yields
        self.frames_emitted = 0
        # Whether blocks() may denoise block k+1 before it hands out block k (see blocks()). A live session turns
        # it off on the CPU, where it would delay every block, and before it restarts at a clip boundary.
        self.lookahead = True
        self._denoised = 0  # blocks this object has denoised

    @property
    def ref_latent(self) -> torch.Tensor:
        """The sink's reference latent [1, 16, 1, h, w]: the input image's, then the rolling sink frame."""
        return self.steps.ref_latent

    @property
    def sink_replaced(self) -> bool:
        return self.steps.sink_replaced

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def blocks(self, num_clips: int, num_blocks: int | None = None) -> Iterator[Block]:
        """Yields blocks next_block.. up to num_clips clips, or up to block num_blocks - 1 if that comes first (a
        video that ends with its speech needs no whole last clip). The steps of block k+1 are enqueued right
        after the decode of block k, before the host waits for its frames (except after block 0, whose frames
        come first as fast as possible): nothing waits for the GPU except the hand-over of finished frames, and
        the GPU has the next block's work while the caller muxes. Block k+1 is only taken ahead if `lookahead`
        is on and its audio is ready now (an audio source with `ready(k)`, the live one, may not have the speech
        yet: waiting for it would hold back block k)."""
        total = total_blocks(self.settings, num_clips, num_blocks)
        while self.next_block < total:
            k = self.next_block
            if self._ahead is None:
                clock = StageClock(self.dit.device)
                self._ahead = (k, self._denoise(k, clock), clock)
            _, x, clock = self._ahead
            decoding = self._start_decode(k, x, clock)
            self._ahead = None
            if 0 < k < total - 1 and self.lookahead and self._audio_ready(k + 1):
                ahead_clock = StageClock(self.dit.device)
                self._ahead = (k + 1, self._denoise(k + 1, ahead_clock), ahead_clock)
            block = self._finish_decode(decoding)
            self.next_block += 1
            self.frames_emitted += len(block.frames)
            yield block

    @property
    def has_ahead(self) -> bool:
        """Whether a block past the last one handed out is denoised already (its audio was taken)."""
        return self._ahead is not None

    def _audio_ready(self, k: int) -> bool:
        ready = getattr(self.audio, "ready", None)
        return True if ready is None else ready(k)

    def _denoise(self, k: int, clock: StageClock) -> torch.Tensor:
        """Enqueues all denoising steps of block k (and the sink replacement due before it); returns its latents."""
        s = self.settings
        device = self.dit.device
        if self._denoised == s.blocks_per_clip and self.dit.block_streamer is not None:
            # A whole clip has run (every stage at full size): the blocks that fit in what is left stay on the GPU.
            fit_resident_blocks(self.dit.block_streamer)
        self._denoised += 1
        if s.rolling_sink and k == s.blocks_per_clip and not self.sink_replaced:
            with clock.stage("sink_prefill"):
                self._streaming_all_blocks_on_oom(lambda: self.steps.replace_sink(self._first_latent))
        with clock.stage("audio"):
            audio = to_device(self.audio.block(k, s.video_frames_per_block), device)
        noise = to_device(self.steps.noise_for_block(k), device)

        def steps() -> torch.Tensor:
            x = noise
            for step in range(s.sample_steps):
                with clock.stage(f"step{step}"):
                    x = self.steps.denoise_step(k, step, x, audio)
            return x

        x = self._streaming_all_blocks_on_oom(steps)
        if k == 0:
            self._first_latent = x[None, :, :1].clone()
        return x

    def _streaming_all_blocks_on_oom(self, work):
        """work(); if the GPU runs out of memory while transformer blocks are kept on it (low-memory mode, where
        the first clip's peak may not have shown everything), every block is streamed again and work() runs once
        more: it only rewrites the same cache slots with the same values."""
        host_rings = self.steps.host_rings
        position = None if host_rings is None else host_rings.position
        try:
            return work()
        except torch.OutOfMemoryError:
            streamer = self.dit.block_streamer
            if streamer is None or streamer.resident_count == 0:
                raise
            log.warning("out of GPU memory with %d transformer blocks kept on the GPU: streaming them all again",
                        streamer.resident_count)
            streamer.keep_resident(0)
            streamer.memory_margin *= 2  # the next fit leaves more room
            torch.cuda.empty_cache()
            if position is not None:
                host_rings.rewind(position)
            return work()

    def _start_decode(self, k: int, x: torch.Tensor, clock: StageClock) -> tuple:
        """Enqueues the decode of block k (on the decode stream on a GPU) and the copies of its frames and
        latents into host memory."""
        side = self._decode_stream
        with self._on_decode_stream():
            if side is not None:
                x.record_stream(side)  # the allocator must not hand x's memory to block k+1 before the decode read it
            with clock.stage("decode"):
                frames = to_host(to_uint8_frames(decode_video(self.decoder, k, x)))
                latents = to_host(x.float())
            done = None
            if x.device.type == "cuda":  # marks the end of this decode, whatever is enqueued after it
                done = torch.cuda.Event()
                done.record()
        return k, frames, latents, clock, done

    def _on_decode_stream(self):
        """Work on the decode stream, after everything enqueued so far on the current one. The decoder's
        causal cache is only ever allocated and used there."""
        if self._decode_stream is None:
            return nullcontext()
        self._decode_stream.wait_stream(torch.cuda.current_stream(self._decode_stream.device))
        return torch.cuda.stream(self._decode_stream)

    def _finish_decode(self, decoding: tuple) -> Block:
        k, frames, latents, clock, done = decoding
        if done is not None:
            done.synchronize()
        s = self.settings
        return Block(k, k // s.blocks_per_clip, latents, frames, self.frames_emitted, clock.read())

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Everything that changes while streaming (caches, sink reference, decoder history, counters)."""
        state = {
            "next_block": self.next_block,
            "frames_emitted": self.frames_emitted,
            **self.steps.state_dict(),  # sink_replaced, ref_latent, rings
            "decoder_name": self.decoder_name,
            "decoder": self.decoder.state_dict(),
            # The fast path's attention kernel, chosen by timing: the resumed run must round as this one did.
            "attention": getattr(self.dit, "attention_choice", None),
        }
        if self.next_block > 0:
            state["first_latent"] = self._first_latent.to("cpu", copy=True)
        if self._ahead is not None:  # denoised already (the rings hold it), decoded by the next blocks() call
            state["ahead_latents"] = self._ahead[1].to("cpu", copy=True)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("decoder_name", "wan")  # states from before the choice existed are the VAE's
        if saved != self.decoder_name:
            raise InputError(f"--resume: the interrupted run decoded with --decoder {saved}, this one with "
                             f"--decoder {self.decoder_name}; resume with --decoder {saved}")
        if state.get("attention") is not None and getattr(self.dit, "attention_choice", None) is not None:
            use_attention(self.dit, state["attention"])
        self.next_block = int(state["next_block"])
        self.frames_emitted = int(state["frames_emitted"])
        if "first_latent" in state:
            self._first_latent = state["first_latent"].to(self.dit.device)
        self.steps.load_state_dict(state)
        with self._on_decode_stream():
            self.decoder.load_state_dict(state["decoder"])
        self._ahead = None
        if "ahead_latents" in state:
            self._ahead = (self.next_block, state["ahead_latents"].to(self.dit.device), StageClock(self.dit.device))
