"""The people's regions in multi-person mode: one mask image per person, white = that person, at the reference
image's size (liveavatar.engine.multi_person routes each speech track to its region)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from liveavatar.errors import InputError
from liveavatar.media import image as image_io
from liveavatar.media.files import require_readable_file

# A pixel belongs to the person where its grey level is at least this (drawn masks are 0 / 255; anti-aliased
# or JPEG-compressed edges count as inside from half-white on).
WHITE_FROM = 128


def load_mask(path: str | os.PathLike, image_size: tuple[int, int]) -> np.ndarray:
    """A mask image as bool [H, W] (True = the person). image_size (W, H): the reference image's, which the mask
    must have. Raises InputError for a missing or unreadable file, another size, or a mask with no white pixel."""
    path = Path(path)
    require_readable_file(path, "mask")
    img = image_io.load_image(path).convert("L")  # the checks of a reference image (missing, corrupt, too large)
    if img.size != tuple(image_size):
        raise InputError(f"{path}: the mask is {img.width}x{img.height}, the image {image_size[0]}x{image_size[1]}; "
                         f"a mask must have the image's size (white = that person)")
    mask = np.asarray(img) >= WHITE_FROM
    if not mask.any():
        raise InputError(f"{path}: the mask is empty (no white pixel); white marks the person whose speech it routes")
    return mask


def load_masks(paths: Sequence[str | os.PathLike], image_size: tuple[int, int]) -> np.ndarray:
    """[A, H, W] bool, one mask per person in the order given."""
    return np.stack([load_mask(p, image_size) for p in paths])
