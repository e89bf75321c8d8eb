"""Multi-person mode: several people in one picture, one speech track each, each track driving only its
own person's region (the original's `--audio "a.wav+b.wav"`).

What changes against one speaker (golden MULTI_PERSON.md):

* audio: every track is encoded on its own, as a single speaker's would be; the clip count is the smallest
  of the tracks' (the longer tracks are cut to the shortest), and each block gets the features of every
  actor, stacked [A, layers, C, frames] (`ActorAudio`);
* routing: one binary mask per actor at the image's resolution is resized to the transformer's token grid,
  turned into one-hot routing labels (the later actor wins an overlap), dilated by a tenth of its bounding
  box, and made exclusive: a token covered by exactly one actor's dilated mask gets that actor's audio only;
  one covered by two or more (the band along a boundary) gets none; one covered by none (background far
  from everybody) gets every actor's (`routing_masks`). The transformer adds each actor's injection
  residual weighted by its mask (liveavatar.models.audio_modules.AudioInjector);
* the video's sound: the mean of the tracks, cut to the shortest (`mix_tracks`), as the original muxes it.

The masks come from the user (one image per person, white = that person) or from a face detector
(liveavatar.media.faces).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DILATION_RATIO = 0.1  # of the larger side of an actor's bounding box, in tokens
THRESHOLD = 0.5


@dataclass(frozen=True)
class Speakers:
    """A multi-person request: the speech tracks, in the order of the people they drive, and one mask image
    per track (white = that person, the reference image's size), or None to find the people automatically
    (left to right, as the original numbers them)."""

    audio: tuple[Path, ...]
    masks: tuple[Path, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "audio", tuple(Path(p) for p in self.audio))
        if self.masks is not None:
            object.__setattr__(self, "masks", tuple(Path(p) for p in self.masks))


def split_plus(text: str | Path) -> list[Path]:
    """`a.wav+b.wav` -> [a.wav, b.wav], the original's way of naming one file per person. A name that is an
    existing file as a whole is one file, even if it contains '+' (the original could not use such files)."""
    text = str(text)
    if "+" not in text or Path(text).is_file():
        return [Path(text)]
    return [Path(part) for part in text.split("+")]


# ---------------------------------------------------------------------------------------------- audio
class ActorAudio:
    """The per-block features of several actors: [A, layers, C, frames] for block k, actor a's track in row a.
    Covers the clips of the shortest track (the original cuts every track to the shortest)."""

    def __init__(self, sources: Sequence):
        if len(sources) < 2:
            raise ValueError("ActorAudio needs two or more audio sources")
        self.sources = list(sources)
        self.num_clips = min(s.num_clips for s in self.sources)

    @property
    def num_actors(self) -> int:
        return len(self.sources)

    def block(self, k: int, frames: int) -> torch.Tensor:
        return torch.cat([s.block(k, frames) for s in self.sources], dim=0)

    @property
    def embedding(self) -> torch.Tensor:
        """The whole features when every track's are precomputed: [A, layers, C, shortest track's frames], the
        original's `audio_emb`. (Absent for long tracks encoded segment by segment.)"""
        if not all(hasattr(s, "embedding") for s in self.sources):
            raise AttributeError("embedding: a track is encoded segment by segment")
        frames = min(s.embedding.shape[-1] for s in self.sources)
        return torch.cat([s.embedding[..., :frames] for s in self.sources], dim=0)


def mix_tracks(waves: Sequence[np.ndarray]) -> np.ndarray:
    """The video's sound track: the sample-wise mean of the tracks, cut to the shortest (what the original's
    ffmpeg `amix=inputs=N:duration=shortest` gives)."""
    n = min(len(w) for w in waves)
    total = np.zeros(n, dtype=np.float64)
    for w in waves:
        total += w[:n]
    return (total / len(waves)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- masks
@dataclass
class RoutingMasks:
    """The steps of the mask processing (for checks) and its result.

    logits: [1, T*h*w, A] one-hot routing labels in (t, y, x) order, zero where no actor is;
    dilated: [A, T, h, w, 1] each actor's label mask dilated; processed: [A, T, h, w, 1] the exclusive
    weights the transformer gets (1 where no other actor's dilated mask covers a token)."""

    logits: torch.Tensor
    dilated: torch.Tensor
    processed: torch.Tensor
    radius: list[list[int]]  # [actor][frame] dilation radius in tokens (0 where the actor's mask is empty)

    @property
    def num_actors(self) -> int:
        return self.processed.shape[0]

    def token_weights(self, frames: int) -> torch.Tensor:
        """[A, frames*h*w, 1] float32: the weights of a block's tokens, in the transformer's token order. As
        in the original, a block of `frames` latent frames always takes the mask's first `frames` frames."""
        m = self.processed[:, :frames]
        return m.reshape(m.shape[0], -1, 1).float().contiguous()


def resize_to_grid(masks: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """[A, n, H_img, W_img] 0/1 masks -> [A, T, h, w] bool on the token grid: trilinear interpolation of the
    whole image (no antialiasing, half-pixel centres), then `> 0.5`. A single frame is repeated in time."""
    out = [F.interpolate(m[None, None].float(), size=grid, mode="trilinear", align_corners=False)[0, 0] > THRESHOLD
           for m in masks]
    return torch.stack(out)


def routing_logits(resized: torch.Tensor) -> torch.Tensor:
    """[A, T, h, w] bool -> one-hot [1, T*h*w, A] float32: each token labelled with the last actor that covers
    it, all zeros where none does."""
    num = resized.shape[0]
    labels = torch.full(resized.shape[1:], -1, dtype=torch.long)
    for a in range(num):
        labels[resized[a]] = a
    onehot = torch.zeros(*labels.shape, num)
    covered = labels >= 0
    onehot[covered] = F.one_hot(labels[covered], num).float()
    return onehot.reshape(1, -1, num)


def dilation_radius(box_h: int, box_w: int, ratio: float = DILATION_RATIO) -> int:
    """The original's radius, in Python float arithmetic with a truncating int(): ceil(ratio * L) except just
    above an integer (L = 10 gives 1)."""
    return max(1, int(ratio * max(box_h, box_w) + 0.9999))


def dilate(mask: torch.Tensor, ratio: float = DILATION_RATIO) -> tuple[torch.Tensor, list[list[int]]]:
    """[A, T, h, w] 0/1 -> (dilated [A, T, h, w] 0/1 float, radius per actor and frame). Each actor's frame is
    dilated on its own: every token within Chebyshev distance r of a set token, r from its bounding box."""
    out = torch.zeros_like(mask, dtype=torch.float32)
    radii = []
    for a in range(mask.shape[0]):
        radii.append([])
        for t in range(mask.shape[1]):
            m = mask[a, t] > THRESHOLD
            if not m.any():
                radii[-1].append(0)
                continue
            ys, xs = torch.where(m)
            r = dilation_radius(int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1), ratio)
            pooled = F.max_pool2d(m.float()[None, None], kernel_size=2 * r + 1, stride=1, padding=r)
            out[a, t] = (pooled[0, 0] > 0).float()
            radii[-1].append(r)
    return out, radii


def exclusive(dilated: torch.Tensor) -> torch.Tensor:
    """weight[a] = 1 where no actor other than a covers the token (the actor's own mask plays no part)."""
    covered = dilated > THRESHOLD
    count = covered.sum(dim=0, keepdim=True)
    return ((count - covered.long()) == 0).float()


def routing_masks(masks: torch.Tensor | np.ndarray, grid: tuple[int, int, int]) -> RoutingMasks:
    """The original's mask processing: masks [A, n, H_img, W_img] (0/1, one or more frames each, at the
    image's resolution) on the token grid (T, h, w) = (latent frames per clip, H/16, W/16)."""
    masks = torch.as_tensor(np.asarray(masks) if isinstance(masks, np.ndarray) else masks)
    if masks.dim() == 3:
        masks = masks[:, None]
    num, (t, h, w) = masks.shape[0], grid
    logits = routing_logits(resize_to_grid(masks > 0, grid))
    labels = logits.reshape(1, t, h, w, num).permute(4, 1, 2, 3, 0)  # [A, T, h, w, 1]
    dilated, radius = dilate(labels[..., 0])
    dilated = dilated[..., None]
    return RoutingMasks(logits, dilated, exclusive(dilated), radius)


def token_grid(height: int, width: int, frames_per_clip: int) -> tuple[int, int, int]:
    """(T, h, w): latent frames of a clip and the transformer's token rows and columns at H x W."""
    return frames_per_clip // 4, height // 16, width // 16
