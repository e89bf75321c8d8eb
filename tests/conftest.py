import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("LIVEAVATAR_GOLDEN", REPO.parent / "shared" / "golden"))
CKPT = GOLDEN / "ckpt"
WAN_DIR = CKPT / "Wan2.2-S2V-14B"
LORA_FILE = CKPT / "LiveAvatar" / "liveavatar.safetensors"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

requires_golden = pytest.mark.skipif(
    not (GOLDEN / "README.md").exists(), reason=f"golden data folder not found at {GOLDEN}"
)


def rel_err(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """max|mine - ref| / max|ref|, the spec's error measure (README section 7)."""
    mine, ref = mine.double(), ref.double()
    return float((mine - ref).abs().max() / ref.abs().max())


def assert_close(name: str, mine: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> float:
    assert tuple(mine.shape) == tuple(ref.shape), f"{name}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    if not ref.is_floating_point():
        assert torch.equal(mine.to(ref.dtype), ref), f"{name}: integer tensor differs"
        return 0.0
    err = rel_err(mine, ref)
    assert err <= tol, f"{name}: max rel err {err:.3e} > {tol:.0e}"
    return err


_cache: dict = {}


def golden_case(name: str) -> dict:
    """Loads cases/<name>/outputs.safetensors once per session."""
    from safetensors.torch import load_file

    if name not in _cache:
        _cache[name] = load_file(str(GOLDEN / "cases" / name / "outputs.safetensors"))
    return _cache[name]


def golden_params(name: str) -> dict:
    return json.loads((GOLDEN / "cases" / name / "params.json").read_text())


def module_checks() -> dict:
    from safetensors.torch import load_file

    if "module_checks" not in _cache:
        _cache["module_checks"] = load_file(str(GOLDEN / "module_checks.safetensors"))
    return _cache["module_checks"]
