"""The benchmark runner on the tiny model (CPU, seconds) and the FLOP counts behind its floor."""

import json

import pytest

from benchmarks import run
from benchmarks.flops import block_decode_flops, block_step_flops, tiny_block_decode_flops
from benchmarks.random_models import FULL, TINY


def test_runner_reports_every_stage_and_the_floor(tmp_path):
    out = tmp_path / "tiny.json"
    result = run.main(["--scale", "tiny", "--device", "cpu", "--size", "128*128", "--blocks", "3", "--steady_from", "1",
                       "--profile", "--json", str(out)])
    assert json.loads(out.read_text())["steady_blocks"] == [1, 2]
    assert result["video"] == {"height": 128, "width": 128, "blocks": 3, "frames_per_block": 12}
    assert [b["index"] for b in result["blocks"]] == [0, 1, 2]
    assert [b["frames"] for b in result["blocks"]] == [9, 12, 12]
    assert set(result["stages_ms"]) == {"audio", "step0", "step1", "step2", "step3", "decode", "mux"}
    assert set(result["prepare_ms"]) >= {"reference_encode", "text_encode", "audio_features"}
    assert result["ttff_s"] > 0 and result["steady_fps"] > 0
    floor = result["floor"]
    assert floor["step_ms"] > 0 and floor["decode_ms"] > 0 and floor["fps"] > 0
    assert result["profile"]["total_ms"] > 0


def test_runner_measures_the_light_decoder_beside_the_vae(tmp_path):
    """`--decoder taew2_1 wan`: one model, the light decoder's streams first (its figures are the run's), then
    the VAE's, each with its own stages, FPS and floor."""
    out = tmp_path / "light.json"
    result = run.main(["--scale", "tiny", "--device", "cpu", "--size", "128*128", "--blocks", "3", "--steady_from", "1",
                       "--decoder", "taew2_1", "wan", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["decoder"] == "taew2_1" and list(saved["decoders"]) == ["taew2_1", "wan"]
    light, vae = result["decoders"]["taew2_1"], result["decoders"]["wan"]
    for measured in (light, vae):
        assert [b["frames"] for b in measured["blocks"]] == [9, 12, 12]
        assert measured["steady_fps"] > 0 and measured["stages_ms"]["decode"] > 0
    assert result["steady_fps"] == light["steady_fps"] and result["floor"] == light["floor"]
    # The floor's decode is the light decoder's arithmetic at this size (16x16 latents), not the tiny VAE's.
    assert light["floor"]["decode_tflop"] == pytest.approx(sum(tiny_block_decode_flops(16, 16).values()) / 1e12)
    assert vae["floor"]["decode_tflop"] == pytest.approx(sum(block_decode_flops(TINY.vae_dim, 16, 16).values()) / 1e12)


def test_light_decoder_flops_are_a_25th_of_the_vaes_at_704x384():
    """About 1.1 TFLOP a block (3x3 convolutions at 256/128/64 channels) against the Wan VAE's 27.5."""
    light = tiny_block_decode_flops(48, 88)
    assert light["linear"] == light["attention"] == 0
    assert light["convolution"] / 1e12 == pytest.approx(1.105, abs=0.001)
    assert sum(block_decode_flops(FULL.vae_dim, 48, 88).values()) / 1e12 == pytest.approx(27.48, abs=0.01)


def test_block_step_flops_follow_the_shapes():
    """Counted on the meta device; the attention part has a closed form to check the counter against."""
    c = TINY.dit
    h, w = 16, 24
    flops = block_step_flops(c, h, w)
    q = 3 * (h // 2) * (w // 2)
    # reference, then the packed motion: newest latent at full resolution, 2 at half, 16 at quarter (4 frames)
    sink = 2 * (h // 2) * (w // 2) + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
    keys = 12 * (h // 2) * (w // 2) + sink
    attention = 4 * q * c.dim * (keys * c.num_layers + c.text_len * c.num_layers + (c.num_audio_token + 1) * len(c.audio_inject_layers))
    assert flops["attention"] == attention
    per_layer = 2 * q * (6 * c.dim**2 + 2 * c.dim * c.ffn_dim)  # q k v o, cross q o, ffn
    assert flops["linear"] > per_layer * c.num_layers
    assert block_decode_flops(TINY.vae_dim, h, w)["convolution"] > 0


@pytest.mark.parametrize("scale", [FULL])
def test_full_size_step_is_121_tflop_at_704x384(scale):
    flops = block_step_flops(scale.dit, 48, 88)
    assert flops["attention"] / 1e12 == pytest.approx(41.07, abs=0.01)
    assert flops["linear"] / 1e12 == pytest.approx(79.75, abs=0.01)


def test_parallel_benchmark_runs_on_cpu_ranks_with_either_cut(tmp_path):
    """What the device session runs on GPUs (benchmarks.bench_parallel), here on two CPU processes: both cuts of
    the layers, the rank reports and the check against one process."""
    from benchmarks import bench_parallel

    out = tmp_path / "parallel.json"
    bench_parallel.main(["--scale", "tiny", "--device", "cpu", "--gpus", "2", "--configs", "fp32", "--sizes", "64*64",
                         "--clips", "2", "--decode_costs", "0", "0.75", "--out", str(out)])
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["config"], r["decode_cost"]) for r in runs] == [("fp32", 0.0), ("fp32", 0.75)]
    assert [r["role"] for r in runs[0]["ranks"]] == ["steps 0-1", "steps 2-3 + decode"]
    assert [r["role"] for r in runs[1]["ranks"]] == ["steps 0-1 + step 2 layers 0-2", "step 2 layers 3-7 + step 3 + decode"]
    for r in runs:
        assert r["pipeline"]["frames"] == 2 * 48 - 3 and r["pipeline"]["fps"] > 0
        assert r["single"]["latents_max_abs_diff"] == 0.0  # one thread per rank: the same numbers as one process
        assert all(rank["blocks"] == 8 and rank["stage_ms"] > 0 for rank in r["ranks"])


def test_runner_takes_the_step_count_and_the_low_memory_mode_reports_pinned_memory(tmp_path):
    result = run.main(["--scale", "tiny", "--device", "cpu", "--size", "128*128", "--blocks", "2", "--steady_from", "1",
                       "--steps", "3", "--offload", "--kv_fp8", "--no_mux"])
    assert set(result["stages_ms"]) == {"audio", "step0", "step1", "step2", "decode"}
    assert result["floor"]["block_ms"] == pytest.approx(3 * result["floor"]["step_ms"] + result["floor"]["decode_ms"])
    # The transformer blocks and the FP8 rings stay in host memory.
    assert result["resident_blocks"] == 0 and result["host_pinned_gib"] > 0


def test_smoke_run_packs_what_the_device_needs_and_refuses_a_machine_without_gpu(tmp_path, capsys):
    from benchmarks import smoke
    from conftest import GOLDEN

    if not (GOLDEN / "README.md").exists():
        pytest.skip("golden data folder not found")
    folder = tmp_path / "smoke"
    smoke.main(["pack", "--golden", str(GOLDEN), "--to", str(folder)])
    assert (folder / "ckpt" / "Wan2.2-S2V-14B" / "config.json").exists()
    assert {p.name for p in (folder / "case").iterdir()} == {"image.png", "audio.wav", "prompt.txt",
                                                             "latents_final.safetensors"}
    from safetensors.torch import load_file

    assert list(load_file(str(folder / "case" / "latents_final.safetensors"))["latents_final"].shape) == [3, 16, 12, 32, 48]
    assert {p.name for p in (folder / "multi").iterdir()} == {"image.png", "audio.wav", "audio2.wav", "prompt.txt",
                                                              "mask_actor1.png", "mask_actor2.png",
                                                              "latents_final.safetensors"}
    assert smoke.main(["run", "--data", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    # The bounds stop a broken kernel but not the precision's own error (CPU accuracy figures: 1.2 % / 2.7 %).
    assert set(smoke.RMS_BOUNDS) == set(smoke.COMMAND_CHECKS) - {"fp32", "resume", "light", "light_parity"}


def test_live_benchmark_calibrates_and_runs_a_session_on_cpu(tmp_path):
    """What the device session runs on a GPU (benchmarks.bench_live --realtime), here on the tiny model: the
    calibration of two candidates, the session at the preset with speech pushed in real time, the latency parts."""
    from benchmarks import bench_live

    out = tmp_path / "live.json"
    result = bench_live.main(["--scale", "tiny", "--device", "cpu", "--realtime", "--sizes", "128*128,64*64",
                              "--steps_options", "4", "--calibration_blocks", "5", "--seconds", "2", "--steady_from", "1",
                              "--speed_table", str(tmp_path / "speed.json"), "--json", str(out)])
    assert json.loads(out.read_text())["session"]["blocks_total"] == result["session"]["blocks_total"]
    assert [c["size"] for c in result["calibration"]][0] == "128*128" and result["calibration_s"] > 0
    assert result["realtime"]["size"] in ("128*128", "64*64") and result["speeds"]
    session = result["session"]
    assert (session["size"], session["sample_steps"]) == (result["realtime"]["size"], 4)
    for part in ("window", "generation", "mux", "push_to_ready", "push_to_out"):
        assert session["latency_ms"][part]["n"] > 0 and session["latency_ms"][part]["median"] >= 0, part
    assert session["lag_s"]["max"] >= 0 and session["gpu_work_ms_per_block"]["n"] > 0
    assert sum(b["speech_samples"] + b["dropped_samples"] for b in result["blocks"]) == 2 * 16000
    assert json.loads((tmp_path / "speed.json").read_text())["machines"]
