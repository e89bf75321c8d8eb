"""The Gradio web UI (`liveavatar app`): its generate handler streams playable chunks and ends with the MP4,
Cancel stops the job, bad inputs are named, and starting it opens no connection off this machine."""

import shutil
import sys
from pathlib import Path

import numpy as np

import pytest
import torch

from conftest import CKPT, REPO, requires_golden

pytestmark = requires_golden
gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from liveavatar.engine.pipeline import LiveAvatarPipeline  # noqa: E402
from liveavatar.engine.worker import EngineWorker  # noqa: E402
from liveavatar.interfaces.app import THEME, build_app  # noqa: E402
from liveavatar.media.video import read_video  # noqa: E402
from test_server import free_port  # noqa: E402

FACE, SPEECH = str(REPO / "examples" / "face.png"), str(REPO / "examples" / "speech.wav")
INPUTS = dict(prompt="A person talking", size="128*128", sample_steps=4, seed=3, trim_silence=False,
              normalize_loudness=False)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pipe = LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)
    worker = EngineWorker(pipe, max_queue=2)
    demo = build_app(worker, tmp_path_factory.mktemp("app"), default_size="128*128")
    yield demo, worker
    worker.shutdown()


def handler(demo, name):
    return next(f.fn for f in demo.fns.values() if f.name == name)


def run_generate(demo, image=FACE, audio=SPEECH, num_clip=1, text="", tts=None, voice=None, **changes):
    values = {**INPUTS, **changes}
    return handler(demo, "generate")(image, audio, values["prompt"], values["size"], num_clip, values["sample_steps"],
                                     values["seed"], values["trim_silence"], values["normalize_loudness"], text, tts, voice)


def test_generate_streams_one_playable_chunk_per_block_then_the_mp4(app):
    demo, _ = app
    outputs, chunks = [], []
    for output in run_generate(demo, num_clip=1):  # each chunk is read when it is handed over, as Gradio does
        outputs.append(output)
        if isinstance(output[0], str):
            chunks.append(read_video(output[0]))
    assert len(chunks) == 4
    for (video, fps, audio, rate), frames in zip(chunks, [9, 12, 12, 12]):
        assert video.shape == (frames, 128, 128, 3) and fps == 25 and rate == 16000
        assert len(audio) == pytest.approx(frames * 640, abs=1024)  # the block's own speech
    folder = Path(outputs[-1][2]).parent
    assert sorted(p.name for p in folder.glob("block-*.mp4")) == ["block-000002.mp4", "block-000003.mp4"]
    statuses = [o[1] for o in outputs]
    assert statuses[0].startswith("Preparing")
    for status, block, frame in zip(statuses[1:5], range(1, 5), [9, 21, 33, 45]):
        assert status.startswith(f"Generating: block {block} of 4, frame {frame} of 45")
    done = outputs[-1]
    assert done[1].startswith("Done: 45 frames (128x128)")
    final, _, _, _ = read_video(done[2])
    assert final.shape == (45, 128, 128, 3)
    assert all(o[2] is None for o in outputs[:-1]), "the download appears only at the end"


def test_chunks_and_download_carry_the_uploads_own_rate_and_channels(app, tmp_path):
    from test_server import stereo_wav

    from liveavatar.media.video import read_audio

    demo, _ = app
    voice = tmp_path / "voice.wav"
    voice.write_bytes(stereo_wav(1.0))  # 44.1 kHz stereo, 1 s: the video ends with it, 25 frames
    outputs = list(run_generate(demo, audio=str(voice), num_clip=0))
    chunks = [o[0] for o in outputs if isinstance(o[0], str)]
    assert len(chunks) == 3 and outputs[-1][1].startswith("Done: 25 frames (128x128)")
    total = 0
    for chunk in chunks[-2:]:  # the app keeps the newest two
        planes, rate, layout = read_audio(chunk)
        assert (rate, layout) == (44100, "stereo")
        total += len(read_video(chunk)[0])
    assert total == 25 - 9  # blocks 1 and 2: 12 frames, then the last 4 (the video stops with the speech)
    planes, rate, layout = read_audio(outputs[-1][2])
    assert (rate, layout) == (44100, "stereo") and abs(planes.shape[1] / rate - 1.0) < 0.03


def test_cancel_stops_the_job_and_offers_what_was_made(app):
    demo, worker = app
    outputs = run_generate(demo, num_clip=3)
    first = next(outputs)
    task_id = first[3]
    next(outputs)  # the first block
    handler(demo, "cancel")(task_id)
    rest = list(outputs)
    assert rest[-1][1] == "Cancelled: the video generated so far can be downloaded."
    partial, _, _, _ = read_video(rest[-1][2])
    assert 9 <= len(partial) < 9 + 11 * 12
    assert worker.tasks[task_id].state == "cancelled"


def test_missing_or_bad_inputs_are_named(app):
    demo, _ = app
    with pytest.raises(gr.Error, match="Add a reference image"):
        next(run_generate(demo, image=None))
    with pytest.raises(gr.Error, match="Add speech"):
        next(run_generate(demo, audio=None))
    with pytest.raises(gr.Error, match="Size: invalid size 'big'"):
        next(run_generate(demo, size="big"))
    outputs = run_generate(demo, audio=FACE)  # an image where the speech should be
    next(outputs)
    with pytest.raises(gr.Error) as failed:
        list(outputs)
    assert failed.value.message == "Generation failed: file has no audio stream: face.png"


def test_launch_binds_loopback_and_connects_nowhere_else(app):
    demo, _ = app
    seen = []
    active = [True]

    def audit(event, args):
        if active[0] and event in ("socket.connect", "socket.getaddrinfo"):
            seen.append((event, args[1] if event == "socket.connect" else args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed; this one goes quiet after the test
    port = free_port()
    try:
        demo.queue(max_size=2).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                      quiet=True, theme=THEME)
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "liveavatar" in page.text
        theme = httpx.get(f"http://127.0.0.1:{port}/theme.css", timeout=30)
        assert theme.status_code == 200 and "system-ui" in theme.text and "googleapis" not in theme.text
    finally:
        demo.close()
        active[0] = False
    hosts = {target[0] if isinstance(target, tuple) else target for _, target in seen}
    assert hosts and hosts <= {"127.0.0.1", "localhost", "::1"}, seen


requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="eSpeak NG is not installed")


@requires_espeak
def test_generate_from_text_speaks_it(app):
    from liveavatar import tts
    from liveavatar.media.audio import load_audio
    from liveavatar.tts.speaker import to_speech_rate

    text = "Hello there. I read what you type."
    outputs, chunk_sounds = [], []
    for output in run_generate(demo=app[0], audio=None, num_clip=0, text=text, tts="espeak", voice="en-gb"):
        outputs.append(output)
        if isinstance(output[0], str):  # kept when handed over (the app deletes all but the newest two)
            kept = output[0] + ".kept.mp4"
            shutil.copyfile(output[0], kept)
            chunk_sounds.append(kept)
    done = outputs[-1]
    assert done[1].startswith("Done: ") and done[2].endswith("output.mp4")
    speech = to_speech_rate(tts.synthesize(text, "espeak", "en-gb"))
    frames, *_ = read_video(done[2])
    assert len(frames) == -(-len(speech) // 640), "the video ends with the speech"
    audio = load_audio(done[2])  # the sound track at 16 kHz: the whole speech, from its first sample
    n = min(len(audio), len(speech))
    assert abs(len(audio) - len(speech)) < 0.05 * 16000
    assert np.corrcoef(audio[:n], speech[:n])[0, 1] > 0.95
    assert len(chunk_sounds) == -(-(len(frames) - 9) // 12) + 1  # a chunk a block: 9 frames, then 12 each
    first = load_audio(chunk_sounds[0])
    assert np.corrcoef(first[:4000], speech[:4000])[0, 1] > 0.9, "the chunks that play carry the speech too"


@requires_espeak
def test_text_input_errors_are_named(app):
    demo, _ = app
    with pytest.raises(gr.Error, match="Add speech .*, or type a text to speak"):
        next(run_generate(demo, audio=None, text="   "))
    with pytest.raises(gr.Error, match="Give either speech or a text to speak, not both"):
        next(run_generate(demo, text="Hello."))
    with pytest.raises(gr.Error, match="Text to speech: unknown espeak voice 'xx-nowhere'"):
        next(run_generate(demo, audio=None, text="Hello.", voice="xx-nowhere"))
    with pytest.raises(gr.Error, match="Text to speech: the text is 5001 characters long; the limit is 5000"):
        next(run_generate(demo, audio=None, text="x" * 5001))


def test_realtime_app_shows_the_measured_speeds_and_opens_at_the_preset(app, tmp_path):
    """`app --realtime`: the page lists what this machine sustains and each page opens with the preset's size and steps
    (as measured when it opens: the start-up calibration may still be running)."""
    from liveavatar.engine.realtime import Realtime, SpeedTable

    _, worker = app
    realtime = Realtime(SpeedTable(None, "test machine"), sizes=["128*128", "64*64"], steps=[4, 3], default=True)
    demo = build_app(worker, tmp_path, default_size="128*128", realtime=realtime)
    load = next(f for f in demo.fns.values() if f.name == "<lambda>" and any(t[1] == "load" for t in f.targets))
    speeds, size, steps = load.fn()
    assert "Nothing measured yet (calibration: off)" in speeds and size == gr.skip() and steps == gr.skip()
    realtime.table.record("128*128", 4, 12.0, 8, "calibration")
    realtime.table.record("128*128", 3, 30.0, 8, "calibration")
    speeds, size, steps = load.fn()
    assert "Preset: **128*128 at 3 steps**, 30.0 FPS (keeps up)" in speeds
    assert "- 128*128, 4 steps: 12.0 FPS (0.48x real time; calibration" in speeds
    assert size["value"] == "128*128" and steps["value"] == 3
    shown = next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == "speeds")
    assert shown.visible
    plain = build_app(worker, tmp_path)  # without a real-time view: nothing shown, nothing loaded
    assert not next(c for c in plain.blocks.values() if getattr(c, "elem_id", None) == "speeds").visible
