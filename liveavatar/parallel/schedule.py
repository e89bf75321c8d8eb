"""Which rank runs which part of a block's work, and which rank decodes.

A block's work is its denoising steps, each a pass through the transformer's layers, then its decode. Laid
end to end, the steps' layers form one sequence of steps x layers (step 0 layer 0, ..., step 0 layer L-1,
step 1 layer 0, ...); each rank owns a contiguous stretch of it, and the last rank (world_size - 1) also
decodes and writes the video. A block's latents travel 0 -> 1 -> ... -> last; where a stretch ends inside a
step, the residual stream of that step goes along with them. Each rank holds the KV caches of its own
(step, layer) pairs only.

The stretches are cut so that every rank has about the same work, counting the decode of a block as
`decode_cost` steps: the pipeline delivers one block per slowest rank, so the ranks should be equal. When
the decode alone is at least a fair share, the last rank only decodes and the others share the steps. The
pipeline starts from DECODE_COST and cuts again with the cost each stream measured
(ParallelPipeline.cut_from).

    world 2, 4 steps of 40 layers, decode 0.75 step: rank 0: steps 0-1 + step 2 layers 0-14 (95 layers)
                                                    rank 1: step 2 layers 15-39 + step 3 + decode (65 + 30)
    world 5, same:                                  ranks 0-3: 38 layers each; rank 4: 8 layers + decode
    world 1:                                        rank 0: steps 0-3 + decode
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from liveavatar.engine.steps import StepPart

# The decode of a block against one denoising step, both on the same GPU, at 704x384 with the fast path:
# FP8 137 ms vs 180 ms on an H200, 148 vs 187 ms on an H100; bf16 135 vs 211 ms (docs/benchmarks.md).
DECODE_COST = 0.75
# The same for the light TAEW2.1 decoder (--decoder taew2_1): an estimate from its arithmetic (~1 TFLOP a block
# against 121 per step) at a lower efficiency, not measured yet; the measured cost replaces it after a stream.
LIGHT_DECODE_COST = 0.1


@dataclass(frozen=True)
class Schedule:
    world_size: int
    steps: int
    num_layers: int = 40
    decode_cost: float = DECODE_COST  # the decode of a block, in denoising steps

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sample_steps must be at least 1, got {self.steps}")
        if self.num_layers < 1:
            raise ValueError(f"the transformer needs at least 1 layer, got {self.num_layers}")
        if not self.decode_cost >= 0:
            raise ValueError(f"decode_cost must be at least 0, got {self.decode_cost}")
        most = self.steps * self.num_layers + 1
        if not 1 <= self.world_size <= most:
            raise ValueError(f"{self.world_size} ranks for {self.steps} denoising steps of {self.num_layers} layers: "
                             f"use 1 to {most} (one layer per rank plus one for decoding is the most that can work)")

    @property
    def output_rank(self) -> int:
        """The rank that decodes, writes the video and coordinates the jobs (it holds the encoders and the VAE)."""
        return self.world_size - 1

    @functools.cached_property
    def _ends(self) -> tuple[int, ...]:
        """Where each rank's stretch of the steps x layers sequence ends (rank r runs ends[r-1]..ends[r]-1).

        The busiest rank sets the pace, so the cut minimises the largest share: the smallest load T (in
        layers) such that the last rank, which decodes, takes floor(T - decode) layers and every other rank
        floor(T) layers, and all the layers are taken. The last rank takes that many (none when the decode
        alone is the largest share: a dedicated decode rank); the others split the rest evenly."""
        layers, n = self.steps * self.num_layers, self.world_size
        if n == 1:
            return (layers,)
        decode = self.decode_cost * self.num_layers
        eps = 1e-9
        loads = sorted({float(m) for m in range(1, layers + 1)} | {m + decode for m in range(layers + 1)})
        load = next(t for t in loads
                    if t >= decode and math.floor(t - decode + eps) + (n - 1) * math.floor(t + eps) >= layers)
        last = min(layers - (n - 1), math.floor(load - decode + eps))
        base, extra = divmod(layers - last, n - 1)
        ends = list(itertools.accumulate(base + (r < extra) for r in range(n - 1)))
        return tuple(ends) + (layers,)

    def _span(self, rank: int) -> tuple[int, int]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        return (self._ends[rank - 1] if rank else 0), self._ends[rank]

    def parts_of(self, rank: int) -> list[StepPart]:
        """The (step, layers) that `rank` runs for every block, in order (none for a dedicated decode rank)."""
        lo, hi = self._span(rank)
        parts = []
        for step in range(lo // self.num_layers, -(-hi // self.num_layers)):
            first = step * self.num_layers
            layers = range(max(lo, first) - first, min(hi, first + self.num_layers) - first)
            if layers:
                parts.append(StepPart(step, layers))
        return parts

    @property
    def dedicated_decoder(self) -> bool:
        return not self.parts_of(self.output_rank)

    def receives_tokens(self, rank: int) -> bool:
        """Whether `rank` starts inside a step, so that it receives that step's residual stream with the latents."""
        lo, hi = self._span(rank)
        return lo < hi and lo % self.num_layers != 0

    def cost(self, rank: int) -> float:
        """The work of `rank` per block, in denoising steps (the schedule's estimate)."""
        lo, hi = self._span(rank)
        return (hi - lo) / self.num_layers + (self.decode_cost if rank == self.output_rank else 0.0)

    def previous(self, rank: int) -> int | None:
        """The rank whose latents `rank` receives (None: rank 0 starts from noise)."""
        return rank - 1 if rank > 0 else None

    def next(self, rank: int) -> int | None:
        """The rank that `rank` sends its latents to (None: the output rank keeps them)."""
        return rank + 1 if rank < self.output_rank else None

    def describe(self, rank: int) -> str:
        """E.g. "steps 0-1 + step 2 layers 0-14" or "step 2 layers 15-39 + step 3 + decode"."""
        words, whole = [], []
        for part in self.parts_of(rank) + [None]:
            if part is not None and len(part.layers) == self.num_layers:
                whole.append(part.step)
                continue
            if whole:
                words.append(f"step {whole[0]}" if len(whole) == 1 else f"steps {whole[0]}-{whole[-1]}")
                whole = []
            if part is not None:
                first, last = part.layers[0], part.layers[-1]
                words.append(f"step {part.step} layer {first}" if first == last else f"step {part.step} layers {first}-{last}")
        if rank == self.output_rank:
            words.append("decode")
        return " + ".join(words)
