"""Benchmark of the multi-GPU pipeline (liveavatar.parallel) with random full-size weights, and its check
against one process on one GPU.

    NCCL_NVLS_ENABLE=0 python -m benchmarks.bench_parallel --gpus 2 --configs bf16 fp8 fp8_fast --out r.json
    NCCL_NVLS_ENABLE=0 python -m benchmarks.bench_parallel --gpus 2 --configs fp8_fast --decode_costs 0 0.75 measured
    python -m benchmarks.bench_parallel --scale tiny --device cpu --gpus 2 --configs fp32 --sizes 128*128 --clips 2

For each configuration (bf16 or FP8 linear layers, eager or the compiled fast path) and each decode cost (how
the schedule shares the layers out, liveavatar.parallel.schedule: a fixed number of steps, or "measured", the
default of the command line, which cuts again after every stream) one pipeline is started:
every rank builds the same random models on its own GPU (benchmarks.random_models, same seeds). For each
size: a warm-up stream of one clip, the measured stream of --clips clips, then (for the first size) the same
stream in one process on the output rank's GPU, its transformer running all the steps with the same
options, for the latent check and the one-GPU speed beside it.

Reported per run (seconds unless named otherwise):
* fps: video frames over the time from blocks() to the last block's frames on the host; steady_fps: over
  the clips after the first (the pipeline is full and the sink has been replaced); after_refill_fps: from
  the block after the one-time sink refill on; block_arrivals_s: each block's frames, from blocks();
* ttff_s: from pipe.stream() (conditioning ready, models loaded and warm) to the first block's frames on
  the host; ttff_blocks_s: from blocks();
* ranks: what every rank reports: role, stage_ms (its busy GPU time per block: its denoising steps; on the
  output rank the steps and the decode), idle_fraction (the share of the time from its first to its last
  block that its GPU waited), setup_ms (sink prefill and caches), sink_refill_ms, peak_memory_gb;
* single: the one-process stream: fps, steady_fps, ttff_s, and the largest difference of its latents from
  the pipeline's (max |a - b| and that over max |b|).
With --mux the frames go into an MP4 on the output thread, as `run_job` writes them (mux_ms: mean per block);
without, they stop as uint8 arrays on the host.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# As benchmarks.run: growable segments keep the allocator from freeing memory (a device-wide sync) mid-stream.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.random_models import SCALES, build_dit, build_vae  # noqa: E402
from benchmarks.report import write_json  # noqa: E402
from liveavatar.engine.audio_source import PrecomputedAudio  # noqa: E402
from liveavatar.engine.pipeline import Conditioning, LiveAvatarPipeline  # noqa: E402
from liveavatar.engine.runtime import RuntimeOptions  # noqa: E402
from liveavatar.engine.stream import StreamSettings  # noqa: E402
from liveavatar.media import image as image_io  # noqa: E402
from liveavatar.parallel.launch import start_pipeline  # noqa: E402

SEED = 42
CONFIGS = {
    "fp32": RuntimeOptions(),  # the CPU check
    "bf16": RuntimeOptions(),
    "fp8": RuntimeOptions(fp8=True),
    "fp8_fast": RuntimeOptions(fp8=True, compile=True),
    "bf16_fast": RuntimeOptions(compile=True),
}
TEXT_TOKENS = 24  # a short prompt; the transformer pads the text to 512 positions whatever its length


@dataclass(frozen=True)
class RandomModels:
    """The ranks' models (liveavatar.parallel.launch.ModelSource): random weights, the same on every rank."""

    scale: str
    dtype: torch.dtype

    def num_layers(self) -> int:
        return SCALES[self.scale].dit.num_layers

    def load_dit(self, device: torch.device):
        return build_dit(SCALES[self.scale].dit, device, self.dtype)

    def load_vae(self, device: torch.device):
        return build_vae(SCALES[self.scale].vae_dim, device, self.dtype)

    def load_tiny_decoder(self, device: torch.device, choice):
        return None  # the VAE decodes (the options' default)

    def load_encoders(self, device: torch.device):
        return None, None  # the conditioning is made up here, not encoded


def conditioning(pipe: LiveAvatarPipeline, size: str, clips: int, scale: str) -> Conditioning:
    """A random reference image of the size's own shape (VAE-encoded as usual), text and audio features."""
    width, height = (int(v) for v in size.split("*"))
    height, width = image_io.output_size(height, width, image_io.parse_size(size))
    gen = torch.Generator().manual_seed(SEED)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8).numpy()
    ref, motion = pipe.encode_reference(pixels)
    text = torch.randn(TEXT_TOKENS, SCALES[scale].dit.text_dim, generator=gen)
    dit = SCALES[scale].dit
    audio = PrecomputedAudio(torch.randn(1, dit.audio_layers, dit.audio_dim, clips * 48, generator=gen), clips)
    return Conditioning(height, width, pixels, ref, motion, text, audio, clips, np.zeros(16000, np.float32))


def run_stream(pipe, cond: Conditioning, clips: int, mux: bool = False) -> tuple[dict, torch.Tensor, list | None]:
    output = None
    if mux:
        from liveavatar.engine.job import OutputThread
        from liveavatar.media.video import FragmentedMP4Writer

        folder = tempfile.TemporaryDirectory()
        output = OutputThread(FragmentedMP4Writer(Path(folder.name) / "bench.mp4", cond.width, cond.height))
    t0 = time.perf_counter()
    stream = pipe.stream(cond, StreamSettings(seed=SEED))
    t1 = time.perf_counter()
    arrivals, latents, frames = [], [], 0
    for block in stream.blocks(clips):
        arrivals.append(time.perf_counter())
        latents.append(block.latents)
        frames += len(block.frames)
        if output is not None:
            output.write(block.frames.numpy())
    if output is not None:
        output.drain()
        arrivals[-1] = time.perf_counter()  # the video is complete once the last block is written
        output.stop()
        output.writer.close()
        folder.cleanup()
    per_clip = stream.settings.blocks_per_clip
    result = {"frames": frames, "stream_call_s": t1 - t0, "ttff_s": arrivals[0] - t0, "ttff_blocks_s": arrivals[0] - t1,
              "fps": frames / (arrivals[-1] - t1)}
    if output is not None:
        result["mux_ms"] = float(np.mean(output.mux_ms))
    if clips > 1:
        steady = (len(arrivals) - per_clip) * stream.settings.video_frames_per_block
        result["steady_fps"] = steady / (arrivals[-1] - arrivals[per_clip - 1])
        # From the block after the one-time sink refill (it comes with clip 1's first block) to the end.
        after_refill = (len(arrivals) - per_clip - 1) * stream.settings.video_frames_per_block
        result["after_refill_fps"] = after_refill / (arrivals[-1] - arrivals[per_clip])
    result["block_arrivals_s"] = [t - t1 for t in arrivals]
    ranks = getattr(stream, "rank_stats", None)
    del stream
    gc.collect()  # the caches of this stream go before the next one is made
    return result, torch.cat(latents, 1), ranks


def _decode_cost(text: str) -> float | None:
    return None if text == "measured" else float(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["704*384", "720*400"])
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["bf16", "fp8"], choices=sorted(CONFIGS))
    parser.add_argument("--decode_costs", nargs="+", type=_decode_cost, default=[None],
                        help="a block's decode in denoising steps, for the schedule's cut, or 'measured' (cut again "
                             "after every stream, from its stage times); one pipeline for each")
    parser.add_argument("--scale", default="full", choices=sorted(SCALES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--deadline_s", type=float, default=float("inf"),
                        help="start no new run after this many seconds (to end inside a time limit)")
    parser.add_argument("--mux", action="store_true", help="write each stream's MP4 as run_job does (needs PyAV)")
    parser.add_argument("--out", default="bench_parallel.json")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    report = {"gpus": args.gpus, "clips": args.clips, "scale": args.scale, "torch": torch.__version__, "runs": []}
    for config, decode_cost in [(c, d) for c in args.configs for d in args.decode_costs]:
        if time.perf_counter() - t_start > args.deadline_s:
            report["runs"].append({"config": config, "decode_cost": decode_cost, "skipped": "deadline"})
            continue
        t0 = time.perf_counter()
        try:
            pipe = start_pipeline(RandomModels(args.scale, dtype), args.gpus, device_type=args.device,
                                  options=CONFIGS[config], cpu_threads=1 if args.device == "cpu" else None,
                                  decode_cost=decode_cost)
        except Exception as e:
            report["runs"].append({"config": config, "decode_cost": decode_cost,
                                   "error": f"start: {type(e).__name__}: {e}"})
            continue
        start_s = time.perf_counter() - t0
        report.setdefault("device", torch.cuda.get_device_name(pipe.device) if args.device == "cuda" else "cpu")
        try:
            for i, size in enumerate(args.sizes):
                run = {"config": config, "decode_cost": decode_cost, "size": size, "start_pipeline_s": start_s}
                report["runs"].append(run)
                if time.perf_counter() - t_start > args.deadline_s:
                    run["skipped"] = "deadline"
                    continue
                try:
                    measure(pipe, run, size, i == 0, args, t_start)
                except Exception as e:  # recorded; the other runs go on
                    run["error"] = f"{type(e).__name__}: {e}"
                    if pipe.broken:
                        break
                write_json(args.out, report)
        finally:
            pipe.close()
    write_json(args.out, report)
    _print_table(report)


def measure(pipe, run: dict, size: str, with_single: bool, args, t_start: float) -> None:
    """The warm-up and measured streams of one size, and (with_single) the one-process stream beside them."""
    cond = conditioning(pipe, size, args.clips, args.scale)
    run["warmup"], _, _ = run_stream(pipe, cond, 1, args.mux)
    if pipe.recut:  # the first stream's stage times include compilation: cut from a second one
        run_stream(pipe, cond, 1, args.mux)
    run["cut_decode_cost"] = pipe.schedule.decode_cost
    run["pipeline"], latents, run["ranks"] = run_stream(pipe, cond, args.clips, args.mux)
    if not with_single or pipe.dit is None or time.perf_counter() - t_start > args.deadline_s:
        return
    # One process on one GPU with the same models and options (the output rank's transformer).
    single = LiveAvatarPipeline(pipe.dit, pipe.vae, None, None, pipe.options)
    run_stream(single, cond, 1, args.mux)  # warm-up of the one-process path
    run["single"], reference, _ = run_stream(single, cond, args.clips, args.mux)
    diff = (latents.double() - reference.double()).abs().max().item()
    run["single"]["latents_max_abs_diff"] = diff
    run["single"]["latents_max_rel_diff"] = diff / reference.double().abs().max().item()


def _print_table(report: dict) -> None:
    print(f"\n{report.get('device')}, {report['gpus']} ranks, {report['clips']} clips, torch {report['torch']}")
    print(f"{'run':<26}{'fps':>6}{'steady':>7}{'after refill':>13}{'ttff':>6}{'1-GPU steady':>13}{'1-GPU ttff':>11}{'max rel Δ':>10}"
          f"  ranks: stage ms / idle % / peak GiB")
    for run in report["runs"]:
        name = f"{run['config']} d{run.get('cut_decode_cost', run['decode_cost'])} {run.get('size', '')}"
        if "pipeline" not in run:
            print(f"{name:<26}  {run.get('skipped') or run.get('error', 'failed')}")
            continue
        p, s = run["pipeline"], run.get("single", {})
        ranks = "  ".join(f"r{r['rank']} {r['stage_ms']:.0f}/{100 * r['idle_fraction']:.0f}/{r['peak_memory_gb']:.0f}"
                          for r in run["ranks"])
        print(f"{name:<26}{p['fps']:>6.1f}{p.get('steady_fps', 0):>7.1f}{p.get('after_refill_fps', 0):>13.1f}{p['ttff_s']:>6.2f}"
              f"{s.get('steady_fps', float('nan')):>13.1f}{s.get('ttff_s', float('nan')):>11.2f}"
              f"{s.get('latents_max_rel_diff', float('nan')):>10.1e}  {ranks}")


if __name__ == "__main__":
    main()
