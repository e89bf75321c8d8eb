"""Building blocks of the Wan transformer: norms, attention projections, the modulated block and the head.

The residual stream and all modulation arithmetic are float32; linear layers run in the weights' dtype
(bf16 on GPU), which is where the reference spends its reduced precision too.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Runs a linear layer in float32 whatever its storage dtype (the reference's fp32 autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax(q k^T / sqrt(d)) v on [B, L, heads, d] tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def two_part_attention(q: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """`attention` over the keys/values of two parts (the streaming step's history and sink), as one."""
    return attention(q, torch.cat([k1, k2], dim=1), torch.cat([v1, v2], dim=1))


def merge_attention_parts(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """The attention over two sets of keys from the attention over each ([B, heads, L, d]) and its log-sum-exp
    of the scores ([B, heads, L]): each part's output weighs with its share of the softmax mass."""
    dtype = torch.promote_types(out1.dtype, torch.float32)
    share1 = torch.sigmoid(lse1.to(dtype) - lse2.to(dtype)).unsqueeze(-1)  # e^lse1 / (e^lse1 + e^lse2)
    return torch.lerp(out2.to(dtype), out1.to(dtype), share1).to(out1.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class AttentionProjections(nn.Module):
    """q/k/v/o projections with RMSNorm on q and k over the full width (the checkpoint's names)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(AttentionProjections):
    """Self-attention whose attention itself is supplied by the caller, because it differs between the sink
    prefill, the streaming step and the plain forward."""

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, D] -> q, k, v [B, L, heads, d] (no RoPE: that depends on the caller's positions)."""
        b, length, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, length, self.num_heads, -1)
        k = self.norm_k(self.k(x)).view(b, length, self.num_heads, -1)
        v = self.v(x).view(b, length, self.num_heads, -1)
        return q, k, v

    def forward(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
        return self.o(attend(*self.qkv(x)).flatten(2))


class CrossAttention(AttentionProjections):
    """Attention from x to a context (text or audio tokens), q/k RMSNorm, no position embedding, no mask."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The model's dtype (the norms'; the projections may hold FP8 weights)."""
        return self.norm_q.weight.dtype

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context; the text's are computed once per prompt and reused every call."""
        b, length, _ = context.shape
        context = context.to(self.compute_dtype)
        k = self.norm_k(self.k(context)).view(b, length, self.num_heads, -1)
        v = self.v(context).view(b, length, self.num_heads, -1)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        k, v = kv if kv is not None else self.context_kv(context)
        q = self.norm_q(self.q(x.to(self.compute_dtype))).view(b, length, self.num_heads, -1)
        return self.o(attention(q, k, v).flatten(2))


class TransformerBlock(nn.Module):
    """Self-attention, text cross-attention and FFN, with adaptive (timestep) modulation of the first and last."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        x: torch.Tensor,
        time_mod: torch.Tensor,
        attend: Attend,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        skip_post_attention: bool = False,
    ) -> torch.Tensor:
        """x [B, L, D] float32; time_mod [B, L or 1, 6, D] float32 projected time embedding.

        `skip_post_attention` stops after the self-attention residual, for the sink prefill's last layer
        whose remaining output nobody reads.
        The two halves around the attention are separate methods so that they can be compiled once for
        all layers, with the attention (which differs between callers) left outside.
        """
        mod = self.modulation.float()[:, None] + time_mod
        q, k, v = self.self_attention_inputs(x, mod)
        return self.after_self_attention(x, attend(q, k, v), mod, text_kv, skip_post_attention)

    def self_attention_inputs(self, x: torch.Tensor, mod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Modulated LayerNorm, then q, k, v. mod [B, L or 1, 6, D] is modulation + time_mod."""
        shift1, scale1 = mod[:, :, 0], mod[:, :, 1]
        h = F.layer_norm(x, (x.shape[-1],), eps=self.eps) * (1 + scale1) + shift1
        return self.self_attn.qkv(h.to(self.modulation.dtype))

    def after_self_attention(
        self,
        x: torch.Tensor,
        attn: torch.Tensor,
        mod: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        skip_post_attention: bool = False,
    ) -> torch.Tensor:
        """Output projection and gated residual of the self-attention result attn [B, L, heads, d], then
        text cross-attention and the gated FFN."""
        gate1, shift2, scale2, gate2 = mod[:, :, 2], mod[:, :, 3], mod[:, :, 4], mod[:, :, 5]
        dim = x.shape[-1]
        x = x + self.self_attn.o(attn.flatten(2)).float() * gate1
        if skip_post_attention:
            return x

        h = F.layer_norm(x, (dim,), self.norm3.weight.float(), self.norm3.bias.float(), self.norm3.eps)
        x = x + self.cross_attn(h.to(self.modulation.dtype), kv=text_kv).float()

        h = F.layer_norm(x, (dim,), eps=self.eps) * (1 + scale2) + shift2
        return x + self.ffn(h.to(self.modulation.dtype)).float() * gate2


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch pixels (latent channels x patch volume)."""

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; time_emb [B, L or 1, D] (the unprojected time embedding)."""
        shift, scale = (self.modulation.float()[:, None] + time_emb[:, :, None]).unbind(2)
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale) + shift
        return linear_fp32(self.head, h)
