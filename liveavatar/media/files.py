"""Checks on an input file before it is decoded, with messages that name what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

from liveavatar.errors import InputError


def require_readable_file(path: Path, kind: str) -> None:
    """Raises InputError unless ``path`` is a non-empty regular file this process can read; ``kind`` names
    it in the message ("image", "audio")."""
    if not path.exists():
        raise InputError(f"{kind} file not found: {path}")
    if path.is_dir():
        raise InputError(f"{kind} path is a directory, expected a file: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"{kind} file is empty (0 bytes): {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{kind} file is not readable (permission denied): {path}")
