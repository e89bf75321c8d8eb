"""umT5 text encoder: prompt cleaning, tokenizer and the encoder network (Wan `T5Encoder` weight layout).

The prompt becomes `[L, dim]` context vectors, one per token including the final `</s>`.
The architecture sizes are read from the checkpoint's tensor shapes, so the real umT5-XXL file
(dim 4096, 24 layers, 64 heads) and small test checkpoints load through the same code.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import ftfy
import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.errors import CheckpointError
from liveavatar.weights.files import check_state_dict, load_torch_state_dict, require_dir, require_file

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = Path("google") / "umt5-xxl"
TEXT_LEN = 512  # prompts are padded / truncated to this many tokens (DiT `text_len`)

_WHAT = "umT5 text encoder"
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def clean_prompt(text: str) -> str:
    """Repairs mojibake and HTML entities, then collapses whitespace, as the reference does before tokenizing."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    # str.split() differs from the reference's `regex` \s only on U+001C..U+001F, which ftfy and
    # html.unescape have already removed, so this equals its "strip, collapse runs to one space"
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------
# Network


@dataclass(frozen=True)
class UMT5Config:
    vocab: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_buckets: int
    num_layers: int

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str | Path) -> "UMT5Config":
        """Reads the sizes from tensor shapes; the full key/shape check happens afterwards."""

        def shape(name: str, ndim: int) -> tuple[int, ...]:
            if name not in state:
                raise CheckpointError(f"{source}: {_WHAT} is missing tensor {name}")
            if state[name].ndim != ndim:
                raise CheckpointError(
                    f"{source}: tensor {name} has shape {list(state[name].shape)}, expected {ndim} dims ({_WHAT})"
                )
            return tuple(state[name].shape)

        layers = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))}
        if not layers:
            raise CheckpointError(f"{source}: {_WHAT} has no blocks.* tensors")
        vocab, dim = shape("token_embedding.weight", 2)
        num_buckets, num_heads = shape("blocks.0.pos_embedding.embedding.weight", 2)
        dim_attn = shape("blocks.0.attn.q.weight", 2)[0]
        dim_ffn = shape("blocks.0.ffn.fc1.weight", 2)[0]
        if dim_attn % num_heads:
            raise CheckpointError(
                f"{source}: {_WHAT} attention width {dim_attn} is not a multiple of its {num_heads} heads"
            )
        # max + 1 rather than the count, so a gap in the numbering shows up as missing tensors
        return cls(vocab, dim, dim_attn, dim_ffn, num_heads, num_buckets, max(layers) + 1)


def _clamp_fp16_overflow(x: torch.Tensor) -> torch.Tensor:
    # float16 residuals of the large model can overflow; the reference then clamps them back into range
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class T5RMSNorm(nn.Module):
    """T5 LayerNorm: scale by the root mean square, no mean subtraction and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in float32 even for half-precision weights
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def relative_position_buckets(
    length: int, num_buckets: int, device: torch.device, max_distance: int = 128
) -> torch.Tensor:
    """Bidirectional T5 bucket [length, length] of each key-minus-query distance."""
    positions = torch.arange(length, device=device)
    distance = positions[None, :] - positions[:, None]
    # half of the buckets for keys after the query, half for keys at or before it
    per_side = num_buckets // 2
    side = (distance > 0).long() * per_side
    distance = distance.abs()
    # small distances get one bucket each, larger ones share log-spaced buckets up to max_distance
    exact = per_side // 2
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (per_side - exact)).long()).clamp(max=per_side - 1)
    return side + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """Learned per-head attention bias for each distance bucket."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] -> bias [1, heads, L, L]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5SelfAttention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; bias [B or 1, heads, L, L], already holding the key mask."""
        b, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        # T5 folds the 1/sqrt(d) scale into its weights, so the logits are not scaled
        scores = q @ k.transpose(-1, -2) + bias
        weights = F.softmax(scores.float(), dim=-1).to(v.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, length, -1)
        return self.o(out)


class GatedFeedForward(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential to match the checkpoint's `gate.0` name."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class UMT5Block(nn.Module):
    """Pre-norm encoder layer; unlike the original T5, each umT5 layer has its own position bias."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(config.dim)
        self.attn = T5SelfAttention(config.dim, config.dim_attn, config.num_heads)
        self.norm2 = T5RMSNorm(config.dim)
        self.ffn = GatedFeedForward(config.dim, config.dim_ffn)
        self.pos_embedding = RelativePositionBias(config.num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """buckets [L, L] from relative_position_buckets; key_mask [B, 1, 1, L] bool, True for real tokens."""
        bias = self.pos_embedding(buckets).masked_fill(~key_mask, torch.finfo(x.dtype).min)
        x = _clamp_fp16_overflow(x + self.attn(self.norm1(x), bias))
        return _clamp_fp16_overflow(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 encoder stack: token embedding, layers, final norm (no dropout: inference only)."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab, config.dim)
        self.blocks = nn.ModuleList(UMT5Block(config) for _ in range(config.num_layers))
        self.norm = T5RMSNorm(config.dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] (mask nonzero for real tokens) -> [B, L, dim]; padded keys are ignored."""
        key_mask = mask.bool()[:, None, None, :]
        buckets = relative_position_buckets(ids.shape[1], self.config.num_buckets, ids.device)
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, key_mask)
        return self.norm(x)


def load_umt5_encoder(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> UMT5Encoder:
    """Builds the encoder from a Wan `T5Encoder` state_dict, converting one tensor at a time.

    The module is created on the meta device and the converted tensors are assigned to it, so the only
    full copy in memory is the final one (the file itself stays memory-mapped).
    """
    state = load_torch_state_dict(path, _WHAT)
    config = UMT5Config.from_state_dict(state, path)
    with torch.device("meta"):
        model = UMT5Encoder(config)
    check_state_dict(state, model.state_dict(), path, _WHAT)
    weights = {name: state.pop(name).to(device=device, dtype=dtype) for name in list(state)}
    model.load_state_dict(weights, assign=True)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Tokenizer + encoder


def load_tokenizer(folder: str | Path):
    """Loads the umT5 tokenizer exactly as its `tokenizer.json` defines it.

    `PreTrainedTokenizerFast` rather than `AutoTokenizer`: with transformers 5, AutoTokenizer builds
    a `T5Tokenizer` that replaces the file's pre-tokenizer with its own and emits an extra leading `▁`
    token. With transformers 4 both give the reference's `T5TokenizerFast` ids.
    """
    from transformers import PreTrainedTokenizerFast

    folder = require_dir(folder, "umT5 tokenizer folder (google/umt5-xxl)")
    require_file(folder / "tokenizer.json", "umT5 tokenizer")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as e:  # the tokenizers/transformers parsers raise many unrelated types
        first_line = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{folder}: cannot load the umT5 tokenizer ({type(e).__name__}: {first_line})") from None
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise CheckpointError(f"{folder}: umT5 tokenizer defines no pad or eos token")
    return tokenizer


class TextEncoder:
    """Prompt -> umT5 context `[L, dim]` (L tokens including `</s>`), as the DiT's text input."""

    def __init__(self, model: UMT5Encoder, tokenizer, text_len: int = TEXT_LEN):
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len

    @classmethod
    def from_pretrained(
        cls, wan_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "TextEncoder":
        """wan_dir is the Wan2.2-S2V-14B folder holding the T5 checkpoint and google/umt5-xxl/."""
        wan_dir = Path(wan_dir)
        tokenizer = load_tokenizer(wan_dir / TOKENIZER_DIR)  # first: it is the cheap one to fail
        model = load_umt5_encoder(wan_dir / T5_FILE, device=device, dtype=dtype)
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    @property
    def dim(self) -> int:
        return self.model.config.dim

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        return self

    def _tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask [1, text_len]; long prompts are truncated, keeping the final `</s>`."""
        batch = self.tokenizer(
            [clean_prompt(prompt)],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    def token_ids(self, prompt: str) -> torch.LongTensor:
        """The cleaned prompt's token ids, unpadded, ending with `</s>`."""
        ids, mask = self._tokenize(prompt)
        return ids[0, : int(mask.sum())]

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """Context [L, dim] in the model's dtype, on its device: the first L rows of the masked, padded pass."""
        ids, mask = self._tokenize(prompt)
        out = self.model(ids.to(self.device), mask.to(self.device))
        return out[0, : int(mask.sum())].clone()
