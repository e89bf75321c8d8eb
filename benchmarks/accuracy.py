"""Error of the reduced-precision modes against float32 on the golden tiny checkpoints (CPU, a few minutes).

    python -m benchmarks.accuracy [--golden ../shared/golden] [--json out.json]

Modes of the transformer: bf16; bf16 with FP8 linear layers (the arithmetic of torch._scaled_mm with row-wise
scales, see liveavatar.models.fp8); either with FP8 ring caches. Measured against the original's float32
numbers stored in the golden data, and against the bf16 mode:
* velocity: the first block's velocity at all 4 steps of cases A, B and T (sink prefill + one step each);
* latents: the 12 blocks (3 clips, with the sink replacement and a wrapped ring) of case T streamed through
  the real engine (LiveAvatarPipeline, AvatarStream) with the float32 text, audio and VAE models;
* VAE: case T's golden latents decoded by the float32 and the bf16 VAE.
Errors: "max" is max|a-b| / max|b| (the tests' measure), "rms" is ||a-b|| / ||b||.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.report import emit
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.stream import StreamSettings
from liveavatar.media.audio import load_audio
from liveavatar.models.dit import S2VTransformer
from liveavatar.models.fp8 import E4M3, quantize_transformer
from liveavatar.models.kv_cache import RingCache
from liveavatar.models.vae import WanVAE

DEFAULT_GOLDEN = Path(os.environ.get("LIVEAVATAR_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))
# (name, FP8 linear layers, ring cache dtype or None for the model's)
MODES = (("bf16", False, None), ("fp8", True, None), ("bf16+kv_fp8", False, E4M3), ("fp8+kv_fp8", True, E4M3))


def errors(mine: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    mine, ref = mine.double(), ref.double()
    return {"max": float((mine - ref).abs().max() / ref.abs().max()), "rms": float((mine - ref).norm() / ref.norm())}


def transformer(wan: Path, lora: Path, fp8: bool) -> S2VTransformer:
    model = S2VTransformer.from_pretrained(wan, lora_file=lora, dtype=torch.bfloat16)
    if fp8:
        quantize_transformer(model, run_device=torch.device("cpu"))
    return model


def first_block_velocities(model: S2VTransformer, case: dict, kv_dtype) -> torch.Tensor:
    c = model.config
    text_kv = model.text_kv(case["text_context"][None])
    motion = case["motion_latents_init"][:, :, -19:] if "motion_latents_init" in case else case.get(
        "motion_latents_init_last19", case.get("motion_latents"))
    sink = model.prefill_sink(case["ref_latents"], motion, text_kv)
    h, w = case["dit_b0_x"].shape[-2:]
    out = []
    for s in range(4):
        ring = RingCache.allocate(c.num_layers, 1, 12 * (h // 2) * (w // 2), c.num_heads, c.head_dim, "cpu",
                         kv_dtype or model.dtype, model.dtype)
        out.append(model.forward_block(case["dit_b0_x"][s][None], case["dit_b0_t"][s], case["dit_b0_audio_input"],
                                       text_kv, sink, ring, start_frame=0, ref_roll=int(case["rd_table"][0, s]))[0])
    return torch.stack(out)


def stream_latents(pipe: LiveAvatarPipeline, golden: Path, name: str) -> torch.Tensor:
    params = json.loads((golden / "cases" / name / "params.json").read_text())
    case_dir = golden / "cases" / name
    cond = pipe.prepare(case_dir / "image.png", load_audio(case_dir / "audio.wav"), (case_dir / "prompt.txt").read_text(),
                        size=params["size"])
    stream = pipe.stream(cond, StreamSettings(seed=params["seed"]))
    blocks = list(stream.blocks(min(params["num_clip_requested"], cond.num_clips)))
    latents = torch.cat([b.latents for b in blocks], dim=1)
    return latents.view(16, -1, 12, *latents.shape[2:]).transpose(0, 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    p.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    ckpt = args.golden / "ckpt"
    wan, lora = ckpt / "Wan2.2-S2V-14B", ckpt / "LiveAvatar" / "liveavatar.safetensors"
    cases = {n: load_file(str(args.golden / "cases" / n / "outputs.safetensors")) for n in ("A", "B", "T")}
    pipe = LiveAvatarPipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32)
    result: dict = {"velocity": {}, "latents_T": {}}

    reference_latents = cases["T"]["latents_final"]
    bf16 = {}
    for mode, fp8, kv_dtype in MODES:
        model = transformer(wan, lora, fp8)
        result["velocity"][mode] = {}
        for name, case in cases.items():
            v = first_block_velocities(model, case, kv_dtype)
            entry = {"vs_fp32": errors(v, case["dit_b0_v"])}
            if mode == "bf16":
                bf16[name] = v
            else:
                entry["vs_bf16"] = errors(v, bf16[name])
            result["velocity"][mode][name] = entry
        pipe.dit, pipe.options = model, replace(pipe.options, kv_dtype=kv_dtype)
        latents = stream_latents(pipe, args.golden, "T")
        entry = {"vs_fp32": errors(latents, reference_latents)}
        if mode == "bf16":
            bf16["latents"] = latents
        else:
            entry["vs_bf16"] = errors(latents, bf16["latents"])
        result["latents_T"][mode] = entry
        print(mode, json.dumps({"velocity": result["velocity"][mode], "latents_T": entry}), flush=True)

    vae32 = WanVAE.from_checkpoint(ckpt / "Wan2.2-S2V-14B" / "Wan2.1_VAE.pth")
    vae16 = WanVAE.from_checkpoint(ckpt / "Wan2.2-S2V-14B" / "Wan2.1_VAE.pth", dtype=torch.bfloat16)
    clip = reference_latents[0][None]
    result["vae_decode_T_clip0"] = {"bf16_vs_fp32": errors(vae16.decode(clip), vae32.decode(clip))}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
