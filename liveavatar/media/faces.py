"""Automatic masks for multi-person mode: the people in the reference image found by their faces.

The original finds the people with insightface and segments them with SAM2 (CUDA and downloaded weights).
Here a face detector that ships inside its package does it, offline on the CPU: OpenCV's frontal-face Haar
cascade (`pip install 'liveavatar[multi]'`, opencv-python-headless; OpenCV 5's wheels no longer carry the
cascade files, so it is pinned below 5). The faces are numbered left to right by the centre of their box, as
the original numbers them, so the first speech track drives the leftmost person.

Each person's region is made from their face box: a column of the image from half a face above the face to
the image's bottom (head, shoulders and body, which move with the speech), two face widths wide, and never
past halfway to the next face. The mask processing (liveavatar.engine.multi_person) then dilates the regions
and leaves the boundary between neighbours to nobody.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from liveavatar.errors import InputError

CASCADE = "haarcascade_frontalface_default.xml"
MAX_SIDE = 1280  # larger images are searched at this size (the faces of a shot of a few people stay large)
MIN_FACE_FRACTION = 1 / 30  # of the image's shorter side: smaller "faces" are noise
MIN_NEIGHBOURS = 5  # overlapping detections a face needs (OpenCV's grouping; fewer gives false faces)
SMALLEST_VS_LARGEST = 0.35  # faces narrower than this share of the widest are background people or noise
REGION_WIDTH = 2.0  # face widths
REGION_ABOVE = 0.5  # face heights above the face


@dataclass(frozen=True)
class Face:
    """A face box in image pixels."""

    x: int
    y: int
    width: int
    height: int

    @property
    def centre_x(self) -> float:
        return self.x + self.width / 2

    def __str__(self) -> str:
        return f"{self.width}x{self.height} at ({self.x}, {self.y})"


def _detector():
    try:
        import cv2
    except ImportError:
        raise InputError("finding the people automatically needs OpenCV: pip install 'liveavatar[multi]' "
                         "(opencv-python-headless<5); or give one mask per speech track") from None
    path = Path(cv2.data.haarcascades) / CASCADE if hasattr(cv2, "data") else None
    if path is None or not path.is_file():
        raise InputError(f"finding the people automatically needs OpenCV's face cascade {CASCADE}, which this OpenCV "
                         f"({cv2.__version__}) does not ship: pip install 'opencv-python-headless<5'; or give one mask "
                         f"per speech track")
    return cv2, cv2.CascadeClassifier(str(path))


def detect_faces(img: Image.Image) -> list[Face]:
    """The faces in an image, left to right by the centre of their box."""
    cv2, cascade = _detector()
    grey = img.convert("L")
    scale = min(1.0, MAX_SIDE / max(grey.size))
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.BILINEAR)
    smallest = max(20, int(min(grey.size) * MIN_FACE_FRACTION))
    boxes = cascade.detectMultiScale(np.asarray(grey), scaleFactor=1.1, minNeighbors=MIN_NEIGHBOURS,
                                     minSize=(smallest, smallest))
    faces = [Face(*(int(round(v / scale)) for v in box)) for box in np.asarray(boxes).reshape(-1, 4)]
    if faces:
        widest = max(f.width for f in faces)
        faces = [f for f in faces if f.width >= SMALLEST_VS_LARGEST * widest]
    return sorted(faces, key=lambda f: f.centre_x)


@functools.lru_cache(maxsize=8)
def _faces_in_file(path: str, mtime_ns: int, size: int) -> tuple[Face, ...]:
    from liveavatar.media.image import load_image

    return tuple(detect_faces(load_image(path)))


def faces_in(path: str | os.PathLike) -> list[Face]:
    """detect_faces of an image file (remembered for the file as it is: a job checks its inputs, then runs)."""
    stat = Path(path).stat()
    return list(_faces_in_file(str(path), stat.st_mtime_ns, stat.st_size))


def person_regions(faces: list[Face], width: int, height: int) -> np.ndarray:
    """[A, H, W] bool: each face's region (see the module notes), faces in the order given (left to right)."""
    centres = [f.centre_x for f in faces]
    masks = np.zeros((len(faces), height, width), dtype=bool)
    for i, face in enumerate(faces):
        left = face.centre_x - REGION_WIDTH / 2 * face.width
        right = face.centre_x + REGION_WIDTH / 2 * face.width
        if i > 0:
            left = max(left, (centres[i - 1] + centres[i]) / 2)
        if i + 1 < len(faces):
            right = min(right, (centres[i] + centres[i + 1]) / 2)
        top = face.y - REGION_ABOVE * face.height
        x0, x1 = max(0, int(round(left))), min(width, int(round(right)))
        masks[i, max(0, int(round(top))) :, x0:x1] = True
    return masks


def automatic_masks(path: str | os.PathLike, tracks: int) -> tuple[np.ndarray, list[Face]]:
    """([A, H, W] bool masks, the faces) for `tracks` speech tracks: one region per face found, left to right.
    Raises InputError when the number of faces differs from the number of tracks."""
    from liveavatar.media.image import load_image

    faces = faces_in(path)
    if len(faces) != tracks:
        found = "no face" if not faces else f"{len(faces)} face(s) ({'; '.join(map(str, faces))})"
        raise InputError(f"{path}: found {found} for {tracks} speech tracks; the people are found by their faces "
                         f"(frontal, not too small): give one mask per track instead (white = that person)")
    img = load_image(path)
    return person_regions(faces, img.width, img.height), faces
