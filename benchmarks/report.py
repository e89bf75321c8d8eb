"""How the benchmarks hand over their results: JSON on standard output and, if asked, in a file written whole."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, result: dict) -> None:
    """Writes `result` to `path` through a temporary file, so that a run cut short never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def emit(result: dict, path: str | Path | None) -> None:
    """Prints `result` as JSON and writes it to `path` too (if given)."""
    print(json.dumps(result, indent=1))
    if path:
        write_json(path, result)
