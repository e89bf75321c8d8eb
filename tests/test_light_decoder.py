"""`--decoder taew2_1` through the services: the flags of `app` and `serve` load the light decoder (the TAEW2.1
layout with random weights, ../shared/golden/taew2_1/) beside the tiny golden checkpoint, the web UI's job and a
live session over the server's WebSocket decode with it, a session may ask for the VAE's decoder instead, and
`--gpus 2` (two CPU processes) decodes with it on the output rank, as one process does."""

import io
import json

import av
import numpy as np
import pytest
import torch

from conftest import CKPT, GOLDEN, REPO, requires_golden

pytestmark = requires_golden
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("gradio")
from websockets.sync.client import connect  # noqa: E402

from liveavatar.engine.runtime import RuntimeOptions  # noqa: E402
from liveavatar.engine.stream import StreamSettings  # noqa: E402
from liveavatar.engine.worker import EngineWorker  # noqa: E402
from liveavatar.interfaces import cli  # noqa: E402
from liveavatar.interfaces.app import build_app  # noqa: E402
from liveavatar.interfaces.backend import Backend  # noqa: E402
from liveavatar.interfaces.server import create_app  # noqa: E402
from liveavatar.media.audio import load_audio  # noqa: E402
from liveavatar.media.video import read_video  # noqa: E402
from liveavatar.models.taehv import DecoderChoice, TinyDecoder  # noqa: E402
from test_server import serve_in_thread  # noqa: E402

FACE, SPEECH = REPO / "examples" / "face.png", REPO / "examples" / "speech.wav"
TAEW = GOLDEN / "taew2_1" / "taew2_1.pth"
SIZE = "128*128"
LIGHT = ["--decoder", "taew2_1", "--decoder_path", str(TAEW)]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """What `liveavatar serve --decoder taew2_1 --decoder_path taew2_1.pth --device cpu` runs."""
    args = cli.build_parser().parse_args(["serve", "--ckpt_dir", str(CKPT), "--device", "cpu", *LIGHT])
    backend = Backend.from_args(args)
    assert backend.decoder == DecoderChoice("taew2_1", TAEW)
    pipe = backend.open()
    worker = EngineWorker(pipe, max_queue=2)
    try:
        yield pipe, worker, tmp_path_factory.mktemp("light")
    finally:
        worker.shutdown()


def test_service_flags_load_the_light_decoder(service):
    pipe, _, _ = service
    assert isinstance(pipe.decoders["taew2_1"], TinyDecoder) and pipe.decoder_name == "taew2_1"
    assert pipe.decoders["wan"] is pipe.vae  # still there: it encodes, and a stream may ask for it
    for command in ("app", "serve", "generate"):
        args = cli.build_parser().parse_args([command, "--decoder", "taew2_1"] +
                                             (["--image", "i", "--audio", "a"] if command == "generate" else []))
        assert args.decoder == "taew2_1" and args.decoder_path is None


def test_app_job_decodes_with_the_light_decoder(service):
    _, worker, folder = service
    demo = build_app(worker, folder / "app", default_size=SIZE)
    generate = next(f.fn for f in demo.fns.values() if f.name == "generate")
    outputs = list(generate(str(FACE), str(SPEECH), "A person talking", SIZE, 1, 4, 3, False, False))
    assert outputs[-1][1].startswith("Done: 45 frames (128x128)")
    frames, fps, audio, rate = read_video(outputs[-1][2])
    assert frames.shape == (45, 128, 128, 3) and fps == 25 and audio is not None
    summary = json.loads(next((folder / "app" / "jobs").glob("*/output.json")).read_text())
    assert summary["decoder"] == "taew2_1"


def _session(client, **form) -> tuple[list[dict], bytes]:
    """A live session over the WebSocket: 1 s of speech pushed at once, closed after 4 blocks."""
    r = client.post("/sessions", files={"image": ("face.png", FACE.read_bytes())}, data={"size": SIZE, **form})
    assert r.status_code == 201, r.text
    session = r.json()
    pcm = (np.clip(load_audio(SPEECH)[:16000], -1, 1) * 32767).astype("<i2").tobytes()
    url = client.base_url.copy_with(scheme="ws", path=session["links"]["ws"])
    blocks, video = [], bytearray()
    with connect(str(url), max_size=None) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session"
        ws.send(pcm)
        for _ in range(2000):
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                video += message
                continue
            event = json.loads(message)
            if event["type"] == "block":
                blocks.append(event)
                if len(blocks) == 4:
                    ws.send(json.dumps({"type": "close"}))
            elif event["type"] == "end":
                assert event["error"] is None
                break
    return blocks, bytes(video)


def test_server_live_session_with_either_decoder(service):
    _, worker, folder = service
    (folder / "serve").mkdir()
    app = create_app(worker, folder / "serve", max_upload_mb=2, default_size=SIZE)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/health").json()
        assert health["decoder"] == "taew2_1" and health["decoders"] == ["wan", "taew2_1"]
        for decoder in (None, "wan"):  # the service's decoder, then the VAE's for this session only
            blocks, video = _session(client, **({"decoder": decoder} if decoder else {}))
            assert [b["index"] for b in blocks[:4]] == [0, 1, 2, 3]
            assert [b["frames"] for b in blocks[:4]] == [9, 12, 12, 12]  # the same timing as the VAE's stream
            assert [b["first_frame"] for b in blocks[:4]] == [0, 9, 21, 33]
            assert "decode" in blocks[0]["timings_ms"]
            with av.open(io.BytesIO(video)) as container:
                assert len(list(container.decode(video=0))) == sum(b["frames"] for b in blocks)
        r = client.post("/sessions", files={"image": ("face.png", FACE.read_bytes())}, data={"decoder": "taew3"})
        assert r.status_code == 422 and "decoder: 'taew3' is not loaded in this server" in r.json()["detail"]


def test_two_processes_decode_with_the_light_decoder_as_one_does(service):
    """`--gpus 2` with the light decoder: the output rank decodes with it; the blocks are the single process's
    (the latents bit for bit, the frames within one uint8 level: each process has its own CPU threads)."""
    from liveavatar.parallel.launch import CheckpointModels, start_pipeline
    from liveavatar.parallel.schedule import LIGHT_DECODE_COST

    single, _, _ = service
    cond = single.prepare(GOLDEN / "cases" / "T1" / "image.png", load_audio(GOLDEN / "cases" / "T1" / "audio.wav"),
                          "talking", size=SIZE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = list(single.stream(cond, StreamSettings(seed=3)).blocks(1))
        pipe = start_pipeline(CheckpointModels(CKPT, dtype=torch.float32), 2,
                              options=RuntimeOptions(decoder=DecoderChoice("taew2_1", TAEW)),
                              device_type="cpu", cpu_threads=1)
        try:
            assert pipe.decoder_name == "taew2_1" and pipe.schedule.decode_cost == LIGHT_DECODE_COST
            blocks = list(pipe.stream(cond, StreamSettings(seed=3)).blocks(1))
        finally:
            pipe.close()
    finally:
        torch.set_num_threads(threads)
    assert [len(b.frames) for b in blocks] == [len(b.frames) for b in expected] == [9, 12, 12, 12]
    for a, b in zip(blocks, expected):
        assert torch.equal(a.latents, b.latents)
        assert (a.frames.int() - b.frames.int()).abs().max() <= 1
