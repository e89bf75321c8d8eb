"""3-D rotary position embedding (frame, row, column) of the Wan transformer.

Positions are computed directly from integer coordinates instead of indexing a fixed table, so a
stream can run for any length (the original's 45000-row table wraps after about two hours).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (frame, height, width); Wan splits head_dim as d-4(d//6), 2(d//6), 2(d//6)."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _positions(seq: Sequence[int], device) -> torch.Tensor:
    """Integer positions as float64 on `device`; a range is generated there (no host-to-device copy, so
    the streaming loop never waits for the GPU to build its RoPE tables)."""
    if isinstance(seq, range):
        return torch.arange(seq.start, seq.stop, seq.step, dtype=torch.float64, device=device)
    return torch.as_tensor(list(seq), dtype=torch.float64).to(device)


def _axis_angles(positions: torch.Tensor, pairs: int, theta: float = 10000.0) -> torch.Tensor:
    """[N] float64 positions -> [N, pairs] float64 angles pos * theta^(-2j/(2*pairs))."""
    exponents = torch.arange(0, 2 * pairs, 2, dtype=torch.float64, device=positions.device) / (2 * pairs)
    inv = 1.0 / torch.pow(theta, exponents)
    return positions[:, None] * inv[None, :]


def grid_multipliers(
    frames: Sequence[int], rows: Sequence[int], cols: Sequence[int], head_dim: int, device=None
) -> torch.Tensor:
    """Complex128 multipliers [len(frames)*len(rows)*len(cols), head_dim/2] for tokens in (f, h, w) order,
    computed on `device` (default CPU).

    Negative frame positions give the conjugate rotation, which is what polar(1, angle) does for
    a negative angle, so signed positions need no special case.
    """
    pf, ph, pw = axis_dims(head_dim)
    af = _axis_angles(_positions(frames, device), pf)
    ah = _axis_angles(_positions(rows, device), ph)
    aw = _axis_angles(_positions(cols, device), pw)
    nf, nh, nw = len(af), len(ah), len(aw)
    angles = torch.cat(
        [
            af[:, None, None, :].expand(nf, nh, nw, pf),
            ah[None, :, None, :].expand(nf, nh, nw, ph),
            aw[None, None, :, :].expand(nf, nh, nw, pw),
        ],
        dim=-1,
    ).reshape(nf * nh * nw, pf + ph + pw)
    return torch.polar(torch.ones_like(angles), angles)


def spaced_positions(extent: int, count: int) -> list[int]:
    """`count` integer positions spread over [0, extent-1] (a coarser grid covering the same area)."""
    return np.linspace(0, extent - 1, count).astype(int).tolist()


def rotation_table(multipliers: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Complex multipliers [L, d/2] -> real (cos, sin) pairs [L, d/2, 2] in `dtype`, the form `apply_rope` uses."""
    return torch.view_as_real(multipliers).to(dtype)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotates x [B, L, heads, head_dim] by a rotation table [L, head_dim/2, 2] (or complex multipliers [L, head_dim/2]).

    Each channel pair (a, b) becomes (a cos - b sin, a sin + b cos), computed in the table's dtype: float64
    for the reference's precision, float32 for speed. Real arithmetic rather than complex tensors, so the
    compiler can fuse it. The result has x's dtype.
    """
    if table.is_complex():
        table = torch.view_as_real(table)
    pairs = x.to(table.dtype).unflatten(-1, (-1, 2))  # [B, L, heads, d/2, 2]
    re, im = pairs.unbind(-1)
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).to(x.dtype)
