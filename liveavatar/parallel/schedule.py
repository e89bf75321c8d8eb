"""Which rank runs which denoising steps, and which rank decodes.

Ranks 0..D-1 denoise, D = min(world_size, steps): each owns a contiguous group of steps (and the KV caches
of those steps only), so a block's latents travel 0 -> 1 -> ... -> D-1 and every hop is one step further
down the noise schedule. The last rank (world_size - 1) decodes and writes the video: with one GPU more
than steps it does nothing else (a dedicated decode rank, the original's 4 + 1 layout); otherwise it is
also the last denoising rank, so it is given the smallest group: when the steps do not divide evenly, the
earlier ranks take one step more.

    world 2, steps 4: rank 0 steps 0-1 | rank 1 steps 2-3 + decode
    world 3, steps 4: rank 0 steps 0-1 | rank 1 step 2 | rank 2 step 3 + decode
    world 5, steps 4: ranks 0-3 one step each | rank 4 decode
    world 3, steps 2: rank 0 step 0 | rank 1 step 1 | rank 2 decode
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    world_size: int
    steps: int

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"sample_steps must be at least 1, got {self.steps}")
        if not 1 <= self.world_size <= self.steps + 1:
            raise ValueError(
                f"{self.world_size} ranks for {self.steps} denoising steps: use 1 to {self.steps + 1} "
                f"(one rank per step plus one for decoding is the most that helps)"
            )

    @property
    def denoising_ranks(self) -> int:
        return min(self.world_size, self.steps)

    @property
    def output_rank(self) -> int:
        """The rank that decodes, writes the video and coordinates the jobs (it holds the encoders and the VAE)."""
        return self.world_size - 1

    @property
    def dedicated_decoder(self) -> bool:
        return self.world_size > self.steps

    def steps_of(self, rank: int) -> range:
        """The denoising steps of `rank` (empty for a dedicated decode rank)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        if rank >= self.denoising_ranks:
            return range(0)
        base, extra = divmod(self.steps, self.denoising_ranks)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))

    def previous(self, rank: int) -> int | None:
        """The rank whose latents `rank` receives (None: rank 0 starts from noise)."""
        return rank - 1 if rank > 0 else None

    def next(self, rank: int) -> int | None:
        """The rank that `rank` sends its latents to (None: the output rank keeps them)."""
        return rank + 1 if rank < self.output_rank else None

    def describe(self, rank: int) -> str:
        steps = self.steps_of(rank)
        parts = []
        if len(steps):
            parts.append(f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}")
        if rank == self.output_rank:
            parts.append("decode")
        return " + ".join(parts)
