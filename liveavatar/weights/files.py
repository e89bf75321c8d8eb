"""Reading checkpoint files with one-line errors that name the file and what was expected."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from liveavatar.errors import CheckpointError


# Leading bytes of files that end up under a checkpoint's name by mistake (a renamed or failed download).
_SIGNATURES = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WAV audio or WebP image)"),
    (b"version https://git-lfs", "a Git LFS pointer (fetch the weights with git lfs pull or liveavatar download)"),
    (b"<!doctype html", "an HTML page (a failed download?)"),
    (b"<html", "an HTML page (a failed download?)"),
)


def _impostor(path: Path) -> str | None:
    """What the file is when its first bytes are one of the usual mix-ups (never a valid weights file)."""
    with path.open("rb") as f:
        head = f.read(32).lower()
    return next((name for magic, name in _SIGNATURES if head.startswith(magic.lower())), None)


def _unreadable(path: Path, what: str, detail: str) -> CheckpointError:
    """The error for a file that does not load: names what it is instead when it is one of the usual mix-ups."""
    kind = _impostor(path)
    return CheckpointError(f"{path}: this is {kind}, not the {what}" if kind else f"{path}: {detail}")


def require_weights(path: str | Path, what: str) -> Path:
    """`require_file`, and the file must not be an image, a Git LFS pointer or an HTML page (read: 32 bytes)."""
    path = require_file(path, what)
    kind = _impostor(path)
    if kind is not None:
        raise CheckpointError(f"{path}: this is {kind}, not the {what}")
    return path


def require_file(path: str | Path, what: str) -> Path:
    """Returns `path` as a Path, or raises CheckpointError saying which file is missing and what it holds."""
    path = Path(path)
    if not path.is_file():
        where = "folder" if path.is_dir() else "file"
        if path.is_dir():
            raise CheckpointError(f"{path}: expected the {what} file, found a {where}")
        raise CheckpointError(f"{path}: missing; expected the {what}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file; expected the {what}")
    return path


_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


def require_safetensors(path: str | Path, what: str) -> Path:
    """`require_file`, and the file must start with a safetensors header (read without loading any tensor)."""
    path = require_file(path, what)
    with path.open("rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        ok = 2 <= length <= min(path.stat().st_size - 8, _MAX_HEADER_BYTES)
        if ok:
            try:
                ok = isinstance(json.loads(f.read(length)), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
    if not ok:
        raise _unreadable(path, what, f"not a safetensors file (no valid header); expected the {what}")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: missing folder; expected the {what}")
    return path


def load_torch_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Loads a `torch.save`d state_dict memory-mapped (no second copy in host memory)."""
    path = require_file(path, what)
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise _unreadable(path, what, f"cannot read the {what} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state_dict of tensors for the {what}")
    return dict(state)


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor | torch.Size | tuple],
    source: str | Path,
    what: str,
) -> None:
    """Raises CheckpointError if keys are missing/unexpected or a tensor has the wrong shape.

    `expected` maps each parameter name to a tensor (or shape) of the module that will receive it.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(
            f"{source}: {what} is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: {what} has {len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}"
        )
    for name, ref in expected.items():
        shape = tuple(ref.shape) if isinstance(ref, torch.Tensor) else tuple(ref)
        got = tuple(state[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(got)}, expected {list(shape)} ({what})")
        if not state[name].is_floating_point():
            raise CheckpointError(f"{source}: tensor {name} has dtype {state[name].dtype}, expected a float dtype ({what})")
