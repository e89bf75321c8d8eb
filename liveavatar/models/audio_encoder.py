"""Speech features for the talking-avatar DiT: wav2vec2 hidden states, resampled to video frames.

Pipeline (README §2.3 of the golden spec):

1. ``input_values``: the 16 kHz waveform normalised to zero mean / unit variance by the
   checkpoint's ``Wav2Vec2FeatureExtractor``.
2. ``hidden_states``: all ``num_hidden_layers + 1`` wav2vec2 hidden states at 50 Hz, ``[L, T50, C]``.
   Index 0 is the input of transformer layer 0, index k the output of layer k-1, and the last one is
   ``encoder.layer_norm`` applied to the output of the last layer (the transformers <= 4.51 meaning of
   ``hidden_states[-1]``; transformers 5 returns the un-normed output there instead).
3. ``interpolate_to_30fps``: linear resampling 50 -> 30 frames per second.
4. ``bucket_to_video_frames``: one 30 fps audio frame per output video frame, in whole clips,
   zeros past the end of the audio. Result ``[1, L, C, frames_per_clip * num_clips]``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from liveavatar.errors import CheckpointError, InputError
from liveavatar.weights.files import require_dir, require_file

SAMPLE_RATE = 16000
HIDDEN_FPS = 50  # wav2vec2 frame rate at 16 kHz (320x downsampling)
FEATURE_FPS = 30  # the rate the audio features are resampled to before bucketing

# Frames of the convolutional feature encoder computed per step. Those layers are local in time, so
# running them in pieces gives the same frames as one pass while bounding the largest activation
# (the first conv layer has 10 outputs per hidden frame).
_CONV_CHUNK_FRAMES = 30 * HIDDEN_FPS


@dataclass
class AudioFeatures:
    embedding: torch.Tensor  # [1, L, C, frames_per_clip * num_clips], frame axis last
    num_clips: int  # clips the audio reaches into; the last one is partly or fully zero


class AudioEncoder:
    """wav2vec2 (transformers' ``Wav2Vec2ForCTC`` weights) as a frozen speech-feature extractor."""

    def __init__(self, model: Wav2Vec2ForCTC, feature_extractor: Wav2Vec2FeatureExtractor):
        config = model.config
        # Both the meaning of the last hidden state and the exactness of the chunked conv encoder
        # depend on this variant (the one of wav2vec2-large-xlsr-53).
        if not config.do_stable_layer_norm or config.feat_extract_norm != "layer":
            raise CheckpointError(
                "wav2vec2 config: expected do_stable_layer_norm=true and feat_extract_norm='layer' "
                f"(got {config.do_stable_layer_norm}, {config.feat_extract_norm!r})"
            )
        # Only the encoder is needed; the CTC head is dropped.
        self.model = model.wav2vec2.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self._hop = math.prod(config.conv_stride)  # samples per hidden frame (320)
        self._receptive_field = _conv_receptive_field(config.conv_kernel, config.conv_stride)  # 400

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "AudioEncoder":
        """Loads the ``wav2vec2-large-xlsr-53-english`` folder of the Wan2.2-S2V checkpoint."""
        folder = require_dir(folder, "wav2vec2 model folder (wav2vec2-large-xlsr-53-english)")
        require_file(folder / "config.json", "wav2vec2 config")
        require_file(folder / "preprocessor_config.json", "wav2vec2 feature-extractor config")
        weights = require_file(folder / "model.safetensors", "wav2vec2 weights")
        # The positional-conv weight norm may be stored under the legacy names `weight_g`/`weight_v`;
        # transformers renames them to `parametrizations.weight.original0/1` while loading (4.x and 5.x).
        try:
            # SDPA keeps attention memory linear in the audio length (no [T, T] score matrix).
            model, info = Wav2Vec2ForCTC.from_pretrained(
                str(folder), attn_implementation="sdpa", output_loading_info=True
            )
            feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
        except SafetensorError as e:
            raise CheckpointError(f"{weights}: cannot read the wav2vec2 weights ({e})") from None
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            first_line = (str(e).splitlines() or [""])[0]
            raise CheckpointError(f"{folder}: cannot load the wav2vec2 model ({type(e).__name__}: {first_line})") from None
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            bad = sorted(str(k) for k in info.get(kind) or ())
            if bad:
                raise CheckpointError(f"{weights}: wav2vec2 weights have {len(bad)} {kind.replace('_', ' ')}, e.g. {', '.join(bad[:3])}")
        return cls(model.to(device=device, dtype=dtype), feature_extractor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device) -> "AudioEncoder":
        self.model.to(device)
        return self

    def input_values(self, wave_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Processor-normalised waveform ``[1, N]`` (float32, CPU)."""
        wave = _as_float32_mono(wave_16k)
        out = self.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return out.input_values

    def hidden_states(self, wave_16k: np.ndarray | torch.Tensor) -> torch.Tensor:
        """All wav2vec2 hidden states of a 16 kHz waveform: ``[num_layers + 1, T50, C]``.

        One-pass semantics, as in the reference: the waveform is normalised with its own mean and
        variance, and every transformer layer attends over all of it, so the result cannot be
        assembled from independent windows (with 1-1.5 s of context per side, windows still differ
        by 10-40 % on the golden checkpoint). Memory grows linearly with the length (chunked conv
        encoder, SDPA attention), compute quadratically; for very long audio, call this per segment
        and accept that segment boundaries change the features.
        """
        values = self.input_values(wave_16k)
        if values.shape[1] < self._receptive_field:
            raise InputError(
                f"audio too short: {values.shape[1]} samples at 16 kHz, wav2vec2 needs at least {self._receptive_field}"
            )
        with torch.no_grad():
            conv_features = self._conv_features(values.to(device=self.device, dtype=self.dtype))
            projected, _ = self.model.feature_projection(conv_features)
            with _record_layer_states(self.model.encoder) as states:
                self.model.encoder(projected)
        return torch.cat(states)

    def features(self, wave_16k: np.ndarray | torch.Tensor, fps: int = 25, frames_per_clip: int = 48) -> AudioFeatures:
        """The DiT's audio input for a whole waveform, bucketed to ``fps`` video frames."""
        embedding, num_clips = bucket_to_video_frames(
            interpolate_to_30fps(self.hidden_states(wave_16k)), fps=fps, frames_per_clip=frames_per_clip
        )
        return AudioFeatures(embedding=embedding, num_clips=num_clips)

    def _conv_features(self, values: torch.Tensor) -> torch.Tensor:
        """Conv feature encoder output ``[1, T50, C_conv]``, computed ``_CONV_CHUNK_FRAMES`` at a time."""
        num_frames = (values.shape[1] - self._receptive_field) // self._hop + 1
        pieces = []
        for start in range(0, num_frames, _CONV_CHUNK_FRAMES):
            stop = min(start + _CONV_CHUNK_FRAMES, num_frames)
            # Frame j sees samples [j*hop, j*hop + receptive_field).
            samples = values[:, start * self._hop : (stop - 1) * self._hop + self._receptive_field]
            pieces.append(self.model.feature_extractor(samples))
        return torch.cat(pieces, dim=2).transpose(1, 2)


def interpolate_to_30fps(hidden: torch.Tensor) -> torch.Tensor:
    """``[L, T50, C]`` -> ``[L, int(T50 / 50 * 30), C]``, linear with ``align_corners=True``."""
    # The float expression is kept on purpose: it is what the reference computes, and it is one
    # frame shorter than exact integer arithmetic for some lengths (e.g. T50 = 205 -> 122, not 123).
    out_len = int(hidden.shape[1] / HIDDEN_FPS * FEATURE_FPS)
    if out_len < 1:
        raise InputError(f"audio too short: {hidden.shape[1]} wav2vec2 frame(s) give no {FEATURE_FPS} fps feature frame")
    resampled = F.interpolate(hidden.transpose(1, 2), size=out_len, mode="linear", align_corners=True)
    return resampled.transpose(1, 2)


def bucket_to_video_frames(
    feat30: torch.Tensor, fps: int = 25, frames_per_clip: int = 48
) -> tuple[torch.Tensor, int]:
    """Picks the 30 fps feature frame of each output video frame, for whole clips.

    ``feat30`` is ``[L, T30, C]``. Returns ``([1, L, C, frames_per_clip * num_clips], num_clips)``
    with ``num_clips = int(T30 / (frames_per_clip * 30 / fps)) + 1``; video frames whose audio frame
    lies at or past ``T30`` are zero.
    """
    num_layers, num_feat, channels = feat30.shape
    num_clips = int(num_feat / (frames_per_clip * (FEATURE_FPS / fps))) + 1
    num_video = num_clips * frames_per_clip
    # Video frame k is at time k / fps and takes the nearest feature frame; numpy's round is half to
    # even, and the linspace/ceil expressions mirror the reference so that rounding ties agree.
    times = np.linspace(0.0, num_video / fps, num_video, endpoint=False)
    last_index = math.ceil(num_video / fps * FEATURE_FPS) - 1
    index = np.clip(np.round(times * FEATURE_FPS).astype(np.int64), 0, last_index)
    has_audio = torch.from_numpy(index < num_feat)

    out = feat30.new_zeros(num_layers, channels, num_video)
    picked = torch.from_numpy(index[has_audio.numpy()]).to(feat30.device)
    out[:, :, has_audio.to(feat30.device)] = feat30[:, picked].transpose(1, 2)
    return out.unsqueeze(0), num_clips


@contextmanager
def _record_layer_states(encoder: torch.nn.Module):
    """Collects the input of every encoder layer plus the output of ``encoder.layer_norm``.

    In the stable-layer-norm encoder, ``layer_norm`` runs after the last layer, so these are the
    ``num_layers + 1`` hidden states with the transformers <= 4.51 meaning on any version.
    """
    states: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda _m, args: states.append(args[0])) for layer in encoder.layers]
    handles.append(encoder.layer_norm.register_forward_hook(lambda _m, _args, out: states.append(out)))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
    if len(states) != len(encoder.layers) + 1:
        raise RuntimeError(f"wav2vec2 encoder produced {len(states)} hidden states, expected {len(encoder.layers) + 1}")


def _conv_receptive_field(kernels: list[int], strides: list[int]) -> int:
    """Input samples seen by one output frame of a stack of strided convolutions."""
    field = 1
    for kernel, stride in zip(reversed(kernels), reversed(strides)):
        field = (field - 1) * stride + kernel
    return field


def _as_float32_mono(wave: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim != 1:
        raise InputError(f"audio: expected a mono waveform [N] or [1, N], got shape {list(wave.shape)}")
    return wave
