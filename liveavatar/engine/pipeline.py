"""`LiveAvatarPipeline`: loads the four models once and turns (image, speech, prompt) into a block stream.

    pipe = LiveAvatarPipeline.from_pretrained("ckpt", device="cuda")
    cond = pipe.prepare("face.png", wave_16k, "A person talking", size="704*384")
    for block in pipe.stream(cond, StreamSettings(seed=42)).blocks(cond.num_clips):
        show(block.frames)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from liveavatar.engine.audio_source import audio_source_for
from liveavatar.engine.stream import AvatarStream, StreamSettings
from liveavatar.media import image as image_io
from liveavatar.models.audio_encoder import AudioEncoder
from liveavatar.models.dit import MOTION_VIDEO_FRAMES, S2VTransformer
from liveavatar.models.text_encoder import TextEncoder
from liveavatar.models.vae import WanVAE
from liveavatar.weights.checkpoint import CheckpointLayout

log = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """Everything a stream needs from the user's inputs, computed once."""

    height: int
    width: int
    reference: np.ndarray  # [H, W, 3] uint8, the resized and cropped image
    ref_latent: torch.Tensor  # [1, 16, 1, h, w]: the single reference frame encoded
    motion_latents: torch.Tensor  # [1, 16, 19, h, w]: the reference held still for 73 frames, encoded
    text_context: torch.Tensor  # [L, 4096]
    audio: object  # an AudioSource (per-block features)
    num_clips: int  # clips the audio covers
    wave: np.ndarray  # 16 kHz mono speech, for muxing


class LiveAvatarPipeline:
    def __init__(self, dit: S2VTransformer, vae: WanVAE, text_encoder: TextEncoder, audio_encoder: AudioEncoder,
                 offload_encoders: bool = False):
        self.dit, self.vae, self.text_encoder, self.audio_encoder = dit, vae, text_encoder, audio_encoder
        self.offload_encoders = offload_encoders

    @property
    def device(self) -> torch.device:
        return self.dit.device

    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        lora_file: str | Path | None = None,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype | None = None,
        offload_encoders: bool = False,
    ) -> "LiveAvatarPipeline":
        """Loads the Wan2.2-S2V-14B models and merges the Live Avatar LoRA (default: <ckpt_dir>/LiveAvatar/)."""
        layout = CheckpointLayout.from_dir(ckpt_dir, lora_file)
        t0 = time.perf_counter()
        # The cheap, most often misplaced parts first, so a bad folder fails in seconds.
        text = TextEncoder.from_pretrained(layout.wan_dir, device=device, dtype=dtype)
        audio = AudioEncoder.from_pretrained(layout.wav2vec2_dir, device=device, dtype=torch.float32)
        vae = WanVAE.from_checkpoint(layout.vae_file, device=device, dtype=vae_dtype or dtype)
        dit = S2VTransformer.from_pretrained(layout.wan_dir, lora_file=layout.lora_file, device=device, dtype=dtype)
        log.info("models loaded in %.1f s (device %s, %s)", time.perf_counter() - t0, device, dtype)
        if offload_encoders:
            text.to("cpu")
            audio.to("cpu")
        return cls(dit, vae, text, audio, offload_encoders)

    @torch.no_grad()
    def encode_reference(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref latent [1,16,1,h,w], motion latents [1,16,19,h,w]) of a uint8 reference frame."""
        frame = image_io.to_tensor(pixels)[None, :, None].to(self.device)
        ref = self.vae.encode(frame)
        motion = self.vae.encode(frame.expand(-1, -1, MOTION_VIDEO_FRAMES, -1, -1))
        return ref, motion

    def _on_device(self, encoder):
        if self.offload_encoders:
            encoder.to(self.device)
        return encoder

    def _off_device(self, encoder):
        if self.offload_encoders:
            encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def prepare(
        self,
        image: str | Path,
        wave: np.ndarray,
        prompt: str,
        size: str = "704*384",
        fps: int = 25,
        frames_per_clip: int = 48,
    ) -> Conditioning:
        """Loads and sizes the image, encodes it, the prompt and the speech (16 kHz mono float32)."""
        img = image_io.load_image(image)
        height, width = image_io.output_size(img.height, img.width, image_io.parse_size(size))
        pixels = image_io.prepare_reference(img, height, width)
        ref, motion = self.encode_reference(pixels)
        text = self._on_device(self.text_encoder)
        context = text.encode(prompt).float()
        self._off_device(text)
        audio_encoder = self._on_device(self.audio_encoder)
        audio = audio_source_for(audio_encoder, wave, fps=fps, frames_per_clip=frames_per_clip)
        if self.offload_encoders and hasattr(audio, "embedding"):
            self._off_device(audio_encoder)
        return Conditioning(height, width, pixels, ref, motion, context, audio, audio.num_clips, wave)

    def stream(self, cond: Conditioning, settings: StreamSettings = StreamSettings()) -> AvatarStream:
        return AvatarStream(self.dit, self.vae, cond.text_context, cond.ref_latent, cond.motion_latents, cond.audio, settings)
