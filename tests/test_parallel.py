"""The multi-process pipeline (liveavatar.parallel) against the single-process stream, on CPU ranks with gloo.

The T1 image with case T's 3 clips of audio at 384*256: the sink is replaced after clip 0 and every step's
KV ring wraps, so every message of the pipeline is exercised. Every rank runs one torch thread, like the
single-process reference, so the numbers are expected to be bit-identical (the ranks run the same
operations on the same tensors; only latents move between them, in float32).
"""

import itertools
import json
import time
from datetime import timedelta

import pytest
import torch

from conftest import CKPT, GOLDEN, requires_golden
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.stream import StreamSettings
from liveavatar.errors import LiveAvatarError
from liveavatar.media.audio import load_audio
from liveavatar.parallel.launch import CheckpointModels, start_pipeline
from liveavatar.parallel.pipeline import RankFailed
from liveavatar.parallel.schedule import DECODE_COST, Schedule

SEED = 5


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("layers", [1, 2, 8, 40])
@pytest.mark.parametrize("decode_cost", [0.0, 0.75, 3.0])
def test_schedule_covers_every_layer_of_every_step_once_in_order(steps, layers, decode_cost):
    total = steps * layers
    for world in sorted({1, 2, 3, 4, 5, steps + 1, total, total + 1} & set(range(1, total + 2))):
        schedule = Schedule(world, steps, layers, decode_cost)
        parts = [schedule.parts_of(r) for r in range(world)]
        assert [(p.step, layer) for rank in parts for p in rank for layer in p.layers] == \
            [(step, layer) for step in range(steps) for layer in range(layers)]
        assert all(parts[r] for r in range(world - 1))  # only the decoding rank may have no layers
        assert schedule.dedicated_decoder == (not parts[-1])
        for r in range(1, world):  # a rank receives a residual stream where its predecessor stops inside a step
            assert schedule.receives_tokens(r) == (bool(parts[r]) and parts[r - 1][-1].layers.stop < layers)
        assert not schedule.receives_tokens(0)
        costs = [schedule.cost(r) for r in range(world)]
        assert sum(costs) == pytest.approx(steps + decode_cost)
        sizes = [sum(len(p.layers) for p in rank) for rank in parts[:-1]]
        assert max(sizes, default=0) - min(sizes, default=0) <= 1  # the ranks before the last share evenly
        if total <= 16 and world <= 5:  # no other cut gives the busiest rank less work
            assert max(costs) == pytest.approx(best_largest_share(total, world, decode_cost * layers) / layers)
        assert [schedule.next(r) for r in range(world)] == list(range(1, world)) + [None]
    for world in (0, total + 2):
        with pytest.raises(ValueError, match="ranks for"):
            Schedule(world, steps, layers, decode_cost)


def best_largest_share(layers: int, ranks: int, decode: float) -> float:
    """The smallest largest share over every way to cut `layers` layers into `ranks` stretches, the last one
    of which also decodes (brute force)."""
    best = float("inf")
    for cuts in itertools.combinations_with_replacement(range(layers + 1), ranks - 1):
        ends = (0, *cuts, layers)
        loads = [b - a for a, b in zip(ends, ends[1:])]
        if all(loads[:-1]):
            best = min(best, max(loads[:-1] + [loads[-1] + decode]))
    return best


def test_schedule_layouts():
    def layout(*args):
        schedule = Schedule(*args)
        return [schedule.describe(r) for r in range(schedule.world_size)]

    # The released model (40 layers), a block's decode costing 0.75 of a step.
    assert layout(2, 4) == ["steps 0-1 + step 2 layers 0-14", "step 2 layers 15-39 + step 3 + decode"]
    assert layout(5, 4) == ["step 0 layers 0-37", "step 0 layers 38-39 + step 1 layers 0-35",
                            "step 1 layers 36-39 + step 2 layers 0-33", "step 2 layers 34-39 + step 3 layers 0-31",
                            "step 3 layers 32-39 + decode"]
    assert layout(5, 4, 40, 1.5) == ["step 0", "step 1", "step 2", "step 3", "decode"]  # the original's 4 + 1
    assert layout(1, 4) == ["steps 0-3 + decode"]
    # The tiny golden model (8 layers), as the tests below run it.
    assert layout(2, 4, 8) == ["steps 0-1 + step 2 layers 0-2", "step 2 layers 3-7 + step 3 + decode"]
    assert layout(3, 2, 8, 3.0) == ["step 0", "step 1", "decode"]
    assert layout(5, 4, 8) == ["step 0", "step 1", "step 2 layers 0-6", "step 2 layer 7 + step 3 layers 0-5",
                               "step 3 layers 6-7 + decode"]
    assert layout(6, 4, 8) == ["step 0 layers 0-6", "step 0 layer 7 + step 1 layers 0-4",
                               "step 1 layers 5-7 + step 2 layers 0-2", "step 2 layers 3-7 + step 3 layer 0",
                               "step 3 layers 1-6", "step 3 layer 7 + decode"]


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
    """`liveavatar generate --gpus 2` (here CPU processes): rank 0 steps 0-1 and the first 3 layers of step 2,
    rank 1 the rest of step 2, step 3, the decode and the MP4."""
    from safetensors.torch import load_file

    from liveavatar.interfaces import cli

    case = GOLDEN / "cases"
    out = tmp_path / "out.mp4"
    code = cli.main(["generate", "--image", str(case / "T1" / "image.png"), "--audio", str(case / "T" / "audio.wav"),
                     "--prompt", "talking", "--size", "384*256", "--base_seed", str(SEED), "--ckpt_dir", str(CKPT),
                     "--device", "cpu", "--gpus", "2", "--save_file", str(out), "--save_latents", str(tmp_path / "z.safetensors"),
                     "--original_timing"])  # the reference stream hears the speech as it is
    assert code == 0 and out.exists()
    latents = load_file(str(tmp_path / "z.safetensors"))["latents"]
    # The video ends with the 5 s of speech: 122 frames from 0.12 s on, 11 blocks of the stream's 12.
    assert latents.shape[1] == 11 * 3
    assert rel_diff(latents, reference(single, 4, 3)[0][:, : 11 * 3]) == 0.0
    assert json.loads(out.with_suffix(".json").read_text())["frames"] == 122


@requires_golden
@pytest.mark.parametrize(
    "world, steps, clips, decode_cost",
    [
        (5, 4, 3, 0.75),  # whole steps on ranks 0-1, then steps split between ranks (residual streams sent)
        (3, 2, 2, 3.0),  # a costly decode: one rank per step and a dedicated decode rank (the original's layout)
        (6, 4, 2, 0.75),  # more ranks than steps + 1: a residual stream on every hop
        (2, 3, 2, 0.75),  # a step count that does not divide evenly
    ],
)
def test_same_video_as_single_process(single, world, steps, clips, decode_cost):
    _, cond = single
    pipe = start(world, steps, decode_cost=decode_cost)
    try:
        latents, frames, stats = run(pipe, cond, steps, clips)
    finally:
        pipe.close()
    ref_latents, ref_frames = reference(single, steps, clips)
    assert latents.shape == ref_latents.shape
    assert rel_diff(latents, ref_latents) == 0.0  # measured: bit-identical on every layout
    assert torch.equal(frames, ref_frames)
    assert [s["rank"] for s in stats] == list(range(world))
    schedule = Schedule(world, steps, 8, decode_cost)
    assert [s["role"] for s in stats] == [schedule.describe(r) for r in range(world)]
    assert all(s["blocks"] == clips * 4 for s in stats)


@requires_golden
def test_world_size_beyond_the_layers_is_refused_before_any_rank_starts():
    with pytest.raises(LiveAvatarError, match="34 ranks for 4 denoising steps of 8 layers: use 1 to 33"):
        start(34, 4)


@requires_golden
def test_idle_ranks_survive_and_jobs_recover(single):
    """Idle ranks wait on the host group, never on the job group, so an idle period longer than the job
    group's timeout (NCCL's watchdog kills a process whose operation waits that long) harms nothing. A
    stream that never ran and one stopped early leave the ranks ready for the next job. The work is cut
    again after a stream from the decode's measured cost, and the next stream runs that cut."""
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
        assert pipe.schedule.decode_cost == DECODE_COST
        first = latents(pipe, settings)
        cut = pipe.schedule
        assert cut.decode_cost != DECODE_COST  # measured in the first stream
        time.sleep(op_timeout.total_seconds() * 1.5)
        pipe.stream(cond, settings)  # never iterated: ended by the next stream()
        stopped = pipe.stream(cond, settings).blocks(2)
        next(stopped), next(stopped)
        stopped.close()
        assert pipe.schedule == cut  # streams shorter than a clip leave the cut as it is
        again = pipe.stream(cond, settings)
        assert torch.equal(first, expected) and torch.equal(torch.cat([b.latents for b in again.blocks(2)], 1), expected)
        assert [r["role"] for r in again.rank_stats] == [cut.describe(r) for r in range(2)]
        assert torch.equal(latents(pipe, fixed_sink), expected_fixed_sink)
        pipe.processes[0].kill()
        pipe.processes[0].join()
        with pytest.raises(RankFailed, match="rank 0 exited"):
            pipe.stream(cond, settings)
    finally:
        pipe.close()
