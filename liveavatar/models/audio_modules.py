"""The transformer's audio path: wav2vec2 layer mixing + causal temporal encoder, and per-frame injection.

Parameter names follow the released checkpoint (`casual_audio_encoder.*`, sic, and `audio_injector.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.models.layers import CrossAttention


class CausalConv1d(nn.Module):
    """Conv1d over time with replicate left padding, so an output step never sees later input."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left_pad, 0), mode="replicate"))


class AudioTokenEncoder(nn.Module):
    """Audio features [B, T, C] -> per-step local tokens [B, T', n+1, D] and a global token [B, T', 1, D].

    Time is downsampled 4x by two stride-2 convs (50 Hz-ish audio frames -> latent frames). The local
    branch produces `num_tokens` tokens per step plus a learned padding token; the global branch one token
    that drives the AdaLN of the injection layers. Both branches share conv2/conv3 and the norms.
    """

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_tokens, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, 3, stride=2)
        self.final_linear = nn.Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C1, T] after conv1 -> [N, T', dim] through the shared norm/act/conv stack."""
        x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6))
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)
        x = F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))
        x = self.conv3(x.transpose(1, 2)).transpose(1, 2)
        return F.silu(F.layer_norm(x, (x.shape[-1],), eps=1e-6))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = feats.shape[0]
        x = feats.transpose(1, 2)  # [B, C, T]
        local = self.conv1_local(x)  # [B, n*c, T]
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [(B n), c, T]
        local = self._downsample(local)  # [(B n), T', D]
        local = local.unflatten(0, (b, self.num_tokens)).transpose(1, 2)  # [B, T', n, D]
        pad = self.padding_tokens.expand(b, local.shape[1], 1, -1).to(local.dtype)
        local = torch.cat([local, pad], dim=2)

        glob = self._downsample(self.conv1_global(x))  # [B, T', D]
        glob = self.final_linear(glob)[:, :, None, :]
        return glob, local


class CausalAudioEncoder(nn.Module):
    """Mixes the wav2vec2 hidden-state stack with learned SiLU-normalised weights, then encodes it.

    Runs in float32 (the reference runs it under fp32 autocast); the loader keeps its weights in fp32.
    """

    def __init__(self, audio_dim: int, dim: int, num_tokens: int, num_layers: int = 25):
        super().__init__()
        self.encoder = AudioTokenEncoder(audio_dim, dim, num_tokens)
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, layers, C, T] -> (global [B, T', 1, D], local [B, T', n+1, D]), all float32."""
        w = F.silu(self.weights.float())
        mixed = (audio.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C, T]
        return self.encoder(mixed.transpose(1, 2))


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm (eps 1e-5, no affine) scaled and shifted by a projection of a conditioning vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(cond).to(self.linear.weight.dtype)).float().chunk(2, dim=-1)
        x = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5)
        return x * (1 + scale[:, None, :]) + shift[:, None, :]


class AudioInjector(nn.Module):
    """Per-frame cross-attention from video tokens to that frame's audio tokens, after chosen layers."""

    def __init__(self, dim: int, num_heads: int, inject_layers: list[int], eps: float = 1e-6):
        super().__init__()
        # Injector j serves the j-th injected layer in depth order.
        self.layer_to_injector = {layer: j for j, layer in enumerate(sorted(inject_layers))}
        n = len(inject_layers)
        self.injector = nn.ModuleList(CrossAttention(dim, num_heads, eps) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaptiveLayerNorm(dim) for _ in range(n))

    def forward(
        self, layer: int, x: torch.Tensor, audio_tokens: torch.Tensor, audio_global: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, F*T, D] residual stream of the video tokens; audio_tokens [B, F, n+1, D]; audio_global [B, F, 1, D].

        With several actors (multi-person mode), x is one video [1, F*T, D], the audio tokens are the actors'
        [A, F, n+1, D] / [A, F, 1, D] and mask [A, F*T, 1] weights each actor's residual per token (see
        `inject_actors`). Returns x with the injection added (float32).
        """
        j = self.layer_to_injector[layer]
        if mask is None and audio_tokens.shape[0] != x.shape[0]:
            raise ValueError(f"{audio_tokens.shape[0]} actors' audio for {x.shape[0]} video(s): several actors need a mask")
        if mask is not None:
            return self.inject_actors(self.injector_adain_layers[j], self.injector[j], x, audio_tokens, audio_global, mask)
        return self.inject(self.injector_adain_layers[j], self.injector[j], x, audio_tokens, audio_global)

    @staticmethod
    def actor_residuals(
        adain: AdaptiveLayerNorm, attn: CrossAttention, x: torch.Tensor, audio_tokens: torch.Tensor, audio_global: torch.Tensor
    ) -> torch.Tensor:
        """Each actor's injection residual [A, F*T, D] float32 for one video x [1, F*T, D]: x is copied per actor,
        and each copy is modulated by that actor's global token and attends to that actor's tokens, frame by frame."""
        actors, frames = audio_tokens.shape[:2]
        per_frame = x.expand(actors, *x.shape[1:]).reshape(actors * frames, -1, x.shape[-1])  # actor-major rows
        h = adain(per_frame, audio_global.flatten(0, 1)[:, 0])
        out = attn(h, audio_tokens.flatten(0, 1))
        return out.reshape(actors, -1, x.shape[-1]).float()

    @staticmethod
    def inject_actors(
        adain: AdaptiveLayerNorm, attn: CrossAttention, x: torch.Tensor, audio_tokens: torch.Tensor,
        audio_global: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """x + the sum over actors of mask[a] * residual[a] (mask [A, F*T, 1] of 0/1 weights)."""
        residual = AudioInjector.actor_residuals(adain, attn, x, audio_tokens, audio_global)
        return x + (residual * mask).sum(dim=0, keepdim=True)

    @staticmethod
    def inject(
        adain: AdaptiveLayerNorm, attn: CrossAttention, x: torch.Tensor, audio_tokens: torch.Tensor, audio_global: torch.Tensor
    ) -> torch.Tensor:
        """One injection with the given modules; a static method so that one compiled version serves all of them."""
        b, frames = audio_tokens.shape[:2]
        per_frame = x.reshape(b * frames, -1, x.shape[-1])
        h = adain(per_frame, audio_global.flatten(0, 1)[:, 0])
        out = attn(h, audio_tokens.flatten(0, 1))
        return x + out.reshape(x.shape).float()
