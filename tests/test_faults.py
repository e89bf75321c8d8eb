"""Injected faults: GPU out-of-memory, full disk, a stop request. Each keeps what was generated and resumes."""

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import CKPT, GOLDEN, requires_golden
from liveavatar.engine.job import JobResult, JobSpec, run_job
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.errors import DiskFull, JobStopped, OutOfMemory
from liveavatar.media.video import FragmentedMP4Writer, read_video

pytestmark = requires_golden

STEPS_PER_BLOCK = 4


@pytest.fixture(scope="module")
def pipe():
    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


def _spec(folder: Path, resume: bool = False) -> JobSpec:
    return JobSpec(
        image=GOLDEN / "cases" / "T1" / "image.png", audio=GOLDEN / "cases" / "T" / "audio.wav", prompt="talking",
        output=folder / "out.mp4", size="384*256", seed=3, save_latents=folder / "lat.safetensors", resume=resume,
    )


def _finish(pipe, spec) -> JobResult:
    return [item for item in run_job(pipe, spec)][-1]


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    _finish(pipe, _spec(folder))
    return folder


def _assert_resumed_equal(pipe, folder: Path, reference: Path) -> JobResult:
    result = _finish(pipe, _spec(folder, resume=True))
    assert result.resumed_from_block == 4
    assert torch.equal(load_file(str(folder / "lat.safetensors"))["latents"], load_file(str(reference / "lat.safetensors"))["latents"])
    got, *_ = read_video(folder / "out.mp4")
    want, *_ = read_video(reference / "out.mp4")
    assert np.array_equal(got, want)
    return result


def test_gpu_out_of_memory_names_remedies_and_keeps_the_video(pipe, tmp_path, monkeypatch, reference):
    real_forward = pipe.dit.forward_block
    calls = []

    def forward_that_runs_out_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5 * STEPS_PER_BLOCK + 3:  # block 5, step 2
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(pipe.dit, "forward_block", forward_that_runs_out_of_memory)
    with pytest.raises(OutOfMemory, match=r"smaller --size .*--offload_model True, or --fp8; the \d+ frames made so far") as info:
        list(run_job(pipe, _spec(tmp_path)))
    monkeypatch.undo()
    # Blocks finished before the failure are all in the file (with decode pipelining the block before the
    # failing one may still be in flight, so 45 or 57 frames), and the message says how many.
    frames, *_ = read_video(tmp_path / "out.mp4.partial")
    assert len(frames) in (45, 57)
    assert f"the {len(frames)} frames made so far" in str(info.value)
    _assert_resumed_equal(pipe, tmp_path, reference)


def test_full_disk_is_reported_and_the_written_part_survives(pipe, tmp_path, monkeypatch, reference):
    real_write = FragmentedMP4Writer.write
    writes = []

    def write_until_the_disk_is_full(self, frames):
        writes.append(1)
        if len(writes) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, frames)

    monkeypatch.setattr(FragmentedMP4Writer, "write", write_until_the_disk_is_full)
    with pytest.raises(DiskFull, match=r"disk full while writing .*out.mp4.partial: the 69 frames written so far are kept"):
        list(run_job(pipe, _spec(tmp_path)))
    monkeypatch.undo()
    frames, *_ = read_video(tmp_path / "out.mp4.partial")
    assert len(frames) == 69
    _assert_resumed_equal(pipe, tmp_path, reference)


def test_stop_request_finalises_after_the_block(pipe, tmp_path, reference):
    progress = []

    def stop_after_six_blocks():
        return len(progress) >= 6

    with pytest.raises(JobStopped, match=r"stopped after 69 of 125 frames"):
        for item in run_job(pipe, _spec(tmp_path), should_stop=stop_after_six_blocks):
            progress.append(item)
    frames, *_ = read_video(tmp_path / "out.mp4.partial")
    assert len(frames) == 69
    result = _finish(pipe, _spec(tmp_path, resume=True))
    assert result.resumed_from_block == 6  # the stop saved a state at its block
    got, *_ = read_video(tmp_path / "out.mp4")
    want, *_ = read_video(reference / "out.mp4")
    assert np.array_equal(got, want)
