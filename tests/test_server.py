"""The job and live-session API (`liveavatar serve`) against the tiny golden checkpoints on CPU, over HTTP."""

import io
import json
import shutil
import socket
import threading
import time
import wave
from contextlib import contextmanager

import av
import numpy as np
import pytest
import torch

from conftest import CKPT, REPO, requires_golden

pytestmark = requires_golden
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from websockets.sync.client import connect  # noqa: E402

from liveavatar.engine.live import (  # noqa: E402
    JITTER_S, BlockPublished, LiveMP4Muxer, LiveSession, LiveSpeech, SessionClosed, SessionOptions, init_segment_length,
    mime_type,
)
from liveavatar.engine.pipeline import LiveAvatarPipeline  # noqa: E402
from liveavatar.engine.worker import EngineWorker  # noqa: E402
from liveavatar.interfaces.server import create_app  # noqa: E402
from liveavatar.media.audio import load_audio  # noqa: E402
from liveavatar.media.video import read_audio, read_video  # noqa: E402
from liveavatar import tts  # noqa: E402
from liveavatar.tts.speaker import to_speech_rate  # noqa: E402

FACE, SPEECH = REPO / "examples" / "face.png", REPO / "examples" / "speech.wav"
SIZE = "128*128"  # the tiny model makes a 128x128 block in well under a second on CPU
POLL_S = 0.1
MAX_POLLS = 1200  # every wait below is bounded: 2 minutes at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app):
    """Runs an ASGI app with uvicorn on 127.0.0.1 and a free port; stops it on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(MAX_POLLS):
        if server.started:
            break
        time.sleep(POLL_S)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def pipe():
    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    worker = EngineWorker(pipe, max_queue=2)
    work_dir = tmp_path_factory.mktemp("serve")
    app = create_app(worker, work_dir, max_upload_mb=2, default_size=SIZE)
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, worker, work_dir
    worker.shutdown()


def submit(client, **form):
    with FACE.open("rb") as image, SPEECH.open("rb") as audio:
        return client.post("/jobs", files={"image": ("face.png", image), "audio": ("speech.wav", audio)},
                           data={k: str(v) for k, v in form.items()})


def wait_until(predicate, what: str):
    for _ in range(MAX_POLLS):
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"timed out waiting for {what}")


def test_health_and_openapi(server):
    client, worker, _ = server
    health = client.get("/health").json()
    assert set(health.pop("realtime")) == {"size", "sample_steps", "fps", "keeps_up", "calibration"}
    assert health == {"status": "ok", "device": "cpu", "queued": 0, "max_queue": 2, "running": None,
                      "decoder": "wan", "decoders": ["wan"]}
    schema = client.get("/openapi.json").json()
    for path in ("/jobs", "/jobs/{job_id}", "/jobs/{job_id}/live", "/jobs/{job_id}/video", "/jobs/{job_id}/cancel",
                 "/sessions", "/sessions/{session_id}/video", "/health", "/capabilities"):
        assert path in schema["paths"], path
    fields = schema["components"]["schemas"]["Body_submit_job_jobs_post"]["properties"]
    assert {"image", "audio", "prompt", "size", "num_clip", "sample_steps", "seed"} <= set(fields)
    assert "decoder" in schema["components"]["schemas"]["Body_create_session_sessions_post"]["properties"]
    page = client.get("/player")
    assert page.status_code == 200 and "<video" in page.text


def test_job_progress_live_output_and_download(server):
    client, worker, work_dir = server
    t0 = time.perf_counter()
    response = submit(client, num_clip=1, seed=7)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running")
    # The live MP4 is followed while the job writes it; the response ends when the job does.
    live, first_bytes_s, states_seen = bytearray(), None, set()
    with client.stream("GET", job["links"]["live"]) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"] == "video/mp4"
        for chunk in stream.iter_bytes():
            if first_bytes_s is None:
                first_bytes_s = time.perf_counter() - t0
                states_seen.add(client.get(f"/jobs/{job['id']}").json()["state"])
            live += chunk
    status = client.get(f"/jobs/{job['id']}").json()
    assert states_seen == {"running"}, "the first bytes arrived while the job was running"
    assert status["state"] == "done"
    assert status["progress"] == {**status["progress"], "blocks_done": 4, "blocks_total": 4, "frames_done": 45, "frames_total": 45}
    assert status["result"]["frames"] == 45 and (status["result"]["width"], status["result"]["height"]) == (128, 128)
    print(f"\njob: first block after {status['first_block_s']:.2f} s, first live bytes after {first_bytes_s:.2f} s "
          f"(from submit), job {status['result']['seconds']:.2f} s")

    video = client.get(job["links"]["video"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert bytes(live) == video.content, "the live stream is the job's MP4, byte for byte"
    (work_dir / "download.mp4").write_bytes(video.content)
    frames, fps, audio, rate = read_video(work_dir / "download.mp4")
    assert frames.shape == (45, 128, 128, 3) and fps == 25 and rate == 16000 and len(audio) > 0
    # Uploads are kept under generated names while the job runs and deleted when it ends: only the video stays.
    folder = work_dir / "jobs" / job["id"]
    assert {p.name for p in folder.iterdir()} == {"output.mp4"}


def test_bad_requests_name_what_is_wrong(server):
    client, worker, work_dir = server
    with SPEECH.open("rb") as audio:
        r = client.post("/jobs", files={"image": ("cat.png", b"not an image"), "audio": ("speech.wav", audio)})
    assert r.status_code == 400 and r.json()["detail"].startswith("image (cat.png): not an image file")
    with FACE.open("rb") as image:
        r = client.post("/jobs", files={"image": ("face.png", image), "audio": ("talk.wav", b"RIFF....WAVEfmt ")})
    assert r.status_code == 400 and r.json()["detail"].startswith("audio (talk.wav): ")
    assert str(work_dir) not in r.json()["detail"]
    with FACE.open("rb") as image:
        r = client.post("/jobs", files={"image": ("face.png", image)})
    assert r.status_code == 422 and any(e["loc"] == ["body", "audio"] for e in r.json()["detail"])
    r = submit(client, size="huge")
    assert r.status_code == 422 and r.json()["detail"].startswith("size: invalid size 'huge'")
    r = submit(client, sample_steps=0)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sample_steps"]
    r = client.post("/jobs", files={"image": ("big.png", b"\0" * (3 * 2**20)), "audio": ("a.wav", b"\0")})
    assert r.status_code == 413 and "limited to 2 MB" in r.json()["detail"]
    assert client.get("/jobs/0123").status_code == 404
    assert {p.name for p in (work_dir / "jobs").iterdir()} <= set(worker.tasks), "refused uploads are not kept"


def test_full_queue_answers_429_and_jobs_cancel(server):
    client, worker, _ = server
    running = submit(client, num_clip=3).json()
    wait_until(lambda: client.get(f"/jobs/{running['id']}").json()["state"] == "running", "the first job to start")
    waiting = [submit(client, num_clip=1) for _ in range(2)]
    assert [r.status_code for r in waiting] == [202, 202]
    assert [r.json()["position"] for r in waiting] == [1, 2]
    refused = submit(client, num_clip=1)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "10"
    assert refused.json()["detail"].startswith("the queue is full (2 requests waiting)")

    for r in waiting:  # queued jobs never start
        assert client.post(f"/jobs/{r.json()['id']}/cancel").json()["state"] == "cancelled"
    assert client.post(f"/jobs/{waiting[0].json()['id']}/cancel").status_code == 409
    wait_until(lambda: (client.get(f"/jobs/{running['id']}").json().get("progress") or {}).get("blocks_done"),
               "the first block")
    client.post(f"/jobs/{running['id']}/cancel")
    status = wait_until(lambda: (s := client.get(f"/jobs/{running['id']}").json())["state"] != "running" and s,
                        "the cancelled job to stop")
    assert status["state"] == "cancelled"
    assert status["progress"]["blocks_done"] < status["progress"]["blocks_total"] == 12
    assert client.get(running["links"]["video"]).status_code == 409
    assert client.get("/health").json()["running"] is None


def test_live_session_speaks_pushed_speech_in_order_then_idles(server):
    client, _, _ = server
    r = client.post("/sessions", files={"image": ("face.png", FACE.read_bytes())}, data={"size": SIZE})
    assert r.status_code == 201, r.text
    session = r.json()
    speech = load_audio(SPEECH)[: 3 * 16000]  # 3 s, pushed as a microphone would: 100 ms every 100 ms
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()
    chunk = 3200  # bytes: 1600 samples
    url = client.base_url.copy_with(scheme="ws", path=session["links"]["ws"])
    blocks, video, end = [], bytearray(), None
    with connect(str(url), max_size=None) as ws:
        hello = json.loads(ws.recv(timeout=30))
        assert hello["type"] == "session" and hello["id"] == session["id"]
        t_push = time.perf_counter()

        pushed_at = []  # (samples pushed so far, when)

        def push():
            for i in range(0, len(pcm), chunk):
                ws.send(pcm[i : i + chunk])
                pushed_at.append((min(len(speech), (i + chunk) // 2), time.perf_counter()))
                time.sleep(0.1)

        pusher = threading.Thread(target=push)
        pusher.start()
        first_block_s = first_video_s = None
        for _ in range(2000):  # bounded: each message is one event or one piece of video
            message = ws.recv(timeout=60)
            if isinstance(message, bytes):
                video += message
                first_video_s = first_video_s or time.perf_counter() - t_push
                continue
            event = json.loads(message)
            if event["type"] == "init":
                assert event["mime"].startswith('video/mp4; codecs="avc1.')
            elif event["type"] == "block":
                first_block_s = first_block_s or time.perf_counter() - t_push
                event["received"] = time.perf_counter()
                blocks.append(event)
                spoken = blocks[-1]["speech_end"]  # spoken, or dropped as silence to catch up
                if spoken == len(speech) and sum(not b["speech_samples"] for b in blocks) == 3 and not pusher.is_alive():
                    ws.send(json.dumps({"type": "close"}))
            elif event["type"] == "end":
                end = event
                break
        pusher.join()
    assert end == {"type": "end", "error": None}
    # Latency of speech: from the push of a window's last sample to its block arriving (compute + queueing).
    latency = [b["received"] - next(t for n, t in pushed_at if n >= b["speech_start"] + b["speech_samples"])
               for b in blocks if b["speech_samples"]]
    print(f"\nlive session: first block {first_block_s:.2f} s and first video bytes {first_video_s:.2f} s after the "
          f"first speech chunk (session start-up included); speech-to-block latency mean {np.mean(latency):.2f} s, "
          f"max {np.max(latency):.2f} s; {len(blocks)} blocks")

    assert [b["index"] for b in blocks] == list(range(len(blocks)))
    assert [b["first_frame"] for b in blocks] == list(np.cumsum([0] + [b["frames"] for b in blocks[:-1]]))
    assert [b["frames"] for b in blocks] == [9] + [12] * (len(blocks) - 1)
    # Speech comes back in order with no gap and nothing twice: each block continues where the last ended (past
    # the silence it dropped, if the session fell behind; see test_live_realtime.py).
    assert [b["speech_start"] for b in blocks] == [0] + [b["speech_end"] for b in blocks[:-1]]
    assert all(b["speech_end"] == b["speech_start"] + b["speech_samples"] + b["dropped_samples"] for b in blocks)
    speaking = [b for b in blocks if b["speech_samples"]]
    assert sum(b["speech_samples"] + b["dropped_samples"] for b in blocks) == len(speech)
    print(f"lag after each block (s): {[b['lag_s'] for b in blocks]}")
    assert all(b["padded_samples"] == 0 for b in speaking[1:-1]), "silence inserted in the middle of the speech"
    # After the speech the avatar stays alive: the stream goes on with idle blocks until it is closed.
    assert blocks[-1]["speech_samples"] == 0 and blocks[-1]["index"] > speaking[-1]["index"]

    with av.open(io.BytesIO(bytes(video))) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == sum(b["frames"] for b in blocks)
    assert [i for i, f in enumerate(frames) if f.key_frame] == [b["first_frame"] for b in blocks]
    assert client.get(f"/sessions/{session['id']}").json()["state"] == "done"


def test_session_errors(server):
    client, _, _ = server
    r = client.post("/sessions", files={"image": ("x.png", b"nope")}, data={"size": SIZE})
    assert r.status_code == 400 and r.json()["detail"].startswith("image (x.png): not an image file")
    r = client.post("/sessions", files={"image": ("face.png", FACE.read_bytes())}, data={"decoder": "taew2_1"})
    assert r.status_code == 422 and r.json()["detail"] == ("decoder: 'taew2_1' is not loaded in this server (it has "
                                                           "wan; start it with --decoder taew2_1 for that one)")
    assert client.get("/sessions/unknown").status_code == 404


def test_live_speech_waits_for_speech_and_idles_on_silence(pipe):
    speech = LiveSpeech(pipe.audio_encoder)
    layers, channels = pipe.audio_encoder.model.config.num_hidden_layers + 1, pipe.audio_encoder.model.config.hidden_size
    t0 = time.monotonic()
    idle = speech.block(0, 12)  # nothing pushed: returns once real time has passed the window
    assert time.monotonic() - t0 >= 0.48 + JITTER_S - 0.01
    assert idle.shape == (1, layers, channels, 12) and not idle.any()
    assert speech.window(0).speech_samples == 0
    wave = load_audio(SPEECH)
    speech.push(wave[16000 : 16000 + 7680 + 100])
    features = speech.block(1, 12)
    window = speech.window(1)
    assert (window.speech_start, window.speech_samples) == (0, 7680)
    np.testing.assert_array_equal(window.samples, wave[16000 : 16000 + 7680])
    assert features.shape == (1, layers, channels, 12) and features.abs().amax(dim=(0, 1, 2)).min() > 0
    assert speech.queued_seconds == pytest.approx(100 / 16000)
    speech.close()
    with pytest.raises(SessionClosed):
        speech.block(2, 12)


def stereo_wav(seconds: float = 1.5, rate: int = 44100) -> bytes:
    """A 44.1 kHz stereo WAV: 300 Hz on the left, 500 Hz on the right."""
    t = np.arange(int(seconds * rate)) / rate
    planes = np.stack([0.3 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 500 * t)])
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.round(planes.T * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def test_a_stereo_upload_downloads_with_its_own_rate_and_channels(server, tmp_path):
    client, _, _ = server
    response = client.post("/jobs", files={"image": ("face.png", FACE.read_bytes()), "audio": ("voice.wav", stereo_wav())},
                           data={"seed": "3"})
    assert response.status_code == 202, response.text
    job = response.json()
    status = wait_until(lambda: (s := client.get(f"/jobs/{job['id']}").json())["state"] in ("done", "failed") and s,
                        "the job")
    assert status["state"] == "done", status
    assert status["result"]["frames"] == 38  # ends with the 1.5 s of speech (ceil(1.5 * 25) frames)
    assert status["result"]["generation_fps"] > 0 and "fps" not in status["result"]
    (tmp_path / "v.mp4").write_bytes(client.get(job["links"]["video"]).content)
    planes, rate, layout = read_audio(tmp_path / "v.mp4")
    assert (rate, layout) == (44100, "stereo")
    for channel, freq in ((0, 300), (1, 500)):
        spectrum = np.abs(np.fft.rfft(planes[channel, :32768] * np.hanning(32768)))
        assert abs(np.fft.rfftfreq(32768, 1 / rate)[np.argmax(spectrum)] - freq) < 3


def test_live_speech_puts_120_ms_of_silence_before_the_first_window(pipe):
    """The stream drops its first 3 frames: the first window's silence falls there, and no speech is lost."""
    speech = LiveSpeech(pipe.audio_encoder)
    wave_ = load_audio(SPEECH)
    speech.push(wave_[:16000])
    speech.block(0, 12)
    first = speech.window(0)
    assert (first.speech_start, first.speech_samples) == (0, 5760)  # 0.36 s of speech after 0.12 s of silence
    assert not first.samples[:1920].any() and np.array_equal(first.samples[1920:], wave_[:5760])
    speech.block(1, 12)
    second = speech.window(1)
    assert (second.speech_start, second.speech_samples) == (5760, 7680)
    assert np.array_equal(second.samples, wave_[5760 : 5760 + 7680])
    speech.close()


def test_live_session_sound_track_has_every_pushed_sample(pipe):
    session = LiveSession(SessionOptions(FACE, size=SIZE))
    events = []

    def collect(event):
        events.append(event)
        if isinstance(event, BlockPublished) and event.info.index == 3:
            session.close()

    session.subscribe(collect)
    rng = np.random.default_rng(3)
    pushed = np.convolve(rng.normal(0, 0.2, 16000), np.ones(8) / 8, "same").astype(np.float32)  # 1 s, below 2 kHz
    session.push(pushed)
    session.run(pipe)
    data = b"".join(e.data for e in events)
    with av.open(io.BytesIO(data)) as container:
        rate = container.streams.audio[0].codec_context.sample_rate
        sound = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    assert rate == 16000
    # The sound starts with the first pushed sample (frame 0 shows it), not 120 ms into it.
    scores = [np.dot(sound[:4000], pushed[d : d + 4000]) for d in range(0, 2500)]
    assert int(np.argmax(scores)) == 0
    assert np.corrcoef(sound[:4000], pushed[:4000])[0, 1] > 0.9


def test_live_muxer_fragments_keyframes_and_late_join():
    muxer = LiveMP4Muxer(64, 64)
    rng = np.random.default_rng(0)
    output, keyframes, first_frames = b"", [], []
    for b, n in enumerate([9, 12, 12, 12]):
        first_frames.append(muxer.frames)
        data, keyframe_at = muxer.write_block(rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
                                              np.zeros(n * 640, np.float32))
        output += data
        keyframes.append(keyframe_at)
        assert len(output) >= keyframe_at and muxer.frames - 1 <= len(output)  # the block left the muxer
    output += muxer.close()
    init = output[: init_segment_length(output)]
    assert mime_type(init).startswith('video/mp4; codecs="avc1.') and mime_type(init).endswith(', mp4a.40.2"')
    assert all(output[k + 4 : k + 8] == b"moof" for k in keyframes[1:])
    with av.open(io.BytesIO(output)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 45 and [i for i, f in enumerate(frames) if f.key_frame] == first_frames
    with av.open(io.BytesIO(init + output[keyframes[2] :])) as container:  # a viewer joining at block 2
        assert len(list(container.decode(video=0))) == 24


# ------------------------------------------------------------------------------------------- text in (TTS)
requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="eSpeak NG is not installed")
TEXT = "Hello there. I am a talking avatar, and I read what you type."


def submit_text(client, **form):
    with FACE.open("rb") as image:
        return client.post("/jobs", files={"image": ("face.png", image)}, data={k: str(v) for k, v in form.items()})


@requires_espeak
def test_job_from_text_speaks_it(server):
    client, _, work_dir = server
    r = submit_text(client, text=TEXT, voice="en-us", tts="espeak")
    assert r.status_code == 202, r.text
    job = r.json()
    status = wait_until(lambda: (s := client.get(f"/jobs/{job['id']}").json())["state"] in ("done", "failed") and s,
                        "the text job to finish")
    assert status["state"] == "done", status
    (work_dir / "text.mp4").write_bytes(client.get(job["links"]["video"]).content)
    frames, *_ = read_video(work_dir / "text.mp4")
    speech = to_speech_rate(tts.synthesize(TEXT, "espeak", "en-us"))
    assert len(frames) == -(-len(speech) // 640), "the video covers the speech and ends with it"
    audio = load_audio(work_dir / "text.mp4")  # the sound track at 16 kHz: the whole speech, from its first sample
    assert abs(len(audio) - len(speech)) < 0.05 * 16000
    n = min(len(audio), len(speech))
    assert np.corrcoef(audio[:n], speech[:n])[0, 1] > 0.95, "the video's sound is the synthesised text"
    assert {p.name for p in (work_dir / "jobs" / job["id"]).iterdir()} == {"output.mp4"}


@requires_espeak
def test_text_job_errors_name_the_field(server):
    client, worker, work_dir = server
    cases = [
        (dict(text="  \n"), 400, "text: the text to speak is empty"),
        (dict(text="x" * 5001), 400, "text: the text is 5001 characters long; the limit is 5000"),
        (dict(text="Hi.", voice="xx-nowhere"), 400, "voice: unknown espeak voice 'xx-nowhere': pick a language like"),
        (dict(text="Hi.", tts="festival"), 400, "tts: unknown speech engine 'festival': pick one of espeak, piper"),
    ]
    for form, code, detail in cases:
        r = submit_text(client, **form)
        assert r.status_code == code and r.json()["detail"].startswith(detail), (form, r.text)
    with FACE.open("rb") as image, SPEECH.open("rb") as audio:
        r = client.post("/jobs", files={"image": ("face.png", image), "audio": ("speech.wav", audio)}, data={"text": "Hi."})
    assert r.status_code == 400 and r.json()["detail"] == "audio and text: give one of them (a speech file, or words to speak)"
    r = submit(client, voice="de")
    assert r.status_code == 400 and r.json()["detail"].startswith("voice: only used with text")
    for form in ({}, {"text": ""}):  # an empty form field is no field
        r = submit_text(client, **form)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "audio"]
        assert r.json()["detail"][0]["msg"] == "Field required: upload speech (audio) or give words to speak (text)"
    schema = client.get("/openapi.json").json()
    assert {"text", "voice", "tts"} <= set(schema["components"]["schemas"]["Body_submit_job_jobs_post"]["properties"])
    assert {p.name for p in (work_dir / "jobs").iterdir()} <= set(worker.tasks), "refused requests leave no folder"


@requires_espeak
def test_live_session_speaks_text_messages(server):
    client, _, _ = server
    r = client.post("/sessions", files={"image": ("face.png", FACE.read_bytes())},
                    data={"size": SIZE, "voice": "en-us"})
    assert r.status_code == 201, r.text
    session = r.json()
    url = client.base_url.copy_with(scheme="ws", path=session["links"]["ws"])
    blocks, video, said, sentences, errors, end = [], bytearray(), [], None, [], None
    with connect(str(url), max_size=None) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session"
        ws.send("not json")
        ws.send(json.dumps({"type": "text", "text": "   "}))
        ws.send(json.dumps({"type": "text", "text": 42}))
        ws.send(json.dumps({"type": "text", "text": TEXT}))
        for _ in range(3000):  # bounded: each message is one event or one piece of video
            message = ws.recv(timeout=60)
            if isinstance(message, bytes):
                video += message
                continue
            event = json.loads(message)
            if event["type"] == "error":
                errors.append(event["detail"])
            elif event["type"] == "text":
                sentences = event["sentences"]
            elif event["type"] == "speech":
                said.append(event)
            elif event["type"] == "block":
                blocks.append(event)
                total = sum(s["speech_samples"] for s in said)
                if sentences and len(said) == len(sentences) and blocks[-1]["speech_end"] == total \
                        and len(blocks) >= 3 and all(b["speech_samples"] == 0 for b in blocks[-2:]):
                    ws.send(json.dumps({"type": "close"}))
            elif event["type"] == "end":
                end = event
                break
    assert end == {"type": "end", "error": None}
    assert errors[0].startswith("text messages are JSON objects") and errors[1] == "the text to speak is empty"
    assert errors[2] == "text: expected a string, got int" and len(errors) == 3
    assert sentences == ["Hello there.", "I am a talking avatar, and I read what you type."]
    assert [s["text"] for s in said] == sentences
    assert [s["speech_start"] for s in said] == [0, said[0]["speech_samples"]]
    # The avatar spoke the text: blocks driven by its speech (not idle), all of it, in order; then it idled.
    speech = np.concatenate([to_speech_rate(tts.synthesize(s, "espeak", "en-us")) for s in sentences])
    assert sum(s["speech_samples"] for s in said) == len(speech)
    # (A session behind real time, as on a busy CPU, shortens the pause between the sentences: `dropped`.)
    speaking = [b for b in blocks if b["speech_samples"]]
    assert sum(b["speech_samples"] + b["dropped_samples"] for b in blocks) == len(speech)
    assert len(speaking) >= (len(speech) - sum(b["dropped_samples"] for b in blocks)) // 7680
    assert blocks[-1]["speech_samples"] == 0
    # The session's video carries that speech where the blocks say (each block: silence it was padded with, then
    # its share of the speech; the first 3 frames' sound is dropped with them).
    expected = np.concatenate([np.concatenate([np.zeros(b["padded_samples"], np.float32), spoken(b, speech)])
                               for b in blocks])[3 * 640:]
    with av.open(io.BytesIO(bytes(video))) as container:
        sound = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
    n = min(len(sound), len(expected))
    assert n > len(speech) and np.corrcoef(sound[:n], expected[:n])[0, 1] > 0.9


def spoken(block: dict, pushed: np.ndarray) -> np.ndarray:
    """The pushed samples a block spoke: its range less the silence it dropped."""
    keep = np.ones(block["speech_end"] - block["speech_start"], bool)
    for start, end in block["dropped"]:
        keep[start - block["speech_start"] : end - block["speech_start"]] = False
    return pushed[block["speech_start"] : block["speech_end"]][keep]


def test_session_voice_is_checked_at_creation(server):
    client, _, _ = server
    r = client.post("/sessions", files={"image": ("face.png", FACE.read_bytes())}, data={"size": SIZE, "tts": "nope"})
    assert r.status_code == 400 and r.json()["detail"].startswith("tts: unknown speech engine 'nope'")


# ------------------------------------------------------------------------------------------- real time
@pytest.fixture
def measured(server, monkeypatch):
    """The server's speed table as if measured: 128*128 too slow for real time, 64*64 fast enough."""
    from liveavatar.engine.realtime import SpeedTable

    _, worker, _ = server
    realtime = worker.realtime
    monkeypatch.setattr(realtime, "table", SpeedTable(None, realtime.table.machine))
    monkeypatch.setattr(realtime, "sizes", ("128*128", "64*64"))
    realtime.table.record("128*128", 4, 5.0, 8, "calibration")
    realtime.table.record("64*64", 4, 40.0, 8, "calibration")
    return realtime


def new_session(client, **form):
    return client.post("/sessions", files={"image": ("face.png", FACE.read_bytes())}, data={k: str(v) for k, v in form.items()})


def test_capabilities_and_health_show_the_measured_speeds_and_the_preset(server, measured):
    client, _, _ = server
    caps = client.get("/capabilities").json()
    assert caps["device"] == "cpu" and caps["needed_fps"] == 27.5 and caps["video_fps"] == 25
    assert [(r["size"], r["sample_steps"], r["fps"], r["keeps_up"]) for r in caps["speeds"]] == [
        ("128*128", 4, 5.0, False), ("64*64", 4, 40.0, True)]
    assert caps["realtime"]["size"] == "64*64" and caps["realtime"]["sample_steps"] == 4
    assert caps["realtime"]["reason"].startswith("64*64 at 4 steps: 40.0 FPS (1.60x real time), the largest size")
    assert caps["calibration"]["state"] == "off" and caps["speed_table"] is None
    assert client.get("/health").json()["realtime"] == {"size": "64*64", "sample_steps": 4, "fps": 40.0,
                                                        "keeps_up": True, "calibration": "off"}


def test_sessions_refuse_or_downgrade_a_size_that_cannot_keep_up(server, measured):
    client, worker, _ = server
    refused = new_session(client, size=SIZE, on_slow="refuse")
    assert refused.status_code == 409
    body = refused.json()
    assert body["detail"] == ("128*128 at 4 steps makes 5.0 FPS on this machine, below the 27.5 FPS a live session "
                              "needs to keep up (1.1x 25 FPS); the real-time preset here is 64*64 at 4 steps (40.0 FPS): "
                              "ask for it, or for on_slow=downgrade")
    assert body["requested"] == {"size": SIZE, "sample_steps": 4, "fps": 5.0} and body["realtime"]["size"] == "64*64"
    for form, detail in [({"realtime": "true", "size": SIZE}, "size: realtime=true picks the size"),
                         ({"realtime": "true", "sample_steps": 3}, "sample_steps: the real-time preset picks"),
                         ({"on_slow": "hurry"}, "on_slow: one of downgrade, refuse, keep")]:
        r = new_session(client, **form)
        assert r.status_code == 422 and r.json()["detail"].startswith(detail), r.text
    auto = new_session(client, size="auto")
    assert auto.status_code == 201 and auto.json()["plan"]["type"] == "realtime" and auto.json()["plan"]["size"] == "64*64"
    client.post(f"/sessions/{auto.json()['id']}/close")

    # The default policy downgrades, and says so on the WebSocket before the first block, which is at the preset.
    r = new_session(client, size=SIZE)
    assert r.status_code == 201, r.text
    session = r.json()
    assert session["plan"]["type"] == "downgrade" and session["plan"]["requested"]["size"] == SIZE
    assert {"lag_s", "queued_s", "dropped_s", "max_lag_s", "size", "sample_steps", "mime"} <= set(session)
    url = client.base_url.copy_with(scheme="ws", path=session["links"]["ws"])
    events = []
    with connect(str(url), max_size=None) as ws:
        for _ in range(200):
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                continue
            events.append(json.loads(message))
            if events[-1]["type"] == "block":
                break
        status = client.get(f"/sessions/{session['id']}").json()
        ws.send(json.dumps({"type": "close"}))
        for _ in range(200):
            message = ws.recv(timeout=120)
            if isinstance(message, str) and json.loads(message)["type"] == "end":
                break
    assert [e["type"] for e in events] == ["session", "downgrade", "init", "block"]
    assert events[1]["size"] == "64*64" and "downgraded to 64*64 at 4 steps (40.0 FPS)" in events[1]["reason"]
    block = events[-1]
    assert (block["size"], block["sample_steps"]) == ("64*64", 4) and block["lag_s"] >= 0
    assert {"speech_end", "dropped_samples", "dropped", "latency_ms", "speech_media_s"} <= set(block)
    assert status["size"] == "64*64" and status["mime"].startswith('video/mp4; codecs="avc1.') and status["lag_s"] >= 0
    page = client.get(session["links"]["view"])
    assert page.status_code == 200 and "<video" in page.text and "controls" not in page.text
    assert client.get("/sessions/nope/view").status_code == 404
