"""`LiveAvatarPipeline`: loads the four models once and turns (image, speech, prompt) into a block stream.

    pipe = LiveAvatarPipeline.from_pretrained("ckpt", device="cuda")
    cond = pipe.prepare("face.png", wave_16k, "A person talking", size="704*384")
    for block in pipe.stream(cond, StreamSettings(seed=42)).blocks(cond.num_clips):
        show(block.frames)
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from liveavatar.engine.audio_source import audio_source_for
from liveavatar.engine.multi_person import ActorAudio, RoutingMasks, mix_tracks, routing_masks, token_grid
from liveavatar.engine.runtime import RuntimeOptions, apply_to_transformer, apply_to_vae, choose_attention
from liveavatar.engine.stream import AvatarStream, StreamSettings, VideoDecoder
from liveavatar.errors import InputError
from liveavatar.media import image as image_io
from liveavatar.models.audio_encoder import AudioEncoder
from liveavatar.models.dit import MOTION_VIDEO_FRAMES, S2VTransformer
from liveavatar.models.taehv import NAME as TINY_DECODER
from liveavatar.models.taehv import TinyDecoder
from liveavatar.models.text_encoder import TextEncoder
from liveavatar.models.vae import WanVAE
from liveavatar.weights.checkpoint import CheckpointLayout

log = logging.getLogger(__name__)

ENCODINGS_KEPT = 8  # reference frames and prompts whose encodings a pipeline keeps (a few MB each)


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
    # The 16 kHz mono speech the model hears (a job's has its lead-in silence in front; several people: the mean
    # of their tracks, cut to the shortest).
    wave: np.ndarray
    routing: RoutingMasks | None = None  # several people (multi-person mode): whose audio drives which tokens

    def actor_weights(self, frames: int) -> torch.Tensor | None:
        """Multi-person mode: [A, tokens of a block of `frames` latent frames, 1], the weights of each actor's
        audio injection (None for one speaker)."""
        return None if self.routing is None else self.routing.token_weights(frames)


class Encodings:
    """The encodings of the last few reference frames and prompts. A service streams the same avatar and prompt
    again and again (a live session restarts at another size, a studio's jobs share a face): those then skip
    the VAE's 73-frame encode and the text encoder. A kept encoding is what encoding again gives (on a GPU, as far
    as its kernels repeat themselves); callers get copies, so the kept tensors never change."""

    def __init__(self, kept: int = ENCODINGS_KEPT):
        self.kept = kept
        self._items: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: tuple, encode: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """The encoding kept under `key`, or encode() kept under it (the least recently used one goes)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                log.debug("%s: encoded before, kept", key[0])
            else:
                self._items[key] = encode()
                while len(self._items) > self.kept:
                    self._items.popitem(last=False)
            return tuple(t.clone() for t in self._items[key])


class LiveAvatarPipeline:
    def __init__(self, dit: S2VTransformer, vae: WanVAE, text_encoder: TextEncoder, audio_encoder: AudioEncoder,
                 options: RuntimeOptions = RuntimeOptions(), tiny_decoder: TinyDecoder | None = None):
        """Models as `assemble` left them. options: how they were set up and how the streams run
        (liveavatar.engine.runtime). tiny_decoder: the light TAEW2.1 decoder, which then decodes the streams (the
        VAE still encodes the reference; a stream may still ask for the VAE's decoder)."""
        self.dit, self.vae, self.text_encoder, self.audio_encoder = dit, vae, text_encoder, audio_encoder
        self.options = options
        self.encodings = Encodings()
        self.attention_backend_ms: dict[str, float] = {}  # the fast path's timings of the attention kernels
        # The decoders a stream may use (StreamSettings.decoder), and the one used when it names none.
        self.decoders: dict[str, VideoDecoder] = {"wan": vae}
        if tiny_decoder is not None:
            self.decoders[TINY_DECODER] = tiny_decoder
        self.decoder_name = TINY_DECODER if tiny_decoder is not None else "wan"

    @property
    def fast(self) -> bool:
        """Whether the models run the compiled fast path."""
        return self.options.compile

    @property
    def offload_encoders(self) -> bool:
        return self.options.offload_encoders

    def decoder_for(self, name: str | None) -> VideoDecoder:
        """The decoder model of that name (None: the pipeline's default); InputError if it was not loaded."""
        name = name or self.decoder_name
        if name not in self.decoders:
            raise InputError(f"decoder {name}: this pipeline was started without it (start it with --decoder "
                             f"{name}); available: {', '.join(self.decoders)}")
        return self.decoders[name]

    @property
    def device(self) -> torch.device:
        return self.dit.device

    @property
    def fixed_sample_steps(self) -> int | None:
        """The one step count this pipeline runs, if it is laid out for one (the multi-GPU pipeline); None: any."""
        return None

    def close(self) -> None:
        """Stops what the pipeline started besides its models: nothing here (the multi-GPU one stops its ranks)."""

    @classmethod
    def from_pretrained(
        cls,
        ckpt_dir: str | Path,
        lora_file: str | Path | None = None,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype | None = None,
        options: RuntimeOptions = RuntimeOptions(),
    ) -> "LiveAvatarPipeline":
        """Loads the Wan2.2-S2V-14B models and merges the Live Avatar LoRA (default: <ckpt_dir>/LiveAvatar/), then
        applies `options` (speed, memory and the decoder: liveavatar.engine.runtime.RuntimeOptions)."""
        layout = CheckpointLayout.from_dir(ckpt_dir, lora_file)
        device = torch.device(device)
        t0 = time.perf_counter()
        # The cheap, most often misplaced parts first, so a bad folder fails in seconds.
        tiny = options.decoder.load(device, dtype)
        encoders_at = "cpu" if options.offload_encoders else device
        text = TextEncoder.from_pretrained(layout.wan_dir, device=encoders_at, dtype=dtype)
        audio = AudioEncoder.from_pretrained(layout.wav2vec2_dir, device=encoders_at, dtype=torch.float32)
        vae = WanVAE.from_checkpoint(layout.vae_file, device=device, dtype=vae_dtype or dtype)
        # Offloaded, the transformer is loaded into host memory and only its small parts go to the device.
        dit = S2VTransformer.from_pretrained(layout.wan_dir, lora_file=layout.lora_file,
                                             device="cpu" if options.offload_transformer else device, dtype=dtype)
        log.info("models loaded in %.1f s (device %s, %s)", time.perf_counter() - t0, device, dtype)
        return cls.assemble(dit, vae, text, audio, device, options, tiny_decoder=tiny)

    @classmethod
    def assemble(cls, dit: S2VTransformer, vae: WanVAE, text: TextEncoder, audio: AudioEncoder, device,
                 options: RuntimeOptions = RuntimeOptions(),
                 tiny_decoder: TinyDecoder | None = None) -> "LiveAvatarPipeline":
        """Applies the options to loaded models (the transformer on `device`, or on the CPU when
        options.offload_transformer)."""
        device = torch.device(device)
        apply_to_transformer(dit, options, device)
        apply_to_vae(vae, options)
        if options.offload_encoders:
            text.to("cpu")
            audio.to("cpu")
        return cls(dit, vae, text, audio, options, tiny_decoder)

    @torch.no_grad()
    def encode_reference(self, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref latent [1,16,1,h,w], motion latents [1,16,19,h,w]) of a uint8 reference frame (kept for the next
        streams of the same frame: see `Encodings`)."""
        def encode():
            frame = image_io.to_tensor(pixels)[None, :, None].to(self.device)
            return self.vae.encode(frame), self.vae.encode(frame.expand(-1, -1, MOTION_VIDEO_FRAMES, -1, -1))

        key = ("reference", pixels.shape, hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest())
        return self.encodings.get(key, encode)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """The text encoder's context [L, 4096] float32 of a prompt (kept for the next streams of the same prompt,
        which then need no text encoder at all: with offload_encoders, not even its trip to the device)."""
        def encode():
            text = self._on_device(self.text_encoder)
            context = text.encode(prompt).float()
            self._off_device(text)
            return (context,)

        return self.encodings.get(("prompt", prompt), encode)[0]

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
        wave: np.ndarray | Sequence[np.ndarray],
        prompt: str,
        size: str = "704*384",
        fps: int = 25,
        frames_per_clip: int = 48,
        masks: np.ndarray | torch.Tensor | None = None,
    ) -> Conditioning:
        """Loads and sizes the image, encodes it, the prompt and the speech (16 kHz mono float32).

        Several people (multi-person mode): `wave` is a list of tracks, one per person, and `masks`
        [A, H_img, W_img] their regions at the image's resolution (non-zero = that person), in the same
        order; the video covers the shortest track, and its sound is the mean of the tracks
        (liveavatar.engine.multi_person)."""
        waves = None
        if not isinstance(wave, np.ndarray):
            waves = list(wave)
            if len(waves) < 2 or masks is None or len(masks) != len(waves):
                raise ValueError(f"{len(waves)} speech tracks need as many masks (got "
                                 f"{'none' if masks is None else len(masks)})")
        elif masks is not None:
            raise ValueError("masks are for several speech tracks; pass one track per person")
        if self.dit is not None and self.dit.block_streamer is not None:
            self.dit.block_streamer.keep_resident(0)  # the encoders need the memory that resident blocks took
        img = image_io.load_image(image)
        height, width = image_io.output_size(img.height, img.width, image_io.parse_size(size))
        pixels = image_io.prepare_reference(img, height, width)
        ref, motion = self.encode_reference(pixels)
        context = self.encode_prompt(prompt)
        audio_encoder = self._on_device(self.audio_encoder)
        routing = None
        if waves is None:
            audio = audio_source_for(audio_encoder, wave, fps=fps, frames_per_clip=frames_per_clip)
        else:  # each track encoded as a single speaker's, one after another
            audio = ActorAudio([audio_source_for(audio_encoder, w, fps=fps, frames_per_clip=frames_per_clip) for w in waves])
            routing = routing_masks(masks, token_grid(height, width, frames_per_clip))
            wave = mix_tracks(waves)
        if self.offload_encoders and hasattr(audio, "embedding"):
            self._off_device(audio_encoder)
        return Conditioning(height, width, pixels, ref, motion, context, audio, audio.num_clips, wave, routing)

    def stream(self, cond: Conditioning, settings: StreamSettings = StreamSettings()) -> AvatarStream:
        stream = AvatarStream(self.dit, self.decoder_for(settings.decoder), cond.text_context, cond.ref_latent,
                              cond.motion_latents, cond.audio, settings, self.options,
                              actor_mask=cond.actor_weights(settings.latent_frames_per_block))
        self.attention_backend_ms = choose_attention(self.dit, self.options, stream.steps)
        return stream
