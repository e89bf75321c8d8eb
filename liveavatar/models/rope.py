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


def _axis_angles(positions: torch.Tensor, pairs: int, theta: float = 10000.0) -> torch.Tensor:
    """[N] positions -> [N, pairs] float64 angles pos * theta^(-2j/(2*pairs))."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
    return positions.to(torch.float64)[:, None] * inv[None, :]


def grid_multipliers(
    frames: Sequence[int], rows: Sequence[int], cols: Sequence[int], head_dim: int
) -> torch.Tensor:
    """Complex128 multipliers [len(frames)*len(rows)*len(cols), head_dim/2] for tokens in (f, h, w) order.

    Negative frame positions give the conjugate rotation, which is what polar(1, angle) does for
    a negative angle, so signed positions need no special case.
    """
    pf, ph, pw = axis_dims(head_dim)
    af = _axis_angles(torch.as_tensor(list(frames)), pf)
    ah = _axis_angles(torch.as_tensor(list(rows)), ph)
    aw = _axis_angles(torch.as_tensor(list(cols)), pw)
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


def apply_rope(x: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Rotates x [B, L, heads, head_dim] by multipliers [L, head_dim/2].

    In complex128 when the multipliers are (the reference's precision); in complex64 for speed.
    The result has x's dtype.
    """
    b, length, heads, dim = x.shape
    work = torch.float64 if multipliers.dtype == torch.complex128 else torch.float32
    xc = torch.view_as_complex(x.to(work).reshape(b, length, heads, dim // 2, 2))
    out = torch.view_as_real(xc * multipliers[None, :, None, :]).flatten(3)
    return out.to(x.dtype)
