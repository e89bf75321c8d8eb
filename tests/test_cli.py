"""`liveavatar generate` end to end on the tiny golden checkpoints: parity, files, options, kill + resume, memory."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CKPT, GOLDEN, REPO, assert_close, golden_case, requires_golden
from liveavatar.interfaces.cli import main
from liveavatar.media.audio import load_audio
from liveavatar.media.video import read_video

pytestmark = requires_golden

CASE_T = GOLDEN / "cases" / "T"
CASE_T1 = GOLDEN / "cases" / "T1"
CPU = ["--ckpt_dir", str(CKPT), "--device", "cpu", "--dtype", "float32"]


def test_generate_case_T_matches_original(tmp_path, capsys):
    out = tmp_path / "t.mp4"
    lat = tmp_path / "t.safetensors"
    code = main([
        "generate", "--image", str(CASE_T / "image.png"), "--audio", str(CASE_T / "audio.wav"),
        "--prompt", (CASE_T / "prompt.txt").read_text(), "--size", "384*256", "--base_seed", "11",
        "--num_clip", "3", "--save_file", str(out), "--save-latents", str(lat), "--original_timing", *CPU,
    ])
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    g = golden_case("T")
    latents = load_file(str(lat))["latents"]
    assert latents.dtype == torch.float32 and list(latents.shape) == [16, 36, 32, 48]
    assert_close("latents_final", latents.view(16, 3, 12, 32, 48).transpose(0, 1), g["latents_final"])

    frames, fps, audio, rate = read_video(out)
    assert frames.shape == (141, 256, 384, 3) and fps == 25
    assert rate == 16000 and audio is not None
    # The original's timing: the speech is muxed from input time 3/25 s (the first 3 generated frames are
    # dropped), and ends with the video or the audio, whichever is shorter.
    assert abs(len(audio) / rate - min(141 / 25, 5.0 - 3 / 25)) < 0.1
    assert not Path(str(out) + ".partial").exists() and not Path(str(out) + ".resume").exists()
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["frames"] == 141 and summary["clips"] == 3 and (summary["height"], summary["width"]) == (256, 384)
    assert {"step0", "step3", "decode", "mux", "sink_prefill"} <= set(summary["stage_ms"])
    log = out.with_suffix(".log").read_text()
    assert "device cpu" in log and "wrote" in log and "peak memory: host" in log and "mean per block (ms)" in log
    assert summary["peak_host_memory_gb"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sample_guide_scale", "4.5"], "--sample_guide_scale 4.5: refused, the distilled model uses no classifier-free guidance"),
        (["--sample_solver", "unipc"], "--sample_solver unipc: refused"),
        (["--sample_shift", "5"], "--sample_shift 5: refused"),
        (["--size", "big"], "invalid size 'big'"),
        (["--infer_frames", "50"], "--infer_frames 50: must be a positive multiple of 12"),
        (["--num_clip", "0"], "--num_clip must be at least 1"),
        (["--fp8"], "--fp8"),
        (["--device", "cuda"], "no CUDA GPU is available"),
    ],
)
def test_option_errors_are_one_line(tmp_path, capsys, extra, message):
    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    device = [] if "--device" in extra else ["--device", "cpu", "--dtype", "float32"]
    args = ["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
            "--save_file", str(tmp_path / "o.mp4"), "--ckpt_dir", str(CKPT), *device, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "o.mp4").exists()


def test_missing_inputs_fail_before_loading(tmp_path, capsys):
    assert main(["generate", "--image", str(tmp_path / "nope.png"), "--audio", str(CASE_T1 / "audio.wav"),
                 "--save_file", str(tmp_path / "o.mp4"), *CPU]) == 2
    assert "nope.png: reference image not found" in capsys.readouterr().err
    assert main(["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
                 "--save_file", str(tmp_path / "o.mp4"), "--ckpt_dir", str(tmp_path / "ck"), "--device", "cpu"]) == 2
    assert "ck: missing folder" in capsys.readouterr().err


def test_notice_flags_are_accepted(tmp_path, capsys):
    code = main(["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
                 "--prompt", "hi", "--size", "384*256", "--save_file", str(tmp_path / "o.mp4"), *CPU,
                 "--enable_online_decode", "--sample_guide_scale", "0", "--sample-solver", "euler", "--load_lora"])
    assert code == 0
    assert "--enable_online_decode: accepted; decoding is always online" in capsys.readouterr().err
    frames, *_ = read_video(tmp_path / "o.mp4")
    assert frames.shape == (30, 192, 256, 3)  # the 1.2 s of speech, from its first sample to its last


def _generate_cmd(out: Path, latents: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "liveavatar.interfaces.cli", "generate", "--image", str(CASE_T1 / "image.png"),
           "--audio", str(CASE_T / "audio.wav"), "--prompt", "talking", "--size", "384*256", "--base_seed", "3",
           "--save_file", str(out), "--save-latents", str(latents), *CPU]
    return cmd + (["--resume"] if resume else [])


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted run of the resume tests' command: (mp4, latents)."""
    folder = tmp_path_factory.mktemp("reference")
    out, lat = folder / "ref.mp4", folder / "ref.safetensors"
    subprocess.run(_generate_cmd(out, lat), check=True, env=_env(), capture_output=True)
    return out, lat


def _assert_same_as(out: Path, lat: Path, reference) -> None:
    ref_out, ref_lat = reference
    assert torch.equal(load_file(str(lat))["latents"], load_file(str(ref_lat))["latents"])
    got, _, got_audio, _ = read_video(out)
    want, _, want_audio, _ = read_video(ref_out)
    assert got.shape == want.shape == (125, 192, 256, 3)  # 5 s of speech
    assert np.array_equal(got, want)
    assert np.array_equal(got_audio, want_audio)
    assert not Path(str(out) + ".partial").exists() and not Path(str(out) + ".resume").exists()


def _start_and_wait_for_state(out: Path, lat: Path, block: int) -> subprocess.Popen:
    proc = subprocess.Popen(_generate_cmd(out, lat), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = Path(str(out) + ".resume") / f"state-{block:09d}.pt"
    deadline = time.monotonic() + 600
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    return proc


def test_sigkill_leaves_playable_partial_and_resume_is_identical(tmp_path, uninterrupted):

    out, lat = tmp_path / "run.mp4", tmp_path / "run.safetensors"
    proc = _start_and_wait_for_state(out, lat, block=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    partial = Path(str(out) + ".partial")
    assert partial.exists() and not out.exists()
    frames, fps, _, _ = read_video(partial)
    assert len(frames) >= 45 and fps == 25  # at least clip 0 plays

    done = subprocess.run(_generate_cmd(out, lat, resume=True), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming at block" in done.stderr
    _assert_same_as(out, lat, uninterrupted)


def test_sigterm_finishes_the_block_keeps_a_playable_file_and_resumes(tmp_path, uninterrupted):
    out, lat = tmp_path / "run.mp4", tmp_path / "run.safetensors"
    proc = _start_and_wait_for_state(out, lat, block=4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130
    assert "error: stopped after" in err and "rerun the same command with --resume" in err
    frames_made = int(err.split("stopped after ")[1].split(" of ")[0])
    frames, fps, audio, _ = read_video(Path(str(out) + ".partial"))
    assert len(frames) == frames_made >= 45  # everything generated is in the file, nothing half-written
    assert audio is not None

    done = subprocess.run(_generate_cmd(out, lat, resume=True), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"frame {frames_made})" in done.stderr
    _assert_same_as(out, lat, uninterrupted)


def test_interrupted_output_without_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "o.mp4"
    Path(str(out) + ".partial").write_bytes(b"x")
    assert main(["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
                 "--save_file", str(out), *CPU]) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


MEMORY_SCRIPT = """
import sys, numpy as np, torch
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.stream import StreamSettings
from liveavatar.media.audio import load_audio
from liveavatar.media.video import FragmentedMP4Writer
def rss_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
pipe = LiveAvatarPipeline.from_pretrained(sys.argv[1], device='cpu', dtype=torch.float32)
wave = np.tile(load_audio(sys.argv[2]), 11)  # ~86 s of speech: 45 clips
cond = pipe.prepare(sys.argv[3], wave, 'talking', size='128*128')
stream = pipe.stream(cond, StreamSettings(seed=1))
with FragmentedMP4Writer(sys.argv[4], cond.width, cond.height, 25, wave) as writer:
    for block in stream.blocks(42):
        writer.write(block.frames.numpy())
        if block.index % 4 == 3:
            print(block.clip, rss_mb(), flush=True)
"""


def test_memory_is_flat_after_the_first_clips(tmp_path):
    """42 clips (2016 frames, ~97 MB of raw pixels at 128x128): resident memory must not grow with them."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(CKPT), str(REPO / "examples" / "speech.wav"),
         str(CASE_T1 / "image.png"), str(tmp_path / "long.mp4")],
        env=_env(), capture_output=True, text=True, check=True,
    )
    rss = [float(line.split()[1]) for line in proc.stdout.splitlines()]
    assert len(rss) == 42
    growth = max(rss[2:]) - rss[2]
    print(f"RSS after clip 2: {rss[2]:.1f} MB, max after: {max(rss[2:]):.1f} MB, growth {growth:.1f} MB")
    assert growth < 20, rss
    frames, *_ = read_video(tmp_path / "long.mp4")
    assert len(frames) == 42 * 48 - 3


def test_sink_frame_option_reaches_the_job(monkeypatch, tmp_path):
    from liveavatar.interfaces import cli

    seen = {}

    def fake_run_job(pipe, spec, should_stop=None, **options):
        seen["rolling_sink"] = spec.rolling_sink
        return iter(())

    monkeypatch.setattr("liveavatar.engine.job.run_job", fake_run_job)
    args = ["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
            "--save_file", str(tmp_path / "o.mp4"), *CPU]
    cli.main(args + ["--sink_frame", "reference"])
    assert seen == {"rolling_sink": False}
    cli.main(args)
    assert seen == {"rolling_sink": True}


# -- first steps: what a new user meets ------------------------------------------------------------------


def _t1(tmp_path, *extra) -> list[str]:
    return ["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
            "--size", "128*128", "--save_file", str(tmp_path / "out.mp4"), *extra]


def test_no_gpu_is_said_before_any_download(tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from liveavatar.weights import hub

    def no_network():
        raise AssertionError("the hub was asked for the weights")

    monkeypatch.setattr(hub, "_hub", no_network)
    for argv in (_t1(tmp_path), ["serve"], ["app"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: no CUDA GPU found"), err
        assert "nothing was downloaded or loaded" in err[0] and "pass --device cpu" in err[0]
    assert not (tmp_path / "out.log").exists()


@pytest.mark.parametrize("command, module", [("app", "gradio"), ("serve", "uvicorn"), ("serve", "fastapi")])
def test_app_and_serve_without_the_app_extra_name_it(capsys, monkeypatch, command, module):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package gives: an ImportError
    for name in ("liveavatar.interfaces.app", "liveavatar.interfaces.server"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert main([command, "--ckpt_dir", str(CKPT), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: `liveavatar {command}` needs the optional 'app' extra ({module} not installed): run bash "
                   f"scripts/setup.sh app, or pip install -e '.[app]' in the checkout"]


def test_an_old_resume_state_names_both_leftovers_and_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    partial, states = Path(str(out) + ".partial"), Path(str(out) + ".resume")
    partial.write_bytes(b"\0\0\0\x08free")  # what an interrupted run of an earlier version left
    states.mkdir()
    torch.save({"stream": {"next_block": 4, "frames_emitted": 0}, "fingerprint": "old"}, states / "state-000000004.pt")

    assert main(_t1(tmp_path, *CPU)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {partial} exists from an interrupted run: pass --resume to continue it, or --overwrite to start over")
    assert main(_t1(tmp_path, *CPU, "--resume")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: {states / 'state-000000004.pt'}: saved by an earlier liveavatar")
    assert last.endswith(f"delete {states} and {partial}, or rerun with --overwrite, to start over")
    assert main(_t1(tmp_path, *CPU, "--resume", "--overwrite")) == 2
    assert "--resume and --overwrite: choose one" in capsys.readouterr().err

    prompt = "It's a \"test\" $HOME  two  spaces"
    argv = _t1(tmp_path, *CPU, "--overwrite", "--prompt", prompt)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert out.exists() and not partial.exists() and not states.exists()
    frames, *_ = read_video(out)
    assert len(frames) == 30  # 1.2 s of speech

    # The run log's command line pastes back into a shell: it splits into exactly the arguments given.
    run_line = [line for line in out.with_suffix(".log").read_text().splitlines() if " run: " in line][-1]
    assert shlex.split(run_line.split(" run: ", 1)[1]) == ["liveavatar", *argv]
    # The progress bar's rate is a real one from its first display on (was 67168 frame/s after the first block).
    rates = [float(r) for r in re.findall(r"([\d.]+)frame/s", err)]
    assert rates and all(r < 1000 for r in rates), rates
    # The summary names the generation speed for what it is; the video's frame rate is spec.fps.
    summary = json.loads(out.with_suffix(".json").read_text())
    assert "fps" not in summary and summary["generation_fps"] > 0 and summary["spec"]["fps"] == 25
    assert summary["frames"] == 30 and summary["audio"]["video_s"] == 1.2 and summary["audio"]["speech_s"] == 1.2


# --------------------------------------------------------------------------------------------------
# --decoder taew2_1: the light decoder

TAEW = GOLDEN / "taew2_1" / "taew2_1.pth"


def test_light_decoder_gives_the_same_frames_count_and_duration(tmp_path, capsys):
    """The same clip with either decoder: a playable MP4 with the same number of frames, the same duration and
    the same speech (the audio stays in sync); the light decoder's frames differ from the VAE's."""
    made = {}
    for decoder in ("wan", "taew2_1"):
        out = tmp_path / f"{decoder}.mp4"
        extra = ["--decoder", "taew2_1", "--decoder_path", str(TAEW)] if decoder == "taew2_1" else []
        code = main(["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
                     "--prompt", "talking", "--size", "128*128", "--base_seed", "3", "--save_file", str(out), *CPU,
                     *extra])
        assert code == 0, capsys.readouterr().err
        made[decoder] = read_video(out)
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["decoder"] == decoder and summary["frames"] == 30
    (light, fps, light_audio, rate), (full, _, full_audio, _) = made["taew2_1"], made["wan"]
    assert light.shape == full.shape == (30, 128, 128, 3) and fps == 25  # the 1.2 s of speech
    assert light_audio is not None and len(light_audio) == len(full_audio)
    # The whole speech is muxed, from its first sample; the video ends with it.
    speech_s = len(load_audio(CASE_T1 / "audio.wav")) / 16000
    assert abs(len(light_audio) / rate - speech_s) < 0.1
    assert np.array_equal(light_audio, full_audio)
    assert not np.array_equal(light, full)
    log = (tmp_path / "taew2_1.log").read_text()
    assert f"decoder taew2_1: {TAEW}" in log and "decoder taew2_1" in log.split("output 128x128")[1].splitlines()[0]


def _refused(tmp_path, capsys, *extra) -> str:
    args = ["generate", "--image", str(CASE_T1 / "image.png"), "--audio", str(CASE_T1 / "audio.wav"),
            "--save_file", str(tmp_path / "o.mp4"), *CPU, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not (tmp_path / "o.mp4").exists()
    return err[-1]


def test_light_decoder_option_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    err = _refused(tmp_path, capsys, "--decoder", "taew2_1")  # the golden tree has no taehv/ folder
    assert f"--decoder taew2_1: no TAEW2.1 weights found (looked in {CKPT / 'taehv'}/ and the Hugging Face cache)" in err
    assert "pass --decoder_path" in err and "liveavatar download --decoder taew2_1" in err
    err = _refused(tmp_path, capsys, "--decoder", "taew2_1", "--decoder_path", str(tmp_path / "nope.pth"))
    assert "nope.pth: missing; expected the TAEW2.1 weights file" in err
    assert "only used with --decoder taew2_1" in _refused(tmp_path, capsys, "--decoder_path", str(TAEW))
    err = _refused(tmp_path, capsys, "--decoder", "taew2_1", "--decoder_path", str(CASE_T1 / "image.png"))
    assert "image.png: this is a PNG image, not the TAEW2.1 decoder" in err
    (tmp_path / "cut.pth").write_bytes(TAEW.read_bytes()[:4096])  # an interrupted download
    err = _refused(tmp_path, capsys, "--decoder", "taew2_1", "--decoder_path", str(tmp_path / "cut.pth"))
    assert "cut.pth: cannot read the TAEW2.1 decoder" in err
    err = _refused(tmp_path, capsys, "--decoder", "taew2_1", "--decoder_path", str(CKPT / "Wan2.2-S2V-14B" / "Wan2.1_VAE.pth"))
    assert "Wan2.1_VAE.pth: not a TAEW2.1 checkpoint" in err
