"""How the models run: one frozen `RuntimeOptions`, built once from the flags (liveavatar.interfaces.backend)
or a benchmark's arguments, and the functions that apply it to models that know nothing about it (quantised
layers, streamed blocks, compiled regions), used alike by the single-process pipeline and by every rank of
the multi-device one. Streams read the rest (ring storage, CUDA graphs, the attention kernel) from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from liveavatar.models import fastpath
from liveavatar.models.dit import S2VTransformer
from liveavatar.models.fp8 import quantize_transformer
from liveavatar.models.offload import stream_blocks
from liveavatar.models.taehv import DecoderChoice
from liveavatar.models.vae import WanVAE


@dataclass(frozen=True)
class RuntimeOptions:
    fp8: bool = False  # FP8 linear layers in the transformer (liveavatar.models.fp8)
    # The compiled fast path (liveavatar.models.fastpath): regional torch.compile of the transformer and of the
    # VAE decoder's elementwise work, and on a GPU the fastest self-attention kernel for each stream's shapes.
    compile: bool = False
    # With `compile` on a GPU: steady block steps (and the light decoder's blocks) replayed as CUDA graphs.
    cuda_graphs: bool = True
    # The fast path's self-attention kernel by name (fastpath.attention_candidates); None: the fastest, timed.
    attention: str | None = None
    offload_encoders: bool = False  # text and audio encoders in host memory except while they run
    # The transformer's blocks and the ring caches in pinned host memory, streamed to the GPU layer by layer
    # (liveavatar.models.offload), for GPUs of 24-48 GB.
    offload_transformer: bool = False
    kv_dtype: torch.dtype | None = None  # ring caches' storage; None: the transformer's (float8_e4m3fn halves it)
    # The VAE on its own CUDA stream beside the next block's steps (see AvatarStream; off: slower on an H100).
    concurrent_decode: bool = False
    decoder: DecoderChoice = DecoderChoice()  # what decodes the streams: the VAE's decoder or the light one

    def __post_init__(self):
        if self.attention is not None and self.attention not in fastpath.attention_candidates():
            raise ValueError(f"unknown attention kernel {self.attention!r}; known: "
                             f"{', '.join(fastpath.attention_candidates())}")

    def graphs_on(self, device: torch.device) -> bool:
        """Whether a stream on `device` replays its steady steps as CUDA graphs (never with streamed blocks,
        whose copies between the layers a graph cannot hold)."""
        return self.compile and self.cuda_graphs and device.type == "cuda" and not self.offload_transformer

    def kernels_timed_on(self, device: torch.device) -> bool:
        """Whether streams on `device` pick their attention kernel (the fast path on a GPU)."""
        return self.compile and device.type == "cuda"


def apply_to_transformer(dit: S2VTransformer, options: RuntimeOptions, device: torch.device) -> None:
    """FP8 layers, streamed blocks and compiled regions, in place; `device` is where it runs (the model itself
    may sit in host memory for `offload_transformer`)."""
    if options.fp8:
        quantize_transformer(dit, run_device=device)
    if options.offload_transformer:
        stream_blocks(dit, device)
    if options.compile:
        fastpath.compile_transformer(dit)


def apply_to_vae(vae: WanVAE, options: RuntimeOptions) -> None:
    """The VAE decoder's compiled elementwise work, in place."""
    if options.compile:
        fastpath.compile_decoder(vae)
        # The VAE's convolutions have fixed shapes per resolution: let cuDNN time its algorithms once.
        torch.backends.cudnn.benchmark = True


def choose_attention(dit: S2VTransformer, options: RuntimeOptions, steps) -> dict[str, float]:
    """The self-attention kernel of the fast path for a stream's `steps` (a StepRunner): the one the options
    name, or the fastest at its shapes (timed once per shape; the timings in ms are returned)."""
    if not options.kernels_timed_on(dit.device):
        return {}
    if options.attention is not None:
        fastpath.use_attention(dit, options.attention)
        return {}
    return fastpath.use_fastest_attention(dit, steps)
