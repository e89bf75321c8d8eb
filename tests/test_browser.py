"""Headless Chromium (Debian's, driven by Playwright) against the web UI and the player page: the video
plays while the job is still generating, the live session plays back, and the screenshots are not blank."""

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CKPT, REPO, requires_golden

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    requires_golden,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (Debian package chromium)"),
]
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
pytest.importorskip("gradio")

from liveavatar.engine.pipeline import LiveAvatarPipeline  # noqa: E402
from liveavatar.media.audio import load_audio  # noqa: E402
from liveavatar.engine.worker import EngineWorker  # noqa: E402
from liveavatar.interfaces.app import THEME, build_app  # noqa: E402
from liveavatar.interfaces.server import create_app  # noqa: E402
from test_server import free_port, serve_in_thread  # noqa: E402

FACE, SPEECH = str(REPO / "examples" / "face.png"), str(REPO / "examples" / "speech.wav")
# Never a browser download: the system's Chromium, with nothing that talks to the network by itself.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
POLL_MS = 100
MAX_POLLS = 1200  # 2 minutes at most per wait


@pytest.fixture(scope="module")
def worker():
    pipe = LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)
    worker = EngineWorker(pipe, max_queue=2)
    yield worker
    worker.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.hosts = set()
    page.on("request", lambda request: page.hosts.add(request.url.split("/")[2]))
    yield page
    page.close()


def assert_not_blank(png: bytes, what: str, path: Path) -> None:
    path.write_bytes(png)
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, f"{what} screenshot is blank ({path})"


def watch_playback(page, video_selector: str, finished_js: str) -> dict:
    """Polls until `finished_js` is true; records whether the video's time advanced before that."""
    record = {"played_before_end": 0.0, "first_play_poll": None}
    for poll in range(MAX_POLLS):
        current, finished = page.evaluate(
            f"() => {{ const v = document.querySelector({video_selector!r}); return [v ? v.currentTime : 0, {finished_js}]; }}")
        if finished:
            record["polls"] = poll
            return record
        if current > 0 and record["first_play_poll"] is None:
            record["first_play_poll"] = poll
        record["played_before_end"] = max(record["played_before_end"], current)
        page.wait_for_timeout(POLL_MS)
    raise AssertionError("the job did not finish")


def _frames_of(speech) -> int:
    """The frames of a job with this speech: the video ends with it (liveavatar.engine.job.plan)."""
    from liveavatar.engine.job import JobSpec, plan

    return plan(JobSpec(Path(FACE), Path(SPEECH), "", Path("o.mp4")), len(speech)).frames


def test_gradio_app_plays_while_generating(worker, page, tmp_path):
    demo = build_app(worker, tmp_path, default_size="128*128")
    port = free_port()
    demo.queue(max_size=2).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                                  theme=THEME)
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.set_input_files("#image input[type=file]", FACE)
        page.set_input_files("#audio input[type=file]", SPEECH)
        page.wait_for_selector("#image img", timeout=30000)
        page.wait_for_function("() => /0:0[0-9]/.test(document.querySelector('#audio').innerText)", timeout=30000)
        t0 = time.perf_counter()
        page.click("#generate")
        record = watch_playback(page, "#video video", "!!document.querySelector('#download a')")
        status = page.inner_text("#status")
        frames = _frames_of(load_audio(SPEECH))
        assert status.startswith(f"Done: {frames} frames (128x128)"), status
        assert record["played_before_end"] > 0, "the video did not play before the job finished"
        print(f"\napp: video playing {record['first_play_poll'] * POLL_MS / 1000:.1f} s after Generate "
              f"(poll resolution {POLL_MS} ms); job done after {time.perf_counter() - t0:.1f} s; {status}")
        assert_not_blank(page.locator("#video video").screenshot(), "app video", tmp_path / "app-video.png")
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        assert page.hosts == {f"127.0.0.1:{port}"}, page.hosts
    finally:
        demo.close()


@pytest.fixture(scope="module")
def server(worker, tmp_path_factory):
    app = create_app(worker, tmp_path_factory.mktemp("serve"), default_size="128*128")
    with serve_in_thread(app) as url:
        yield url


def test_player_page_plays_a_job_while_it_is_written(server, page, tmp_path):
    page.goto(f"{server}/player")
    page.set_input_files("#job-form input[name=image]", FACE)
    page.set_input_files("#job-form input[name=audio]", SPEECH)
    page.fill("#job-form input[name=size]", "128*128")
    page.fill("#job-form input[name=num_clip]", "3")
    page.click("#job-start")
    record = watch_playback(page, "#job-video", "!!window.liveavatar.job && window.liveavatar.job.state === 'done'")
    assert record["played_before_end"] > 0, "the job's live MP4 did not play before the job finished"
    view = page.evaluate("() => window.liveavatar.job.view")
    print(f"\nplayer (job): playing {record['first_play_poll'] * POLL_MS / 1000:.1f} s after submit, job "
          f"{view['result']['seconds']:.1f} s, first block {view['first_block_s']:.1f} s")
    assert view["progress"]["frames_done"] == 141
    assert page.is_visible("#job-download")
    assert_not_blank(page.locator("#job-video").screenshot(), "player job video", tmp_path / "player-job.png")
    assert page.hosts == {server.split("/")[2]}, page.hosts


def test_player_page_live_session_plays_back(server, page, tmp_path):
    page.goto(f"{server}/player")
    page.set_input_files("#session-form input[name=image]", FACE)
    page.set_input_files("#session-speech", SPEECH)
    page.fill("#session-form input[name=size]", "128*128")
    page.click("#session-start")
    # Played for 2 s of video while speech is still being spoken: the stream is live.
    for _ in range(MAX_POLLS):
        played = page.evaluate("() => document.querySelector('#session-video').currentTime")
        if played > 2:
            break
        page.wait_for_timeout(POLL_MS)
    state = page.evaluate("() => window.liveavatar.session")
    assert played > 2 and not state["ended"] and state["error"] is None
    assert [b["index"] for b in state["blocks"]] == list(range(len(state["blocks"])))
    print(f"\nplayer (session): first block {(state['firstBlockAt'] - state['firstSpeechAt']) / 1000:.2f} s and playback "
          f"{(state['firstPlaybackAt'] - state['firstSpeechAt']) / 1000:.2f} s after the first speech chunk "
          f"(session start-up included)")
    # Speech chunk pushed -> the frame showing it on screen, split into its parts (ms): each one measured, none
    # negative, and together the whole (the first block's window includes the session's start-up).
    for _ in range(MAX_POLLS):
        rows = page.evaluate("() => window.liveavatar.latency()")
        if len(rows) >= 3:
            break
        page.wait_for_timeout(POLL_MS)
    assert len(rows) >= 3, rows
    parts = ("window", "generation", "mux", "transport", "buffering", "in_block")
    for row in rows:
        assert set(row["parts"]) == set(parts) and all(row["parts"][p] >= 0 for p in parts), row
        assert sum(row["parts"].values()) == pytest.approx(row["total"], abs=1e-6)
        print(f"  block {row['block']:3d}: push -> on screen {row['total']:7.1f} ms = " +
              " + ".join(f"{p} {row['parts'][p]:.1f}" for p in parts))
    print("  playback when each block arrived:", [(b["index"], b.get("playback")) for b in state["blocks"][:8]])
    assert page.inner_text("#session-lag").startswith("lag ")
    assert page.inner_text("#session-latency").startswith("speech to screen ")
    assert_not_blank(page.locator("#session-video").screenshot(), "live session video", tmp_path / "player-session.png")
    page.click("#session-stop")
    page.wait_for_function("() => window.liveavatar.session.ended", timeout=60000)
    assert page.evaluate("() => window.liveavatar.session.error") is None


requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="eSpeak NG is not installed")
TEXT = "Hello there. I am a talking avatar, and I read what you type."


@requires_espeak
def test_gradio_app_speaks_typed_text(worker, page, tmp_path):
    from liveavatar import tts
    from liveavatar.media.video import read_video
    from liveavatar.tts.speaker import to_speech_rate

    demo = build_app(worker, tmp_path, default_size="128*128")
    port = free_port()
    demo.queue(max_size=2).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                                  theme=THEME)
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.set_input_files("#image input[type=file]", FACE)
        page.wait_for_selector("#image img", timeout=30000)
        page.locator("#text textarea").type(TEXT)  # typed, key by key
        t0 = time.perf_counter()
        page.click("#generate")
        record = watch_playback(page, "#video video", "!!document.querySelector('#download a')")
        status = page.inner_text("#status")
        speech = to_speech_rate(tts.synthesize(TEXT))
        frames = _frames_of(speech)
        assert status.startswith(f"Done: {frames} frames (128x128)"), status
        assert record["played_before_end"] > 0, "the video did not play before the job finished"
        print(f"\napp (text): video playing {record['first_play_poll'] * POLL_MS / 1000:.1f} s after Generate; job done "
              f"after {time.perf_counter() - t0:.1f} s; {status}")
        # What the page offers to download is the video with the typed text spoken.
        href = page.get_attribute("#download a", "href")
        response = page.request.get(href if href.startswith("http") else f"http://127.0.0.1:{port}{href}")
        assert response.ok
        (tmp_path / "download.mp4").write_bytes(response.body())
        video, *_ = read_video(tmp_path / "download.mp4")
        sound = load_audio(tmp_path / "download.mp4")  # the whole speech from its first sample, at 16 kHz as `speech`
        n = min(len(sound), len(speech))
        assert len(video) == frames and np.corrcoef(sound[:n], speech[:n])[0, 1] > 0.95
        assert_not_blank(page.locator("#video video").screenshot(), "app video (text)", tmp_path / "app-text.png")
        page.screenshot(path=str(tmp_path / "app-text-page.png"), full_page=True)
        assert page.hosts == {f"127.0.0.1:{port}"}, page.hosts
    finally:
        demo.close()


@requires_espeak
def test_player_page_job_and_live_session_speak_text(server, page, tmp_path):
    page.goto(f"{server}/player")
    page.set_input_files("#job-form input[name=image]", FACE)
    page.locator("#job-text").type("Hello. I read what you type.")
    page.fill("#job-form input[name=size]", "128*128")
    page.click("#job-start")
    record = watch_playback(page, "#job-video", "!!window.liveavatar.job && "
                            "['done', 'failed'].includes(window.liveavatar.job.state)")
    view = page.evaluate("() => window.liveavatar.job.view")
    assert view["state"] == "done", view
    assert record["played_before_end"] > 0, "the text job's live MP4 did not play before the job finished"
    assert view["result"]["frames"] > 45, "the video covers the spoken text (more than one clip)"
    assert page.is_visible("#job-download")

    page.goto(f"{server}/player")
    page.set_input_files("#session-form input[name=image]", FACE)
    page.fill("#session-form input[name=size]", "128*128")
    page.locator("#session-text").type(TEXT)
    page.click("#session-start")
    # Played while the text is spoken: blocks driven by its speech arrive, and all of it is spoken in the end.
    for _ in range(MAX_POLLS):
        state = page.evaluate("() => window.liveavatar.session")
        said = sum(s["speech_samples"] for s in state["said"]) if state else 0
        # Spoken, or dropped as a pause to catch up (a session behind real time, as on a busy CPU).
        spoken = sum(b["speech_samples"] + b["dropped_samples"] for b in state["blocks"]) if state else 0
        if said and spoken == said and len(state["said"]) == 2:
            break
        page.wait_for_timeout(POLL_MS)
    assert [s["text"] for s in state["said"]] == ["Hello there.", "I am a talking avatar, and I read what you type."]
    dropped = sum(b["dropped_samples"] for b in state["blocks"])
    assert spoken == said and sum(1 for b in state["blocks"] if b["speech_samples"]) >= (said - dropped) // 7680
    played = page.evaluate("() => document.querySelector('#session-video').currentTime")
    assert played > 0 and not state["ended"] and state["error"] is None
    assert_not_blank(page.locator("#session-video").screenshot(), "live session (text)", tmp_path / "player-text.png")
    page.fill("#session-text", "And one more thing.")
    page.click("#session-say")
    page.wait_for_function("() => window.liveavatar.session.said.length === 3", timeout=60000)
    page.click("#session-stop")
    page.wait_for_function("() => window.liveavatar.session.ended", timeout=60000)
    assert page.evaluate("() => window.liveavatar.session.error") is None
    assert page.hosts == {server.split("/")[2]}, page.hosts


def test_viewer_page_plays_a_session_for_several_viewers(server, browser, page, tmp_path):
    """The page for OBS (/sessions/{id}/view): the video alone, filling the page, no controls, starting by itself;
    one viewer from the start (Chromium's default autoplay policy: muted, with a button for the sound) and one that
    joins late in a browser that allows autoplay with sound (as OBS's Browser Source does), while a client pushes
    speech over the WebSocket."""
    import json
    import threading

    import httpx
    from websockets.sync.client import connect

    from liveavatar.media.audio import load_audio

    with httpx.Client(base_url=server, timeout=60) as client:
        session = client.post("/sessions", files={"image": ("face.png", open(FACE, "rb").read())},
                              data={"size": "128*128"}).json()
    view_url = f"{server}{session['links']['view']}"
    page.goto(view_url)  # before the session has any video: it waits for the first block
    blocks, stop = [], threading.Event()
    speech = load_audio(SPEECH)[: 6 * 16000]
    pcm = (np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes()

    def client_pushes():
        with connect(server.replace("http", "ws") + session["links"]["ws"], max_size=None) as ws:
            ws.recv(timeout=60)
            sent = 0
            while not stop.is_set():
                if sent < len(pcm):
                    ws.send(pcm[sent : sent + 3200])
                    sent += 3200
                try:
                    message = ws.recv(timeout=0.1)
                except TimeoutError:
                    continue
                if isinstance(message, str) and json.loads(message)["type"] == "block":
                    blocks.append(json.loads(message))
            ws.send(json.dumps({"type": "close"}))
            for _ in range(1000):
                message = ws.recv(timeout=60)
                if isinstance(message, str) and json.loads(message)["type"] == "end":
                    return

    pusher = threading.Thread(target=client_pushes, daemon=True)
    pusher.start()
    obs = None
    try:
        for _ in range(MAX_POLLS):  # the second viewer joins once the session is 4 blocks in
            if len(blocks) >= 4:
                break
            page.wait_for_timeout(POLL_MS)
        assert len(blocks) >= 4
        playwright_browser = browser.browser_type.launch(executable_path=str(CHROMIUM),
                                                         args=CHROMIUM_ARGS + ["--autoplay-policy=no-user-gesture-required"])
        obs = playwright_browser.new_page(viewport={"width": 640, "height": 360})
        joined_at = len(blocks)
        obs.goto(view_url)
        viewers = {"first": page, "late": obs}
        for _ in range(MAX_POLLS):
            states = {name: p.evaluate("() => ({...window.liveavatarViewer, frames: window.liveavatarViewer.frames.length, "
                                       "time: document.getElementById('view').currentTime})") for name, p in viewers.items()}
            if all(v["started"] is not None and v["time"] > v["started"] + 1.0 for v in states.values()):
                break
            page.wait_for_timeout(POLL_MS)
        print(f"\nviewers: {states}")
        for name, state in states.items():
            assert state["error"] is None and state["frames"] > 10 and state["time"] > state["started"] + 1.0, (name, state)
        assert states["first"]["started"] == 0 and states["first"]["muted"] is True  # no autoplay with sound here
        assert page.is_visible("#unmute")
        late = states["late"]
        assert late["muted"] is False and not obs.is_visible("#unmute")  # OBS-like: sound on, nothing to click
        # The late viewer started at a block's keyframe, past the start: the newest block when it joined (or later).
        starts = {b["first_frame"] / 25 for b in blocks}
        assert late["started"] in starts and late["started"] >= blocks[joined_at - 1]["first_frame"] / 25
        for name, p in viewers.items():  # the video fills the page and has no controls
            box = p.evaluate("() => { const r = document.getElementById('view').getBoundingClientRect(); "
                             "return [r.width, r.height, innerWidth, innerHeight, document.getElementById('view').controls]; }")
            assert box[:2] == box[2:4] and box[4] is False, (name, box)
            assert_not_blank(p.locator("#view").screenshot(), f"viewer ({name})", tmp_path / f"viewer-{name}.png")
        page.click("#unmute")
        assert page.evaluate("() => document.getElementById('view').muted") is False and not page.is_visible("#unmute")
    finally:
        stop.set()
        pusher.join(120)
        if obs is not None:
            obs.context.browser.close()
    for p in (page,):
        p.wait_for_function("() => window.liveavatarViewer.ended", timeout=60000)
