"""Audio features per block, for a whole speech file.

Short files (up to `EXACT_LIMIT_S`) get the original's exact features: wav2vec2 over the whole waveform,
50->30 fps interpolation over the whole length, bucketed to 25 fps. Longer files would need memory that
grows with the audio (the original keeps [25, 1024, frames] floats for the whole video: ~9 GB per hour),
so they are processed in segments of a fixed number of clips with overlapping context on both sides,
one segment in memory at a time. Segment boundaries change wav2vec2's attention context, so long files
differ slightly from a one-shot computation (which the original cannot run in bounded memory anyway).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from liveavatar.models.audio_encoder import FEATURE_FPS, HIDDEN_FPS, SAMPLE_RATE, AudioEncoder

EXACT_LIMIT_S = 300.0
SEGMENT_CLIPS = 60  # 115.2 s of video per segment at 48 frames / 25 fps
CONTEXT_S = 2.0  # audio context added on each side of a segment


def clips_covered(num_samples: int, fps: int = 25, frames_per_clip: int = 48) -> int:
    """The original's clip count for a waveform: int(T30 / (frames_per_clip * 30 / fps)) + 1."""
    t50 = max(0, (num_samples - 400) // 320 + 1)
    t30 = int(t50 / HIDDEN_FPS * FEATURE_FPS)
    return int(t30 / (frames_per_clip * FEATURE_FPS / fps)) + 1


class PrecomputedAudio:
    """Features of the whole file computed up front (exact reference semantics)."""

    def __init__(self, embedding: torch.Tensor, num_clips: int):
        self.embedding = embedding
        self.num_clips = num_clips

    def block(self, k: int, frames: int) -> torch.Tensor:
        return self.embedding[..., k * frames : (k + 1) * frames]


class SegmentedAudio:
    """Features computed one segment at a time; memory is bounded whatever the audio length."""

    def __init__(self, encoder: AudioEncoder, wave: np.ndarray, fps: int = 25, frames_per_clip: int = 48):
        self.encoder, self.wave, self.fps, self.frames_per_clip = encoder, wave, fps, frames_per_clip
        self.num_clips = clips_covered(len(wave), fps, frames_per_clip)
        self.segment_frames = SEGMENT_CLIPS * frames_per_clip
        self._segment: tuple[int, torch.Tensor] | None = None

    def _compute_segment(self, index: int) -> torch.Tensor:
        first = index * self.segment_frames  # first video frame of the segment
        start_s = max(0.0, first / self.fps - CONTEXT_S)
        start_s = math.floor(start_s * self.fps) / self.fps  # a whole number of video frames
        end_s = (first + self.segment_frames) / self.fps + CONTEXT_S
        piece = self.wave[int(round(start_s * SAMPLE_RATE)) : int(round(end_s * SAMPLE_RATE))]
        feats = self.encoder.features(piece, fps=self.fps, frames_per_clip=self.frames_per_clip).embedding
        offset = first - int(round(start_s * self.fps))
        seg = feats[..., offset : offset + self.segment_frames]
        if seg.shape[-1] < self.segment_frames:  # past the end of the audio: silence features are zeros
            seg = torch.nn.functional.pad(seg, (0, self.segment_frames - seg.shape[-1]))
        return seg

    def block(self, k: int, frames: int) -> torch.Tensor:
        first = k * frames
        index = first // self.segment_frames
        if self._segment is None or self._segment[0] != index:
            self._segment = (index, self._compute_segment(index))
        local = first - index * self.segment_frames
        return self._segment[1][..., local : local + frames]


def audio_source_for(encoder: AudioEncoder, wave: np.ndarray, fps: int = 25, frames_per_clip: int = 48):
    """The exact source for files up to EXACT_LIMIT_S, the segmented one beyond."""
    if len(wave) <= EXACT_LIMIT_S * SAMPLE_RATE:
        feats = encoder.features(wave, fps=fps, frames_per_clip=frames_per_clip)
        return PrecomputedAudio(feats.embedding, feats.num_clips)
    return SegmentedAudio(encoder, wave, fps, frames_per_clip)
