"""The block-causal generation loop: denoise each block of 3 latent frames in a few Euler steps against
per-step KV caches, then decode it to pixels right away with the streaming VAE decoder.

This is the real-time pipeline of Live Avatar (timestep-forcing pipeline parallelism) run as one loop;
spreading its steps over devices (liveavatar.parallel) is a schedule of the same computation and changes
no number. Per clip r (4 blocks, 48 video frames) and block k = 4r + b:

    x = noise_r[:, 3b:3b+3]
    for step s: x += (sigma[s+1] - sigma[s]) * DiT(x, t_s, cache_s, audio of block k, rd(seed, k, s))
    frames = decoder.decode(x)           # 12 frames; the very first block drops its first 3

After clip 0 the sink's reference becomes the first generated latent frame (the rolling sink frame) and
the sink is prefilled again; nothing else about the sink ever changes, and nothing grows with the video.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from liveavatar.engine import scheduler
from liveavatar.media.video import frames_to_uint8
from liveavatar.models.dit import S2VTransformer
from liveavatar.models.kv_cache import RingCache, SinkCache
from liveavatar.models.vae import StreamingDecoder, WanVAE

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


class AvatarStream:
    """Generates blocks for one (reference, motion, text, audio) conditioning, resumable at block boundaries.

    The caller iterates `blocks(num_clips)`; `state_dict()` between blocks captures everything needed to
    continue bit-identically in a new process (`load_state_dict`).
    """

    def __init__(
        self,
        dit: S2VTransformer,
        vae: WanVAE,
        text_context: torch.Tensor,
        ref_latent: torch.Tensor,
        motion_latents: torch.Tensor,
        audio: AudioSource,
        settings: StreamSettings = StreamSettings(),
    ):
        self.dit, self.vae, self.audio, self.settings = dit, vae, audio, settings
        device = dit.device
        self.ref_latent = ref_latent.to(device, torch.float32)
        self.motion_latents = motion_latents.to(device, torch.float32)
        self.timesteps, self.sigmas = scheduler.flow_sigmas(settings.sample_steps)
        _, _, _, self.lat_h, self.lat_w = self.ref_latent.shape
        self.tokens_per_frame = (self.lat_h // 2) * (self.lat_w // 2)

        self.text_kv = dit.text_kv(text_context.to(device)[None])
        cfg = dit.config
        ring_tokens = settings.latent_frames_per_clip * self.tokens_per_frame
        self.rings = [
            RingCache(cfg.num_layers, 1, ring_tokens, cfg.num_heads, cfg.head_dim, device, dit.dtype)
            for _ in range(settings.sample_steps)
        ]
        self.sink: SinkCache = dit.prefill_sink(self.ref_latent, self.motion_latents, self.text_kv)
        self.sink_replaced = False
        self.decoder: StreamingDecoder = vae.streaming_decoder()
        self.decoder.decode(self.motion_latents[:, :, :DECODER_WARMUP_LATENTS])
        self.next_block = 0
        self.frames_emitted = 0
        self._noise: tuple[int, torch.Tensor] | None = None

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
        f = self.settings.latent_frames_per_block
        v = self.dit.forward_block(
            x[None].to(self.dit.device),
            self.timesteps[step],
            audio,
            self.text_kv,
            self.sink,
            self.rings[step],
            start_frame=k * f,
            ref_roll=scheduler.ref_roll(self.settings.seed, k, step),
        )[0]
        return x.to(v.device) + (self.sigmas[step + 1] - self.sigmas[step]).item() * v

    def replace_sink(self, new_ref: torch.Tensor) -> None:
        """Rolling sink frame: the first generated latent becomes the reference, motion latents stay."""
        self.ref_latent = new_ref.to(self.dit.device, torch.float32)
        self.sink = self.dit.prefill_sink(self.ref_latent, self.motion_latents, self.text_kv)
        self.sink_replaced = True

    def decode_block(self, k: int, latents: torch.Tensor) -> torch.Tensor:
        video = self.decoder.decode(latents[None])
        if k == 0:
            video = video[:, :, DROPPED_FIRST_FRAMES:]
        return torch.from_numpy(frames_to_uint8(video))

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def blocks(self, num_clips: int) -> Iterator[Block]:
        s = self.settings
        total = num_clips * s.blocks_per_clip
        while self.next_block < total:
            k = self.next_block
            timings: dict[str, float] = {}
            if s.rolling_sink and k == s.blocks_per_clip and num_clips > 1 and not self.sink_replaced:
                t0 = time.perf_counter()
                self.replace_sink(self._first_latent)
                timings["sink_prefill"] = _ms(t0)
            t0 = time.perf_counter()
            audio = self.audio.block(k, s.video_frames_per_block).to(self.dit.device)
            timings["audio"] = _ms(t0)
            x = self.noise_for_block(k).to(self.dit.device)
            for step in range(s.sample_steps):
                t0 = time.perf_counter()
                x = self.denoise_step(k, step, x, audio)
                timings[f"step{step}"] = _ms(t0)
            if k == 0:
                self._first_latent = x[None, :, :1].clone()
            t0 = time.perf_counter()
            frames = self.decode_block(k, x)
            timings["decode"] = _ms(t0)
            block = Block(k, k // s.blocks_per_clip, x.float().cpu(), frames, self.frames_emitted, timings)
            self.next_block += 1
            self.frames_emitted += len(frames)
            yield block

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Everything that changes while streaming (caches, sink reference, decoder history, counters)."""
        state = {
            "next_block": self.next_block,
            "frames_emitted": self.frames_emitted,
            "sink_replaced": self.sink_replaced,
            "ref_latent": self.ref_latent.to("cpu", copy=True),
            "decoder": self.decoder.state_dict(),
            "rings": [r.state_dict() for r in self.rings],
        }
        if self.next_block > 0:
            state["first_latent"] = self._first_latent.to("cpu", copy=True)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.next_block = int(state["next_block"])
        self.frames_emitted = int(state["frames_emitted"])
        if "first_latent" in state:
            self._first_latent = state["first_latent"].to(self.dit.device)
        if state["sink_replaced"]:
            self.replace_sink(state["ref_latent"])
        self.decoder.load_state_dict(state["decoder"])
        for ring, rs in zip(self.rings, state["rings"]):
            ring.load_state_dict(rs)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000
