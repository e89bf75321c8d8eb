"""Benchmark runner: builds random-weight models of the real architecture on the device, drives the real
streaming engine (LiveAvatarPipeline.prepare -> AvatarStream.blocks -> FragmentedMP4Writer) and prints JSON.

    python -m benchmarks.run --size 704*384 --blocks 16                # bf16, one GPU
    python -m benchmarks.run --fp8 --compile                           # the fast path with FP8 linear layers
    python -m benchmarks.run --offload --kv_fp8 --memory_gb 24         # low-memory mode within 24 GiB
    python -m benchmarks.run --scale tiny --device cpu --size 128*128 --blocks 2    # CI: seconds
    python -m benchmarks.run --compile --fp8 --decoder taew2_1 wan     # the light decoder, then the VAE's, one model

Reported (milliseconds unless named otherwise):
* prepare: reference encode (VAE), prompt (umT5, moved in and out of the GPU), audio features (wav2vec2);
* stream_call: host time of `pipeline.stream()` (text keys/values, sink prefill, decoder warm-up and ring
  allocation are enqueued there; their GPU time is part of ttff_s);
* stages: mean per block over the steady blocks, as the engine records them (CUDA events on a GPU, so each
  stage is its GPU time, the decode overlapping the next block's steps), plus the muxing on the host;
* steady_fps: video frames per wall-clock second over the steady blocks (frames are 25 fps video);
* ttff_s: from the call of `pipeline.stream()` (conditioning prepared, models loaded and warm) to the first
  block's frames on the host; ttff_with_prepare_s adds the preparation of the inputs;
* peak memory: the allocator's peak during the measured stream (models included);
* floor: FLOPs of a block step and a block decode (benchmarks.flops) over the measured matrix-product rate
  of the device: the time no implementation can beat, next to each measured figure.

With several --decoder names, each gets a warm-up stream and a measured stream of its own on the same loaded
models (the light TAEW2.1 decoder is built beside the VAE): the top-level figures are the first decoder's,
and "decoders" holds every decoder's (stages, steady_fps, ttff_s, peak memory, floor), side by side.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# Growable allocator segments: the bf16 stream fills 74 of the H100's 79 GiB, and with fixed segments the
# allocator's fragmentation forces cudaFree (a device-wide synchronisation) in the middle of the loop.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.flops import block_step_flops, decode_flops  # noqa: E402
from benchmarks.random_models import SCALES, build_pipeline, num_parameters  # noqa: E402
from benchmarks.report import emit  # noqa: E402
from liveavatar.engine.audio_source import audio_source_for  # noqa: E402
from liveavatar.engine.job import OutputThread  # noqa: E402
from liveavatar.engine.runtime import RuntimeOptions  # noqa: E402
from liveavatar.engine.stream import StreamSettings  # noqa: E402
from liveavatar.media import image as image_io  # noqa: E402
from liveavatar.media.audio import load_audio  # noqa: E402
from liveavatar.media.video import FragmentedMP4Writer  # noqa: E402
from liveavatar.models.fastpath import attention_candidates  # noqa: E402
from liveavatar.models.taehv import DECODERS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "examples" / "face.png"
SPEECH = REPO / "examples" / "speech.wav"
PROMPT = "A cartoon person talks to the camera in a bright studio, natural head motion, soft light."
SAMPLE_RATE = 16000
WARMUP_STREAM_BLOCKS = 2  # compiles every shape of the step and of the sink prefill


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="704*384", help="pixel budget W*H (the example image sets the aspect)")
    p.add_argument("--blocks", type=int, default=16, help="blocks to generate (12 frames each)")
    p.add_argument("--steady_from", type=int, default=8, help="first block of the steady state (after clip 0's warm ring and the sink replacement)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per block (4, the distilled count; 3 is faster)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--vae_dtype", choices=["bfloat16", "float32"], default=None, help="default: --dtype")
    p.add_argument("--fp8", action="store_true", help="FP8 linear layers in the transformer")
    p.add_argument("--kv_fp8", action="store_true", help="FP8 ring caches")
    p.add_argument("--offload", action="store_true", help="transformer blocks and rings streamed from host memory")
    p.add_argument("--compile", action="store_true", help="the compiled fast path (liveavatar.models.fastpath)")
    p.add_argument("--no_cuda_graphs", action="store_true", help="with --compile: steps launched from Python, not replayed as CUDA graphs")
    p.add_argument("--attention", choices=sorted(attention_candidates()), default=None,
                   help="with --compile: this self-attention kernel instead of the fastest one timed")
    p.add_argument("--memory_gb", type=float, default=None, help="cap the process at this many GiB of GPU memory")
    p.add_argument("--concurrent_decode", action="store_true", help="VAE on its own CUDA stream beside the next block's steps")
    p.add_argument("--decoder", nargs="+", choices=DECODERS, default=["wan"],
                   help="the decoder(s) to measure, each on its own streams: 'wan' (the VAE) and/or 'taew2_1' (the "
                        "light decoder, random weights at the release's size, float16 on a GPU)")
    p.add_argument("--no_mux", action="store_true", help="skip the MP4 writer (on machines without PyAV)")
    p.add_argument("--profile", action="store_true", help="after the measured blocks, profile one more and sum GPU kernel time by kind")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    result: dict = {"command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": datetime.date.today().isoformat(), "environment": environment(device)}
    if args.memory_gb is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(args.memory_gb * 2**30 / total, index)
    dtype = getattr(torch, args.dtype)
    scale = SCALES[args.scale]
    if args.compile:
        # A region that fails to compile runs eagerly instead (result["compile"] says so) rather than
        # ending the run.
        torch._dynamo.config.suppress_errors = True

    t0 = time.perf_counter()
    options = RuntimeOptions(fp8=args.fp8, compile=args.compile, cuda_graphs=not args.no_cuda_graphs,
                             attention=args.attention, offload_encoders=args.offload, offload_transformer=args.offload,
                             kv_dtype=torch.float8_e4m3fn if args.kv_fp8 else None,
                             concurrent_decode=args.concurrent_decode)
    pipe = build_pipeline(scale, device, dtype, vae_dtype=getattr(torch, args.vae_dtype or args.dtype), options=options,
                          decoder="taew2_1" if "taew2_1" in args.decoder else "wan")
    _sync(device)
    result["build_s"] = time.perf_counter() - t0
    result["transformer_parameters"] = num_parameters(pipe.dit)

    settings = StreamSettings(sample_steps=args.steps)
    # One block more than measured, so that the last measured block, too, has the next block's steps behind it.
    num_clips = math.ceil((args.blocks + 1 + 2 * args.profile) / settings.blocks_per_clip)
    wave = _speech(num_clips, settings)
    t_prepare = time.perf_counter()
    cond, result["prepare_ms"] = prepare(pipe, wave, args.size)
    prepare_s = time.perf_counter() - t_prepare
    t0 = time.perf_counter()  # what a service's next stream of the same image and prompt spends encoding them
    pipe.encode_reference(cond.reference)
    pipe.encode_prompt(PROMPT)
    result["prepare_ms"]["encodings_kept"] = _lap(t0, device)
    # The inputs are encoded. Without --offload the encoders were built on the GPU; they are dropped rather
    # than moved out (the 11 GB text encoder would not leave room for the bf16 rings, and the move to host
    # memory is what --offload measures).
    pipe.text_encoder.model = pipe.audio_encoder.model = None
    gc.collect()
    result["video"] = {"height": cond.height, "width": cond.width, "blocks": args.blocks,
                       "frames_per_block": settings.video_frames_per_block}

    result["decoders"] = {}
    for name in dict.fromkeys(args.decoder):  # each once, in the order given
        measured = measure(pipe, cond, replace(settings, decoder=name), num_clips, args, wave, prepare_s)
        measured["floor"] = floor(scale, cond, result["environment"], args.fp8, settings, name)
        result["decoders"][name] = measured
        for key, value in measured.items():  # the first decoder's figures are the run's
            result.setdefault(key, value)
    result["decoder"] = args.decoder[0]
    result["attention_backend_ms"] = pipe.attention_backend_ms
    if pipe.dit.block_streamer is not None:  # --offload: blocks kept on the GPU after the first clip
        result["resident_blocks"] = pipe.dit.block_streamer.resident_count
    if args.compile:
        from torch._dynamo.utils import counters

        result["compile"] = {"graphs": counters["stats"].get("unique_graphs", 0),
                             "graph_breaks": dict(counters["graph_break"]), "fallbacks": dict(counters["frames"])}
    emit(result, args.json)
    return result


def measure(pipe, cond, settings: StreamSettings, num_clips: int, args, wave: np.ndarray, prepare_s: float) -> dict:
    """A warm-up stream, then the measured one, with settings.decoder: the per-block records and their summary."""
    device = pipe.device
    result: dict = {}
    # A short stream first: compilation, kernel autotuning and first-use allocations stay out of the numbers.
    t0 = time.perf_counter()
    warm = pipe.stream(cond, settings)
    for _ in zip(range(WARMUP_STREAM_BLOCKS), warm.blocks(num_clips)):
        pass
    del warm
    gc.collect()
    result["warmup_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    blocks, stream_setup_s, ttff_s, result["profile"], pinned = run_stream(pipe, cond, settings, num_clips, args, wave)
    result["stream_call_ms"] = stream_setup_s * 1000
    result["ttff_s"] = ttff_s
    result["ttff_with_prepare_s"] = ttff_s + prepare_s
    result["blocks"] = blocks
    steady = [b for b in blocks if b["index"] >= args.steady_from] or blocks[1:] or blocks
    result["stages_ms"] = _mean_stages(steady)
    result["first_block_stages_ms"] = blocks[0]["stages_ms"]
    if len(steady) > 1:
        frames = sum(b["frames"] for b in steady[1:])
        result["steady_fps"] = frames / (steady[-1]["t_s"] - steady[0]["t_s"])
    result["steady_blocks"] = [b["index"] for b in steady]
    if device.type == "cuda":
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        stats = torch.cuda.memory_stats(device)
        # Each retry or device free is a device-wide synchronisation inside the loop.
        result["allocator"] = {k: stats.get(k) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")}
    if pipe.dit.block_streamer is not None:  # --offload
        result["host_pinned_gib"] = pinned / 2**30  # the streamed blocks and, with FP8 or bf16 rings, the rings
    return result


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), capability=list(torch.cuda.get_device_capability(device)))
    env["matmul_tflops"] = matmul_ceilings(device)
    return env


def matmul_ceilings(device: torch.device) -> dict[str, float]:
    """Measured dense matrix-product rates (TFLOP/s) on random data: bf16 and, where supported, row-scaled FP8."""
    from liveavatar.models.fp8 import quantize_rows, scaled_mm_supported

    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    rates = {"bf16": 2 * n**3 / _time(lambda: a @ b, device) / 1e12}
    if scaled_mm_supported(device):
        qa, sa = quantize_rows(a)
        qb, sb = quantize_rows(b)
        mm = lambda: torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)  # noqa: E731
        rates["fp8"] = 2 * n**3 / _time(mm, device) / 1e12
        # The FP8 GEMM must compute what the CPU tests check: the product of the dequantised operands.
        emulated = (qa.float() * sa) @ (qb.float() * sb).t()
        rates["fp8_vs_emulation_rel_err"] = float((mm().float() - emulated).norm() / emulated.norm())
    return rates


def _time(fn, device: torch.device, repeats: int = 10) -> float:
    """Median seconds per call after a warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _speech(num_clips: int, settings: StreamSettings) -> np.ndarray:
    """The example speech, repeated to cover the clips (plus a second, so the last clip has audio)."""
    wave = load_audio(SPEECH, SAMPLE_RATE)
    need = int((num_clips * settings.frames_per_clip / settings.fps + 1) * SAMPLE_RATE)
    return np.tile(wave, -(-need // len(wave)))[:need]


def prepare(pipe, wave: np.ndarray, size: str):
    """pipe.prepare, stage by stage: (Conditioning, {stage: ms})."""
    from liveavatar.engine.pipeline import Conditioning

    device = pipe.device
    ms = {}
    t0 = time.perf_counter()
    img = reference_image(size)
    height, width = image_io.output_size(img.height, img.width, image_io.parse_size(size))
    pixels = image_io.prepare_reference(img, height, width)
    ref, motion = pipe.encode_reference(pixels)
    ms["reference_encode"] = _lap(t0, device)
    t0 = time.perf_counter()
    context = pipe.encode_prompt(PROMPT)
    ms["text_encode"] = _lap(t0, device)
    t0 = time.perf_counter()
    audio_encoder = pipe._on_device(pipe.audio_encoder)
    audio = audio_source_for(audio_encoder, wave)
    pipe._off_device(audio_encoder)
    ms["audio_features"] = _lap(t0, device)
    ms["audio_seconds"] = len(wave) / SAMPLE_RATE
    cond = Conditioning(height, width, pixels, ref, motion, context, audio, audio.num_clips, wave)
    return cond, ms


def reference_image(size: str) -> Image.Image:
    """The example face scaled and cropped to exactly W x H of a "W*H" size, so the video has that size."""
    width, height = (int(v) for v in size.split("*"))
    img = Image.open(IMAGE).convert("RGB")
    scale = max(width / img.width, height / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def run_stream(pipe, cond, settings: StreamSettings, num_clips: int, args, wave: np.ndarray):
    """The measured stream: (per-block records, seconds until stream() returned, seconds to the first frames,
    profile, bytes of pinned host memory the low-memory mode holds). Nothing waits for the GPU between the two,
    as in a real stream."""
    t_call = time.perf_counter()
    stream = pipe.stream(cond, settings)
    setup_s = time.perf_counter() - t_call
    output = None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_mux:  # as run_job: encoded on its own thread, overlapping the next blocks
            speech = wave[3 * SAMPLE_RATE // settings.fps :]
            output = OutputThread(FragmentedMP4Writer(Path(tmp) / "bench.mp4", cond.width, cond.height, settings.fps,
                                                      speech, SAMPLE_RATE))
        records, ttff = [], None
        for block in stream.blocks(num_clips):
            t_ready = time.perf_counter()
            ttff = ttff if ttff is not None else t_ready - t_call
            if output is not None:
                output.write(block.frames.numpy())
            records.append({"index": block.index, "frames": len(block.frames), "t_s": t_ready - t_call,
                            "stages_ms": dict(block.timings_ms)})
            if len(records) == args.blocks:
                break
        if output is not None:
            output.drain()
            for record, ms in zip(records, output.mux_ms):
                record["stages_ms"]["mux"] = ms
        profile = profile_block(stream.blocks(num_clips), pipe.device) if args.profile else None
        graphs = stream.steps.graphs
        if graphs is not None:
            profile = {**(profile or {}), "cuda_graphs": len(graphs.graphs), "cuda_graph_error": graphs.error}
        if getattr(stream.decoder, "cuda_graphs", False):  # the light decoder's block graphs
            profile = {**(profile or {}), "decoder_cuda_graphs": len(stream.decoder.graphs),
                       "decoder_cuda_graph_error": stream.decoder.graph_error}
        if output is not None:
            output.stop()
            output.writer.close()
    return records, setup_s, ttff, profile, pinned_host_bytes(pipe, stream)


def pinned_host_bytes(pipe, stream) -> int:
    """Pinned host memory of the low-memory mode: the transformer blocks and the stream's ring caches."""
    blocks = pipe.dit.block_streamer.host_bytes if pipe.dit.block_streamer is not None else 0
    rings = stream.steps.host_rings.rings if stream.steps.host_rings is not None else []
    return blocks + sum(t.numel() * t.element_size() for r in rings for t in (r.keys, r.values, *(r.scales or ())))


# Kernel-name fragments of each kind of GPU work, tried in this order.
KERNEL_KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul", "addmm", "aten::mm")),
    ("convolution", ("conv", "fprop", "dgrad", "winograd")),
    ("compiled elementwise (triton)", ("triton",)),
    ("copies", ("memcpy", "memset", "copy", "cat")),
)


def profile_block(blocks, device: torch.device) -> dict:
    """GPU kernel time of one pipelined iteration (the decode of one block beside the steps of the next), summed
    by kind of kernel, with the largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        next(blocks)
        _sync(device)
    kernels = {}
    for event in prof.key_averages():
        ms = (event.device_time_total if device.type == "cuda" else event.self_cpu_time_total) / 1000
        if ms > 0 and (device.type != "cuda" or event.device_type.name == "CUDA"):
            kernels[event.key] = kernels.get(event.key, 0.0) + ms
    by_kind: dict[str, float] = {}
    for name, ms in kernels.items():
        kind = next((k for k, frags in KERNEL_KINDS if any(f in name.lower() for f in frags)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"ms_by_kind": by_kind, "top_kernels_ms": dict(top), "total_ms": sum(kernels.values())}


def _mean_stages(blocks: list[dict]) -> dict[str, float]:
    names = sorted({k for b in blocks for k in b["stages_ms"]})
    return {k: float(np.mean([b["stages_ms"][k] for b in blocks if k in b["stages_ms"]])) for k in names}


def floor(scale, cond, env: dict, fp8: bool, settings: StreamSettings, decoder: str = "wan") -> dict:
    """The arithmetic floor of a steady block: 4 steps (linear layers at the FP8 or bf16 rate, attention at
    the bf16 rate) plus one decode with that decoder (bf16 rate), at the measured matrix-product ceilings."""
    lat_h, lat_w = cond.ref_latent.shape[-2:]
    step = block_step_flops(scale.dit, lat_h, lat_w, settings.latent_frames_per_block, settings.latent_frames_per_clip)
    decode = decode_flops(decoder, scale.vae_dim, lat_h, lat_w, settings.latent_frames_per_block)
    rates = env["matmul_tflops"]
    linear_rate = rates["fp8"] if fp8 and "fp8" in rates else rates["bf16"]
    step_ms = (step["linear"] + step["convolution"]) / linear_rate / 1e9 + step["attention"] / rates["bf16"] / 1e9
    decode_ms = sum(decode.values()) / rates["bf16"] / 1e9
    block_ms = settings.sample_steps * step_ms + decode_ms
    return {
        "step_tflop": {k: v / 1e12 for k, v in step.items()},
        "decode_tflop": sum(decode.values()) / 1e12,
        "step_ms": step_ms,
        "decode_ms": decode_ms,
        "block_ms": block_ms,
        "fps": settings.video_frames_per_block / block_ms * 1000,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lap(t0: float, device: torch.device) -> float:
    _sync(device)
    return (time.perf_counter() - t0) * 1000


if __name__ == "__main__":
    main()
