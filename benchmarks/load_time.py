"""Load time and peak host memory of the full-size transformer, from a synthetic checkpoint in the real layout.

    python -m benchmarks.load_time --folder /tmp/ckpt [--device cuda] [--json out.json]

Writes <folder>/Wan2.2-S2V-14B/{config.json, diffusion_pytorch_model-0000k-of-0000n.safetensors, .index.json}
(random bf16 weights, shards of at most 10 GB as released) and <folder>/LiveAvatar/liveavatar.safetensors
(rank-128 LoRA for every targeted layer), then loads them with `S2VTransformer.from_pretrained` in a fresh
process (after asking the kernel to drop its page cache, so the shards are read from disk when it agrees)
and reports the wall time and the peak host memory of that process: anonymous memory (what the loader
allocates) and resident memory (which also counts the memory-mapped shard pages being read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.random_models import SCALES
from benchmarks.report import emit
from liveavatar.models.dit import S2VTransformer
from liveavatar.weights.lora import target_modules

SHARD_BYTES = 10 * 10**9
LORA_RANK = 128

_MEASURE = r"""
import json, sys, threading, time, torch
from liveavatar.models.dit import S2VTransformer

peak = {"anon_kib": 0, "rss_kib": 0}
def sample():
    while True:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak["anon_kib"] = max(peak["anon_kib"], int(fields["RssAnon"].split()[0]))
        peak["rss_kib"] = max(peak["rss_kib"], int(fields["VmRSS"].split()[0]))
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
wan, lora, device = sys.argv[1:4]
t0 = time.perf_counter()
model = S2VTransformer.from_pretrained(wan, lora_file=lora, device=device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
time.sleep(0.1)
print(json.dumps({"load_s": seconds, "peak_anon_gib": peak["anon_kib"] / 2**20, "peak_rss_gib": peak["rss_kib"] / 2**20,
                  "device_gib": torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None}))
"""


def write_checkpoint(folder: Path, device: torch.device, config) -> dict:
    wan, lora_dir = folder / "Wan2.2-S2V-14B", folder / "LiveAvatar"
    wan.mkdir(parents=True, exist_ok=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    (wan / "config.json").write_text(json.dumps({"model_type": "s2v", **fields}, indent=1))
    with torch.device("meta"):
        model = S2VTransformer(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    gen = torch.Generator(device).manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        filename = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu() for n in names}
        save_file(tensors, str(wan / filename), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({n: filename for n in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (wan / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    lora = {}
    for name, layer in target_modules(model).items():
        out_features, in_features = layer.weight.shape
        lora[f"{name}.lora_A.default.weight"] = torch.randn(LORA_RANK, in_features, generator=gen, device=device).to(torch.bfloat16).cpu()
        lora[f"{name}.lora_B.default.weight"] = torch.zeros(out_features, LORA_RANK, dtype=torch.bfloat16)
    save_file(lora, str(lora_dir / "liveavatar.safetensors"))
    return {"shards": len(shards), "checkpoint_gb": total / 1e9, "lora_modules": len(lora) // 2}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/liveavatar_synthetic_ckpt"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    result = write_checkpoint(args.folder, torch.device(args.device), SCALES[args.scale].dit)
    try:  # cold cache where the kernel lets us (root on the benchmark machine)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        result["page_cache_dropped"] = True
    except OSError:
        result["page_cache_dropped"] = False
    wan, lora = args.folder / "Wan2.2-S2V-14B", args.folder / "LiveAvatar" / "liveavatar.safetensors"
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(wan), str(lora), args.device],
                         capture_output=True, text=True, check=True)
    result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
