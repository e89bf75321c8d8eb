"""The denoising steps of a stream: the sink cache, one ring cache per step, the noise, and the Euler steps of a
block through the transformer (or its CUDA graphs). `StepRunner` runs every step whole for the single-process
stream (liveavatar.engine.stream), or the share of the steps' layers that one rank of the multi-device pipeline
runs (liveavatar.parallel): the same code, so the ranks compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liveavatar.engine import scheduler
from liveavatar.engine.runtime import RuntimeOptions
from liveavatar.models.dit import S2VTransformer
from liveavatar.models.fastpath import StepGraphs
from liveavatar.models.kv_cache import RingCache, SinkCache
from liveavatar.models.offload import HostRings


@dataclass(frozen=True)
class StepPart:
    """Layers of one denoising step: a whole step, or the stretch of one that a rank of the multi-device
    pipeline runs (liveavatar.parallel.schedule)."""

    step: int
    layers: range


class StepRunner:
    """The steps of one stream's blocks (or the parts of them in `parts`) against its caches."""

    def __init__(self, dit: S2VTransformer, text_context: torch.Tensor, ref_latent: torch.Tensor,
                 motion_latents: torch.Tensor, settings, options: RuntimeOptions = RuntimeOptions(),
                 parts: list[StepPart] | None = None, actor_mask: torch.Tensor | None = None):
        """settings: the stream's StreamSettings. options: the ring caches' storage (`kv_dtype`; in pinned host
        memory with `offload_transformer`, one layer at a time on the device: liveavatar.models.offload.HostRings)
        and whether steady steps replay as CUDA graphs (`graphs_on`; liveavatar.models.fastpath.StepGraphs).
        parts (default: every step whole): ring caches for those steps' layers only.
        actor_mask: several people in the picture (multi-person mode): the audio gives one row of features per
        actor, and this [A, tokens of a block, 1] weights each actor's audio injection."""
        self.dit, self.settings, self.options = dit, settings, options
        cfg, device = dit.config, dit.device
        self.parts = parts if parts is not None else [StepPart(s, range(cfg.num_layers)) for s in range(settings.sample_steps)]
        self.actor_mask = None if actor_mask is None else actor_mask.to(device, torch.float32)
        self.ref_latent = ref_latent.to(device, torch.float32)
        self.motion_latents = motion_latents.to(device, torch.float32)
        self.timesteps, self.sigmas = scheduler.flow_sigmas(settings.sample_steps)
        _, _, _, self.lat_h, self.lat_w = self.ref_latent.shape
        self.tokens_per_frame = (self.lat_h // 2) * (self.lat_w // 2)

        self.text_kv = dit.text_kv(text_context.to(device)[None])
        ring_shape = (1, settings.latent_frames_per_clip * self.tokens_per_frame, cfg.num_heads, cfg.head_dim)
        kv_dtype = options.kv_dtype or dit.dtype
        self.host_rings = None
        if options.offload_transformer:
            self.host_rings = HostRings(settings.sample_steps, cfg.num_layers, *ring_shape, device, kv_dtype, dit.dtype)
            self.rings: list[RingCache | None] = list(self.host_rings.rings)
        else:
            self.rings = [None] * settings.sample_steps  # per step: its layers' ring, if this runner has any
            for part in self.parts:
                self.rings[part.step] = RingCache.allocate(len(part.layers), *ring_shape, device, kv_dtype, dit.dtype,
                                                           first_layer=part.layers.start)
        self.sink: SinkCache = dit.prefill_sink(self.ref_latent, self.motion_latents, self.text_kv)
        self.sink_replaced = False
        self.graphs = StepGraphs(dit) if options.graphs_on(device) else None
        self._noise: tuple[int, torch.Tensor] | None = None

    def noise_for_block(self, k: int) -> torch.Tensor:
        """Block k's starting noise [16, F, h, w] (a clip's noise is drawn once, from the seed and the clip)."""
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
        step = part.step
        forward = self.graphs.forward_block if self.graphs is not None else self.dit.forward_block
        out = forward(
            x[None].to(self.dit.device),
            self.timesteps[step],
            audio,
            self.text_kv,
            self.sink,
            self.rings[step],
            start_frame=k * self.settings.latent_frames_per_block,
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
        if self.graphs is not None:
            self.graphs.clear()

    def state_dict(self) -> dict:
        """The caches' state that changes while streaming (the rings; the sink follows from the reference)."""
        return {"sink_replaced": self.sink_replaced, "ref_latent": self.ref_latent.to("cpu", copy=True),
                "rings": [r.state_dict() for r in self.rings]}

    def load_state_dict(self, state: dict) -> None:
        if state["sink_replaced"]:
            self.replace_sink(state["ref_latent"])
        for ring, saved in zip(self.rings, state["rings"]):
            ring.load_state_dict(saved)
