"""The Wan2.1 video VAE: a causal 3D conv autoencoder, 8x spatial and 4x temporal compression, 16 latent channels.

Every temporal operation is causal, so a video can be processed in chunks of frames with each
temporal conv remembering only the last frames of its input (a `FrameCache`). That is how the
reference runs it, and how memory stays bounded:
  * encode: the first frame alone, then chunks of 4 frames, each chunk giving one latent;
  * decode: one latent at a time; the first latent of a stream gives 1 frame, every later one 4.
`StreamingDecoder` keeps the decoder's cache between calls, so an unbounded latent stream decodes
as one continuous causal video in constant memory.

Activations are kept channels-last (NDHWC in memory): the convolutions run faster that way and the
per-pixel channel norms reduce over contiguous memory.
Module and parameter names follow the checkpoint (`Wan2.1_VAE.pth`), so its state_dict loads unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.errors import CheckpointError
from liveavatar.weights.files import check_state_dict, load_torch_state_dict

Z_DIM = 16
DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
TEMPORAL_DOWNSAMPLE = (False, True, True)  # per encoder stage; the decoder mirrors it
TIME_STRIDE = 4  # frames per latent (after the first)
SPACE_STRIDE = 8

# Per-channel latent statistics of Wan2.1 (also in diffusers' AutoencoderKLWan).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

VAE_FILE = "Wan2.1_VAE.pth"  # in the Wan2.2-S2V-14B folder
CHECKPOINT_WHAT = "Wan2.1 VAE"

# The trailing input frames that each temporal layer carries from one chunk to the next, keyed by the layer.
FrameCache = dict[nn.Module, torch.Tensor]


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           stride: tuple[int, int, int] = (1, 1, 1), padding: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """F.conv3d, except that float32 on CPU goes straight to oneDNN: for these few-channel, many-pixel
    convs torch's heuristic would pick its much slower im2col kernel."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


class Conv3d(nn.Conv3d):
    """nn.Conv3d computed by `conv3d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight, self.bias, self.stride, self.padding)


def zero_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """n zero frames matching x's batch, channels, frame size, dtype and device, in the channels-last layout."""
    b, c, _, h, w = x.shape
    return x.new_zeros(b, n, h, w, c).permute(0, 4, 1, 2, 3)


class CausalConv3d(Conv3d):
    """A conv whose output at frame t sees input frames t-k+1..t; frames before the stream's start are zeros.

    Spatial padding is symmetric ("same"); temporal context comes from the cache instead of padding.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int]):
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        super().__init__(in_dim, out_dim, (kt, kh, kw), padding=(0, kh // 2, kw // 2))
        self.context = kt - 1

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        past = cache.get(self)
        if past is None:
            past = zero_frames(x, self.context)
        x = torch.cat([past, x], dim=2)
        cache[self] = x[:, :, -self.context:].clone()  # a copy, so the cache does not pin the whole chunk
        return super().forward(x)


class FrameConv2d(nn.Conv2d):
    """A 2D conv applied to every frame of a [B, C, T, H, W] video (as a conv3d with a 1-frame kernel, no reshapes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d(x, self.weight.unsqueeze(2), self.bias, (1, *self.stride), (0, *self.padding))


def rms_norm(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Each pixel's channel vector of x [B, C, ...] normalised to length sqrt(C), then scaled by gamma [C]."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
    gain = gamma.view(-1, *([1] * (x.dim() - 2))) * x.shape[1] ** 0.5
    return (x / norm).mul_(gain)


class RMSNorm(nn.Module):
    """`rms_norm` with the checkpoint's gamma (stored as [C, 1, 1(, 1)])."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.gamma.view(-1))


def norm_silu(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)), what comes before every causal conv of the residual blocks and the decoder's head: one
    function, so that liveavatar.models.fastpath can compile it into a single pass over the activations."""
    return F.silu(norm(x), inplace=True)


def upsample_2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-exact doubling of H and W of a [B, C, T, H, W] video (a hook for the fast path, as norm_silu)."""
    return F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Laid out as the checkpoint's Sequential: norm, SiLU, conv, norm, SiLU, dropout (a no-op here), conv.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3),
        )
        self.shortcut = Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.norm_silu = norm_silu

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(self.norm_silu(norm1, x), cache)
        h = conv2(self.norm_silu(norm2, h), cache)
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        # The 1x1 convs are applied as linear layers on the token layout.
        q, k, v = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Downsample(nn.Module):
    """Halves H and W; with `temporal`, also halves the frame count after the stream's first frame."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # Pad right and bottom only, then a stride-2 3x3 conv.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), FrameConv2d(dim, dim, 3, stride=2))
        self.time_conv = Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.resample(x)
        if self.time_conv is None:
            return x
        # The first frame of a stream (the encoder gets it alone) is kept as is. Later chunks hold an even
        # number of frames; the conv sees the previous chunk's last frame first, so windows are (2i, 2i+1, 2i+2).
        previous = cache.get(self.time_conv)
        cache[self.time_conv] = x[:, :, -1:].clone()
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


class Upsample(nn.Module):
    """Doubles H and W and halves the channels; with `temporal`, also doubles every frame after the stream's first."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # The checkpoint's Sequential: the upsampling (no weights, see upsample_2x), then resample.1, the conv.
        self.resample = nn.Sequential(nn.Identity(), FrameConv2d(dim, dim // 2, 3, padding=1))
        self.upsample_2x = upsample_2x
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_frames(x, cache)
        return self.resample[1](self.upsample_2x(x))

    def _double_frames(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        if self.time_conv not in cache:
            # The stream's first frame (the decoder gets it alone) stays a single frame. The temporal conv
            # starts at the next frame from a zero history; the first frame is never part of it.
            cache[self.time_conv] = zero_frames(x, self.time_conv.context)
            return x
        b, c, t, h, w = x.shape
        pairs = self.time_conv(x, cache)  # [B, 2C, T, H, W]: channel halves are the two output frames
        pairs = pairs.permute(0, 2, 3, 4, 1).reshape(b, t, h, w, 2, c)  # a view in the channels-last layout
        return pairs.permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)


class Encoder(nn.Module):
    def __init__(self, base_dim: int):
        super().__init__()
        dims = [base_dim * m for m in (1, *DIM_MULT)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(NUM_RES_BLOCKS):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(DIM_MULT) - 1:
                blocks.append(Downsample(out_dim, TEMPORAL_DOWNSAMPLE[stage]))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        # Outputs mean and log-variance (2 * Z_DIM channels); only the mean is used.
        self.head = nn.Sequential(RMSNorm(top, 3), nn.SiLU(), CausalConv3d(top, 2 * Z_DIM, 3))

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.conv1(x.contiguous(memory_format=torch.channels_last_3d), cache)
        for block in self.downsamples:
            x = block(x, cache)
        res1, attention, res2 = self.middle
        x = res2(attention(res1(x, cache)), cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x), inplace=True), cache)


class Decoder(nn.Module):
    def __init__(self, base_dim: int):
        super().__init__()
        dims = [base_dim * m for m in (DIM_MULT[-1], *reversed(DIM_MULT))]
        temporal_upsample = tuple(reversed(TEMPORAL_DOWNSAMPLE))
        self.conv1 = CausalConv3d(Z_DIM, dims[0], 3)
        top = dims[0]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        blocks: list[nn.Module] = []
        in_dim = dims[0]
        for stage, out_dim in enumerate(dims[1:]):
            for _ in range(NUM_RES_BLOCKS + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(DIM_MULT) - 1:
                blocks.append(Upsample(out_dim, temporal_upsample[stage]))
                in_dim = out_dim // 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))
        self.norm_silu = norm_silu

    def forward(self, x: torch.Tensor, cache: FrameCache) -> torch.Tensor:
        x = self.conv1(x.contiguous(memory_format=torch.channels_last_3d), cache)
        res1, attention, res2 = self.middle
        x = res2(attention(res1(x, cache)), cache)
        for block in self.upsamples:
            x = block(x, cache)
        norm, _, conv = self.head
        return conv(self.norm_silu(norm, x), cache)


class WanVAE(nn.Module):
    """Wan2.1 VAE. `encode` gives normalised latents ((mu - mean) / std); `decode` takes them back to [-1, 1] video.

    Runs in the dtype of its parameters (float32, bfloat16 or float16); latent normalisation and the
    returned tensors are float32.
    """

    def __init__(self, base_dim: int):
        super().__init__()
        self.encoder = Encoder(base_dim)
        self.conv1 = Conv3d(2 * Z_DIM, 2 * Z_DIM, 1)  # on (mean, log-variance)
        self.conv2 = Conv3d(Z_DIM, Z_DIM, 1)  # on the latent, before the decoder
        self.decoder = Decoder(base_dim)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
        """Loads `Wan2.1_VAE.pth`; the base width (96 in the release) is read from the weights."""
        state = load_torch_state_dict(path, CHECKPOINT_WHAT)
        first = state.get("encoder.conv1.weight")
        if first is None or first.dim() != 5:
            raise CheckpointError(f"{path}: {CHECKPOINT_WHAT} has no 5-D tensor encoder.conv1.weight")
        with torch.device("meta"):
            model = cls(base_dim=first.shape[0])
        check_state_dict(state, model.state_dict(), path, CHECKPOINT_WHAT)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1+k, H/8, W/8] (float32)."""
        if video.dim() != 5 or video.shape[2] % TIME_STRIDE != 1:
            raise ValueError(f"encode expects [B, 3, 1+4k, H, W], got {list(video.shape)}")
        video = video.to(self.device)
        cache: FrameCache = {}
        chunks = [video[:, :, :1]] + [video[:, :, i:i + TIME_STRIDE] for i in range(1, video.shape[2], TIME_STRIDE)]
        moments = torch.cat([self.encoder(chunk.to(self.dtype), cache) for chunk in chunks], dim=2)
        # conv1 is 1x1x1, so the mean's output channels can be computed alone.
        mu = conv3d(moments, self.conv1.weight[:Z_DIM], self.conv1.bias[:Z_DIM]).float()
        mean, inv_std = _latent_stats(self.device)
        return ((mu - mean) * inv_std).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, T, h, w] normalised latents -> video [B, 3, 1+4(T-1), 8h, 8w] in [-1, 1] (float32)."""
        return self.streaming_decoder().decode(latents)

    def streaming_decoder(self) -> StreamingDecoder:
        return StreamingDecoder(self)


class StreamingDecoder:
    """Decodes a latent stream across calls as one causal video: the first latent ever gives 1 frame, each later one 4.

    Holds the last 2 input frames of every temporal conv of the decoder, so memory does not grow with the video.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self._cache: FrameCache = {}

    def reset(self) -> None:
        self._cache = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The causal history, keyed by module name (for resuming a stream in another process)."""
        names = {module: name for name, module in self.vae.named_modules()}
        return {names[module]: frames.to("cpu", copy=True) for module, frames in self._cache.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        modules = dict(self.vae.named_modules())
        self._cache = {modules[name]: frames.to(self.vae.device) for name, frames in state.items()}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, T, h, w] normalised latents -> the next 4T frames (4T-3 on the first call), clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != Z_DIM or latents.shape[2] == 0:
            raise ValueError(f"decode expects [B, {Z_DIM}, T, h, w] latents, got {list(latents.shape)}")
        vae = self.vae
        mean, inv_std = _latent_stats(vae.device)
        z = latents.to(vae.device, torch.float32) / inv_std + mean
        z = vae.conv2(z.to(vae.dtype))
        b, _, t, h, w = z.shape
        n_frames = TIME_STRIDE * t - (0 if self._cache else TIME_STRIDE - 1)
        video = torch.empty(b, 3, n_frames, h * SPACE_STRIDE, w * SPACE_STRIDE, device=z.device)
        filled = 0
        for i in range(t):  # one latent at a time keeps the activations to at most 4 frames
            frames = vae.decoder(z[:, :, i:i + 1], self._cache)
            video[:, :, filled:filled + frames.shape[2]] = frames
            filled += frames.shape[2]
        return video.clamp_(-1.0, 1.0)


def _latent_stats(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) as float32 [1, 16, 1, 1, 1]; the reference multiplies by the reciprocal, so we do too."""
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=device).view(1, Z_DIM, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=torch.float32, device=device).view(1, Z_DIM, 1, 1, 1)
    return mean, 1.0 / std
