"""Two stages of a block measured alone: the decode of one steady block (3 latents) by the VAE, eager and with the
fast path's compiled elementwise work, and by the light TAEW2.1 decoder (random weights at the release's size;
float16 channels-last on a GPU, eager and replayed as a CUDA graph), and the MP4 muxing of its 12 frames on the
host with nothing else running.

    python -m benchmarks.bench_stages --size 704*384 --json stages.json
    python -m benchmarks.bench_stages --scale tiny --device cpu --size 128*128 --repeats 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.random_models import SCALES, build_tiny_decoder, build_vae
from benchmarks.report import write_json
from liveavatar.models import fastpath
from liveavatar.media import image as image_io
from liveavatar.models.taehv import tiny_decoder_dtype


def time_decode(decoder, latents: torch.Tensor, repeats: int) -> dict:
    """Median ms of a streaming decoder's steady block: the stream's first latent and two warm-up blocks first
    (the second lets the light decoder capture its CUDA graph)."""
    decoder.decode(latents[:, :, :1])
    decoder.decode(latents[:, :, 1:])
    decoder.decode(latents[:, :, 1:])
    cuda = latents.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoder.decode(latents[:, :, 1:])
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    result = {"ms": float(np.median(times)), "ms_all": times}
    if cuda:
        result["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return result


def time_mux(width: int, height: int, repeats: int) -> dict:
    from liveavatar.media.video import FragmentedMP4Writer

    rng = np.random.default_rng(0)
    # A smooth moving picture with a noisy patch: x264 spends about what it spends on a face.
    ramp = np.linspace(0, 255, height * width * 3).reshape(height, width, 3)
    frames = np.stack([(ramp + 5 * i) % 255 for i in range(12)]).astype(np.uint8)
    frames[:, : height // 4, : width // 4] = rng.integers(0, 255, (12, height // 4, width // 4, 3))
    speech = rng.standard_normal(16000 * (repeats + 2)).astype(np.float32) * 0.1
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = FragmentedMP4Writer(Path(tmp) / "mux.mp4", width, height, 25, speech, 16000)
        for _ in range(repeats):
            t0 = time.perf_counter()
            writer.write(frames)
            times.append((time.perf_counter() - t0) * 1000)
        writer.close()
    return {"ms": float(np.median(times)), "ms_all": times}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="704*384")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    width, height = (int(v) for v in args.size.split("*"))
    height, width = image_io.output_size(height, width, image_io.parse_size(args.size))
    torch.backends.cudnn.benchmark = True
    vae = build_vae(SCALES[args.scale].vae_dim, device, dtype)
    latents = torch.randn(1, 16, 4, height // 8, width // 8, device=device)
    report = {"size": f"{width}x{height}", "device": str(device)}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    tiny = build_tiny_decoder(device, tiny_decoder_dtype(device, dtype))
    with torch.no_grad():
        report["decode"] = time_decode(vae.streaming_decoder(), latents, args.repeats)
        report["decode_taew2_1"] = time_decode(tiny.streaming_decoder(), latents, args.repeats)
        if device.type == "cuda":  # the light decoder as the engine runs it on a GPU: one graph launch a block
            graphed = tiny.streaming_decoder(cuda_graphs=True)
            report["decode_taew2_1_graphs"] = time_decode(graphed, latents, args.repeats)
            report["decode_taew2_1_graphs"]["graph_error"] = graphed.graph_error
        fastpath.compile_decoder(vae)  # the fast path's decoder: its elementwise work compiled
        report["decode_compiled"] = time_decode(vae.streaming_decoder(), latents, args.repeats)
    try:
        report["mux"] = time_mux(width, height, args.repeats)
    except ImportError as e:
        report["mux"] = {"error": str(e)}
    if args.json:
        write_json(args.json, report)
    d = report["decode"]
    print(f"decode of a block: {d['ms']:.1f} ms" + (f", +{d['peak_extra_gib']:.2f} GiB" if "peak_extra_gib" in d else ""))
    print(f"decode of a block, compiled elementwise work: {report['decode_compiled']['ms']:.1f} ms")
    print(f"decode of a block by the light TAEW2.1 decoder: {report['decode_taew2_1']['ms']:.1f} ms" +
          (f", as a CUDA graph {report['decode_taew2_1_graphs']['ms']:.1f} ms" if "decode_taew2_1_graphs" in report else ""))
    print(f"mux of 12 frames alone: {report['mux'].get('ms', float('nan')):.1f} ms")
    return report


if __name__ == "__main__":
    main()
