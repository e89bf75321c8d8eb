"""A real full disk (a small tmpfs in a private mount namespace) under `liveavatar generate`: refused up front when
the video cannot fit, reported in one line when it fills up during the run, the written part kept playable, and a
resume after freeing space identical to an uninterrupted run. Plus a full disk while a resume state is saved.

The outcomes are listed in docs/reliability.md."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import CKPT, REPO, requires_golden
from liveavatar.engine.job import JobSpec, Progress, run_job
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.errors import DiskFull
from liveavatar.media.video import read_video

pytestmark = requires_golden

SR = 16000
FRAMES = 2 * 48 - 3  # two clips


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(folder / "face.png")
    with wave.open(str(folder / "speech.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes((6000 * np.sin(2 * np.pi * 330 * np.arange(3 * SR) / SR)).astype("<i2").tobytes())
    return folder / "face.png", folder / "speech.wav"


def _generate(inputs, output: Path, *extra) -> list[str]:
    image, audio = inputs
    return [sys.executable, "-m", "liveavatar.interfaces.cli", "generate", "--image", str(image), "--audio", str(audio),
            "--size", "128*128", "--num_clip", "2", "--base_seed", "8", "--save_file", str(output),
            "--save_latents", str(output.with_suffix(".safetensors")), "--ckpt_dir", str(CKPT), "--device", "cpu", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# Runs inside `unshare --mount`: two tmpfs mounts that vanish with the namespace. Reports as JSON; copies files out.
DRIVER = textwrap.dedent("""
    import json, os, shutil, subprocess, sys, time
    root, out, commands = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    small, big = os.path.join(root, "small"), os.path.join(root, "big")
    for folder, size in ((small, "32m"), (big, "160m")):
        os.makedirs(folder, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], check=True)
    report = {}
    refused = subprocess.run(commands["small"], capture_output=True, text=True)
    report["small"] = [refused.returncode, refused.stderr, os.listdir(small)]
    run = subprocess.Popen(commands["big"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = os.path.join(big, "run.mp4.resume", "state-000000004.pt")
    for _ in range(6000):
        if os.path.exists(state) or run.poll() is not None:
            break
        time.sleep(0.05)
    report["state_seen"] = os.path.exists(state)
    with open(os.path.join(big, "filler"), "wb") as filler:  # another program takes the rest of the disk
        try:
            while True:
                filler.write(b"\\0" * 2**20)
                filler.flush()
        except OSError as e:
            report["filler_errno"] = e.errno
    report["full"] = [run.wait(), run.stderr.read()]
    shutil.copy(os.path.join(big, "run.mp4.partial"), os.path.join(out, "partial.mp4"))
    report["log_tail"] = open(os.path.join(big, "run.log")).read()[-300:]
    os.remove(os.path.join(big, "filler"))
    resumed = subprocess.run(commands["resume"], capture_output=True, text=True)
    report["resume"] = [resumed.returncode, resumed.stderr, sorted(os.listdir(big))]
    for name in ("run.mp4", "run.safetensors"):
        shutil.copy(os.path.join(big, name), os.path.join(out, name))
    json.dump(report, open(os.path.join(out, "report.json"), "w"))
""")


def test_a_real_full_disk_is_refused_up_front_or_reported_and_resumed(tmp_path, inputs):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (needs unshare and CAP_SYS_ADMIN)")
    reference = tmp_path / "reference" / "ref.mp4"
    subprocess.run(_generate(inputs, reference), env=_env(), check=True, capture_output=True)

    root, out = tmp_path / "mnt", tmp_path / "out"
    out.mkdir()
    big = root / "big" / "run.mp4"
    commands = {"small": _generate(inputs, root / "small" / "run.mp4"), "big": _generate(inputs, big),
                "resume": _generate(inputs, big, "--resume")}
    subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DRIVER, str(root), str(out),
                    json.dumps(commands)], env=_env(), check=True, timeout=900)
    report = json.loads((out / "report.json").read_text())

    code, stderr, left = report["small"]  # 32 MB: the preflight's estimate does not fit
    assert code == 2 and stderr.strip().splitlines()[-1] == (
        f"error: {root / 'small'}: not enough free disk space: 32 MB free, about 100 MB needed (93 frames of 128x128, "
        f"the run log and a resume state)")
    assert left == []

    assert report["state_seen"] and report["filler_errno"] == 28  # ENOSPC
    code, stderr = report["full"]
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and last.startswith(f"error: disk full while writing {big}.partial: the ")
    assert last.endswith(" frames written so far are kept (playable in run.mp4.partial); free space and rerun with "
                         "--resume to continue")
    assert "Traceback" not in stderr and "Logging error" not in stderr
    kept = int(last.split(": the ")[1].split()[0])
    frames, fps, _, _ = read_video(out / "partial.mp4")
    # Whole blocks only (9, then 12 frames each), at least the three that were on disk before the disk filled.
    assert len(frames) == kept >= 33 and (kept - 9) % 12 == 0 and fps == 25

    code, stderr, listing = report["resume"]
    assert code == 0, stderr
    # The newest block's fragment is written when the next block starts; when that write found the disk full,
    # the block is not in the file, and neither is the state saved after it usable: the run before it resumes.
    if kept >= 45:
        assert "resuming at block 4 (frame 45)" in stderr
    else:
        assert "no usable resume state" in stderr
    assert listing == ["run.json", "run.log", "run.mp4", "run.safetensors"]  # no partial, state or temporary file
    got, _, got_audio, _ = read_video(out / "run.mp4")
    want, _, want_audio, _ = read_video(reference)
    assert got.shape == (FRAMES, 128, 128, 3) and np.array_equal(got, want) and np.array_equal(got_audio, want_audio)
    assert torch.equal(load_file(str(out / "run.safetensors"))["latents"],
                       load_file(str(reference.with_suffix(".safetensors")))["latents"])


@pytest.fixture(scope="module")
def pipe():
    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


def test_full_disk_while_saving_a_resume_state(tmp_path, inputs, pipe):
    """torch.save itself reports a full disk as an opaque RuntimeError; the state goes through a Python file, so the
    job reports it like any full disk and leaves no temporary file."""
    image, audio = inputs
    spec = JobSpec(image, audio, "talking", tmp_path / "out.mp4", size="128*128", num_clip=2, seed=8)
    state_tmp = tmp_path / "out.mp4.resume" / "state-000000004.tmp"
    with pytest.raises(DiskFull) as failure:
        for item in run_job(pipe, spec):
            if isinstance(item, Progress) and item.blocks_done == 1:  # the run has cleared old states by now
                state_tmp.parent.mkdir(exist_ok=True)
                state_tmp.symlink_to("/dev/full")  # every write to it fails with ENOSPC
    assert str(failure.value) == (f"disk full while writing {state_tmp.with_suffix('.pt')}: the 45 frames written so far "
                                  f"are kept (playable in out.mp4.partial); free space and rerun with --resume to continue")
    assert list(state_tmp.parent.iterdir()) == []
    frames, *_ = read_video(tmp_path / "out.mp4.partial")
    assert len(frames) == 45  # the first clip, complete (resuming after a full disk: tests/test_faults.py)
