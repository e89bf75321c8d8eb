"""Key/value caches of the streaming transformer.

* `SinkCache`: per layer, the keys (without RoPE) and values of the sink tokens (reference image + packed
  motion latents). It is computed once and shared by every denoising step, because the sink pass runs at
  timestep 0 whatever the step; RoPE is applied at read time since the reference position rolls.
* `RingCache`: per layer, keys (with RoPE at absolute positions) and values of the most recent generated
  tokens, one clip long. Each denoising step owns one (timestep forcing: history computed at its own noise
  level). Slots are overwritten modulo the ring length, so memory is constant however long the stream.
  Stored in the model's dtype, or in FP8 (e4m3, one float32 scale per token and head) to halve the largest
  memory of the stream (the four rings of a 704x384 stream hold 41.5 GB in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from liveavatar.models.fp8 import E4M3, dequantize_rows, quantize_rows


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

    def __init__(self, keys: torch.Tensor, values: torch.Tensor,
                 scales: tuple[torch.Tensor, torch.Tensor] | None = None, compute_dtype: torch.dtype | None = None,
                 first_layer: int = 0):
        """A ring over the storage given: keys and values [layers, B, tokens, heads, d] and, for FP8 storage,
        their scales (keys, values) [layers, B, tokens, heads, 1] float32. compute_dtype: what `valid` returns
        (default: the storage's dtype; the model's with FP8 storage). The ring holds layers first_layer.. (a rank
        of the multi-device pipeline may run only some layers of a step), addressed by the model's layer index."""
        self.keys, self.values, self.scales = keys, values, scales
        self.first_layer = first_layer
        self.compute_dtype = compute_dtype or keys.dtype
        if (keys.dtype == E4M3) != (scales is not None):
            raise ValueError("FP8 keys and values need their scales, and only they have scales")
        if self.compute_dtype == E4M3:
            raise ValueError("an FP8 ring cache needs the model's dtype as compute_dtype")
        self.written = 0  # absolute token count written so far (the ring is full once written >= tokens)

    @classmethod
    def allocate(cls, num_layers: int, batch: int, tokens: int, heads: int, head_dim: int, device, dtype,
                 compute_dtype: torch.dtype | None = None, first_layer: int = 0,
                 pin_memory: bool = False) -> "RingCache":
        """A ring with new zeroed storage of `dtype` on `device` (torch.float8_e4m3fn: with scales);
        pin_memory: page-locked host storage, for copies to a GPU that do not make the host wait."""
        shape = (num_layers, batch, tokens, heads, head_dim)

        def new(fill, shape, dtype):
            return torch.full(shape, fill, device=device, dtype=dtype, pin_memory=pin_memory)

        scales = None
        if dtype == E4M3:
            scales = (new(1.0, shape[:-1] + (1,), torch.float32), new(1.0, shape[:-1] + (1,), torch.float32))
        return cls(new(0.0, shape, dtype), new(0.0, shape, dtype), scales, compute_dtype, first_layer)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes a block's keys/values at absolute token offset `start` (must not straddle the ring's end)."""
        layer -= self.first_layer
        slot = start % self.capacity
        n = k.shape[1]
        if slot + n > self.capacity:
            raise ValueError(f"block of {n} tokens at slot {slot} straddles the ring of {self.capacity}")
        if self.scales is None:
            self.keys[layer, :, slot : slot + n] = k
            self.values[layer, :, slot : slot + n] = v
            return
        for store, scales, x in ((self.keys, self.scales[0], k), (self.values, self.scales[1], v)):
            store[layer, :, slot : slot + n], scales[layer, :, slot : slot + n] = quantize_rows(x)

    def valid(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values visible to a block whose tokens end at absolute offset `end`: everything written so
        far before the ring has wrapped, the whole ring after (in slot order, as the reference)."""
        layer -= self.first_layer
        n = min(end, self.capacity)
        if self.scales is None:
            return self.keys[layer, :, :n], self.values[layer, :, :n]
        return tuple(
            dequantize_rows(store[layer, :, :n], scales[layer, :, :n], self.compute_dtype)
            for store, scales in ((self.keys, self.scales[0]), (self.values, self.scales[1]))
        )

    def state_dict(self) -> dict:
        """A snapshot on the CPU (a copy: the live ring keeps changing)."""
        state = {"keys": self.keys.to("cpu", copy=True), "values": self.values.to("cpu", copy=True), "written": self.written}
        if self.scales is not None:
            state["key_scales"], state["value_scales"] = (s.to("cpu", copy=True) for s in self.scales)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.keys.copy_(state["keys"])
        self.values.copy_(state["values"])
        if self.scales is not None:
            self.scales[0].copy_(state["key_scales"])
            self.scales[1].copy_(state["value_scales"])
        self.written = int(state["written"])
