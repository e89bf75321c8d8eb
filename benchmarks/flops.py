"""Arithmetic of one block step and one block decode, counted by running the real code on the meta device.

torch.utils.flop_counter counts every matrix product and convolution the code issues, so the figures follow
the code (the cached text keys/values, the audio injection, the ring and sink lengths) instead of a formula
kept beside it. On the meta device nothing is computed, so the full 14 B model is counted in seconds.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from liveavatar.models.dit import S2VConfig, S2VTransformer
from liveavatar.models.kv_cache import RingCache
from liveavatar.models.taehv import WIDTHS, TinyDecoder
from liveavatar.models.vae import WanVAE

_ATTENTION_OPS = ("bmm", "_scaled_dot_product")  # SDPA decomposes into bmm on the meta device
_LINEAR_OPS = ("mm", "addmm", "_scaled_mm")


def _split(counts: dict) -> dict[str, float]:
    out = {"linear": 0.0, "attention": 0.0, "convolution": 0.0}
    for op, flops in counts.items():
        name = str(op).removeprefix("aten.").split(".")[0]
        if name.startswith(_ATTENTION_OPS):
            out["attention"] += flops
        elif name in _LINEAR_OPS:
            out["linear"] += flops
        elif name == "convolution":
            out["convolution"] += flops
        else:
            raise ValueError(f"uncategorised op {op} in the FLOP count")
    return out


def block_step_flops(config: S2VConfig, lat_h: int, lat_w: int, frames_per_block: int = 3,
                     ring_frames: int = 12) -> dict[str, float]:
    """FLOPs of one denoising step of one block with a full ring: {'linear', 'attention', 'convolution'}."""
    with torch.device("meta"):
        model = S2VTransformer(config)
        text_kv = model.text_kv(torch.zeros(1, 16, config.text_dim))
        sink = model.prefill_sink(torch.zeros(1, 16, 1, lat_h, lat_w), torch.zeros(1, 16, 19, lat_h, lat_w), text_kv)
        tokens_per_frame = (lat_h // 2) * (lat_w // 2)
        ring = RingCache.allocate(config.num_layers, 1, ring_frames * tokens_per_frame, config.num_heads, config.head_dim,
                         "meta", torch.float32)
        ring.written = ring.capacity
        audio = torch.zeros(1, config.audio_layers, config.audio_dim, 4 * frames_per_block)
        x = torch.zeros(1, 16, frames_per_block, lat_h, lat_w)
        with FlopCounterMode(display=False) as counter:
            model.forward_block(x, 500.0, audio, text_kv, sink, ring, start_frame=10 * frames_per_block, ref_roll=4)
    return _split(counter.get_flop_counts()["Global"])


def block_decode_flops(vae_dim: int, lat_h: int, lat_w: int, latents: int = 3) -> dict[str, float]:
    """FLOPs of decoding one block of latents (after the first) with the streaming VAE decoder."""
    with torch.device("meta"):
        decoder = WanVAE(vae_dim).streaming_decoder()
        decoder.decode(torch.zeros(1, 16, 1, lat_h, lat_w))
        with FlopCounterMode(display=False) as counter:
            decoder.decode(torch.zeros(1, 16, latents, lat_h, lat_w))
    return _split(counter.get_flop_counts()["Global"])


def tiny_block_decode_flops(lat_h: int, lat_w: int, latents: int = 3, widths: tuple = WIDTHS) -> dict[str, float]:
    """FLOPs of decoding one block of latents (after the first) with the light TAEW2.1 decoder (release widths)."""
    with torch.device("meta"):
        decoder = TinyDecoder(widths).streaming_decoder()
        decoder.decode(torch.zeros(1, 16, 1, lat_h, lat_w))
        with FlopCounterMode(display=False) as counter:
            decoder.decode(torch.zeros(1, 16, latents, lat_h, lat_w))
    return _split(counter.get_flop_counts()["Global"])


def decode_flops(decoder: str, vae_dim: int, lat_h: int, lat_w: int, latents: int = 3) -> dict[str, float]:
    """A block's decode with the named decoder ("wan": the VAE of base width vae_dim; "taew2_1")."""
    if decoder == "wan":
        return block_decode_flops(vae_dim, lat_h, lat_w, latents)
    return tiny_block_decode_flops(lat_h, lat_w, latents)
