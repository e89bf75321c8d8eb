"""Reference image: size presets, output-size search, loading and the resize + center-crop.

The output size follows the reference pipeline (golden README section 2.1): the ``--size`` preset is
only a pixel budget, and the output keeps roughly the image's aspect ratio with both sides rounded up
to multiples of 64. The reference frame is then made with torchvision's ``Resize(min(H, W))`` +
``CenterCrop((H, W))`` semantics on a PIL image (section 2.2), reproduced here bit-exactly with
Pillow alone.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from liveavatar.errors import InputError
from liveavatar.media.files import require_readable_file

# The sizes Live Avatar was trained and benchmarked at, written "W*H" like the reference CLI.
SIZE_PRESETS = ("720*400", "704*384", "688*368", "384*256")

# Output sides are multiples of this (the VAE's 8x and the DiT's 2x2 patches leave room for it).
SIZE_MULTIPLE = 64

# Smallest budget that can hold one 64x64 output.
MIN_AREA = SIZE_MULTIPLE * SIZE_MULTIPLE

# Images above this many pixels are refused before decoding (decompression bombs): 64 MP is far
# more than any preset needs and keeps the decoded RGB buffer under 200 MB.
MAX_IMAGE_PIXELS = 64_000_000

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[*xX]\s*(\d+)\s*$")


def parse_size(text: str) -> int:
    """Returns the pixel budget ``A = w * h`` of a ``--size`` string.

    Accepts the presets (``"704*384"``), the same with ``x`` as separator (``"704x384"``), and any
    other ``"W*H"`` of positive integers whose area is at least 64*64: the value is only a budget
    (the output size comes from the image's aspect ratio), so no divisibility is required.
    """
    presets = ", ".join(SIZE_PRESETS)
    match = _SIZE_PATTERN.match(str(text))
    if match is None:
        raise InputError(f"invalid size {text!r}: expected W*H such as one of the presets {presets}")
    width, height = int(match.group(1)), int(match.group(2))
    if width * height < MIN_AREA:
        raise InputError(
            f"size {text!r} is too small: its area {width * height} is below "
            f"{MIN_AREA} (one {SIZE_MULTIPLE}x{SIZE_MULTIPLE} output); presets are {presets}"
        )
    return width * height


def _round_up(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def output_size(image_h: int, image_w: int, area: int) -> tuple[int, int]:
    """The output (H, W) for an ``image_h x image_w`` image under a pixel budget ``area``.

    Scans 100 scales from the largest that could fit down to the smallest that surely fits once
    both sides are rounded up to multiples of 64, and keeps the first whose rounded size fits the
    budget. Images already within the budget start at scale 1, so they are only rounded up.
    """
    if image_h <= 0 or image_w <= 0:
        raise InputError(f"image size {image_w}x{image_h} is empty")
    pixels = image_h * image_w
    if pixels <= area:
        min_scale, max_scale = 0.1, 1.0
    else:
        # Lower bound: the scale at which even a full 63-pixel round-up per side stays in budget
        # (the reference's quadratic, kept as written, including its 2ac term).
        pad = SIZE_MULTIPLE - 1
        a, b, c = pixels, pad * (image_h + image_w), pad**2 - area
        min_scale = (-b + math.sqrt(b**2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(area / pixels)

    height = width = 0
    for step in range(100):
        scale = max_scale - (max_scale - min_scale) * step / 100
        height = _round_up(int(image_h * scale))
        width = _round_up(int(image_w * scale))
        if height * width <= area:
            break
    else:
        # Not reached for the presets with ordinary images; for extreme aspect ratios fall back
        # to the budget's aspect-correct size floored to multiples of 64, capped by the image.
        aspect = image_w / image_h
        width = int((area * aspect) ** 0.5 // SIZE_MULTIPLE * SIZE_MULTIPLE)
        height = int((area / aspect) ** 0.5 // SIZE_MULTIPLE * SIZE_MULTIPLE)
        if width >= image_w or height >= image_h:
            width = image_w // SIZE_MULTIPLE * SIZE_MULTIPLE
            height = image_h // SIZE_MULTIPLE * SIZE_MULTIPLE
    # A side that scales below one pixel rounds to 0 (the reference would go on with it).
    if height == 0 or width == 0:
        raise InputError(
            f"cannot fit a {image_w}x{image_h} image into a {area}-pixel budget with sides that are "
            f"multiples of {SIZE_MULTIPLE}: the aspect ratio is too extreme; crop the image"
        )
    return height, width


def small_image_notice(image_w: int, image_h: int, out_w: int, out_h: int, area: int, size_text: str) -> str | None:
    """A word for an image so small that the video comes out at less than half of the ``--size`` budget (an image
    is never scaled up, only its sides rounded up to multiples of 64); None otherwise."""
    if 2 * out_w * out_h > area:
        return None
    need_w = math.ceil(math.sqrt(area * image_w / image_h))
    need_h = math.ceil(math.sqrt(area * image_h / image_w))
    return (f"the image is {image_w}x{image_h} pixels, smaller than --size {size_text.strip()} asks for: the video "
            f"will be {out_w}x{out_h} (an image is not scaled up to fill --size); for a video of about that size use "
            f"an image of at least {need_w}x{need_h} pixels, or pass a smaller --size")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to 8-bit RGB.

    Alpha is dropped, not composited: the reference reads images with ``convert('RGB')``, and
    matching it keeps our output identical to the original system for the same input file.
    16-bit grayscale is scaled to 8 bits (Pillow's own conversion would clip it to 255).
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit samples (PNG/TIFF); "I" is how some decoders hand them over.
        samples = np.asarray(img, dtype=np.int64)
        gray = ((np.clip(samples, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Reads an image file as an 8-bit RGB PIL image (first frame of animated formats), upright.

    The EXIF Orientation tag (all eight values; a phone photo is usually stored sideways with tag 6 or
    8) is applied, so the image is the way it is shown: the reference ignored it and made portrait phone
    photos into sideways landscape videos. An image without the tag (the golden PNGs) is unchanged.
    Raises InputError with a one-line message for a missing, empty, unreadable, corrupt, truncated or
    oversized file.
    """
    path = Path(path)
    require_readable_file(path, "image")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and above twice its own limit refuses) while opening; ours is lower and checked below.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"image is too large: {width}x{height} = {width * height} pixels exceeds the "
                    f"limit of {MAX_IMAGE_PIXELS} (possible decompression bomb): {path}"
                )
            img.load()
            return _to_rgb(_upright(img)).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"image is too large: over the limit of {MAX_IMAGE_PIXELS} pixels (possible decompression bomb): {path}"
        ) from None
    except UnidentifiedImageError:
        raise InputError(f"not an image file (unknown or unsupported format): {path}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"image file is corrupt or truncated: {path}: {exc}") from None


def _upright(img: Image.Image) -> Image.Image:
    """The image turned and mirrored as its EXIF Orientation tag says (the image itself without one).
    Unreadable EXIF data is ignored: the pixels are there, only the hint of how to turn them is broken."""
    try:
        orientation = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF blocks raise from deep inside Pillow's parser, with many types
        return img
    if orientation not in range(2, 9):
        return img
    return img.transpose(_TRANSPOSE[orientation])


ORIENTATION_TAG = 0x0112
# EXIF Orientation -> the Pillow transpose that makes the stored pixels upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """torchvision ``Resize(int)`` arithmetic: the short side becomes ``short_side`` and the long
    side ``int(short_side * long / short)`` (float division, truncated). Returns (width, height)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision ``CenterCrop((height, width))``: zero-pad symmetrically (the extra pixel on the
    bottom/right) where the image is smaller than the crop, then crop at round((size - crop) / 2)."""
    pad_h = max(height - pixels.shape[0], 0)
    pad_w = max(width - pixels.shape[1], 0)
    if pad_h or pad_w:
        pixels = np.pad(
            pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        )
    # Python's round (half to even) is what torchvision uses for the offsets.
    top = int(round((pixels.shape[0] - height) / 2.0))
    left = int(round((pixels.shape[1] - width) / 2.0))
    return pixels[top : top + height, left : left + width]


def prepare_reference(img: Image.Image, height: int, width: int) -> np.ndarray:
    """The reference frame: uint8 ``[height, width, 3]`` after Resize(min(H, W)) + CenterCrop.

    Bilinear resizing is Pillow's (antialiased), as torchvision does for PIL inputs.
    """
    img = _to_rgb(img)
    new_size = _resized_size(img.width, img.height, min(height, width))
    if new_size != img.size:
        img = img.resize(new_size, Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(_center_crop(pixels, height, width))


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 ``[3, H, W]`` in [-1, 1], computed as ToTensor() * 2 - 1."""
    chw = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # a writable copy
    return chw.to(torch.float32).div(255).mul(2).sub(1)
