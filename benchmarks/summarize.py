"""Prints one line per runner JSON file (one per decoder when it measured several): the headline figures next
to the floor.

    python -m benchmarks.summarize bench_out/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("run", "fps", "floor_fps", "ttff_s", "step_ms", "floor_step", "decode_ms", "floor_dec", "mux_ms", "peak_gib")


def row(name: str, r: dict) -> list[str]:
    stages, fl = r.get("stages_ms", {}), r.get("floor", {})
    steps = [v for k, v in stages.items() if k.startswith("step")]
    values = [
        r.get("steady_fps"), fl.get("fps"), r.get("ttff_s"),
        sum(steps) / len(steps) if steps else None, fl.get("step_ms"),
        stages.get("decode"), fl.get("decode_ms"), stages.get("mux"), r.get("peak_allocated_gib"),
    ]
    return [name] + ["-" if v is None else f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in values]


def main(paths: list[str]) -> None:
    rows = [COLUMNS]
    for p in paths:
        result = json.loads(Path(p).read_text())
        decoders = result.get("decoders", {})
        if len(decoders) > 1:
            rows += [row(f"{Path(p).stem}[{name}]", measured) for name, measured in decoders.items()]
        else:
            rows.append(row(Path(p).stem, result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main(sys.argv[1:])
