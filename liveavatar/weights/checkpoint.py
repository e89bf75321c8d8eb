"""The on-disk layout of the released weights, and shard-by-shard loading of the transformer.

    <ckpt_dir>/Wan2.2-S2V-14B/config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors (+ .index.json),
                              models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, Wan2.1_VAE.pth,
                              wav2vec2-large-xlsr-53-english/
    <ckpt_dir>/LiveAvatar/liveavatar.safetensors

This is the layout of the two Hugging Face repos downloaded side by side (`liveavatar download`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from liveavatar.errors import CheckpointError
from liveavatar.weights.files import require_dir, require_file, require_safetensors, require_weights

log = logging.getLogger(__name__)

WAN_REPO = "Wan-AI/Wan2.2-S2V-14B"
LORA_REPO = "Quark-Vision/Live-Avatar"
LORA_FILENAME = "liveavatar.safetensors"

# Submodules kept in float32 whatever the load dtype: the reference runs them under fp32 autocast and
# they are small (the audio encoder's convs).
FP32_MODULES = ("casual_audio_encoder.",)


@dataclass(frozen=True)
class CheckpointLayout:
    wan_dir: Path
    lora_file: Path

    @classmethod
    def from_dir(cls, ckpt_dir: str | Path, lora_file: str | Path | None = None) -> "CheckpointLayout":
        """`ckpt_dir` holds `Wan2.2-S2V-14B/` and `LiveAvatar/`; it may also be the Wan folder itself."""
        root = require_dir(ckpt_dir, "checkpoint folder (holding Wan2.2-S2V-14B/ and LiveAvatar/)")
        wan = root / "Wan2.2-S2V-14B"
        if not wan.is_dir():  # given the Wan folder itself
            wan, root = root, root.parent
        lora = Path(lora_file) if lora_file else root / "LiveAvatar" / LORA_FILENAME
        return cls(wan_dir=wan, lora_file=lora)

    @property
    def dit_config(self) -> Path:
        return self.wan_dir / "config.json"

    @property
    def t5_file(self) -> Path:
        return self.wan_dir / "models_t5_umt5-xxl-enc-bf16.pth"

    @property
    def tokenizer_dir(self) -> Path:
        return self.wan_dir / "google" / "umt5-xxl"

    @property
    def vae_file(self) -> Path:
        return self.wan_dir / "Wan2.1_VAE.pth"

    @property
    def wav2vec2_dir(self) -> Path:
        return self.wan_dir / "wav2vec2-large-xlsr-53-english"

    def dit_shards(self) -> list[Path]:
        """Shard files named by the index (or the single unsharded file)."""
        index = self.wan_dir / "diffusion_pytorch_model.safetensors.index.json"
        single = self.wan_dir / "diffusion_pytorch_model.safetensors"
        if not index.is_file():
            if single.is_file():
                return [single]
            raise CheckpointError(f"{index}: missing; expected the transformer's shard index (or {single.name})")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(e).__name__})") from None
        shards = sorted(set(weight_map.values()))
        return [require_file(self.wan_dir / s, f"transformer shard listed in {index.name}") for s in shards]

    def require_complete(self) -> None:
        """Checks that every file the models load is present (safetensors headers included) before any is loaded,
        so that a folder missing its last part fails in a second rather than after the others have loaded."""
        require_dir(self.wan_dir, "Wan2.2-S2V-14B folder")
        require_file(self.dit_config, "transformer config")
        for shard in self.dit_shards():
            require_safetensors(shard, "transformer weights")
        require_weights(self.t5_file, "umT5 text encoder")
        require_file(self.tokenizer_dir / "tokenizer.json", "umT5 tokenizer")
        require_weights(self.vae_file, "Wan2.1 VAE")
        require_file(self.wav2vec2_dir / "config.json", "wav2vec2 config")
        require_file(self.wav2vec2_dir / "preprocessor_config.json", "wav2vec2 feature-extractor config")
        require_safetensors(self.wav2vec2_dir / "model.safetensors", "wav2vec2 weights")
        require_safetensors(self.lora_file, "LoRA weights (liveavatar.safetensors)")


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_state_into(module: torch.nn.Module, shards: list[Path], device: torch.device, dtype: torch.dtype) -> None:
    """Loads safetensors shards into a module built on the meta device, one tensor at a time, straight to
    `device` in `dtype` (memory-mapped reads: host memory never holds a second copy of the model).

    Missing, unexpected or misshapen tensors raise CheckpointError naming the shard and the tensor.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    seen: set[str] = set()
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in expected:
                        raise CheckpointError(f"{shard}: unexpected tensor {name} (not a parameter of the transformer)")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(f"{shard}: tensor {name} has shape {list(shape)}, expected {list(expected[name])}")
                    tensor = f.get_tensor(name)
                    if tensor.dtype not in _FLOAT_DTYPES:
                        raise CheckpointError(f"{shard}: tensor {name} has dtype {tensor.dtype}, expected a float dtype")
                    target = torch.float32 if name.startswith(FP32_MODULES) else dtype
                    _assign(module, name, tensor.to(device=device, dtype=target))
                    seen.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(
            f"{shards[0].parent}: the transformer shards lack {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}"
        )


def _assign(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=False))
