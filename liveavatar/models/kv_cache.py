"""Key/value caches of the streaming transformer.

* `SinkCache`: per layer, the keys (without RoPE) and values of the sink tokens (reference image + packed
  motion latents). It is computed once and shared by every denoising step, because the sink pass runs at
  timestep 0 whatever the step; RoPE is applied at read time since the reference position rolls.
* `RingCache`: per layer, keys (with RoPE at absolute positions) and values of the most recent generated
  tokens, one clip long. Each denoising step owns one (timestep forcing: history computed at its own noise
  level). Slots are overwritten modulo the ring length, so memory is constant however long the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SinkCache:
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [B, N, heads, d], no RoPE
    values: list[torch.Tensor] = field(default_factory=list)
    motion_rope: torch.Tensor | None = None  # [N_motion, d/2] complex multipliers (positions never move)
    ref_grid: tuple[int, int] = (0, 0)  # rows, cols of the reference tokens

    @property
    def num_ref_tokens(self) -> int:
        return self.ref_grid[0] * self.ref_grid[1]


class RingCache:
    """Fixed-size ring of RoPE'd keys and values for one denoising step, all layers."""

    def __init__(self, num_layers: int, batch: int, tokens: int, heads: int, head_dim: int, device, dtype):
        shape = (num_layers, batch, tokens, heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.written = 0  # absolute token count written so far (the ring is full once written >= tokens)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes a block's keys/values at absolute token offset `start` (must not straddle the ring's end)."""
        slot = start % self.capacity
        n = k.shape[1]
        if slot + n > self.capacity:
            raise ValueError(f"block of {n} tokens at slot {slot} straddles the ring of {self.capacity}")
        self.keys[layer, :, slot : slot + n] = k
        self.values[layer, :, slot : slot + n] = v

    def valid(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values visible to a block whose tokens end at absolute offset `end`: everything written so
        far before the ring has wrapped, the whole ring after (in slot order, as the reference)."""
        n = min(end, self.capacity)
        return self.keys[layer, :, :n], self.values[layer, :, :n]

    def state_dict(self) -> dict:
        """A snapshot on the CPU (a copy: the live ring keeps changing)."""
        return {"keys": self.keys.to("cpu", copy=True), "values": self.values.to("cpu", copy=True), "written": self.written}

    def load_state_dict(self, state: dict) -> None:
        self.keys.copy_(state["keys"])
        self.values.copy_(state["values"])
        self.written = int(state["written"])
