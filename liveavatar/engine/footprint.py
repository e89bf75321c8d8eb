"""How much memory a mode needs, counted before anything loads, so a mode that cannot fit the machine is
refused with the numbers instead of failing after minutes of loading (or taking the host down with it).

Counted from the architecture (a transformer built on the meta device: no weights are read) and the pixel
budget of `--size` (the output is never larger):
* the transformer's weights, bf16 or FP8 (e4m3 weights with one float32 scale per output channel);
* the ring caches: per denoising step, keys and values of every layer for one clip's latent frames
  (FP8 rings also keep one float32 scale per token and head);
* the low-memory mode keeps the blocks and FP8 rings in pinned host memory, which the system cannot swap,
  beside the encoders, which wait in host memory while the transformer runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from liveavatar.errors import LiveAvatarError
from liveavatar.models.dit import S2VConfig

GIB = 2**30
# Measured on an H100 at 704*384 (docs/benchmarks.md): the resident modes peak at 75.3 GiB (bf16) and 61.7 GiB
# (FP8), 2.1-2.2 GiB above what the weights, the rings and this margin add up to; the low-memory mode allocates
# 11.2-12.1 GiB in all (the non-block parts, two block and two ring-layer buffers, the sink, the VAE, activations).
RESIDENT_WORK = 6 * GIB  # VAE, sink, text keys/values, activations
OFFLOAD_DEVICE = 12 * GIB
HOST_MARGIN = 2 * GIB  # the interpreter, torch and the codecs


@dataclass(frozen=True)
class Footprint:
    """Bytes a mode needs (estimates; see the module's notes)."""

    device: int  # GPU memory at the stream's peak
    pinned: int  # pinned host memory (low-memory mode: blocks and rings)
    host: int  # host memory in all at the peak, pinned included

    def describe(self) -> str:
        return (f"about {self.device / GIB:.0f} GiB of GPU memory and {self.host / GIB:.0f} GiB of host memory"
                + (f" ({self.pinned / GIB:.0f} GiB of it pinned)" if self.pinned else ""))


@lru_cache(maxsize=None)
def transformer_bytes(config: S2VConfig, fp8: bool) -> tuple[int, int]:
    """(bytes of one block, bytes of everything outside the blocks) of the transformer as the pipeline holds it:
    bf16, the modules the checkpoint loader keeps in float32 at 4 bytes, and with `fp8` the linear layers that
    liveavatar.models.fp8 quantises as e4m3 weights with a float32 scale per output channel."""
    from liveavatar.models.dit import S2VTransformer
    from liveavatar.models.fp8 import _targets
    from liveavatar.weights.checkpoint import FP32_MODULES

    with torch.device("meta"):
        model = S2VTransformer(config)
    quantised = set(_targets(model)) if fp8 else set()
    block, rest = 0, 0
    for name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            full = f"{name}.{leaf}"
            if name in quantised and leaf == "weight":
                size = p.numel() + p.shape[0] * 4
            else:
                size = p.numel() * (4 if any(full.startswith(m) for m in FP32_MODULES) else 2)
            if name.startswith("blocks.0."):
                block += size
            elif not name.startswith("blocks."):
                rest += size
    return block, rest


def ring_bytes(config: S2VConfig, tokens_per_frame: int, steps: int, fp8: bool, frames_per_clip: int = 48) -> int:
    """The ring caches of a stream: keys and values of every layer for one clip, per denoising step."""
    tokens = frames_per_clip // 4 * tokens_per_frame
    per_layer = 2 * tokens * config.num_heads * (config.head_dim * (1 if fp8 else 2) + (4 if fp8 else 0))
    return steps * config.num_layers * per_layer


def tokens_per_frame(area: int) -> int:
    """Transformer tokens of one latent frame for a pixel budget W*H (8x VAE, 2x2 patches): an upper bound."""
    return area // (16 * 16)


def footprint(config: S2VConfig, area: int, steps: int, fp8: bool, offload: bool, encoder_bytes: int,
              frames_per_clip: int = 48) -> Footprint:
    """area: the pixel budget W*H; encoder_bytes: the text and audio encoders, which wait in host memory while
    the transformer runs (on a GPU they always do)."""
    block, rest = transformer_bytes(config, fp8)
    blocks = config.num_layers * block
    tokens = tokens_per_frame(area)
    if offload:  # rings always in FP8 (the command's low-memory mode)
        pinned = blocks + ring_bytes(config, tokens, steps, True, frames_per_clip)
        # Loading reads the bf16 transformer into host memory before its blocks move into pinned buffers.
        bf16_block, bf16_rest = transformer_bytes(config, False)
        load_peak = config.num_layers * bf16_block + bf16_rest
        return Footprint(OFFLOAD_DEVICE, pinned, max(pinned, load_peak) + encoder_bytes + HOST_MARGIN)
    device = blocks + rest + ring_bytes(config, tokens, steps, False, frames_per_clip) + RESIDENT_WORK
    return Footprint(device, 0, encoder_bytes + HOST_MARGIN)


def host_memory_available() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(need: Footprint, mode: str, size: str, gpu_bytes: int | None, host_bytes: int | None) -> None:
    """Raises a one-line LiveAvatarError naming the numbers when `need` exceeds the GPU's or the host's memory."""
    if gpu_bytes is not None and need.device > gpu_bytes:
        hint = "" if "offload" in mode else "; --offload_model runs in about 12 GiB"
        raise LiveAvatarError(f"{mode} at {size} needs {need.describe()}; this GPU has {gpu_bytes / GIB:.0f} GiB{hint}")
    if host_bytes is not None and need.host > host_bytes:
        hint = "; --fp8 halves the transformer's share" if "fp8" not in mode and need.pinned else ""
        raise LiveAvatarError(f"{mode} at {size} needs {need.describe()}; this machine has {host_bytes / GIB:.0f} GiB "
                              f"of host memory available{hint}")


def gpu_memory(device: str) -> int | None:
    """Total memory of the CUDA device (None on the CPU), within the process's memory fraction if one is set."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    total = torch.cuda.get_device_properties(index).total_memory
    return int(total * torch.cuda.get_per_process_memory_fraction(index))


def largest_file(path: Path) -> int:
    """Bytes of a file, or of the largest file in a folder (a model folder may hold the same weights twice, as
    .bin and .safetensors); 0 if it does not exist."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return max((f.stat().st_size for f in path.rglob("*") if f.is_file()), default=0)

