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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from liveavatar.engine import scheduler
from liveavatar.errors import InputError
from liveavatar.models.dit import S2VTransformer
from liveavatar.models.fastpath import StepGraphs, use_attention
from liveavatar.models.kv_cache import RingCache, SinkCache
from liveavatar.models.offload import HostRings, fit_resident_blocks
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


@dataclass(frozen=True)
class StepPart:
    """Layers of one denoising step: a whole step, or the stretch of one that a rank of the multi-device
    pipeline runs (liveavatar.parallel.schedule)."""

    step: int
    layers: range


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
        vae: VideoDecoder | None,
        text_context: torch.Tensor,
        ref_latent: torch.Tensor,
        motion_latents: torch.Tensor,
        audio: AudioSource | None,
        settings: StreamSettings = StreamSettings(),
        kv_dtype: torch.dtype | None = None,
        offload_kv: bool = False,
        cuda_graphs: bool = False,
        concurrent_decode: bool = False,
        parts: list[StepPart] | None = None,
        actor_mask: torch.Tensor | None = None,
    ):
        """vae: what decodes the blocks, the Wan2.1 VAE or the light TAEW2.1 decoder (None: see parts).
        kv_dtype: storage of the ring caches (default the transformer's dtype; torch.float8_e4m3fn halves
        their memory, see RingCache). offload_kv: keep the rings in pinned host memory, one layer at a time
        on the device (liveavatar.models.offload.HostRings). cuda_graphs: replay the steady-state block steps
        as CUDA graphs (liveavatar.models.fastpath.StepGraphs; GPU only, not with offload_kv), and the light
        decoder's blocks too.
        concurrent_decode: run the VAE on its own CUDA stream, concurrently with the next block's steps. Off by
        default: both saturate the GPU, and on an H100 sharing it made the pair slower than running them back
        to back (docs/benchmarks.md). Either way the host enqueues block k+1's steps before it waits for block
        k's frames, so muxing on the host overlaps the GPU's work.
        parts (default: every step whole) and vae=None make the share of a stream that one rank of the
        multi-device pipeline runs (liveavatar.parallel): ring caches for those steps' layers only and no
        decoder. Such a stream is driven through its pieces (noise_for_block, denoise_part, replace_sink), not
        blocks().
        actor_mask: several people in the picture (multi-person mode): the audio source gives one row of
        features per actor, and this [A, tokens of a block, 1] weights each actor's audio injection
        (Conditioning.actor_weights)."""
        self.dit, self.vae, self.audio, self.settings = dit, vae, audio, settings
        self.actor_mask = None if actor_mask is None else actor_mask.to(dit.device, torch.float32)
        if dit.block_streamer is not None and dit.device.type == "cuda":
            # The stream's own peak over its first clip decides how many blocks stay on the GPU (_denoise).
            torch.cuda.reset_peak_memory_stats(dit.device)
        cfg = dit.config
        if parts is None:
            parts = [StepPart(step, range(cfg.num_layers)) for step in range(settings.sample_steps)]
        self.parts = parts
        device = dit.device
        self.ref_latent = ref_latent.to(device, torch.float32)
        self.motion_latents = motion_latents.to(device, torch.float32)
        self.timesteps, self.sigmas = scheduler.flow_sigmas(settings.sample_steps)
        _, _, _, self.lat_h, self.lat_w = self.ref_latent.shape
        self.tokens_per_frame = (self.lat_h // 2) * (self.lat_w // 2)

        self.text_kv = dit.text_kv(text_context.to(device)[None])
        ring_tokens = settings.latent_frames_per_clip * self.tokens_per_frame
        ring_shape = (1, ring_tokens, cfg.num_heads, cfg.head_dim)
        self._host_rings = None
        if offload_kv:
            self._host_rings = HostRings(settings.sample_steps, cfg.num_layers, *ring_shape, device,
                                         kv_dtype or dit.dtype, dit.dtype)
            self.rings = self._host_rings.rings
        else:
            self.rings: list[RingCache | None] = [None] * settings.sample_steps  # per step: its layers' ring, if any
            for part in parts:
                self.rings[part.step] = RingCache(len(part.layers), *ring_shape, device, kv_dtype or dit.dtype,
                                                  dit.dtype, first_layer=part.layers.start)
        self.sink: SinkCache = dit.prefill_sink(self.ref_latent, self.motion_latents, self.text_kv)
        self.sink_replaced = False
        self._step_graphs = StepGraphs(dit) if cuda_graphs else None
        # The steps of block k+1 are enqueued before the host waits for block k's frames. `_ahead` is that
        # block k+1: denoised (its keys/values are in the rings) but not yet decoded.
        self._decode_stream = torch.cuda.Stream(device) if concurrent_decode and device.type == "cuda" else None
        self._ahead: tuple[int, torch.Tensor, _StageClock] | None = None
        self.decoder: StreamingDecoder | TinyStreamingDecoder | None = None
        self.decoder_name = None if vae is None else decoder_name(vae)
        if vae is not None:
            with self._on_decode_stream():
                self.decoder = start_decoder(vae, self.motion_latents, cuda_graphs=cuda_graphs)
        self.next_block = 0  # the next block `blocks()` yields
        self.frames_emitted = 0
        # Whether blocks() may denoise block k+1 before it hands out block k (see blocks()). A live session turns
        # it off on the CPU, where it would delay every block, and before it restarts at a clip boundary.
        self.lookahead = True
        self._noise: tuple[int, torch.Tensor] | None = None
        self._denoised = 0  # blocks this object has denoised

    # ------------------------------------------------------------------ pieces (also used by parallel ranks)
    def noise_for_block(self, k: int) -> torch.Tensor:
        s = self.settings
        clip, b = divmod(k, s.blocks_per_clip)
        if self._noise is None or self._noise[0] != clip:
            self._noise = (clip, scheduler.clip_noise(s.seed, clip, s.latent_frames_per_clip, self.lat_h, self.lat_w))
        f = s.latent_frames_per_block
        return self._noise[1][:, b * f : (b + 1) * f]

    def denoise_step(self, k: int, step: int, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """One Euler step of block k with cache `step`: returns x moved from sigma[step] to sigma[step+1]."""
        return self.denoise_part(k, StepPart(step, range(self.dit.config.num_layers)), x, None, audio)[0]

    def denoise_part(self, k: int, part: StepPart, x: torch.Tensor, tokens: torch.Tensor | None,
                     audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Part of an Euler step of block k: x are the latents at the step's start, tokens the step's residual
        stream after the layers before the part (None when it starts the step). Returns (x moved from
        sigma[step] to sigma[step+1], None) when the part ends the step, else (x, the residual stream after it)."""
        f, step = self.settings.latent_frames_per_block, part.step
        forward = self._step_graphs.forward_block if self._step_graphs is not None else self.dit.forward_block
        out = forward(
            x[None].to(self.dit.device),
            self.timesteps[step],
            audio,
            self.text_kv,
            self.sink,
            self.rings[step],
            start_frame=k * f,
            ref_roll=scheduler.ref_roll(self.settings.seed, k, step),
            layers=part.layers,
            tokens=tokens,
            mask=self.actor_mask,
        )
        if part.layers.stop < self.dit.config.num_layers:
            return x, out
        v = out[0]
        return x.to(v.device) + (self.sigmas[step + 1] - self.sigmas[step]).item() * v, None

    def replace_sink(self, new_ref: torch.Tensor) -> None:
        """Rolling sink frame: the first generated latent becomes the reference, motion latents stay."""
        self.ref_latent = new_ref.to(self.dit.device, torch.float32)
        self.sink = self.dit.prefill_sink(self.ref_latent, self.motion_latents, self.text_kv)
        self.sink_replaced = True
        if self._step_graphs is not None:
            self._step_graphs.clear()

    def decode_block(self, k: int, latents: torch.Tensor) -> torch.Tensor:
        """Frames [n, H, W, 3] uint8 on the CPU of denoised block k (decoded on the current stream)."""
        return _to_uint8_frames(decode_video(self.decoder, k, latents)).cpu()

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
                clock = _StageClock(self.dit.device)
                self._ahead = (k, self._denoise(k, clock), clock)
            _, x, clock = self._ahead
            decoding = self._start_decode(k, x, clock)
            self._ahead = None
            if 0 < k < total - 1 and self.lookahead and self._audio_ready(k + 1):
                ahead_clock = _StageClock(self.dit.device)
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

    def _denoise(self, k: int, clock: "_StageClock") -> torch.Tensor:
        """Enqueues all denoising steps of block k (and the sink replacement due before it); returns its latents."""
        s = self.settings
        device = self.dit.device
        if self._denoised == s.blocks_per_clip and self.dit.block_streamer is not None:
            # A whole clip has run (every stage at full size): the blocks that fit in what is left stay on the GPU.
            fit_resident_blocks(self.dit.block_streamer)
        self._denoised += 1
        if s.rolling_sink and k == s.blocks_per_clip and not self.sink_replaced:
            with clock.stage("sink_prefill"):
                self._streaming_all_blocks_on_oom(lambda: self.replace_sink(self._first_latent))
        with clock.stage("audio"):
            audio = _to_device(self.audio.block(k, s.video_frames_per_block), device)
        noise = _to_device(self.noise_for_block(k), device)

        def steps() -> torch.Tensor:
            x = noise
            for step in range(s.sample_steps):
                with clock.stage(f"step{step}"):
                    x = self.denoise_step(k, step, x, audio)
            return x

        x = self._streaming_all_blocks_on_oom(steps)
        if k == 0:
            self._first_latent = x[None, :, :1].clone()
        return x

    def _streaming_all_blocks_on_oom(self, work):
        """work(); if the GPU runs out of memory while transformer blocks are kept on it (low-memory mode, where
        the first clip's peak may not have shown everything), every block is streamed again and work() runs once
        more: it only rewrites the same cache slots with the same values."""
        position = None if self._host_rings is None else self._host_rings.position
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
                self._host_rings.rewind(position)
            return work()

    def _start_decode(self, k: int, x: torch.Tensor, clock: "_StageClock") -> tuple:
        """Enqueues the decode of block k (on the decode stream on a GPU) and the copies of its frames and
        latents into host memory."""
        side = self._decode_stream
        with self._on_decode_stream():
            if side is not None:
                x.record_stream(side)  # the allocator must not hand x's memory to block k+1 before the decode read it
            with clock.stage("decode"):
                video = self.decoder.decode(x[None])
                if k == 0:
                    video = video[:, :, DROPPED_FIRST_FRAMES:]
                frames = _to_host(_to_uint8_frames(video))
                latents = _to_host(x.float())
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
            "sink_replaced": self.sink_replaced,
            "ref_latent": self.ref_latent.to("cpu", copy=True),
            "decoder_name": self.decoder_name,
            "decoder": self.decoder.state_dict(),
            "rings": [r.state_dict() for r in self.rings],
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
        if state["sink_replaced"]:
            self.replace_sink(state["ref_latent"])
        with self._on_decode_stream():
            self.decoder.load_state_dict(state["decoder"])
        for ring, rs in zip(self.rings, state["rings"]):
            ring.load_state_dict(rs)
        self._ahead = None
        if "ahead_latents" in state:
            self._ahead = (self.next_block, state["ahead_latents"].to(self.dit.device), _StageClock(self.dit.device))


class _StageClock:
    """Durations of one block's stages: CUDA events on a GPU (read once the block is finished, so timing
    never makes the host wait), the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, tuple] = {}

    def stage(self, name: str):
        return _Stage(self, name)

    def read(self) -> dict[str, float]:
        if not self.cuda:
            return {name: (end - start) * 1000 for name, (start, end) in self.marks.items()}
        out = {}
        for name, (start, end) in self.marks.items():
            end.synchronize()
            out[name] = start.elapsed_time(end)
        return out


class _Stage:
    def __init__(self, clock: _StageClock, name: str):
        self.clock, self.name = clock, name

    def _mark(self):
        if self.clock.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self):
        self.start = self._mark()

    def __exit__(self, *exc):
        self.clock.marks[self.name] = (self.start, self._mark())


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy that does not make the host wait for the GPU (from pinned memory), or t itself if already there."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts the copy of a device tensor into pinned host memory; valid once the current stream gets there."""
    if t.device.type == "cpu":
        return t.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def _to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [1, 3, n, H, W] in [-1, 1] -> [n, H, W, 3] uint8 on the same device, with the arithmetic of
    liveavatar.media.video.frames_to_uint8 (float32 (x+1)/2*255, truncated), so the GPU ships 4x fewer bytes."""
    x = video[0].to(torch.float32).clamp(-1, 1)
    return ((x + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()
