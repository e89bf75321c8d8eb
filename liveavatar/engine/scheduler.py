"""Timesteps and sigmas of the distilled sampler, and the per-call random numbers of the stream.

The original builds diffusers' FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3) and
calls set_timesteps(n), which applies the shift twice; for n=4 that gives timesteps
[1000, 857.69, 602.15, 8.93], ending above 0. We reproduce those numbers exactly (float32), without the
scheduler object, because the Euler update is one line.
"""

from __future__ import annotations

import random

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
SHIFT = 3.0


def _shift(sigma):
    return SHIFT * sigma / (1 + (SHIFT - 1) * sigma)


def flow_sigmas(num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [num_steps], sigmas [num_steps + 1] ending in 0), float32."""
    if num_steps < 1:
        raise ValueError(f"sample_steps must be at least 1, got {num_steps}")
    n = NUM_TRAIN_TIMESTEPS
    train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n)
    train = _shift(train)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = _shift(np.linspace(sigma_max * n, sigma_min * n, num_steps) / n)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return sigmas * n, torch.cat([sigmas, torch.zeros(1)])


def clip_noise(seed: int, clip: int, latent_frames: int, height: int, width: int) -> torch.Tensor:
    """Noise of clip `clip`: [16, latent_frames, h, w], drawn on the CPU in float32 so every device agrees."""
    gen = torch.Generator("cpu").manual_seed(seed + clip)
    return torch.randn(16, latent_frames, height, width, generator=gen, dtype=torch.float32)


def ref_roll(seed: int, block: int, step: int) -> int:
    """The reference RoPE offset rd in [4, 30] for absolute block `block` and denoising step `step`."""
    return random.Random(f"{seed}:{block}:{step}").randint(4, 30)
