"""Live-session benchmark: a real LiveSession on random full-size weights, speech pushed in real time, JSON out.

    python -m benchmarks.bench_live --realtime --compile --fp8 --seconds 30        # the real-time preset, one GPU
    python -m benchmarks.bench_live --size 704*384 --compile --fp8 --seconds 30    # a size that cannot keep up
    python -m benchmarks.bench_live --realtime --size 704*384 --on_slow downgrade --compile --fp8   # ... stepping down
    python -m benchmarks.bench_live --scale tiny --device cpu --size 128*128 --seconds 3 --steady_from 1   # CI

A client pushes 100 ms of speech every 100 ms (the example speech, repeated: real pauses between phrases) for
`--seconds`, then the avatar idles for two blocks and the session closes. With `--realtime` the start-up
calibration of `serve --realtime` runs first (liveavatar.engine.calibration; each new size compiles on a GPU)
and the session runs the preset it picks. Otherwise a short warm-up session at the size compiles it first.

Reported per block (liveavatar.engine.live.LiveBlock) and summarised over the steady blocks (from
`--steady_from`) that carry speech, in milliseconds, for each block's first spoken sample (server side):
* window: from its push (received) to the window that holds it taken (waiting for the 0.48 s window to fill,
  and queueing when the session is behind);
* generation: from there to the block's frames on the host (speech features, steps, decode);
* mux: from there to the block's MP4 bytes handed to the viewers;
* push_to_ready = window + generation; push_to_out = + mux;
and the session's lag after each block (seconds; see the notes of liveavatar.engine.live), the silence it dropped,
any step down, and its steady speed (the session's BlockMeter: frames over wall time between blocks that did not
wait for speech; a session that keeps up mostly waits, so this is often None: `fps_from_stages` is 12 frames over
a block's step and decode times, its GPU work on a GPU).
The transport to a browser and its buffering are measured by the player page (tests/test_browser.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.random_models import SCALES, build_pipeline  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from liveavatar.engine import calibration  # noqa: E402
from liveavatar.engine.live import (LAG_BOUND_S, BlockPublished, LiveSession, SessionEnded,  # noqa: E402
                                   SessionMessage, SessionOptions)
from liveavatar.engine.realtime import (  # noqa: E402
    CANDIDATE_SIZES, CANDIDATE_STEPS, STEADY_FROM, Realtime, SpeedTable, machine_name,
)
from liveavatar.engine.runtime import RuntimeOptions  # noqa: E402
from liveavatar.media.audio import load_audio  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEECH = REPO / "examples" / "speech.wav"
SAMPLE_RATE = 16000
CHUNK_S = 0.1
WARMUP_BLOCKS = STEADY_FROM + 2  # compiles the size and captures the steps' CUDA graphs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_live", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--fp8", action="store_true", help="FP8 linear layers in the transformer")
    p.add_argument("--compile", action="store_true", help="the compiled fast path, as `serve` runs on a GPU")
    p.add_argument("--size", default=None, help="pixel budget W*H (default: the preset with --realtime, else 384*256; "
                   "with --realtime a given size runs after the calibration, which gives it sizes to step down to)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--realtime", action="store_true", help="calibrate the candidates and run the real-time preset")
    p.add_argument("--sizes", default=",".join(CANDIDATE_SIZES), help="the candidates with --realtime")
    p.add_argument("--steps_options", default=",".join(map(str, CANDIDATE_STEPS)), help="their step counts")
    p.add_argument("--speed_table", type=Path, default=None, help="a speed table file to read and update (default: none)")
    p.add_argument("--calibration_blocks", type=int, default=calibration.CALIBRATION_BLOCKS)
    p.add_argument("--calibrate_all", action="store_true", help="measure every candidate, not only up to the first "
                   "that keeps up")
    p.add_argument("--seconds", type=float, default=30.0, help="speech pushed in real time")
    p.add_argument("--steady_from", type=int, default=STEADY_FROM, help="first block of the summary")
    p.add_argument("--on_slow", choices=["keep", "downgrade"], default="keep",
                   help="downgrade: step down at a clip boundary when behind (needs --realtime's candidates measured)")
    p.add_argument("--max_lag_s", type=float, default=LAG_BOUND_S)
    p.add_argument("--warmup_blocks", type=int, default=None, help=f"default {WARMUP_BLOCKS} (0 with --realtime)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def speech(seconds: float) -> np.ndarray:
    wave = load_audio(SPEECH, SAMPLE_RATE)
    need = int(seconds * SAMPLE_RATE)
    return np.tile(wave, -(-need // len(wave)))[:need]


def run_session(pipe, realtime: Realtime | None, options: SessionOptions, pushed: np.ndarray | None,
                close_after_blocks: int | None = None) -> dict:
    """Runs a session on this thread while another pushes `pushed` in real time; returns its blocks and messages."""
    session = LiveSession(options, realtime)
    events: queue.Queue = queue.Queue()
    session.subscribe(events.put)
    blocks, messages = [], []
    done = threading.Event()

    def push():
        t0 = time.monotonic()
        for i, at in enumerate(range(0, len(pushed), int(CHUNK_S * SAMPLE_RATE))):
            time.sleep(max(0.0, t0 + i * CHUNK_S - time.monotonic()))  # on an absolute schedule: no drift
            session.push(pushed[at : at + int(CHUNK_S * SAMPLE_RATE)])
        done.set()

    def watch():
        while True:
            event = events.get()
            if isinstance(event, BlockPublished):
                blocks.append(event.info)
                b = event.info
                if close_after_blocks is not None and len(blocks) >= close_after_blocks:
                    session.close()
                elif pushed is not None and done.is_set() and b.speech_end >= len(pushed) and \
                        len(blocks) >= 2 and not blocks[-2].speech_samples and not b.speech_samples:
                    session.close()
            elif isinstance(event, SessionMessage):
                messages.append(event.message)
            elif isinstance(event, SessionEnded):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if pushed is not None:
        threading.Thread(target=push, daemon=True).start()
    else:
        done.set()
    t0 = time.perf_counter()
    session.run(pipe)
    watcher.join(30)
    return {"blocks": blocks, "messages": messages, "seconds": time.perf_counter() - t0,
            "speeds": [{"size": s, "sample_steps": n, "fps": fps} for (s, n), fps in session.speeds_measured]}


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": float(a.max()),
            "mean": float(a.mean()), "n": len(a)}


def summarise(blocks, steady_from: int) -> dict:
    steady = [b for b in blocks if b.index >= steady_from and b.latency_ms]
    parts = {k: _stats([b.latency_ms[k] for b in steady]) for k in ("window", "generation", "mux")}
    ready = [b.latency_ms["window"] + b.latency_ms["generation"] for b in steady]
    out = [r + b.latency_ms["mux"] for r, b in zip(ready, steady)]
    lags = [b.lag_s for b in blocks if b.index >= steady_from]
    stage_names = sorted({k for b in steady for k in b.timings_ms})
    return {
        "steady_speech_blocks": len(steady), "latency_ms": {**parts, "push_to_ready": _stats(ready), "push_to_out": _stats(out)},
        "lag_s": {**(_stats(lags) or {}), "final": lags[-1] if lags else None},
        "stages_ms": {k: float(np.mean([b.timings_ms[k] for b in steady if k in b.timings_ms])) for k in stage_names},
        "dropped_s": sum(b.dropped_samples for b in blocks) / SAMPLE_RATE,
        "sizes": sorted({(b.size, b.sample_steps) for b in blocks}),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    result: dict = {"command": "python -m benchmarks.bench_live " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": datetime.date.today().isoformat(), "environment": environment(device)}
    if args.compile:
        torch._dynamo.config.suppress_errors = True
    t0 = time.perf_counter()
    # As `serve` on a GPU: the encoders in host memory except while they run (wav2vec2 stays on the GPU in a session).
    pipe = build_pipeline(SCALES[args.scale], device, dtype,
                          options=RuntimeOptions(fp8=args.fp8, compile=args.compile, offload_encoders=device.type == "cuda"))
    result["build_s"] = time.perf_counter() - t0
    table = SpeedTable(args.speed_table, machine_name(pipe))
    realtime = Realtime(table, [s for s in args.sizes.split(",") if s], [int(n) for n in args.steps_options.split(",") if n])
    result["machine"] = table.machine
    with tempfile.TemporaryDirectory(prefix="liveavatar-bench-live-") as folder:
        image = calibration.synthetic_image(Path(folder) / "face.png")
        size, steps = args.size or "384*256", args.steps
        if args.realtime:
            t0 = time.perf_counter()
            result["calibration"] = calibration.calibrate(pipe, realtime, blocks=args.calibration_blocks,
                                                          steady_from=min(args.steady_from, args.calibration_blocks - 4),
                                                          stop_when_found=not args.calibrate_all)
            result["calibration_s"] = time.perf_counter() - t0
            choice = realtime.choice()
            result["realtime"] = choice.to_dict()
            if choice.size is not None and args.size is None:
                size, steps = choice.size, choice.steps
        result["speeds"] = table.entries()
        warmup = args.warmup_blocks if args.warmup_blocks is not None else (0 if args.realtime else WARMUP_BLOCKS)
        if warmup:
            t0 = time.perf_counter()
            options = SessionOptions(image, size=size, sample_steps=steps, max_lag_s=None)
            run_session(pipe, None, options, calibration.synthetic_speech((warmup + 1) * 0.48), close_after_blocks=warmup)
            result["warmup_s"] = time.perf_counter() - t0
            calibration._release(pipe)
        options = SessionOptions(image, size=size, sample_steps=steps, on_slow=args.on_slow, max_lag_s=args.max_lag_s,
                                 steady_from=args.steady_from)
        run = run_session(pipe, realtime, options, speech(args.seconds))
    blocks = run["blocks"]
    result["session"] = {"size": size, "sample_steps": steps, "seconds": run["seconds"], "blocks_total": len(blocks),
                         "speech_s": args.seconds, "speeds": run["speeds"], "messages": run["messages"],
                         **summarise(blocks, args.steady_from)}
    # Real time needs 12 frames per 0.48 s: how long a block took against that, from its generation stages.
    steps_ms = [sum(v for k, v in b.timings_ms.items() if k.startswith("step") or k == "decode")
                for b in blocks if b.index >= args.steady_from]
    result["session"]["gpu_work_ms_per_block"] = _stats(steps_ms)
    result["session"]["fps_from_stages"] = 12000 / float(np.median(steps_ms)) if steps_ms else None
    result["blocks"] = [{"index": b.index, "frames": b.frames, "size": b.size, "sample_steps": b.sample_steps,
                         "speech_samples": b.speech_samples, "dropped_samples": b.dropped_samples, "lag_s": b.lag_s,
                         "latency_ms": b.latency_ms, "stages_ms": b.timings_ms} for b in blocks]
    emit(result, args.json)
    return result


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return env


if __name__ == "__main__":
    main()
