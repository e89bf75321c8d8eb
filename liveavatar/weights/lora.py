"""Reading the Live Avatar LoRA (`liveavatar.safetensors`) and merging it into the transformer.

The released file stores `<module>.lora_A.default.weight` [r, in] and `<module>.lora_B.default.weight`
[out, r] for every targeted Linear, with no alpha. The original loads it with `strict=False`, so a
misspelled file silently loads nothing; here every pair must match a target module and every target
module must get a pair, otherwise the error names the offending keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from liveavatar.errors import CheckpointError
from liveavatar.weights.files import require_safetensors

# Training config of Live Avatar: rank 128, alpha 64. The file carries no alpha, so the scale is fixed.
LORA_SCALE = 64 / 128

# Linear layers the LoRA was trained on: names equal to or ending in one of these.
TARGET_SUFFIXES = ("q", "k", "v", "o", "ffn.0", "ffn.2")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


def target_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers a Live Avatar LoRA must cover (attention projections and FFNs, incl. audio injectors)."""
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(name == s or name.endswith("." + s) for s in TARGET_SUFFIXES)
    }


def read_lora(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Returns {module name: (A [r, in], B [out, r])}; raises CheckpointError for unreadable or unpaired keys."""
    path = require_safetensors(path, "LoRA weights (liveavatar.safetensors)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None:
                    bad.append(key)
                    continue
                pairs.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the LoRA safetensors file ({e})") from None
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} key(s) are not LoRA weights '<module>.lora_A|lora_B[.default].weight', e.g. {', '.join(bad[:3])}"
        )
    if not pairs:
        raise CheckpointError(f"{path}: the file holds no LoRA weights")
    unpaired = sorted(name for name, ab in pairs.items() if len(ab) != 2)
    if unpaired:
        raise CheckpointError(f"{path}: lora_A/lora_B pair incomplete for {len(unpaired)} module(s), e.g. {', '.join(unpaired[:3])}")
    for name, ab in pairs.items():
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{path}: {name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not share a rank")
    return {name: (ab["A"], ab["B"]) for name, ab in pairs.items()}


@torch.no_grad()
def merge_lora(model: nn.Module, path: str | Path, scale: float = LORA_SCALE) -> int:
    """Merges W <- W + scale * B @ A (in float32) into every target Linear. Returns the number of modules.

    Raises CheckpointError, naming the keys, if the LoRA has modules the model lacks, shapes that do not
    fit, or leaves any target module uncovered.
    """
    lora = read_lora(path)
    targets = target_modules(model)
    unknown = sorted(set(lora) - set(targets))
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} LoRA module(s) match no target layer of the transformer, e.g. "
            + ", ".join(f"{n}.lora_A.default.weight" for n in unknown[:3])
        )
    uncovered = sorted(set(targets) - set(lora))
    if uncovered:
        raise CheckpointError(
            f"{path}: the LoRA covers {len(lora)} of {len(targets)} target layers; missing e.g. "
            + ", ".join(f"{n}.lora_A.default.weight" for n in uncovered[:3])
        )
    for name, (a, b) in lora.items():
        layer = targets[name]
        if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape):
            raise CheckpointError(
                f"{path}: {name}.lora_B @ lora_A is {[b.shape[0], a.shape[1]]}, the layer weight is {list(layer.weight.shape)}"
            )
    for name, (a, b) in lora.items():
        w = targets[name].weight
        delta = b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)
        w.copy_((w.float() + scale * delta).to(w.dtype))
    return len(lora)
