"""The GPU fast path of the transformer (regional compilation and the fastest attention kernel) and of the VAE
decoder (its elementwise work compiled, `compile_decoder`).

* Regional torch.compile: the code between two attentions (modulated LayerNorm, q/k/v projections and norms;
  output projection, gated residuals, text cross-attention, FFN; the audio injection; RoPE) is compiled once
  and shared by all 40 layers, so its float32 elementwise work is fused into few kernels. The attention over
  the ring cache stays outside: its key length changes during the first clip, and it is one kernel anyway.
* Self-attention: the step attends to its history (the ring) and the sink. Every scaled_dot_product_attention
  backend on the two concatenated, and the kernels that return the log-sum-exp on each part separately,
  merged (no copy of the 313 MB of keys and values per layer), are timed once at the stream's real shapes;
  the fastest serves every step.

Both keep the numbers of the eager model up to floating-point reassociation (the compiled kernels sum in a
different order), which tests/test_fastpath.py checks on the CPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from liveavatar.models import rope
from liveavatar.models import vae as vae_module
from liveavatar.models.audio_modules import AudioInjector
from liveavatar.models.dit import BlockStepInputs, S2VTransformer
from liveavatar.models.layers import TransformerBlock, merge_attention_parts, two_part_attention

log = logging.getLogger(__name__)

# Recompiling for each new token count (sink prefill, block step, other resolutions) keeps every kernel
# specialised to a static shape, instead of one dynamic-shape kernel that serves them all more slowly.
_compile = functools.partial(torch.compile, dynamic=False)


def compile_transformer(dit: S2VTransformer) -> None:
    """Swaps the transformer's per-layer code for compiled versions, in place (compilation happens on first use)."""
    before = _compile(TransformerBlock.self_attention_inputs)
    after = _compile(TransformerBlock.after_self_attention)
    for block in dit.blocks:
        block.self_attention_inputs = functools.partial(before, block)
        block.after_self_attention = functools.partial(after, block)
    dit.audio_injector.inject = _compile(AudioInjector.inject)
    dit.audio_injector.inject_actors = _compile(AudioInjector.inject_actors)
    dit.rotate = _compile(rope.apply_rope)
    dit.attention_timings = {}  # (query, ring, sink tokens) -> ms per attention candidate (use_fastest_attention)


def compile_decoder(vae: vae_module.WanVAE) -> None:
    """Swaps the VAE decoder's elementwise work for compiled versions, in place: the RMSNorm + SiLU before each
    causal conv and the 2x nearest upsampling, each one pass over the activations instead of several eager
    kernels (the norm's reduction, its division and scaling, the SiLU). The convolutions stay cuDNN's. The
    decoder's stages differ in channels, sizes and frames (1 for the stream's first latent, then 2 or 4), so
    the kernels take dynamic shapes: two compilations each (one frame, several) instead of one per shape."""
    kernel = torch.compile(lambda x, gamma: F.silu(vae_module.rms_norm(x, gamma)), dynamic=True)

    def norm_silu(norm: vae_module.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return kernel(x, norm.gamma.view(-1))  # a view: parameters would be compiled with static shapes

    upsample_2x = torch.compile(vae_module.upsample_2x, dynamic=True)
    vae.decoder.norm_silu = norm_silu
    for module in vae.decoder.modules():
        if isinstance(module, vae_module.ResidualBlock):
            module.norm_silu = norm_silu
        elif isinstance(module, vae_module.Upsample):
            module.upsample_2x = upsample_2x


SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def _with_lse(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, heads, L, d], log-sum-exp of the scores [B, heads, L]) from the kernels that give both."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if kernel == "CUDNN_ATTENTION":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out, lse.reshape(out.shape[:3])


_merge = _compile(merge_attention_parts)


def _attention_by_parts(kernel: str, q, k1, v1, k2, v2) -> torch.Tensor:
    """The attention over both parts without copying them into one tensor: each part separately, then merged."""
    out1, lse1 = _with_lse(kernel, q, k1, v1)
    out2, lse2 = _with_lse(kernel, q, k2, v2)
    return _merge(out1, lse1, out2, lse2).transpose(1, 2)


def _concatenated_with(backend: SDPBackend, q, k1, v1, k2, v2) -> torch.Tensor:
    with sdpa_kernel(backend):
        return two_part_attention(q, k1, v1, k2, v2)


def attention_candidates() -> dict[str, Callable]:
    """The ways to run the step's self-attention over history + sink: every SDPA backend on the two parts
    concatenated, and the kernels that return the log-sum-exp on each part, merged."""
    candidates: dict[str, Callable] = {b.name: functools.partial(_concatenated_with, b) for b in SDPA_BACKENDS}
    for kernel in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        candidates[f"{kernel} by parts"] = functools.partial(_attention_by_parts, kernel)
    return candidates


def time_attention(q_len: int, history_len: int, sink_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per call of each candidate that runs these shapes and agrees with the plain concatenated
    attention (the others are left out, with the reason logged)."""
    gen = torch.Generator(device).manual_seed(0)

    def rand(n: int) -> torch.Tensor:
        return torch.randn(1, n, heads, head_dim, device=device, dtype=dtype, generator=gen)

    args = (rand(q_len), rand(history_len), rand(history_len), rand(sink_len), rand(sink_len))
    reference = two_part_attention(*(a.float() for a in args))
    times = {}
    for name, candidate in attention_candidates().items():
        try:
            out = candidate(*args)  # warm-up (and the refusal, if any)
            error = ((out.float() - reference).norm() / reference.norm()).item()
            if not error < 0.01:  # bf16 rounding gives ~0.3 %
                log.info("attention %s left out: %.2g from the float32 attention (rms)", name, error)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                candidate(*args)
            end.record()
            end.synchronize()
            times[name] = start.elapsed_time(end) / repeats
        except Exception as e:  # kernels that refuse these shapes or dtypes, or private ops another torch lacks
            log.info("attention %s unavailable: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return times


def use_fastest_attention(dit: S2VTransformer, steps) -> dict[str, float]:
    """Makes the transformer use the fastest self-attention at the shapes of `steps` (a StepRunner: a stream's
    steps, or the share of them a rank runs), with its ring full. Each shape is timed once; its timings (ms per
    call) are kept on the transformer and returned."""
    ring = next(r for r in steps.rings if r is not None)
    shape = (steps.settings.latent_frames_per_block * steps.tokens_per_frame, ring.capacity,
             steps.sink.keys[0].shape[1])
    if shape not in dit.attention_timings:
        c = dit.config
        times = time_attention(*shape, c.num_heads, c.head_dim, dit.dtype, dit.device)
        dit.attention_timings[shape] = times
        log.info("self-attention at %s: %s", shape, {k: round(v, 2) for k, v in times.items()})
    times = dit.attention_timings[shape]
    if times:
        use_attention(dit, min(times, key=times.get))
    return times


def use_attention(dit: S2VTransformer, name: str) -> None:
    """Makes the transformer's self-attention the candidate `name` (a resumed stream takes the kernel the
    interrupted one chose: kernels round differently, and two processes may time them in another order)."""
    candidates = attention_candidates()
    if name not in candidates:
        raise ValueError(f"unknown attention kernel {name!r}; known: {', '.join(candidates)}")
    dit.self_attention = candidates[name]
    dit.attention_choice = name


@dataclass
class CapturedStep:
    """A block step captured as a CUDA graph: replaying it reads `inputs` and writes `output`, where they were."""

    graph: torch.cuda.CUDAGraph
    inputs: BlockStepInputs  # the buffers each replay reads (a call's tensors are copied in first)
    output: torch.Tensor  # the velocity, or the residual stream of a step that continues on another rank


class StepGraphs:
    """CUDA graphs of one stream's steady-state block steps.

    Once a ring is full, a block step has fixed shapes and reads fixed tensors (text keys/values, sink, its
    ring); only the latents, the audio features, the time embedding, the RoPE tables and the ring slot it
    writes change. So each (ring, slot) gets a graph, captured at its first use, and every later step is a
    copy of the small inputs and one graph launch instead of thousands of kernel launches from Python: the
    host then finishes a block's work in milliseconds and the GPU never waits for it. The first steady step
    of each ring runs normally, so every kernel (cuDNN plans, compiled regions) exists before a capture.
    All graphs share one memory pool: they run one after another on one stream.
    """

    def __init__(self, dit: S2VTransformer):
        self.dit = dit
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], CapturedStep] = {}  # by (ring, slot)
        self.warm: set[int] = set()
        self.error: str | None = None  # why capturing failed, after which steps run without graphs

    def clear(self) -> None:
        """Forgets the graphs (they hold the addresses of the sink cache, which a new prefill replaces)."""
        self.graphs.clear()
        self.warm.clear()

    @torch.no_grad()
    def forward_block(self, x, t, audio, text_kv, sink, ring, start_frame: int, ref_roll: int,
                      layers: range | None = None, tokens: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """S2VTransformer.forward_block, through a graph once `ring` is full. A ring serves one part of one step
        (its layers), so each part of a step that a rank runs has graphs of its own. mask (multi-person mode)
        is the stream's, the same tensor for every step: the graphs read it where it is."""
        dit = self.dit
        args = (x, t, audio, text_kv, sink, ring, start_frame, ref_roll, layers, tokens)
        if ring.written < ring.capacity or self.error:  # the visible history still grows: shapes change every block
            return dit.forward_block(*args, mask=mask)
        if id(ring) not in self.warm:
            self.warm.add(id(ring))
            return dit.forward_block(*args, mask=mask)
        num_frames, h, w = x.shape[2:]
        tokens_per_frame = (h // 2) * (w // 2)
        start = start_frame * tokens_per_frame
        inputs = dit.block_step_inputs(x, audio, t, start_frame, ref_roll, sink, tokens)
        key = (id(ring), start % ring.capacity)
        if key not in self.graphs:
            static = BlockStepInputs(**{name: value.clone() for name, value in inputs.tensors().items()})
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool):
                    out = dit.block_step(static, text_kv, sink, ring, start, layers, mask)
            except RuntimeError as e:  # a kernel that cannot be captured: keep streaming without graphs
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                log.warning("CUDA graph capture failed, continuing without graphs: %s", self.error)
                return dit.forward_block(*args, mask=mask)
            self.graphs[key] = CapturedStep(graph, static, out)
        captured = self.graphs[key]
        for name, value in inputs.tensors().items():
            getattr(captured.inputs, name).copy_(value)
        captured.graph.replay()
        ring.written = max(ring.written, start + num_frames * tokens_per_frame)
        if layers is not None and layers.stop < len(dit.blocks):
            # A residual stream goes to the next rank; the graph's buffer is rewritten by its next replay.
            return captured.output.clone()
        return captured.output
