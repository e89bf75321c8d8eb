"""`liveavatar app` and `liveavatar serve` with `--gpus 2` (here two CPU processes with gloo): the services'
flags open the multi-GPU pipeline, a job gives the one-process video frame for frame, a live session speaks,
requests for another step count are refused up front, and closing the service stops the ranks."""

import queue
import time

import numpy as np
import pytest
import torch

from conftest import CKPT, REPO, requires_golden

pytestmark = requires_golden
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("gradio")

from liveavatar.engine.job import JobSpec, run_job  # noqa: E402
from liveavatar.engine.live import BlockPublished, LiveSession, SessionEnded, SessionOptions  # noqa: E402
from liveavatar.engine.pipeline import LiveAvatarPipeline  # noqa: E402
from liveavatar.engine.worker import EngineWorker, SessionTask, TaskState  # noqa: E402
from liveavatar.interfaces import cli  # noqa: E402
from liveavatar.interfaces.app import build_app  # noqa: E402
from liveavatar.interfaces.backend import Backend  # noqa: E402
from liveavatar.interfaces.server import create_app  # noqa: E402
from liveavatar.media.audio import load_audio  # noqa: E402
from liveavatar.media.video import read_video  # noqa: E402
from liveavatar.parallel.pipeline import ParallelPipeline  # noqa: E402
from test_server import serve_in_thread  # noqa: E402

FACE, SPEECH = REPO / "examples" / "face.png", REPO / "examples" / "speech.wav"
SIZE = "128*128"
WAIT_S = 180  # every wait below is bounded


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """What `liveavatar serve --gpus 2 --device cpu` runs: the pipeline its flags open, one engine worker."""
    args = cli.build_parser().parse_args(["serve", "--gpus", "2", "--device", "cpu", "--ckpt_dir", str(CKPT)])
    pipe = Backend.from_args(args).open()
    worker = EngineWorker(pipe, max_queue=2)
    try:
        yield pipe, worker, tmp_path_factory.mktemp("parallel-serve")
    finally:
        worker.shutdown()
        pipe.close()
    assert not any(p.is_alive() for p in pipe.processes), "closing the service stops the other ranks"


def test_service_flags_open_the_multi_gpu_pipeline(service):
    pipe, _, _ = service
    assert isinstance(pipe, ParallelPipeline) and pipe.schedule.world_size == 2
    assert pipe.fixed_sample_steps == 4 and [p.is_alive() for p in pipe.processes] == [True]


def test_server_job_equals_the_single_process_video(service, tmp_path):
    pipe, worker, work_dir = service
    app = create_app(worker, work_dir, max_upload_mb=2, default_size=SIZE)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        def submit(**form):
            with FACE.open("rb") as image, SPEECH.open("rb") as audio:
                return client.post("/jobs", files={"image": ("face.png", image), "audio": ("speech.wav", audio)},
                                   data={k: str(v) for k, v in form.items()})

        refused = submit(num_clip=1, sample_steps=3)
        assert refused.status_code == 422
        assert "multi-GPU pipeline runs 4 steps, not 3" in refused.json()["detail"]
        job = submit(num_clip=1, seed=7).json()
        deadline = time.monotonic() + WAIT_S
        while (status := client.get(f"/jobs/{job['id']}").json())["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.2)
        assert status["state"] == "done", status
        (tmp_path / "served.mp4").write_bytes(client.get(job["links"]["video"]).content)

    single = LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)
    spec = JobSpec(FACE, SPEECH, "A person is talking.", tmp_path / "single.mp4", size=SIZE, num_clip=1, seed=7)
    list(run_job(single, spec))
    served, fps, audio, _ = read_video(tmp_path / "served.mp4")
    alone, _, alone_audio, _ = read_video(spec.output)
    assert served.shape == (45, 128, 128, 3) and fps == 25
    assert np.array_equal(served, alone) and np.array_equal(audio, alone_audio)


def test_live_session_on_two_processes(service):
    _, worker, _ = service
    session = LiveSession(SessionOptions(FACE, size=SIZE))
    events: queue.Queue = queue.Queue()
    session.subscribe(events.put)
    speech = load_audio(SPEECH)[:16000]  # 1 s: three blocks' worth, then idle blocks
    session.push(speech)
    task = worker.submit(SessionTask(kind="session", session=session))
    blocks, end = [], None
    deadline = time.monotonic() + WAIT_S
    while end is None:
        event = events.get(timeout=max(1.0, deadline - time.monotonic()))
        if isinstance(event, BlockPublished):
            blocks.append(event.info)
            if len(blocks) == 5:
                session.close()
        elif isinstance(event, SessionEnded):
            end = event
    assert end.error is None, end.error
    assert [b.index for b in blocks[:5]] == list(range(5))
    # In order, nothing lost or twice (a session behind real time may drop pauses: dropped_samples).
    assert [b.speech_start for b in blocks[:3]] == [0] + [b.speech_end for b in blocks[:2]]
    assert sum(b.speech_samples + b.dropped_samples for b in blocks) == len(speech)
    assert blocks[4].speech_samples == 0  # after the speech: idle
    deadline = time.monotonic() + WAIT_S
    while task.state != TaskState.DONE:
        assert time.monotonic() < deadline, task.state
        time.sleep(0.1)


def test_app_form_runs_the_pipelines_step_count(service, tmp_path):
    _, worker, _ = service
    demo = build_app(worker, tmp_path, default_size=SIZE)
    steps = next(c for c in demo.blocks.values() if getattr(c, "label", None) == "Denoising steps (the model is distilled for 4)")
    assert steps.value == 4 and steps.interactive is False
    generate = next(f.fn for f in demo.fns.values() if f.name == "generate")
    outputs = list(generate(str(FACE), str(SPEECH), "A person is talking.", SIZE, 1, 4, 7, False, False))
    assert outputs[-1][1].startswith("Done: 45 frames (128x128)")
    frames, *_ = read_video(outputs[-1][2])
    assert frames.shape == (45, 128, 128, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--gpus", "200"], "--gpus 200: 200 ranks for 4 denoising steps of 40 layers: use 1 to 161"),
        (["serve", "--gpus", "0"], "--gpus 0: "),
        (["app", "--gpus", "2", "--offload_model"], "--offload_model: with --gpus"),
        (["serve", "--gpus", "2", "--device", "cpu:1"], "--device cpu:1 with --gpus 2"),
    ],
)
def test_service_gpus_errors_before_loading(argv, message, capsys):
    assert cli.main([*argv, "--ckpt_dir", str(CKPT), *(["--device", "cpu"] if "--device" not in argv else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_service_help_explains_gpus_and_fp8(capsys):
    for command in ("app", "serve"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "--gpus" in out and "--fp8" in out and "--offload_model" in out
