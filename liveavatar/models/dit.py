"""The Wan2.2-S2V diffusion transformer, with the streaming (block-causal, KV-cached) forward of Live Avatar.

Token streams:
* noisy tokens: the block being denoised, patchified 1x2x2, RoPE frames at absolute latent positions;
* sink tokens: the reference latent (RoPE frame 30, rolled ahead of the block) and the motion latents
  packed by `FramePacker` (negative RoPE frames). They are run once through all layers at timestep 0
  (`prefill_sink`) and afterwards only read from the cache.

Parameter names match the released `diffusion_pytorch_model-*.safetensors` exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.errors import CheckpointError
from liveavatar.models import rope
from liveavatar.models.audio_modules import AudioInjector, CausalAudioEncoder
from liveavatar.models.kv_cache import RingCache, SinkCache
from liveavatar.models.layers import Head, TransformerBlock, attention, linear_fp32, two_part_attention

# Video frames of motion context the audio encoder is primed with, and the latent frames they make
# (1 + 72/4); the audio window of each block is left-padded with this many copies of its first frame.
MOTION_VIDEO_FRAMES = 73
MOTION_LATENT_FRAMES = 19
REF_ROPE_FRAME = 30  # RoPE frame of the reference latent


@dataclass(frozen=True)
class S2VConfig:
    """Architecture of WanModel_S2V. config.json carries these fields; the rest are the model's fixed values."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_len: int = 512
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    # Not in config.json (the class's ignore_for_config drops them): fixed for this model.
    text_dim: int = 4096
    patch_size: tuple[int, int, int] = (1, 2, 2)
    audio_layers: int = 25  # wav2vec2 hidden states mixed by the audio encoder
    framepack_buckets: tuple[int, int, int] = (1, 2, 16)  # newest, 2x, 4x motion latents

    # Values of config.json that select code paths; anything else is a different model we do not run.
    REQUIRED = {
        "model_type": "s2v",
        "enable_adain": True,
        "adain_mode": "attn_norm",
        "zero_timestep": True,
        "enable_motioner": False,
        "enable_framepack": True,
        "framepack_drop_mode": "padd",
        "add_last_motion": True,
        "enable_tsm": False,
        "trainable_token_pos_emb": False,
    }

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_json(cls, path: str | Path) -> "S2VConfig":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; expected the transformer's config.json")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        for key, want in cls.REQUIRED.items():
            if key in raw and raw[key] != want:
                raise CheckpointError(f"{path}: {key}={raw[key]!r} is not supported (this model needs {want!r})")
        names = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
        config = cls(**kwargs)
        if config.dim % config.num_heads or config.head_dim % 2:
            raise CheckpointError(f"{path}: dim {config.dim} is not divisible into {config.num_heads} even-sized heads")
        return config


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[N] timesteps -> [N, dim] cos|sin features, computed in float64 as the reference."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class FramePacker(nn.Module):
    """Packs the last 19 motion latents into tokens: the newest at full resolution (1x2x2 patches), the next 2
    at 2x4x4 and the 16 oldest at 4x8x8, so a long history costs few tokens. Missing history is zero-padded."""

    def __init__(self, dim: int, buckets: tuple[int, int, int]):
        super().__init__()
        self.buckets = buckets
        self.proj = nn.Conv3d(16, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(16, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(16, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """motion [B, 16, T, h, w] -> tokens [B, N, D] (order: newest, 2x, 4x) and RoPE multipliers [N, d/2]."""
        b, c, t, h, w = motion.shape
        total = sum(self.buckets)
        padded = motion.new_zeros(b, c, total, h, w)
        keep = min(total, t)
        if keep:
            padded[:, :, total - keep :] = motion[:, :, t - keep :]
        n1, n2, n4 = self.buckets
        oldest, middle, newest = padded.split([n4, n2, n1], dim=2)

        tokens, mults = [], []
        # (conv, latents, first RoPE frame, frames per token, spatial downsampling vs. the 1x2x2 grid)
        for conv, lat, start, stride, down in (
            (self.proj, newest, -n1, 1, 1),
            (self.proj_2x, middle, -(n1 + n2), 2, 2),
            (self.proj_4x, oldest, -(n1 + n2 + n4), 4, 4),
        ):
            out = conv(lat.to(conv.weight.dtype))
            tokens.append(out.flatten(2).transpose(1, 2))
            nf, nh, nw = out.shape[2:]
            # Token frames sit evenly over the bucket's span, counted backwards (negative RoPE frames).
            span = -start
            frames = [-v for v in np.linspace(span, span - nf * stride + 1, nf).astype(int).tolist()]
            rows = rope.spaced_positions(h // 2, nh)
            cols = rope.spaced_positions(w // 2, nw)
            mults.append(rope.grid_multipliers(frames, rows, cols, head_dim))
        return torch.cat(tokens, dim=1), torch.cat(mults, dim=0)


@dataclass
class BlockStepInputs:
    """The tensors one block step reads besides the caches (S2VTransformer.block_step_inputs); a CUDA graph of
    the step keeps a copy of each as its input buffer (liveavatar.models.fastpath.StepGraphs)."""

    x: torch.Tensor  # noisy latents [B, 16, F, h, w]
    audio: torch.Tensor  # audio features of the block [actors, layers, C, video frames]
    e: torch.Tensor  # time embedding (the head's modulation)
    e0: torch.Tensor  # time projection (the layers' modulation)
    noisy_rope: torch.Tensor  # RoPE table of the block's tokens
    sink_rope: torch.Tensor  # RoPE table of the sink's tokens
    tokens: torch.Tensor | None = None  # the residual stream after earlier layers (a step split between ranks)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (tokens only when there are some)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["tokens"] is None:
            del out["tokens"]
        return out


class S2VTransformer(nn.Module):
    def __init__(self, config: S2VConfig):
        super().__init__()
        c = config
        self.config = c
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.cond_encoder = nn.Conv3d(c.cond_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(TransformerBlock(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers))
        self.head = Head(c.dim, c.out_dim * math.prod(c.patch_size), c.eps)
        self.casual_audio_encoder = CausalAudioEncoder(c.audio_dim, c.dim, c.num_audio_token, c.audio_layers)
        self.audio_injector = AudioInjector(c.dim, c.num_heads, list(c.audio_inject_layers), c.eps)
        self.trainable_cond_mask = nn.Embedding(3, c.dim)  # 0 noisy, 1 reference, 2 motion
        self.frame_packer = FramePacker(c.dim, c.framepack_buckets)
        # RoPE rotation of [B, L, heads, d] tensors and the streaming step's self-attention over its history
        # and its sink; liveavatar.models.fastpath swaps in a compiled rotation and the fastest attention.
        self.rotate = rope.apply_rope
        self.self_attention = two_part_attention
        # Set by liveavatar.models.offload when the blocks live in host memory: called before block i runs.
        self.block_streamer = None

    def layers(self, which: range | None = None):
        """(index, block) in depth order (all, or those in `which`), each on the device when it is handed out
        (see `block_streamer`)."""
        for i in range(len(self.blocks)) if which is None else which:
            if self.block_streamer is not None:
                self.block_streamer.before(i)
            yield i, self.blocks[i]

    # ------------------------------------------------------------------ conditioning helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def rope_dtype(self) -> torch.dtype:
        """RoPE is computed in float64 for a float32 model (the reference's precision) and in float32 for
        reduced-precision ones, whose bf16 keys could not hold the difference."""
        return torch.float64 if self.dtype == torch.float32 else torch.float32

    def timestep(self, t: float | torch.Tensor) -> torch.Tensor:
        """A timestep as a float32 [1] tensor on the model's device, made there (no host-to-device copy)
        unless it already is a device tensor."""
        if isinstance(t, torch.Tensor) and t.device == self.device:
            return t.to(torch.float32).reshape(1)
        return torch.full((1,), float(t), dtype=torch.float32, device=self.device)

    def text_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values for a text context [B, L, 4096].

        The context is zero-padded to text_len rows and NOT masked: the padding rows embed to a constant
        vector that the reference attends to, so we do too.
        """
        b, length, _ = context.shape
        padded = context.new_zeros(b, self.config.text_len, context.shape[-1])
        padded[:, :length] = context
        emb = self.text_embedding(padded.to(self.dtype))
        return [blk.cross_attn.context_kv(emb) for _, blk in self.layers()]

    def time_embedding_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] timesteps -> (e [B, D], e0 [B, 6, D]) in float32."""
        sin = sinusoidal_embedding(self.config.freq_dim, t).float()
        e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], sin)))
        e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def audio_tokens(self, audio: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, layers, C, 4*num_frames] features of this block's video frames ->
        (global [B, F, 1, D], local [B, F, n+1, D]) tokens, one set per latent frame.

        The window is left-padded with copies of its first frame as if preceded by a still motion clip,
        and the steps that cover that padding are dropped.
        """
        pad = audio[..., :1].expand(*audio.shape[:-1], MOTION_VIDEO_FRAMES)
        glob, local = self.casual_audio_encoder(torch.cat([pad, audio], dim=-1))
        glob, local = glob[:, MOTION_LATENT_FRAMES:], local[:, MOTION_LATENT_FRAMES:]
        if glob.shape[1] != num_frames:
            raise ValueError(f"audio window of {audio.shape[-1]} frames does not cover {num_frames} latent frames")
        return glob.to(self.dtype), local.to(self.dtype)

    def embed_noisy(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 16, F, h, w] -> tokens [B, F*h/2*w/2, D] float32.

        The pose condition is always zero in Live Avatar, so cond_encoder contributes exactly its bias.
        """
        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).float()
        bias = self.cond_encoder.bias.float() + self.trainable_cond_mask.weight[0].float()
        return tokens + bias

    def embed_sink(self, ref: torch.Tensor, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Reference [B, 16, 1, h, w] and motion [B, 16, T, h, w] latents -> sink tokens [B, N, D] (float32),
        the motion part's RoPE multipliers, and the reference token grid."""
        ref_tok = self.patch_embedding(ref.to(self.dtype))
        grid = tuple(ref_tok.shape[3:])
        ref_tok = ref_tok.flatten(2).transpose(1, 2).float() + self.trainable_cond_mask.weight[1].float()
        mot_tok, mot_rope = self.frame_packer(motion, self.config.head_dim)
        mot_tok = mot_tok.float() + self.trainable_cond_mask.weight[2].float()
        return torch.cat([ref_tok, mot_tok], dim=1), mot_rope.to(self.device), grid

    def ref_rope(self, grid: tuple[int, int], frame: int) -> torch.Tensor:
        rows, cols = grid
        return rope.grid_multipliers(range(frame, frame + 1), range(rows), range(cols), self.config.head_dim, self.device)

    def noisy_rope(self, start_frame: int, num_frames: int, grid: tuple[int, int]) -> torch.Tensor:
        rows, cols = grid
        frames = range(start_frame, start_frame + num_frames)
        return rope.grid_multipliers(frames, range(rows), range(cols), self.config.head_dim, self.device)

    def unpatchify(self, tokens: torch.Tensor, num_frames: int, grid: tuple[int, int]) -> torch.Tensor:
        """[B, F*h'*w', out*pt*ph*pw] -> [B, out, F*pt, h'*ph, w'*pw]."""
        pt, ph, pw = self.config.patch_size
        rows, cols = grid
        b = tokens.shape[0]
        x = tokens.view(b, num_frames, rows, cols, pt, ph, pw, self.config.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, self.config.out_dim, num_frames * pt, rows * ph, cols * pw)

    # ------------------------------------------------------------------ streaming forward
    @torch.no_grad()
    def prefill_sink(
        self, ref: torch.Tensor, motion: torch.Tensor, text_kv: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> SinkCache:
        """Runs the sink tokens through every layer at timestep 0 and caches their keys (without RoPE) and values.

        The sink attends only to itself, with the reference at its base RoPE frame. No audio is injected.
        """
        x, motion_rope, grid = self.embed_sink(ref, motion)
        sink_rope = rope.rotation_table(torch.cat([self.ref_rope(grid, REF_ROPE_FRAME), motion_rope]), self.rope_dtype)
        _, e0 = self.time_embedding_at(torch.zeros(1, device=self.device))
        time_mod = e0[:, None]  # [1, 1, 6, D]
        cache = SinkCache(motion_rope=motion_rope, ref_grid=grid)

        def attend(q, k, v):
            cache.keys.append(k)
            cache.values.append(v)
            return attention(self.rotate(q, sink_rope), self.rotate(k, sink_rope), v)

        last = len(self.blocks) - 1
        for i, block in self.layers():
            x = block(x, time_mod, attend, text_kv[i], skip_post_attention=i == last)
        return cache

    @torch.no_grad()
    def forward_block(
        self,
        x: torch.Tensor,
        t: float | torch.Tensor,
        audio: torch.Tensor,
        text_kv: list[tuple[torch.Tensor, torch.Tensor]],
        sink: SinkCache,
        ring: RingCache,
        start_frame: int,
        ref_roll: int,
        layers: range | None = None,
        tokens: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoising step of one block: velocity [B, 16, F, h, w] for noisy latents x at timestep t.

        start_frame: absolute latent index of the block's first frame (its RoPE frame).
        ref_roll: the random offset rd; the reference's RoPE frame becomes 30 + max(0, start - 30 + rd),
          so identity stays a little ahead of the current block however long the stream.
        The block's keys/values are written into `ring`, which must belong to this step.
        layers, tokens: run only these layers of the step (see `block_step`).
        mask: several actors (multi-person mode): audio holds one row per actor and mask [A, F*h/2*w/2, 1]
          weights each actor's audio injection per token (liveavatar.engine.multi_person).
        """
        num_frames, h, w = x.shape[2:]
        grid = (h // 2, w // 2)
        start = start_frame * grid[0] * grid[1]
        inputs = self.block_step_inputs(x, audio, t, start_frame, ref_roll, sink, tokens)
        out = self.block_step(inputs, text_kv, sink, ring, start, layers, mask)
        ring.written = max(ring.written, start + num_frames * grid[0] * grid[1])
        return out

    def block_step_inputs(self, x: torch.Tensor, audio: torch.Tensor, t: float | torch.Tensor, start_frame: int,
                          ref_roll: int, sink: SinkCache, tokens: torch.Tensor | None = None) -> BlockStepInputs:
        """The tensors a block step reads besides the caches, made on the device: the latents, the audio features,
        the time embedding and the RoPE tables of the block's tokens and of the sink (whose reference position
        rolls with the block); and the residual stream of a step that continues after earlier layers."""
        num_frames, h, w = x.shape[2:]
        e, e0 = self.time_embedding_at(self.timestep(t))
        noisy_rope = rope.rotation_table(self.noisy_rope(start_frame, num_frames, (h // 2, w // 2)), self.rope_dtype)
        ref_frame = REF_ROPE_FRAME + max(0, start_frame - REF_ROPE_FRAME + ref_roll)
        sink_rope = rope.rotation_table(torch.cat([self.ref_rope(sink.ref_grid, ref_frame), sink.motion_rope]), self.rope_dtype)
        return BlockStepInputs(x, audio, e, e0, noisy_rope, sink_rope, tokens)

    def block_step(
        self,
        inputs: BlockStepInputs,
        text_kv: list[tuple[torch.Tensor, torch.Tensor]],
        sink: SinkCache,
        ring: RingCache,
        start: int,
        layers: range | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The velocity of a block step from its inputs: `embed_noisy`, `run_layers` and `velocity` in turn.
        Besides tensors it depends only on the ring position `start` (absolute token offset) and the ring's
        fill, so that it can be captured in a CUDA graph. Does not update ring.written.

        With `layers`, a contiguous part of the depth, the step starts from `inputs.tokens`, its residual stream
        [B, N, D] float32 after the layers before, unless the part starts at layer 0; and it returns the residual
        stream after the part's last layer instead of the velocity, unless that is the model's last layer.
        mask: the actors' token weights of a multi-person step (see `forward_block`)."""
        num_layers = len(self.blocks)
        layers = range(num_layers) if layers is None else layers
        if not layers or layers.step != 1 or layers.start < 0 or layers.stop > num_layers:
            raise ValueError(f"layers {layers} is not a contiguous part of 0..{num_layers - 1}")
        if (inputs.tokens is None) != (layers.start == 0):
            raise ValueError("a step that starts at layer 0 embeds x; one that starts later needs its tokens")
        tokens = self.embed_noisy(inputs.x) if inputs.tokens is None else inputs.tokens
        tokens = self.run_layers(tokens, layers, inputs, text_kv, sink, ring, start, mask)
        if layers.stop < num_layers:
            return tokens
        return self.velocity(tokens, inputs)

    def run_layers(self, tokens: torch.Tensor, layers: range, inputs: BlockStepInputs,
                   text_kv: list[tuple[torch.Tensor, torch.Tensor]], sink: SinkCache, ring: RingCache, start: int,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream [B, N, D] float32 of a block's tokens through `layers`: each attends to the sink and
        to the ring's history (the block's own keys/values are written into the ring at token offset `start`),
        then the text, and takes the audio injection where the model has one."""
        num_frames, h, w = inputs.x.shape[2:]
        end = start + num_frames * (h // 2) * (w // 2)
        time_mod = inputs.e0[:, None]
        audio_global, audio_local = self.audio_tokens(inputs.audio, num_frames)

        layer = 0

        def attend(q, k, v):
            k = self.rotate(k, inputs.noisy_rope)
            ring.write(layer, start, k, v)
            hist_k, hist_v = ring.valid(layer, end)
            sink_k = self.rotate(sink.keys[layer], inputs.sink_rope)
            return self.self_attention(self.rotate(q, inputs.noisy_rope), hist_k, hist_v, sink_k, sink.values[layer])

        for layer, block in self.layers(layers):
            tokens = block(tokens, time_mod, attend, text_kv[layer])
            if layer in self.audio_injector.layer_to_injector:
                tokens = self.audio_injector(layer, tokens, audio_local, audio_global, mask)
        return tokens

    def velocity(self, tokens: torch.Tensor, inputs: BlockStepInputs) -> torch.Tensor:
        """The head: the residual stream after the last layer -> the velocity [B, 16, F, h, w] float32."""
        num_frames, h, w = inputs.x.shape[2:]
        out = self.head(tokens, inputs.e[:, None])
        return self.unpatchify(out, num_frames, (h // 2, w // 2)).float()

    # ------------------------------------------------------------------ plain (non-causal) forward
    @torch.no_grad()
    def forward_full(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        ref: torch.Tensor,
        motion: torch.Tensor,
        audio: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The upstream bidirectional forward over [noisy, reference, motion] tokens (no caches).

        Noisy tokens are modulated at timestep t and everything else at 0 (two-segment modulation);
        noisy frames take RoPE frames 0..F-1. Used to check the blocks against the original directly.
        """
        b, _, num_frames, h, w = x.shape
        grid = (h // 2, w // 2)
        tokens = self.patch_embedding(x.to(self.dtype)).flatten(2).transpose(1, 2).float()
        if cond is not None:
            tokens = tokens + self.cond_encoder(cond.to(self.dtype)).flatten(2).transpose(1, 2).float()
        tokens = tokens + self.trainable_cond_mask.weight[0].float()
        n_noisy = tokens.shape[1]
        sink, motion_rope, ref_grid = self.embed_sink(ref, motion)
        tokens = torch.cat([tokens, sink], dim=1)
        full_rope = rope.rotation_table(
            torch.cat([self.noisy_rope(0, num_frames, grid), self.ref_rope(ref_grid, REF_ROPE_FRAME), motion_rope]),
            self.rope_dtype,
        )

        e, e0 = self.time_embedding_at(torch.cat([t.reshape(1).float().to(self.device), t.new_zeros(1).to(self.device)]))
        time_mod = torch.cat(
            [e0[:1, None].expand(1, n_noisy, 6, -1), e0[1:, None].expand(1, tokens.shape[1] - n_noisy, 6, -1)], dim=1
        )
        audio_global, audio_local = self.audio_tokens(audio, num_frames)
        text_kv = self.text_kv(context)

        def attend(q, k, v):
            return attention(self.rotate(q, full_rope), self.rotate(k, full_rope), v)

        for layer, block in self.layers():
            tokens = block(tokens, time_mod, attend, text_kv[layer])
            if layer in self.audio_injector.layer_to_injector:
                noisy = self.audio_injector(layer, tokens[:, :n_noisy], audio_local, audio_global)
                tokens = torch.cat([noisy, tokens[:, n_noisy:]], dim=1)
        out = self.head(tokens[:, :n_noisy], e[:1, None])
        return self.unpatchify(out, num_frames, grid).float()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        wan_dir: str | Path,
        lora_file: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ) -> "S2VTransformer":
        """Builds the model from `config.json` and loads the sharded safetensors straight to `device`/`dtype`,
        then merges the Live Avatar LoRA if given."""
        from liveavatar.weights.checkpoint import CheckpointLayout, load_state_into
        from liveavatar.weights.lora import merge_lora

        layout = CheckpointLayout.from_dir(wan_dir)
        config = S2VConfig.from_json(layout.dit_config)
        with torch.device("meta"):
            model = cls(config)
        load_state_into(model, layout.dit_shards(), torch.device(device), dtype)
        if lora_file is not None:
            merge_lora(model, lora_file)
        return model.eval()
