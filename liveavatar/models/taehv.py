"""TAEW2.1, the tiny autoencoder for Wan 2.1 latents (madebyollin/taehv, MIT): its decoder only, a light
alternative to the Wan2.1 VAE's decoder for live and low-latency streams (~1 TFLOP a 12-frame block at 704x384
against the VAE's 27.5), at some cost in fine detail.

What the released `taew2_1.pth` (or its safetensors copy) holds, and how this module runs it:

* The decoder is one `nn.Sequential` of per-frame 2-D layers (its keys `decoder.<i>....` load unchanged):
  a tanh clamp of the latents (3·tanh(x/3)), a 3x3 conv to the first width and a ReLU, then three stages of
  [3 MemBlocks, 2x nearest upsampling, TGrow, 3x3 conv to the next width], then ReLU and a 3x3 conv to RGB.
  Widths 256, 128, 64, 64 in the release (read from the weights here).
* A MemBlock is the only temporal mixing: it sees its input frame and its input one frame earlier
  (`ReLU(conv3(ReLU(conv2(ReLU(conv1([x, past]))))) + x)`), zeros before the stream's first frame. So a
  stream only needs one frame of memory per MemBlock between calls.
* TGrow is a 1x1 conv to `stride` times the channels whose channel groups become consecutive frames: the
  first stage keeps the frame rate, the next two double it, so every latent gives 4 frames.
* The input is the diffusion model's latent space as is (no mean/std denormalisation, unlike the Wan VAE);
  the output is RGB in [0, 1]. Decoding the whole sequence gives 4T frames of which the first 3 are dropped
  (the first latent then gives 1 frame, as with the Wan VAE), so frame counts and timing equal the VAE's.

`TinyStreamingDecoder` decodes a latent stream fed in pieces of any length (the engine feeds 3 latents a block),
each piece processed frame-parallel with the memory carried over, which gives the frames of decoding the whole
sequence at once. On a GPU it runs in half precision, channels-last, and (optionally) replays each block shape
as a CUDA graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from liveavatar.errors import CheckpointError
from liveavatar.weights.files import check_state_dict, load_torch_state_dict, require_file, require_safetensors

log = logging.getLogger(__name__)

NAME = "taew2_1"  # the --decoder value
DECODERS = ("wan", NAME)  # the Wan2.1 VAE's decoder (the default) or this one
REPO = "madebyollin/taehv"  # the Hugging Face repo of the released weights
FILES = ("taew2_1.pth", "taew2_1.safetensors", "safetensors/taew2_1.safetensors")  # the names it may have
CHECKPOINT_WHAT = "TAEW2.1 decoder (taew2_1.pth or taew2_1.safetensors)"

LATENT_CHANNELS = 16  # Wan 2.1 latents
WIDTHS = (256, 128, 64, 64)  # the release's decoder widths: three stages, then the head
TIME_UPSCALE = (False, True, True)  # per stage: 1, 2, 2 frames out per frame in (4 per latent in all)
FRAMES_PER_LATENT = 4
TRIMMED_FRAMES = FRAMES_PER_LATENT - 1  # dropped at the stream's start: the first latent gives 1 frame
SPACE_STRIDE = 8

# Indices in the decoder Sequential (the checkpoint's key prefixes): the first conv, each stage's conv that
# changes the width, the head's conv.
_FIRST_CONV, _STAGE_CONVS, _HEAD_CONV = 1, (8, 14, 20), 22


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format of an activation: channels-last where it is (the fast path), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block over a frame and the same block's input one frame earlier ("past")."""

    def __init__(self, channels: int):
        super().__init__()
        # The checkpoint's Sequential: conv, ReLU, conv, ReLU, conv (keys conv.0, conv.2, conv.4).
        self.conv = nn.Sequential(_conv3x3(2 * channels, channels), nn.ReLU(), _conv3x3(channels, channels),
                                  nn.ReLU(), _conv3x3(channels, channels))

    def forward(self, x_and_past: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x_and_past: the frames and their pasts concatenated on the channels (built in place by
        TinyDecoder.forward, one copy less than a concatenation); x: the frames alone (the first half)."""
        conv1, _, conv2, _, conv3 = self.conv
        h = F.relu_(conv1(x_and_past))
        h = conv3(F.relu_(conv2(h)))
        return F.relu_(h.add_(x))


class Upsample2x(nn.Module):
    """Nearest 2x of H and W (no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TGrow(nn.Module):
    """A 1x1 conv to stride x C channels; channel group j of input frame t becomes output frame stride·t + j."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.stride == 1:
            return y
        frames, _, h, w = x.shape
        c = y.shape[1] // self.stride
        out = torch.empty(frames * self.stride, c, h, w, dtype=y.dtype, device=y.device, memory_format=_layout(y))
        out.unflatten(0, (frames, self.stride)).copy_(y.unflatten(1, (self.stride, c)))
        return out


class TinyDecoder(nn.Module):
    """The TAEW2.1 decoder. `forward` decodes frames [N·T, C, h, w] (each batch item's T frames in time order)
    with the MemBlocks' memory given and updated in place; `streaming_decoder()` is how the engine uses it."""

    def __init__(self, widths: tuple[int, int, int, int] = WIDTHS, latent_channels: int = LATENT_CHANNELS):
        super().__init__()
        w0, w1, w2, w3 = widths
        layers: list[nn.Module] = [Clamp(), _conv3x3(latent_channels, w0), nn.ReLU()]
        for stage, (width, following) in enumerate(zip((w0, w1, w2), (w1, w2, w3))):
            layers += [MemBlock(width), MemBlock(width), MemBlock(width), Upsample2x(),
                       TGrow(width, 2 if TIME_UPSCALE[stage] else 1), _conv3x3(width, following, bias=False)]
        layers += [nn.ReLU(), _conv3x3(w3, 3)]
        self.decoder = nn.Sequential(*layers)
        self.widths, self.latent_channels = tuple(widths), latent_channels

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> "TinyDecoder":
        """Loads `taew2_1.pth` (a torch.save'd state dict) or its `.safetensors` copy; the encoder's tensors in
        the file are not loaded. Widths are read from the weights. Raises CheckpointError (one line, naming the
        file) for a missing or unreadable file or one that is not a TAEW2.1 decoder."""
        path = Path(path)
        state = _read_state(path)
        first = state.get(f"decoder.{_FIRST_CONV}.weight")
        if first is None or first.dim() != 4:
            raise CheckpointError(f"{path}: not a TAEW2.1 checkpoint (no 4-D tensor decoder.{_FIRST_CONV}.weight); "
                                  f"expected madebyollin/taehv's taew2_1.pth or taew2_1.safetensors")
        if first.shape[1] != LATENT_CHANNELS:
            raise CheckpointError(f"{path}: a decoder for {first.shape[1]}-channel latents, not Wan 2.1's "
                                  f"{LATENT_CHANNELS} (taew2_1 is the one for Wan 2.1 and Wan 2.2 14B)")
        widths = [first.shape[0]]
        for index in _STAGE_CONVS:
            conv = state.get(f"decoder.{index}.weight")
            if conv is None or conv.dim() != 4:
                raise CheckpointError(f"{path}: {CHECKPOINT_WHAT} has no 4-D tensor decoder.{index}.weight")
            widths.append(conv.shape[0])
        with torch.device("meta"):
            model = cls(tuple(widths))
        decoder = {k: v for k, v in state.items() if k.startswith("decoder.")}
        expected = model.state_dict()
        _fit_tgrow_weights(model, decoder, expected)
        check_state_dict(decoder, expected, path, CHECKPOINT_WHAT)
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in decoder.items()}, assign=True)
        return model.to(memory_format=torch.channels_last).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.decoder[_FIRST_CONV].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[_FIRST_CONV].weight.dtype

    def memory_blocks(self) -> list[int]:
        return [i for i, layer in enumerate(self.decoder) if isinstance(layer, MemBlock)]

    def forward(self, x: torch.Tensor, memory: dict[int, torch.Tensor], batch: int = 1) -> torch.Tensor:
        """Frames [batch·T, C, h, w] -> RGB frames [batch·4T, 3, 8h, 8w] (before the [0, 1] clamp). `memory[i]`
        is MemBlock i's input one frame before x's first ([batch, C', h', w'], absent: zeros, the stream's
        start); it is set to the last frame's input, in place where it exists (a CUDA graph reads it there)."""
        for i, layer in enumerate(self.decoder):
            if isinstance(layer, MemBlock):
                n, c, h, w = x.shape
                joined = torch.empty(n, 2 * c, h, w, dtype=x.dtype, device=x.device, memory_format=_layout(x))
                joined[:, :c].copy_(x)
                frames = x.unflatten(0, (batch, -1))  # [batch, T, C, H, W]
                past = joined[:, c:].unflatten(0, (batch, -1))  # each frame's previous frame
                previous = memory.get(i)
                if previous is None:
                    past[:, 0].zero_()
                    memory[i] = frames[:, -1].clone()
                else:
                    past[:, 0].copy_(previous)
                    previous.copy_(frames[:, -1])
                past[:, 1:].copy_(frames[:, :-1])
                x = layer(joined, x)
            else:
                x = layer(x)
        return x

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole sequence at once: latents [N, T, 16, h, w] (NTCHW) -> frames [N, 4T-3, 3, 8h, 8w] in [0, 1]."""
        return self.streaming_decoder().frames(latents)

    def streaming_decoder(self, cuda_graphs: bool = False) -> "TinyStreamingDecoder":
        return TinyStreamingDecoder(self, cuda_graphs)


class TinyStreamingDecoder:
    """Decodes a latent stream across calls as one video: the first latent ever gives 1 frame, each later one 4,
    exactly the frames of decoding all latents at once. Holds one frame per MemBlock between calls.

    The same interface as the Wan VAE's StreamingDecoder (`decode`, `reset`, `state_dict`, `load_state_dict`),
    so the engine streams with either. cuda_graphs (on a GPU): the second call of each latent shape after the
    first call is captured as a CUDA graph and later calls of that shape replay it (a copy of the latents and
    one launch instead of ~150 kernel launches); a capture that fails leaves the decoder eager, with a warning.
    """

    def __init__(self, model: TinyDecoder, cuda_graphs: bool = False):
        self.model = model
        self._memory: dict[int, torch.Tensor] = {}
        self.cuda_graphs = cuda_graphs and model.device.type == "cuda"
        self.graphs: dict[tuple, tuple] = {}  # latent shape -> (graph replay, static latents, static output)
        self._warm: set[tuple] = set()
        self._pool = None
        self.graph_error: str | None = None  # why capturing failed, after which every call runs eagerly

    def reset(self) -> None:
        self._memory = {}
        self.graphs.clear()
        self._warm.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The memory, keyed by MemBlock name (`decoder.<i>`), for resuming a stream in another process."""
        return {f"decoder.{i}": frames.to("cpu", copy=True) for i, frames in self._memory.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        blocks = set(self.model.memory_blocks())
        memory = {}
        for name, frames in state.items():
            prefix, _, index = name.partition(".")
            if prefix != "decoder" or not index.isdigit() or int(index) not in blocks:
                raise ValueError(f"not a TAEW2.1 decoder state: unexpected entry {name}")
            memory[int(index)] = frames.to(self.model.device, self.model.dtype).contiguous(
                memory_format=torch.channels_last)
        self.reset()  # graphs read the old memory's addresses
        self._memory = memory

    @torch.no_grad()
    def frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, T, 16, h, w] (NTCHW, the reference's layout) -> the next frames [N, n, 3, 8h, 8w] in
        [0, 1], float32: n = 4T, or 4T-3 on the stream's first call."""
        return self._decode(latents.transpose(1, 2)).transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 16, T, h, w] latents (the DiT's, as they are) -> the next frames [B, 3, n, 8h, 8w] in [-1, 1],
        float32, as the Wan VAE's StreamingDecoder gives them: n = 4T, or 4T-3 on the stream's first call."""
        return self._decode(latents).mul_(2.0).sub_(1.0)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 5 or latents.shape[1] != self.model.latent_channels or latents.shape[2] == 0:
            raise ValueError(f"decode expects [B, {self.model.latent_channels}, T, h, w] latents, got "
                             f"{list(latents.shape)}")
        latents = latents.to(self.model.device)
        if not self._memory:  # the stream's first call: its first frames are dropped
            return self._run(latents)[:, :, TRIMMED_FRAMES:]
        if self.cuda_graphs and not self.graph_error:
            return self._replay(latents)
        return self._run(latents)

    def _run(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, h, w] -> [B, 3, 4T, 8h, 8w] in [0, 1] float32 (no trim), the MemBlocks' memory updated."""
        b, c, t, h, w = latents.shape
        x = latents.transpose(1, 2).reshape(b * t, c, h, w).to(self.model.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        rgb = self.model(x, self._memory, b)  # [B·4T, 3, 8h, 8w]
        return rgb.unflatten(0, (b, -1)).transpose(1, 2).float().clamp_(0.0, 1.0)

    def _replay(self, latents: torch.Tensor) -> torch.Tensor:
        """_run through a CUDA graph of this latent shape (captured at the shape's second call, once the first
        call has run every kernel and cuDNN has chosen its algorithms)."""
        key = tuple(latents.shape)
        if key not in self.graphs:
            if key not in self._warm:
                self._warm.add(key)
                return self._run(latents)
            static = latents.to(torch.float32).clone()  # the graph's input, rewritten before every replay
            try:
                replay, out = self._capture(lambda: self._run(static))
            except RuntimeError as e:
                self.graph_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.warning("CUDA graph capture of the TAEW2.1 decoder failed, decoding eagerly: %s", self.graph_error)
                return self._run(latents)
            self.graphs[key] = (replay, static, out)
        replay, static, out = self.graphs[key]
        static.copy_(latents)
        replay()  # reads and rewrites the MemBlocks' memory where the capture found it
        return out.clone()  # the graph's output is rewritten by its next replay

    def _capture(self, run) -> tuple:
        """(replay, output) of run() captured as a CUDA graph. Capturing records the kernels without running
        them, so the memory is still the previous call's when the first replay runs."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # all shapes' graphs share one pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return graph.replay, out


@dataclass(frozen=True)
class DecoderChoice:
    """Which decoder turns the stream's latents into frames: "wan" (the Wan2.1 VAE's, the default) or "taew2_1"
    (this module's, loaded from `path`). The encoder side (reference image, motion frames) is always the VAE."""

    name: str = "wan"
    path: Path | None = None

    def __post_init__(self):
        if self.name not in DECODERS:
            raise ValueError(f"decoder {self.name!r}: expected one of {', '.join(DECODERS)}")
        if self.name == NAME and self.path is None:
            raise ValueError(f"decoder {NAME}: needs the weights' path")

    def load(self, device, dtype: torch.dtype) -> TinyDecoder | None:
        """The tiny decoder on `device` (None for "wan": the pipeline's VAE decodes), in half precision on a GPU
        unless the pipeline runs in float32, in float32 on the CPU."""
        if self.name != NAME:
            return None
        return TinyDecoder.from_checkpoint(self.path, device, tiny_decoder_dtype(torch.device(device), dtype))


def tiny_decoder_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """float16 on a GPU (the release is stored in float16 and its authors run it so; more mantissa than
    bfloat16 for the same speed) unless the pipeline's dtype is float32; float32 on the CPU."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.float16
    return torch.float32


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        require_safetensors(path, CHECKPOINT_WHAT)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read the {CHECKPOINT_WHAT} ({type(e).__name__}: {e})") from None
    require_file(path, CHECKPOINT_WHAT)
    return load_torch_state_dict(path, CHECKPOINT_WHAT)


def _fit_tgrow_weights(model: TinyDecoder, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """A TGrow conv stored with more output channels than this layout uses (a file trained with temporal
    upscaling at that stage) keeps its last channel group, the last frame's, as the reference loader does."""
    for i, layer in enumerate(model.decoder):
        key = f"decoder.{i}.conv.weight"
        if isinstance(layer, TGrow) and key in state:
            want, got = expected[key].shape[0], state[key].shape[0]
            if got > want and got % want == 0 and state[key].shape[1:] == expected[key].shape[1:]:
                state[key] = state[key][-want:]
