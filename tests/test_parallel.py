"""The multi-process pipeline (liveavatar.parallel) against the single-process stream, on CPU ranks with gloo.

The T1 image with case T's 3 clips of audio at 384*256: the sink is replaced after clip 0 and every step's
KV ring wraps, so every message of the pipeline is exercised. Every rank runs one torch thread, like the
single-process reference, so the numbers are expected to be bit-identical (the ranks run the same
operations on the same tensors; only latents move between them, in float32).
"""

import json
import time
from datetime import timedelta

import pytest
import torch

from conftest import CKPT, GOLDEN, requires_golden
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.stream import StreamSettings
from liveavatar.media.audio import load_audio
from liveavatar.parallel.launch import CheckpointModels, start_pipeline
from liveavatar.parallel.pipeline import RankFailed
from liveavatar.parallel.schedule import Schedule

SEED = 5


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
def test_schedule_covers_every_step_once_in_order(steps):
    for world in range(1, steps + 2):
        schedule = Schedule(world, steps)
        groups = [schedule.steps_of(r) for r in range(world)]
        assert [s for g in groups for s in g] == list(range(steps))
        sizes = [len(g) for g in groups[: schedule.denoising_ranks]]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the decoding rank never has more than the others
        assert schedule.dedicated_decoder == (world == steps + 1)
        assert [schedule.next(r) for r in range(world)] == list(range(1, world)) + [None]
    with pytest.raises(ValueError):
        Schedule(steps + 2, steps)


def test_schedule_layouts():
    assert [Schedule(2, 4).describe(r) for r in range(2)] == ["steps 0-1", "steps 2-3 + decode"]
    assert [Schedule(3, 4).describe(r) for r in range(3)] == ["steps 0-1", "step 2", "step 3 + decode"]
    assert [Schedule(5, 4).describe(r) for r in range(5)] == ["step 0", "step 1", "step 2", "step 3", "decode"]
    assert [Schedule(2, 3).describe(r) for r in range(2)] == ["steps 0-1", "step 2 + decode"]
    assert [Schedule(1, 4).describe(0)] == ["steps 0-3 + decode"]



@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    pipe = LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)
    wave = load_audio(GOLDEN / "cases" / "T" / "audio.wav")
    cond = pipe.prepare(GOLDEN / "cases" / "T1" / "image.png", wave, "talking", size="384*256")
    return pipe, cond


_references: dict = {}


def reference(single, steps: int, clips: int):
    """(latents, frames) of the single-process stream. A stream is causal: the first clips of a longer run
    are those of a shorter one (once it has two clips, for the sink replacement), so one run per step count."""
    if steps not in _references or _references[steps][0] < clips:
        pipe, cond = single
        blocks = list(pipe.stream(cond, StreamSettings(seed=SEED, sample_steps=steps)).blocks(clips))
        _references[steps] = (clips, blocks)
    blocks = _references[steps][1][: clips * 4]
    return torch.cat([b.latents for b in blocks], 1), torch.cat([b.frames for b in blocks])


def start(world: int, steps: int, **kwargs):
    return start_pipeline(CheckpointModels(CKPT, dtype=torch.float32), world, sample_steps=steps, device_type="cpu",
                          cpu_threads=1, **kwargs)


def run(pipe, cond, steps: int, clips: int):
    stream = pipe.stream(cond, StreamSettings(seed=SEED, sample_steps=steps))
    blocks = list(stream.blocks(clips))
    assert [b.index for b in blocks] == list(range(clips * 4))
    return torch.cat([b.latents for b in blocks], 1), torch.cat([b.frames for b in blocks]), stream.rank_stats


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@requires_golden
def test_generate_on_two_processes(single, tmp_path):
    """`liveavatar generate --gpus 2` (here CPU processes): rank 0 steps 0-1, rank 1 steps 2-3 + decode + MP4."""
    from safetensors.torch import load_file

    from liveavatar.interfaces import cli

    case = GOLDEN / "cases"
    out = tmp_path / "out.mp4"
    code = cli.main(["generate", "--image", str(case / "T1" / "image.png"), "--audio", str(case / "T" / "audio.wav"),
                     "--prompt", "talking", "--size", "384*256", "--base_seed", str(SEED), "--ckpt_dir", str(CKPT),
                     "--device", "cpu", "--gpus", "2", "--save_file", str(out), "--save_latents", str(tmp_path / "z.safetensors")])
    assert code == 0 and out.exists()
    latents = load_file(str(tmp_path / "z.safetensors"))["latents"]
    assert rel_diff(latents, reference(single, 4, 3)[0]) == 0.0
    assert json.loads(out.with_suffix(".json").read_text())["frames"] == 141


@requires_golden
@pytest.mark.parametrize(
    "world, steps, clips",
    [
        (5, 4, 3),  # the original's layout: one rank per step and a decode rank
        (3, 4, 2),  # steps 0-1 | step 2 | step 3 + decode
        (2, 3, 2),  # a step count that is not a multiple of the ranks
        (3, 2, 2),  # more ranks than steps: a dedicated decode rank
    ],
)
def test_same_video_as_single_process(single, world, steps, clips):
    _, cond = single
    pipe = start(world, steps)
    try:
        latents, frames, stats = run(pipe, cond, steps, clips)
    finally:
        pipe.close()
    ref_latents, ref_frames = reference(single, steps, clips)
    assert latents.shape == ref_latents.shape
    assert rel_diff(latents, ref_latents) == 0.0  # measured: bit-identical on every layout
    assert torch.equal(frames, ref_frames)
    assert [s["rank"] for s in stats] == list(range(world))
    schedule = Schedule(world, steps)
    assert [s["role"] for s in stats] == [schedule.describe(r) for r in range(world)]
    assert all(s["blocks"] == clips * 4 for s in stats)


@requires_golden
def test_idle_ranks_survive_and_jobs_recover(single):
    """Idle ranks wait on the host group, never on the job group, so an idle period longer than the job
    group's timeout (NCCL's watchdog kills a process whose operation waits that long) harms nothing. A
    stream that never ran and one stopped early leave the ranks ready for the next job."""
    pipe0, _ = single
    cond = pipe0.prepare(GOLDEN / "cases" / "T1" / "image.png", load_audio(GOLDEN / "cases" / "T" / "audio.wav"),
                         "talking", size="64*64")
    settings = StreamSettings(seed=SEED)
    fixed_sink = StreamSettings(seed=SEED, rolling_sink=False)

    def latents(pipe, settings):
        return torch.cat([b.latents for b in pipe.stream(cond, settings).blocks(2)], 1)

    expected, expected_fixed_sink = latents(pipe0, settings), latents(pipe0, fixed_sink)
    op_timeout = timedelta(seconds=4)
    pipe = start(2, 4, op_timeout=op_timeout)
    try:
        first = latents(pipe, settings)
        time.sleep(op_timeout.total_seconds() * 1.5)
        pipe.stream(cond, settings)  # never iterated: ended by the next stream()
        stopped = pipe.stream(cond, settings).blocks(2)
        next(stopped), next(stopped)
        stopped.close()
        assert torch.equal(first, expected) and torch.equal(latents(pipe, settings), expected)
        assert torch.equal(latents(pipe, fixed_sink), expected_fixed_sink)
        pipe.processes[0].kill()
        pipe.processes[0].join()
        with pytest.raises(RankFailed, match="rank 0 exited"):
            pipe.stream(cond, settings)
    finally:
        pipe.close()
