"""`liveavatar serve` under load and under attack, on loopback with the tiny model (128x128, one clip per job).

50 clients submit 3 jobs each, one after the other, against a queue of 3: every job is either refused with 429
or completes with its own video (its image's size, its own tone in the sound track, frames equal to a solo run);
one job fails after its second block (an injected error) and one in ten is cancelled, and both leave only their
partial video behind; the server keeps serving. Upload names and ids cannot reach files outside a job's folder.
The outcomes are listed in docs/reliability.md."""

import dataclasses
import io
import threading
import time
import uuid
import wave

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CKPT, requires_golden

pytestmark = requires_golden
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_server import serve_in_thread  # noqa: E402

from liveavatar.engine.job import JobSpec, run_job  # noqa: E402
from liveavatar.engine.pipeline import LiveAvatarPipeline  # noqa: E402
from liveavatar.engine.worker import EngineWorker, Task, TaskState  # noqa: E402
from liveavatar.errors import LiveAvatarError  # noqa: E402
from liveavatar.interfaces.server import create_app  # noqa: E402
from liveavatar.media.video import read_video  # noqa: E402

SIZE = "128*128"
CLIENTS = 50
JOBS_PER_CLIENT = 3
MAX_QUEUE = 3
MAX_AUDIO_S = 10
SHAPES = [(128, 128), (64, 128), (128, 64)]  # image (height, width); at 128*128 the video has the same size
POISON = "a job that fails at block 3"
FAIL_AT_BLOCK = 3
POLL_S = 0.2
MAX_WAIT_S = 600  # every wait is bounded: a lost job fails the test instead of hanging it
SR = 16000


class FailingAudio:
    """An audio source whose block FAIL_AT_BLOCK raises, as a model error in the middle of a job would."""

    def __init__(self, source):
        self.source, self.num_clips = source, source.num_clips

    def block(self, k, frames):
        if k == FAIL_AT_BLOCK:
            raise RuntimeError(f"injected failure at block {k}")
        return self.source.block(k, frames)


@pytest.fixture(scope="module")
def pipe():
    pipe = LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)
    prepare = pipe.prepare

    def prepare_failing_on_poison(image, wave_, prompt, *args, **kwargs):
        cond = prepare(image, wave_, prompt, *args, **kwargs)
        return dataclasses.replace(cond, audio=FailingAudio(cond.audio)) if prompt == POISON else cond

    pipe.prepare = prepare_failing_on_poison
    return pipe


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    worker = EngineWorker(pipe, max_queue=MAX_QUEUE)
    work_dir = tmp_path_factory.mktemp("serve")
    app = create_app(worker, work_dir, max_upload_mb=2, default_size=SIZE, max_audio_s=MAX_AUDIO_S)
    with serve_in_thread(app) as url:
        yield url, worker, work_dir
    worker.shutdown()


def image_bytes(client: int) -> bytes:
    height, width = SHAPES[client % len(SHAPES)]
    pixels = np.random.default_rng(client).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def tone_hz(client: int) -> int:
    return 300 + 20 * client


def wav_bytes(freq: float, seconds: float = 1.2) -> bytes:
    samples = 8000 * np.sin(2 * np.pi * freq * np.arange(int(seconds * SR)) / SR)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def submit(http, client: int, seed: int, prompt: str = "A person is talking."):
    return http.post("/jobs", files={"image": ("face.png", image_bytes(client)), "audio": ("voice.wav", wav_bytes(tone_hz(client)))},
                     data={"seed": str(seed), "num_clip": "1", "prompt": prompt})


def wait_finished(http, job_id: str) -> dict:
    for _ in range(int(MAX_WAIT_S / POLL_S)):
        status = http.get(f"/jobs/{job_id}").json()
        if TaskState(status["state"]).finished:
            return status
        time.sleep(POLL_S)
    raise AssertionError(f"job {job_id} never finished")


def run_client(url: str, client: int, start: threading.Barrier, records: list, refusals: list) -> None:
    """Submits JOBS_PER_CLIENT jobs one after the other. Client 7's first job is the failing one, and every tenth
    client cancels its first job at once; those jobs are retried on 429 until taken, so that they happen under load."""
    with httpx.Client(base_url=url, timeout=120) as http:
        start.wait()
        for j in range(JOBS_PER_CLIENT):
            seed = 1000 * client + j
            poison, cancel = client == 7 and j == 0, client % 10 == 3 and j == 0
            for _ in range(int(MAX_WAIT_S / POLL_S)):
                response = submit(http, client, seed, POISON if poison else "A person is talking.")
                if response.status_code != 429 or not (poison or cancel):
                    break
                refusals.append(response)
                time.sleep(POLL_S)
            record = {"client": client, "seed": seed, "poison": poison, "cancel": cancel, "code": response.status_code}
            if response.status_code == 429:
                refusals.append(response)
            elif response.status_code == 202:
                record["id"] = response.json()["id"]
                if record["cancel"]:
                    record["cancel_code"] = http.post(f"/jobs/{record['id']}/cancel").status_code
                record["status"] = wait_finished(http, record["id"])
                if record["status"]["state"] == "done":
                    record["video"] = http.get(f"/jobs/{record['id']}/video").content
                elif record["status"].get("progress"):  # stopped after some blocks: the partial video plays
                    record["partial"] = http.get(f"/jobs/{record['id']}/live").content
            records.append(record)


def test_fifty_clients_every_job_done_or_refused_none_lost_or_mixed_up(server, pipe, tmp_path):
    url, worker, work_dir = server
    records, refusals = [], []
    start = threading.Barrier(CLIENTS)
    clients = [threading.Thread(target=run_client, args=(url, i, start, records, refusals)) for i in range(CLIENTS)]
    t0 = time.perf_counter()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(MAX_WAIT_S)
    assert not any(thread.is_alive() for thread in clients), "a client hung"
    elapsed = time.perf_counter() - t0

    # Every submission got an answer: accepted or refused, nothing else, and every client's jobs are accounted for.
    assert len(records) == CLIENTS * JOBS_PER_CLIENT
    assert {r["code"] for r in records} <= {202, 429}
    for refused in refusals:
        assert refused.status_code == 429 and refused.headers["retry-after"] == "10"
        assert refused.json()["detail"].startswith(f"the queue is full ({MAX_QUEUE} requests waiting)")
    accepted = [r for r in records if r["code"] == 202]
    assert len({r["id"] for r in accepted}) == len(accepted)
    done = [r for r in accepted if r["status"]["state"] == "done"]
    print(f"\nload: {len(records)} jobs from {CLIENTS} clients in {elapsed:.0f} s: {len(accepted)} accepted "
          f"({len(done)} done), {len(refusals)} refusals with 429")
    assert len(done) >= 4 and len(refusals) >= CLIENTS  # the load took both paths, many times

    # Each finished job ended the way its client asked for, and a done job's video is made of its own inputs.
    for r in accepted:
        state = r["status"]["state"]
        if r["poison"]:
            assert state == "failed" and r["status"]["error"] == f"RuntimeError: injected failure at block {FAIL_AT_BLOCK}"
            frames, *_ = read_video_bytes(r["partial"], tmp_path)
            # Block k + 1 is denoised before block k is decoded: blocks 0 .. FAIL_AT_BLOCK - 2 were written, and play.
            assert len(frames) == 9 + 12 * (FAIL_AT_BLOCK - 2)
        elif r["cancel"]:
            assert r["cancel_code"] == 200 and state == "cancelled"
        else:
            assert state == "done", r["status"]
            height, width = SHAPES[r["client"] % len(SHAPES)]
            frames, fps, audio, rate = read_video_bytes(r["video"], tmp_path)
            assert frames.shape == (45, height, width, 3) and fps == 25
            assert r["status"]["result"]["frames"] == 45
            assert abs(peak_frequency(audio, rate) - tone_hz(r["client"])) < 3, "another client's sound track"
    assert sum(r["poison"] for r in accepted) == 1 and sum(r["cancel"] for r in accepted) == CLIENTS // 10

    # Frame for frame what the same inputs give alone, for the first two done jobs.
    for r in sorted(done, key=lambda r: r["client"])[:2]:
        (tmp_path / "image").write_bytes(image_bytes(r["client"]))
        (tmp_path / "audio").write_bytes(wav_bytes(tone_hz(r["client"])))
        spec = JobSpec(tmp_path / "image", tmp_path / "audio", "A person is talking.", tmp_path / f"solo{r['client']}.mp4",
                       size=SIZE, num_clip=1, seed=r["seed"])
        list(run_job(pipe, spec))
        solo, *_ = read_video(spec.output)
        served, *_ = read_video_bytes(r["video"], tmp_path)
        assert np.array_equal(served, solo)

    # Nothing is left running or queued, and each job's folder holds its video only (inputs, resume states gone).
    health = httpx.get(f"{url}/health").json()
    assert health["queued"] == 0 and health["running"] is None
    assert all(task.state.finished for task in worker.tasks.values())
    expected = {}
    for r in accepted:
        if r["status"]["state"] == "done":
            expected[r["id"]] = {"output.mp4"}
        elif r["status"].get("progress"):
            expected[r["id"]] = {"output.mp4.partial"}
    assert {p.name: {f.name for f in p.iterdir()} for p in (work_dir / "jobs").iterdir()} == expected


def read_video_bytes(data: bytes, folder):
    path = folder / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(data)
    try:
        return read_video(path)
    finally:
        path.unlink()


def test_the_server_serves_on_after_a_failed_job(server):
    url, worker, _ = server
    with httpx.Client(base_url=url, timeout=120) as http:
        failed = submit(http, 1, 5, POISON).json()
        ok = submit(http, 2, 6).json()
        assert wait_finished(http, failed["id"])["state"] == "failed"
        status = wait_finished(http, ok["id"])
        assert status["state"] == "done" and status["result"]["frames"] == 45
        assert status["started"] >= http.get(f"/jobs/{failed['id']}").json()["finished"]
        assert http.get("/health").json()["running"] is None


def test_a_cancelled_queued_job_frees_its_slot_and_its_files(server):
    url, worker, work_dir = server
    with httpx.Client(base_url=url, timeout=120) as http:
        jobs = [submit(http, i, i) for i in range(MAX_QUEUE + 1)]  # one runs, MAX_QUEUE wait
        assert [r.status_code for r in jobs] == [202] * (MAX_QUEUE + 1)
        assert submit(http, 9, 9).status_code == 429
        waiting = jobs[-1].json()["id"]
        assert (work_dir / "jobs" / waiting / "image").exists()
        assert http.post(f"/jobs/{waiting}/cancel").json()["state"] == "cancelled"
        assert not (work_dir / "jobs" / waiting).exists()
        again = submit(http, 9, 9)
        assert again.status_code == 202  # the slot is free again
        for job_id in [r.json()["id"] for r in jobs[:-1]] + [again.json()["id"]]:
            http.post(f"/jobs/{job_id}/cancel")
            assert wait_finished(http, job_id)["state"] == "cancelled"
        health = http.get("/health").json()
        assert health["queued"] == 0 and health["running"] is None


def multipart(fields: list[tuple[bytes, bytes, bytes | None]]) -> tuple[bytes, str]:
    """A multipart body written byte for byte (name, value, filename): clients escape odd file names, attackers don't."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, value, filename in fields:
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename is not None else b"")
        body += b"--" + boundary.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return body + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def test_upload_names_cannot_write_outside_the_job_folder(server, tmp_path):
    url, worker, work_dir = server
    marker = uuid.uuid4().hex
    names = [f"../../{marker}-up.png", f"{tmp_path}/{marker}-abs.png", f"a\x00{marker}-nul.png", f"..\\..\\{marker}-win.png",
             f"x/../../../{marker}-mixed.png", f"{'../' * 40}tmp/{marker}-deep.png"]
    with httpx.Client(base_url=url, timeout=120) as http:
        for name in names:
            body, content_type = multipart([(b"image", image_bytes(0), name.encode()), (b"audio", wav_bytes(500), name.encode()),
                                            (b"num_clip", b"1", None), (b"prompt", b"caf\xe9", None)])
            response = http.post("/jobs", content=body, headers={"content-type": content_type})
            assert response.status_code == 202, (name, response.text)
            job_id = response.json()["id"]
            assert worker.tasks[job_id].spec.prompt == "caf\xe9"  # a field that is not UTF-8 is read as Latin-1
            assert {f.name for f in (work_dir / "jobs" / job_id).iterdir()} <= {"image", "audio", "output.mp4.partial"}
            http.post(f"/jobs/{job_id}/cancel")
            wait_finished(http, job_id)
        # A bad upload echoes its name in the error, and that is all it does with it.
        body, content_type = multipart([(b"image", b"not an image", b"../../etc/passwd"), (b"audio", wav_bytes(500), b"a.wav")])
        response = http.post("/jobs", content=body, headers={"content-type": content_type})
        assert response.status_code == 400 and response.json()["detail"].startswith("image (../../etc/passwd): not an image file")
    for root in (tmp_path, work_dir.parent, work_dir.parent.parent):
        assert not [p for p in root.rglob(f"*{marker}*")], "an upload name was used as a path"


def test_ids_are_the_only_way_to_a_job(server):
    url, worker, _ = server
    with httpx.Client(base_url=url, timeout=120) as http:
        job = submit(http, 3, 3).json()["id"]
        http.post(f"/jobs/{job}/cancel")
        wait_finished(http, job)
        session = http.post("/sessions", files={"image": ("face.png", image_bytes(0))}, data={"size": SIZE}).json()["id"]
        http.post(f"/sessions/{session}/close")
        assert http.get(f"/jobs/{job}").status_code == 200
        assert http.get("/jobs").status_code == 405  # there is no list of jobs to find others' ids in
        for path in [f"/jobs/{uuid.uuid4().hex}", f"/jobs/{uuid.uuid4().hex}/video", f"/jobs/{session}/video",
                     f"/sessions/{job}", f"/jobs/{job}%2F..%2F{session}", "/jobs/..%2F..%2Fetc%2Fpasswd/video",
                     "/jobs/%2e%2e/video", "/jobs/not-a-uuid/live", "/static/..%2F..%2Finterfaces%2Fserver.py",
                     "/static/%2e%2e/server.py"]:
            assert http.get(path).status_code == 404, path
        assert http.post(f"/jobs/{session}/cancel").status_code == 404


def test_huge_and_overlong_uploads_are_refused_and_not_kept(server):
    url, worker, work_dir = server
    before = set((work_dir / "jobs").iterdir())
    with httpx.Client(base_url=url, timeout=120) as http:
        body, content_type = multipart([(b"image", b"\0" * (3 * 2**20), b"big.png")])

        def chunks():  # streamed without a Content-Length: the server counts the bytes as they arrive
            for i in range(0, len(body), 2**16):
                yield body[i : i + 2**16]

        response = http.post("/jobs", content=chunks(), headers={"content-type": content_type})
        assert response.status_code == 413 and "limited to 2 MB" in response.json()["detail"]
        response = http.post("/jobs", files={"image": ("face.png", image_bytes(0)), "audio": ("long.wav", wav_bytes(500, 12))})
        assert response.status_code == 400
        assert response.json()["detail"] == f"audio (long.wav): audio is too long: 12.0 s, the limit is {MAX_AUDIO_S} s: long.wav"
        assert submit(http, 0, -1).status_code == 422 and submit(http, 0, 2**63).status_code == 422
    assert set((work_dir / "jobs").iterdir()) == before


def test_a_work_folder_link_leading_elsewhere_is_refused(pipe, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "jobs").symlink_to(tmp_path / "elsewhere")
    worker = EngineWorker(pipe)
    try:
        with pytest.raises(LiveAvatarError, match=r"work/jobs: leads out of the work folder \(to .*elsewhere\)"):
            create_app(worker, tmp_path / "work")
    finally:
        worker.shutdown()


@dataclasses.dataclass
class _MakeVideo(Task):
    """A task that writes its "video" at once (no model work)."""

    def run(self, pipe) -> bool:
        (self.folder / "video").write_bytes(b"v")
        return True

    def kept_files(self):
        return {self.folder / "video"}


def test_forgotten_tasks_take_their_folders_with_them(pipe, tmp_path):
    worker = EngineWorker(pipe, keep_finished=1)
    try:
        folders = [tmp_path / name for name in ("first", "second")]
        for folder in folders:
            folder.mkdir()
            (folder / "image").write_bytes(b"x")
            task = worker.submit(_MakeVideo(kind="video", folder=folder))
            for _ in range(int(MAX_WAIT_S / POLL_S)):
                if task.state.finished:
                    break
                time.sleep(POLL_S)
        assert list(worker.tasks) == [task.id]
        assert not folders[0].exists()  # forgotten: its folder is gone
        assert [f.name for f in folders[1].iterdir()] == ["video"]  # ended: its input is gone, its video kept
    finally:
        worker.shutdown()
