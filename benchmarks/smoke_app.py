"""The smoke run's `app` check in its own process: `liveavatar app`'s model flags on the GPU, the page launched
and answering, and one request through its generate handler (what the page's Generate button calls).

    python -m benchmarks.smoke_app DATA OUT     # DATA: what `python -m benchmarks.smoke pack` wrote
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(data: Path, out: Path) -> None:
    import httpx

    from benchmarks.smoke import _free_port
    from liveavatar.engine.worker import EngineWorker
    from liveavatar.interfaces.app import build_app
    from liveavatar.interfaces.backend import Backend
    from liveavatar.interfaces.cli import build_parser
    from liveavatar.media.video import read_video

    port = _free_port()
    args = build_parser().parse_args(["app", "--ckpt_dir", str(data / "ckpt"), "--size", "384*256",
                                      "--server_port", str(port), "--work_dir", str(out / "work")])
    pipe = Backend.from_args(args).open()
    worker = EngineWorker(pipe, max_queue=2)
    try:
        demo = build_app(worker, args.work_dir, args.size)
        demo.queue(max_size=2).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                      allowed_paths=[str(args.work_dir)])
        status = httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code
        generate = next(f.fn for f in demo.fns.values() if f.name == "generate")
        case = data / "case"
        outputs = list(generate(str(case / "image.png"), str(case / "audio.wav"), "A person talking", "384*256", 1, 4,
                                11, False, False))
        chunks = sum(isinstance(o[0], str) for o in outputs)
        frames, fps, audio, _ = read_video(outputs[-1][2])
        demo.close()
    finally:
        worker.shutdown()
        pipe.close()
    if status != 200 or chunks != 4 or len(frames) != 45 or fps != 25 or audio is None:
        raise SystemExit(f"app: page {status}, {chunks} chunks, {len(frames)} frames at {fps} fps, audio {audio is not None}")
    (out / "app.json").write_text(json.dumps({"status": status, "chunks": chunks, "frames": len(frames)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
