"""`liveavatar serve`: an HTTP API for generation jobs and live sessions (FastAPI), and a player page.

Jobs (a reference image, a speech file or a text to speak, a prompt and options, as multipart form data; with
several people in the picture, the others' speech as `more_audio` and optionally one `mask` per person, each
field repeated in the order of the people):

    POST /jobs                       submit; 202 with the job's id (429 when the queue is full)
    GET  /jobs/{id}                  state, queue position, progress, result or error
    GET  /jobs/{id}/live             the job's fragmented MP4 while it is written (plays in <video>, ffplay)
    GET  /jobs/{id}/video            the finished MP4
    POST /jobs/{id}/cancel           a queued job never starts, a running one stops after its current block

Live sessions (speech pushed while the avatar is generated, see liveavatar.engine.live):

    POST /sessions                   image + prompt + options (the decoder among them; a size, or realtime=true for
                                     the size this machine keeps up with; on_slow=downgrade|refuse|keep for a size
                                     that cannot, 409 when refused); 201 with the session's id
    WS   /sessions/{id}/ws           push 16 kHz mono s16le PCM (binary) or text to speak (JSON {"type": "text",
                                     "text": ..., "voice": ..., "tts": ...}, spoken sentence by sentence); receive
                                     JSON events (text) and the session's fragmented MP4 (binary); the session
                                     ends when it closes
    GET  /sessions/{id}/video        the session's video for further viewers (from the newest block on)
    GET  /sessions/{id}/view         a page that only plays it, filling the window (a Browser Source for OBS)
    GET  /sessions/{id}              state, lag, the size running, what the session decided
    POST /sessions/{id}/close

    GET /capabilities                what this machine sustains per size and step count, the real-time preset
    GET /health, GET /openapi.json, GET /player (the page)

Every request runs on one engine thread with one model (liveavatar.engine.worker); uploads are kept in the
work folder under generated names and never used by their client-given names. A job's or session's id (a
random UUID, never listed) is what reaches it: no request names a file, and ids are only looked up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from liveavatar import tts
from liveavatar.engine.job import MAX_SEED, JobResult, JobSpec, check_speakers, synthesize_text
from liveavatar.engine.multi_person import Speakers
from liveavatar.engine.live import (LAG_BOUND_S, BlockPublished, LiveBlock, LiveSession, SessionEnded, SessionEvent,
                                   SessionMessage, SessionOptions, SpeechQueueFull, VideoStarted, mime_type)
from liveavatar.engine.realtime import ON_SLOW, Realtime, SpeedTable, machine_name
from liveavatar.engine.worker import EngineWorker, JobTask, QueueFull, SessionTask, TaskState
from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.media import audio as audio_io
from liveavatar.media import image as image_io
from liveavatar.media.video import PARTIAL_SUFFIX
from liveavatar.tts.speaker import TextSpeaker

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
FOLLOW_POLL_S = 0.05  # how often a live MP4 response looks for new bytes
FOLLOW_CHUNK = 1 << 16
SESSION_CONNECT_S = 60.0  # a session whose WebSocket never connects is closed after this
OUTPUT_NAME = "output.mp4"


class UploadTooLarge(HTTPException):
    """Raised while the body is read; an HTTPException, so that FastAPI's form parsing passes it on."""

    def __init__(self, detail: str):
        super().__init__(413, detail)


class UploadLimit:
    """Refuses request bodies over `max_bytes` (413), by Content-Length and by counting what arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self.message()}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise UploadTooLarge(self.message())
            return message

        await self.app(scope, counted, send)

    def message(self) -> str:
        return f"request too large: uploads are limited to {self.max_bytes / 2**20:.0f} MB in all"


def _save_upload(upload: UploadFile, path: Path, field: str) -> None:
    if upload is None or not upload.filename:
        raise HTTPException(400, f"{field}: no file uploaded")
    with path.open("wb") as out:
        shutil.copyfileobj(upload.file, out)


def _check_upload(check, path: Path, upload: UploadFile, field: str) -> None:
    """Runs a loader on a saved upload; its error names the client's file name, not the server's path."""
    try:
        check(path)
    except InputError as e:
        raise HTTPException(400, f"{field} ({upload.filename}): {str(e).replace(str(path), upload.filename)}") from None


def _with_people(spec: JobSpec, audio: UploadFile, more_audio: list[UploadFile], masks: list[UploadFile],
                 folder: Path, max_audio_s: float) -> JobSpec:
    """A job's spec with several people (multi-person mode): the uploads saved and checked, and the masks (or
    the faces found) checked against the speech tracks; errors name the client's files."""
    tracks, track_uploads = [spec.audio], [audio]
    for i, upload in enumerate(more_audio):
        path = folder / f"audio{i + 2}"
        _save_upload(upload, path, f"more_audio #{i + 1}")
        _check_upload(lambda p: audio_io.load_audio(p, max_seconds=max_audio_s), path, upload, f"more_audio #{i + 1}")
        tracks.append(path)
        track_uploads.append(upload)
    mask_paths = None
    if masks:
        mask_paths = []
        for i, upload in enumerate(masks):
            path = folder / f"mask{i + 1}"
            _save_upload(upload, path, f"mask #{i + 1}")
            mask_paths.append(path)
    spec = dataclasses.replace(spec, speakers=Speakers(tuple(tracks), None if mask_paths is None else tuple(mask_paths)))
    img = image_io.load_image(spec.image)
    height, width = image_io.output_size(img.height, img.width, image_io.parse_size(spec.size))
    try:
        check_speakers(spec, height, width)
    except InputError as e:
        message = str(e)
        names = [(spec.image, "the image")] + list(zip(tracks, (u.filename for u in track_uploads)))
        names += list(zip(mask_paths or [], (u.filename for u in masks)))
        for path, name in sorted(names, key=lambda pn: -len(str(pn[0]))):  # audio10 before audio1
            message = message.replace(str(path), name or path.name)
        raise HTTPException(400, message) from None
    return spec


def _check_tts(text: str | None, engine: str | None, voice: str | None, limit: int | None) -> tuple[str | None, str | None]:
    """Checks a request's text (unless None), engine and voice without synthesising; 400 names the field."""
    engine, voice = engine or None, voice or None
    if text is not None:
        try:
            tts.check_text(text, limit)
        except tts.TTSError as e:
            raise HTTPException(400, f"text: {e}") from None
    try:
        chosen = tts.get_engine(engine)
    except tts.TTSError as e:
        raise HTTPException(400, f"tts: {e}") from None
    try:
        voice = chosen.check_voice(voice) if voice is not None else None
    except tts.TTSError as e:
        raise HTTPException(400, f"voice: {e}") from None
    return engine, voice


def _check_size(size: str) -> None:
    try:
        image_io.parse_size(size)
    except InputError as e:
        raise HTTPException(422, f"size: {e}") from None


@contextmanager
def _removed_on_failure(folder: Path):
    """A request's folder goes if the request is not taken; a full queue answers 429."""
    try:
        yield
    except QueueFull as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise HTTPException(429, str(e), headers={"Retry-After": "10"}) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _check_steps(worker: EngineWorker, sample_steps: int) -> None:
    fixed = worker.pipe.fixed_sample_steps
    if fixed is not None and sample_steps != fixed:
        raise HTTPException(422, f"sample_steps: this server's multi-GPU pipeline runs {fixed} steps, not {sample_steps}")


def _check_decoder(worker: EngineWorker, decoder: str | None) -> None:
    if decoder is not None and decoder not in worker.pipe.decoders:
        raise HTTPException(422, f"decoder: {decoder!r} is not loaded in this server (it has "
                                 f"{', '.join(worker.pipe.decoders)}; start it with --decoder {decoder} for that one)")


def _task(worker: EngineWorker, task_id: str, kind: type, noun: str):
    """The worker's task of that id and kind, or 404."""
    task = worker.tasks.get(task_id)
    if not isinstance(task, kind):
        raise HTTPException(404, f"no {noun} {task_id}")
    return task


def _job_view(worker: EngineWorker, task: JobTask) -> dict:
    # Errors name the job's files by their own names, not by the server's folders.
    error = task.error.replace(f"{task.spec.output.parent}/", "") if task.error else None
    view = {
        "id": task.id, "state": task.state, "position": worker.position(task), "error": error,
        "submitted": task.submitted, "started": task.started, "finished": task.finished,
        "links": {"self": f"/jobs/{task.id}", "live": f"/jobs/{task.id}/live", "video": f"/jobs/{task.id}/video"},
    }
    if task.progress is not None:
        p = task.progress
        view["progress"] = {"blocks_done": p.blocks_done, "blocks_total": p.blocks_total, "frames_done": p.frames_done,
                            "frames_total": p.frames_total, "elapsed_s": round(p.elapsed_s, 3)}
        if p.notices:
            view["notices"] = list(p.notices)
    if task.first_block_s is not None:
        view["first_block_s"] = round(task.first_block_s, 3)
    if task.result is not None:
        r: JobResult = task.result
        view["result"] = {"frames": r.frames, "clips": r.clips, "width": r.width, "height": r.height,
                          "seconds": round(r.seconds, 3), "generation_fps": round(r.generation_fps, 3),
                          "first_frame_s": round(r.first_frame_s, 3), "notices": r.notices}
    return view


def _session_view(worker: EngineWorker, task: SessionTask) -> dict:
    session = task.session
    return {
        "id": task.id, "state": task.state, "position": worker.position(task), "error": task.error,
        "blocks_done": session.blocks_done,
        "links": {"ws": f"/sessions/{task.id}/ws", "video": f"/sessions/{task.id}/video",
                  "view": f"/sessions/{task.id}/view"},
        # The MIME type with codecs, once the video has begun (what Media Source Extensions need).
        "mime": mime_type(session.init_segment) if session.init_segment else None,
        **session.status(),
    }


async def _follow_file(task: JobTask, output: Path):
    """The job's MP4 from its first byte, following the partial file as it grows, until the job ends."""
    partial = Path(str(output) + PARTIAL_SUFFIX)
    handle = None
    while handle is None:
        for path in (partial, output):  # the partial file becomes the output at the end
            try:
                handle = path.open("rb")
                break
            except FileNotFoundError:
                continue
        if handle is None:
            if task.state.finished:
                return
            await asyncio.sleep(FOLLOW_POLL_S)
    with handle:
        while True:
            chunk = handle.read(FOLLOW_CHUNK)
            if chunk:
                yield chunk
                continue
            if task.state.finished:
                while chunk := handle.read(FOLLOW_CHUNK):  # what was written before the end was seen
                    yield chunk
                return
            await asyncio.sleep(FOLLOW_POLL_S)


@dataclass(frozen=True)
class SpeakerEvent:
    """What a session's text speaker reports (liveavatar.tts.speaker): a sentence queued, or one it could not
    synthesise; a JSON event for the client, sent among the session's own."""

    message: dict


def _subscribe_async(session: LiveSession) -> tuple[asyncio.Queue, object]:
    """An asyncio queue that receives the session's events (they come from the engine thread)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def deliver(event: SessionEvent):
        loop.call_soon_threadsafe(events.put_nowait, event)

    session.subscribe(deliver)
    return events, deliver


def _block_json(info: LiveBlock) -> str:
    return json.dumps({"type": "block", **info.__dict__})


def create_app(worker: EngineWorker, work_dir: Path, max_upload_mb: float = 50, default_size: str = "704*384",
               max_audio_s: float = 600, realtime: Realtime | None = None) -> FastAPI:
    """realtime: the speeds this machine sustains and the real-time preset (default: measured from this
    service's own jobs and sessions, kept in memory); the worker's measurements go to it."""
    work_dir = Path(work_dir).resolve()
    if realtime is None:
        realtime = worker.realtime or Realtime(SpeedTable(None, machine_name(worker.pipe)),
                                               fixed_steps=worker.pipe.fixed_sample_steps)
    if worker.realtime is None:
        worker.realtime = realtime
    for name in ("jobs", "sessions"):
        folder = work_dir / name
        folder.mkdir(exist_ok=True)
        # Uploads go below these folders: a link planted there must not take them (or deletions) elsewhere.
        if folder.resolve() != folder:
            raise LiveAvatarError(f"{folder}: leads out of the work folder (to {folder.resolve()}); remove it or "
                                  f"choose another --work_dir")
    app = FastAPI(
        title="liveavatar",
        description="Talking-avatar video from an image, speech and a prompt: jobs, live output and live sessions.",
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; /openapi.json is served
    )
    app.state.worker = worker
    app.state.realtime = realtime

    @app.get("/health")
    def health() -> dict:
        running = worker.running
        return {"status": "ok", "device": str(worker.pipe.device), "queued": worker.queued,
                "max_queue": worker.max_queue, "running": running.id if running else None,
                "decoder": worker.pipe.decoder_name, "decoders": list(worker.pipe.decoders),
                "realtime": realtime.summary()}

    @app.get("/capabilities")
    def capabilities() -> dict:
        """What this machine sustains per size and step count (measured: the start-up calibration, jobs and
        sessions), the FPS a live session needs, and the real-time preset with the reason it was picked."""
        return {"device": str(worker.pipe.device), **realtime.capabilities()}

    # ------------------------------------------------------------------ jobs
    @app.post("/jobs", status_code=202)
    def submit_job(
        image: UploadFile = File(..., description="reference image (PNG, JPEG, WebP, ...)"),
        audio: UploadFile | None = File(None, description="speech: wav, mp3, flac, m4a, ogg, ... (or text)"),
        text: str | None = Form(None, description=f"words to speak instead of an audio upload (at most "
                                f"{tts.MAX_TEXT_CHARS} characters)"),
        voice: str | None = Form(None, description="with text: the voice (e.g. en-us, de; a Piper voice name)"),
        tts_engine: str | None = Form(None, alias="tts", description="with text: the speech engine (espeak, piper)"),
        prompt: str = Form("A person is talking."),
        size: str = Form(default_size, description="pixel budget W*H, e.g. 704*384 or 384*256"),
        num_clip: int | None = Form(None, ge=1, description="clips of 48 frames (default: cover the audio)"),
        sample_steps: int = Form(4, ge=1, le=50),
        seed: int = Form(42, ge=0, le=MAX_SEED),
        trim_silence: bool = Form(False),
        normalize_loudness: bool = Form(False),
        more_audio: list[UploadFile] = File([], description="several people in the picture: the speech of the 2nd, "
                                             "3rd, ... person (repeat the field); `audio` is the 1st person's"),
        mask: list[UploadFile] = File([], description="several people: one mask image per person, in the order of "
                                      "their speech (repeat the field): the image's size, white = that person. "
                                      "None: the people are found by their faces, numbered left to right"),
    ) -> dict:
        _check_size(size)
        _check_steps(worker, sample_steps)
        has_audio = audio is not None and bool(audio.filename)
        if has_audio and text is not None:
            raise HTTPException(400, "audio and text: give one of them (a speech file, or words to speak)")
        if not has_audio and text is None:  # as FastAPI reports a missing field
            raise HTTPException(422, [{"type": "missing", "loc": ["body", "audio"], "input": None,
                                       "msg": "Field required: upload speech (audio) or give words to speak (text)"}])
        if text is None and (voice or tts_engine):
            raise HTTPException(400, f"{'voice' if voice else 'tts'}: only used with text (the speech is the upload)")
        if text is not None:
            tts_engine, voice = _check_tts(text, tts_engine, voice, tts.MAX_TEXT_CHARS)
        job_id = uuid.uuid4().hex
        folder = work_dir / "jobs" / job_id
        folder.mkdir(parents=True)
        with _removed_on_failure(folder):
            image_path, audio_path = folder / "image", folder / ("audio" if text is None else "speech.wav")
            _save_upload(image, image_path, "image")
            _check_upload(image_io.load_image, image_path, image, "image")
            if text is None:
                _save_upload(audio, audio_path, "audio")
                _check_upload(lambda path: audio_io.load_audio(path, max_seconds=max_audio_s), audio_path, audio, "audio")
            spec = JobSpec(image=image_path, audio=audio_path, prompt=prompt, output=folder / OUTPUT_NAME, size=size,
                           num_clip=num_clip, sample_steps=sample_steps, seed=seed, trim_silence=trim_silence,
                           normalize_loudness=normalize_loudness, max_audio_s=max_audio_s, text=text, voice=voice,
                           tts=tts_engine)
            if text is not None:  # synthesised here, so that speech too long for the job is refused at once
                try:
                    synthesize_text(spec)
                    audio_io.load_audio(audio_path, max_seconds=max_audio_s)
                except InputError as e:
                    raise HTTPException(400, f"text: {str(e).replace(str(audio_path), 'the synthesised speech')}") from None
            if more_audio or mask:
                if text is not None:
                    raise HTTPException(400, "more_audio, mask: several people need a speech upload each (a text "
                                             "speaks for one person)")
                spec = _with_people(spec, audio, more_audio, mask, folder, max_audio_s)
            task = worker.submit(JobTask(kind="job", id=job_id, spec=spec, folder=folder))
        return _job_view(worker, task)

    def job(job_id: str) -> JobTask:
        return _task(worker, job_id, JobTask, "job")

    @app.get("/jobs/{job_id}")
    def job_status(job_id: str) -> dict:
        return _job_view(worker, job(job_id))

    @app.get("/jobs/{job_id}/video", response_class=FileResponse)
    def job_video(job_id: str):
        task = job(job_id)
        if task.state != TaskState.DONE:
            hint = f": {task.error}" if task.error else " (its live output is at /jobs/{id}/live)".format(id=job_id)
            raise HTTPException(409, f"job {job_id} is {task.state}{hint}")
        return FileResponse(task.spec.output, media_type="video/mp4", filename=f"liveavatar-{job_id}.mp4")

    @app.get("/jobs/{job_id}/live", response_class=StreamingResponse)
    def job_live(job_id: str):
        task = job(job_id)
        if task.state in (TaskState.FAILED, TaskState.CANCELLED) and task.progress is None:
            raise HTTPException(409, f"job {job_id} is {task.state} and produced no video" +
                                (f": {task.error}" if task.error else ""))
        return StreamingResponse(_follow_file(task, task.spec.output), media_type="video/mp4",
                                 headers={"Cache-Control": "no-store"})

    @app.post("/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> dict:
        task = job(job_id)
        if task.state.finished:
            raise HTTPException(409, f"job {job_id} is already {task.state}")
        worker.cancel(task)
        return _job_view(worker, task)

    # ------------------------------------------------------------------ live sessions
    session_voices: dict[str, tuple[str | None, str | None]] = {}  # id -> the engine and voice of its text messages

    @app.post("/sessions", status_code=201)
    async def create_session(
        image: UploadFile = File(..., description="reference image"),
        prompt: str = Form("A person is talking."),
        size: str | None = Form(None, description="pixel budget W*H, or 'auto' (as realtime=true); default: 'auto' "
                                "if the server runs with --realtime, else 384*256"),
        sample_steps: int | None = Form(None, ge=1, le=50, description="default 4 (with realtime: the preset's)"),
        realtime: bool = Form(False, description="run the largest size, then the most steps (4, then 3), that this "
                              "machine makes at 1.1x real time or faster (see /capabilities)"),
        on_slow: str = Form("downgrade", description="a size measured too slow for real time: 'downgrade' to the real-time "
                            "preset (and step down while running if it falls behind with speech queued), 'refuse' "
                            "(409 with the numbers), 'keep' (run it; the lag shows)"),
        max_lag_s: float = Form(LAG_BOUND_S, gt=0, le=30, description="the lag (s) past which the session catches up"),
        seed: int = Form(42, ge=0, le=MAX_SEED),
        rolling_sink: bool = Form(True, description="after the first clip, the first generated frame becomes the reference"),
        voice: str | None = Form(None, description="the voice of text messages (default: the engine's own)"),
        tts_engine: str | None = Form(None, alias="tts", description="the speech engine of text messages (espeak, piper)"),
        decoder: str | None = Form(None, description="what makes the frames: 'wan' (the Wan2.1 VAE) or 'taew2_1' (the "
                                   "light decoder, if the server was started with --decoder taew2_1); default: the "
                                   "server's --decoder (see /health)"),
    ) -> dict:
        auto = size is not None and size.strip().lower() == "auto"
        if (realtime or auto) and sample_steps is not None:
            raise HTTPException(422, "sample_steps: the real-time preset picks the step count (leave it out)")
        if realtime and size is not None and not auto:
            raise HTTPException(422, f"size: realtime=true picks the size (leave it out, or give 'auto'), not {size!r}")
        if on_slow not in ON_SLOW:
            raise HTTPException(422, f"on_slow: one of {', '.join(ON_SLOW)}, not {on_slow!r}")
        realtime = realtime or auto or (size is None and app.state.realtime.default)
        size = None if realtime else (size or "384*256")
        sample_steps = 4 if sample_steps is None else sample_steps
        if size is not None:
            _check_size(size)
        _check_steps(worker, sample_steps)
        _check_decoder(worker, decoder)
        plan = app.state.realtime.plan(size, sample_steps, realtime, on_slow)
        if plan.refused:
            choice = app.state.realtime.choice()
            return JSONResponse({"detail": plan.refused, "requested": {"size": size, "sample_steps": sample_steps,
                                 "fps": app.state.realtime.speeds().get((size, sample_steps))},
                                 "needed_fps": app.state.realtime.needed_fps, "realtime": choice.to_dict()}, status_code=409)
        # The engine and voice of the session's text messages, checked now (a message may name others).
        speaking = _check_tts(None, tts_engine, voice, None) if voice or tts_engine else (None, None)
        session_id = uuid.uuid4().hex
        folder = work_dir / "sessions" / session_id
        folder.mkdir(parents=True)
        image_path = folder / "image"
        with _removed_on_failure(folder):
            _save_upload(image, image_path, "image")
            _check_upload(image_io.load_image, image_path, image, "image")
            session = LiveSession(SessionOptions(image_path, prompt, plan.size or "auto", plan.steps or sample_steps, seed,
                                                 rolling_sink, decoder, on_slow=on_slow, max_lag_s=max_lag_s),
                                  app.state.realtime)
            session.plan_message = plan.message
            task = worker.submit(SessionTask(kind="session", id=session_id, session=session, folder=folder))
            session_voices[session_id] = speaking
        async def close_unclaimed():
            await asyncio.sleep(SESSION_CONNECT_S)
            if not task.connected:
                session_voices.pop(session_id, None)
                worker.cancel(task)

        app.state.background = getattr(app.state, "background", set())
        watcher = asyncio.ensure_future(close_unclaimed())
        app.state.background.add(watcher)
        watcher.add_done_callback(app.state.background.discard)
        return _session_view(worker, task)

    def session_task(session_id: str) -> SessionTask:
        return _task(worker, session_id, SessionTask, "session")

    @app.get("/sessions/{session_id}")
    def session_status(session_id: str) -> dict:
        return _session_view(worker, session_task(session_id))

    @app.post("/sessions/{session_id}/close")
    def close_session(session_id: str) -> dict:
        task = session_task(session_id)
        worker.cancel(task)
        return _session_view(worker, task)

    @app.get("/sessions/{session_id}/video", response_class=StreamingResponse)
    def session_video(session_id: str):
        task = session_task(session_id)
        if task.state.finished:
            raise HTTPException(409, f"session {session_id} has ended")

        async def follow():
            events, deliver = _subscribe_async(task.session)
            try:
                while True:
                    event = await events.get()
                    if isinstance(event, (VideoStarted, BlockPublished)):
                        yield event.data
                    elif isinstance(event, SessionEnded):
                        yield event.data
                        return
            finally:
                task.session.unsubscribe(deliver)

        return StreamingResponse(follow(), media_type="video/mp4", headers={"Cache-Control": "no-store"})

    @app.websocket("/sessions/{session_id}/ws")
    async def session_socket(websocket: WebSocket, session_id: str):
        task = worker.tasks.get(session_id)
        if not isinstance(task, SessionTask) or task.state.finished or task.connected:
            await websocket.close(code=4404, reason=f"no open session {session_id} without a client")
            return
        task.connected = True
        await websocket.accept()
        await websocket.send_text(json.dumps({"type": "session", **_session_view(worker, task)}))
        if task.session.plan_message is not None:  # the size picked for real time, or the downgrade
            await websocket.send_text(json.dumps(task.session.plan_message))
        events, deliver = _subscribe_async(task.session)
        loop = asyncio.get_running_loop()
        engine, voice = session_voices.pop(session_id, (None, None))
        # Text messages are synthesised sentence by sentence on the speaker's thread; its events join the others.
        speaker = TextSpeaker(task.session, engine, voice,
                              on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, SpeakerEvent(event)))

        async def send_events():
            while True:
                event = await events.get()
                if isinstance(event, VideoStarted):
                    await websocket.send_text(json.dumps({"type": "init", "mime": mime_type(event.data)}))
                    await websocket.send_bytes(event.data)
                elif isinstance(event, BlockPublished):
                    await websocket.send_text(_block_json(event.info))
                    await websocket.send_bytes(event.data)
                elif isinstance(event, (SpeakerEvent, SessionMessage)):
                    await websocket.send_text(json.dumps(event.message))
                elif isinstance(event, SessionEnded):
                    if event.data:
                        await websocket.send_bytes(event.data)
                    await websocket.send_text(json.dumps({"type": "end", "error": event.error}))
                    return

        async def receive_speech():
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    data = message["bytes"]
                    if len(data) % 2:
                        await websocket.send_text(json.dumps({"type": "error", "detail": "speech must be 16-bit PCM: an even number of bytes"}))
                        continue
                    try:
                        task.session.push(np.frombuffer(data, "<i2").astype(np.float32) / 32768)
                    except SpeechQueueFull as e:
                        await websocket.send_text(json.dumps({"type": "error", "detail": str(e)}))
                    except LiveAvatarError:  # closed meanwhile; the "end" event follows
                        return
                else:
                    try:
                        request = json.loads(message.get("text") or "{}")
                        kind = request.get("type", "text" if "text" in request else None)
                    except (ValueError, AttributeError):
                        await websocket.send_text(json.dumps({"type": "error", "detail": "text messages are JSON "
                                                              "objects: {\"type\": \"text\", \"text\": ...} or {\"type\": \"close\"}"}))
                        continue
                    if kind == "close":
                        worker.cancel(task)
                    elif kind == "text":
                        await speak(request)

        async def speak(request: dict):
            """Queues a text message's sentences; tells the client how many, or why not."""
            try:
                sentences = await asyncio.to_thread(speaker.say, request.get("text"), request.get("tts"), request.get("voice"))
            except LiveAvatarError as e:
                await websocket.send_text(json.dumps({"type": "error", "detail": str(e)}))
                return
            await websocket.send_text(json.dumps({"type": "text", "sentences": sentences}))

        sender = asyncio.ensure_future(send_events())
        receiver = asyncio.ensure_future(receive_speech())
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver.done():  # the client left or asked to close: end the session, send what is left
                worker.cancel(task)
                await sender
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            speaker.close()
            sender.cancel()
            receiver.cancel()
            task.session.unsubscribe(deliver)
            worker.cancel(task)
            try:
                await websocket.close()
            except RuntimeError:  # already closed by the client
                pass

    # ------------------------------------------------------------------ the page
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return RedirectResponse("/player")

    @app.get("/player", include_in_schema=False)
    def player():
        return FileResponse(STATIC_DIR / "player.html", media_type="text/html")

    @app.get("/sessions/{session_id}/view", include_in_schema=False)
    def session_viewer(session_id: str):
        """The session's video alone, filling the page, starting by itself with sound where the browser allows
        it (OBS's Browser Source does; a plain browser starts muted and shows a button): any number of viewers."""
        session_task(session_id)
        return FileResponse(STATIC_DIR / "viewer.html", media_type="text/html", headers={"Cache-Control": "no-store"})

    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))
    return app


def main(args) -> int:
    import uvicorn

    from liveavatar.interfaces.backend import Backend, open_realtime

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="liveavatar-serve-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = Backend.from_args(args).open()
    log.info("model ready in %.1f s; work folder %s", time.perf_counter() - t0, work_dir)
    worker = EngineWorker(pipe, max_queue=args.max_queue)
    realtime = open_realtime(args, pipe, worker)
    app = create_app(worker, work_dir, args.max_upload_mb, args.size, args.max_audio_s, realtime)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        worker.shutdown()
        pipe.close()
    return 0
