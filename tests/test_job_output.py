"""What a creator gets from a job: the user's own sound (rate, channels, bit rate), the whole speech from its
first sample, a video that ends with the speech, and resume states that refuse to mix timings.

The speech here is made of noise bursts and tones, different in each channel, so that where the sound track
starts and ends, and which channel is which, can be measured."""

import math
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CKPT, REPO, requires_golden
from liveavatar.engine.job import (
    LEAD_IN_FRAMES, STATE_LAYOUT, JobResult, JobSpec, Progress, ResumeStore, plan, read_speech, run_job,
)
from liveavatar.errors import InputError
from liveavatar.media.audio import SpeechTrack, load_audio
from liveavatar.media.video import read_audio, read_video

SR = 16000
SIZE = "128*128"
FACE = REPO / "examples" / "face.png"


def stereo_speech(path: Path, seconds: float, rate: int = 44100) -> np.ndarray:
    """A stereo WAV: each channel opens with its own 250 ms chirp (left: 300 Hz up to 3 kHz, loud; right: down),
    then a tone (440 Hz left, 660 Hz right) until the end. Returns the samples [2, n] in [-1, 1]."""
    t = np.arange(int(round(seconds * rate))) / rate
    left, right = 0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)
    burst = int(0.25 * rate)
    tb = t[:burst]
    rise = (3000 - 300) / (2 * 0.25) * tb**2  # phase / 2 pi of a linear sweep over the chirp
    left[:burst] = 0.6 * np.sin(2 * np.pi * (300 * tb + rise))
    right[:burst] = 0.4 * np.sin(2 * np.pi * (3000 * tb - rise))
    planes = np.stack([left, right])
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.round(planes.T * 32767).astype("<i2").tobytes())
    return np.round(planes * 32767) / 32767


def lag(output: np.ndarray, source: np.ndarray, search: int) -> int:
    """The shift d (|d| <= search) at which output[i] best matches source[i + d], over output's first 0.3 s."""
    n = len(output) // 8
    a = output[:n]
    scores = [np.dot(a, source[d : d + n]) if d >= 0 else np.dot(a[-d:], source[: n + d]) for d in range(-search, search + 1)]
    return int(np.argmax(scores)) - search


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


@pytest.fixture(scope="module")
def pipe():
    from liveavatar.engine.pipeline import LiveAvatarPipeline

    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def stereo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stereo")
    path = folder / "speech.wav"
    return path, stereo_speech(path, 2.3)


def run(pipe, spec) -> tuple[list[Progress], JobResult]:
    items = list(run_job(pipe, spec))
    return items[:-1], items[-1]


# -- the plan: frames, blocks and clips ----------------------------------------------------------------


@pytest.mark.parametrize("seconds, lead_in, frames, blocks, clips", [
    (2.3, True, 58, 6, 2),  # ceil(2.3 * 25) frames: the video ends on the frame that shows the last sample
    (5.0, True, 125, 11, 3),
    (0.36, True, 9, 1, 1),  # block 0 alone (9 frames after the 3 dropped)
    (0.37, True, 10, 2, 1),
    (5.0, False, 122, 11, 3),  # the original's timing: the video starts 120 ms into the speech
    (5.0 - 0.12, False, 119, 11, 3),
])
def test_plan_ends_the_video_with_the_speech(tmp_path, seconds, lead_in, frames, blocks, clips):
    spec = JobSpec(FACE, tmp_path / "a.wav", "hi", tmp_path / "o.mp4", lead_in=lead_in)
    got = plan(spec, int(round(seconds * SR)))
    assert (got.frames, got.blocks, got.clips) == (frames, blocks, clips)
    assert 9 + 12 * (got.blocks - 2) < got.frames <= 9 + 12 * (got.blocks - 1)  # no block more than needed
    shown = (got.frames + (0 if lead_in else LEAD_IN_FRAMES)) / 25  # speech time at the video's end
    assert -1e-9 <= shown - seconds < 1 / 25


def test_plan_with_num_clip_gives_whole_clips_capped_at_the_speech(tmp_path):
    spec = JobSpec(FACE, tmp_path / "a.wav", "hi", tmp_path / "o.mp4", num_clip=2)
    whole = plan(spec, int(2.3 * SR))
    assert (whole.clips, whole.blocks, whole.frames) == (2, 8, 93)
    spec.num_clip = 50
    capped = plan(spec, int(2.3 * SR))
    assert (capped.clips, capped.blocks, capped.frames) == (capped.clips_covered, 4 * capped.clips_covered,
                                                            48 * capped.clips_covered - 3)


def test_the_model_hears_120_ms_of_silence_then_the_whole_speech(tmp_path, stereo):
    path, _ = stereo
    spec = JobSpec(FACE, path, "hi", tmp_path / "o.mp4")
    speech = read_speech(spec)
    whole = load_audio(path)
    assert np.array_equal(speech.wave, whole) and len(speech.heard) == len(whole) + 1920
    assert not speech.heard[:1920].any() and np.array_equal(speech.heard[1920:], whole)
    assert speech.track == SpeechTrack(path, 0.0, len(whole) / SR)  # the sound track: the file from its start
    original = read_speech(JobSpec(FACE, path, "hi", tmp_path / "o.mp4", lead_in=False))
    assert np.array_equal(original.heard, whole)  # the original's path: the speech alone
    assert original.track == SpeechTrack(path, 0.12, len(whole) / SR - 0.12)


# -- the video a job writes --------------------------------------------------------------------------------


@requires_golden
def test_a_44khz_stereo_source_keeps_its_rate_channels_and_first_120_ms(tmp_path, pipe, stereo):
    path, source = stereo
    spec = JobSpec(FACE, path, "A person is talking.", tmp_path / "out.mp4", size=SIZE, seed=1)
    progress, result = run(pipe, spec)

    with av.open(str(result.output)) as container:
        sound = container.streams.audio[0]
        assert sound.codec_context.name == "aac"
        assert (sound.codec_context.sample_rate, sound.codec_context.channels) == (44100, 2)
        assert 160_000 < sound.bit_rate <= 200_000  # 192 kb/s, not the 16 kHz mono ~66 kb/s of before
    planes, rate, layout = read_audio(result.output)
    assert rate == 44100 and layout == "stereo" and planes.shape[0] == 2
    # Each channel is its own: the left one's tone is 440 Hz, the right one's 660 Hz, and the bursts differ.
    tail = slice(int(0.5 * rate), int(2.0 * rate))
    assert abs(peak_frequency(planes[0, tail], rate) - 440) < 2 and abs(peak_frequency(planes[1, tail], rate) - 660) < 2
    assert np.corrcoef(planes[0, : int(0.1 * rate)], planes[1, : int(0.1 * rate)])[0, 1] < 0.2
    # The whole speech from its first sample: output time t is source time t (the burst opens the track)...
    for channel in (0, 1):
        assert abs(lag(planes[channel], source[channel], search=8000)) <= 2
    burst = planes[0, : int(0.1 * rate)]
    assert np.sqrt(np.mean(burst**2)) > 0.35  # the first 100 ms carry the chirp (amplitude 0.6: RMS 0.42)
    assert np.corrcoef(burst, source[0, : len(burst)])[0, 1] > 0.95
    # ...and it is in sync: output frame j shows the speech at j / 25 s, which the model heard at (j + 3) / 25 s.
    assert progress[0].block.first_frame == 0 and len(progress[0].block.frames) == 9
    summary = (tmp_path / "out.json").read_text()
    assert '"sample_rate": 44100' in summary and '"channels": 2' in summary


@requires_golden
def test_the_video_ends_with_the_speech(tmp_path, pipe, stereo):
    path, source = stereo
    speech_s = source.shape[1] / 44100  # 2.3 s
    spec = JobSpec(FACE, path, "A person is talking.", tmp_path / "out.mp4", size=SIZE, seed=1)
    progress, result = run(pipe, spec)
    frames, fps, _, _ = read_video(result.output)
    assert len(frames) == result.frames == math.ceil(speech_s * 25) == 58  # not 93 (two whole clips)
    assert [len(p.block.frames) for p in progress] == [9, 12, 12, 12, 12, 1]  # 6 blocks; the last one is cut
    assert [p.frames_done for p in progress][-1] == progress[-1].frames_total == 58
    with av.open(str(result.output)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        video_s = float(video.duration * video.time_base)
        sound_s = float(sound.duration * sound.time_base)
    planes, rate, _ = read_audio(result.output)
    assert video_s == pytest.approx(58 / 25)
    assert 0 <= video_s - speech_s < 1 / 25  # the video ends on the frame that shows the speech's last sample
    assert abs(sound_s - speech_s) < 1024 / rate + 1e-3  # the sound track is the speech, to one AAC packet
    assert abs(planes.shape[1] / rate - video_s) < 1024 / rate + 1e-3  # they end together
    # What the speech ends with (the tone) is there to the end.
    assert np.sqrt(np.mean(planes[0, int(2.2 * rate) : int(2.29 * rate)] ** 2)) > 0.15


@requires_golden
def test_num_clip_still_gives_whole_clips_and_original_timing_starts_120_ms_in(tmp_path, pipe, stereo):
    path, source = stereo
    spec = JobSpec(FACE, path, "A person is talking.", tmp_path / "out.mp4", size=SIZE, seed=1, num_clip=2,
                   lead_in=False)
    progress, result = run(pipe, spec)
    assert result.frames == 93 and len(progress) == 8
    planes, rate, _ = read_audio(result.output)
    assert rate == 44100 and planes.shape[0] == 2
    # The original's timing: the video and its sound start 120 ms into the speech (5292 samples at 44.1 kHz).
    assert abs(lag(planes[1], source[1], search=8000) - 5292) <= 2
    assert abs(planes.shape[1] / rate - (source.shape[1] / 44100 - 0.12)) < 1024 / rate + 1e-3  # the speech ends first


@requires_golden
def test_trim_and_normalise_apply_to_the_sound_track_too(tmp_path, pipe):
    rate = 48000
    quiet = np.zeros((2, int(2.0 * rate)))
    t = np.arange(int(1.0 * rate)) / rate
    quiet[0, int(0.5 * rate) : int(1.5 * rate)] = 0.02 * np.sin(2 * np.pi * 300 * t)
    quiet[1, int(0.5 * rate) : int(1.5 * rate)] = 0.01 * np.sin(2 * np.pi * 500 * t)
    path = tmp_path / "quiet.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.round(quiet.T * 32767).astype("<i2").tobytes())
    spec = JobSpec(FACE, path, "hi", tmp_path / "out.mp4", size=SIZE, seed=2, trim_silence=True,
                   normalize_loudness=True)
    speech = read_speech(spec)
    assert speech.track.start_s == pytest.approx(0.5, abs=0.011) and speech.track.duration_s == pytest.approx(1.0, abs=0.021)
    gain = speech.track.gain
    assert gain > 5  # the quiet tones are brought up to -23 LUFS
    _, result = run(pipe, spec)
    planes, got_rate, layout = read_audio(result.output)
    assert (got_rate, layout) == (48000, "stereo")
    assert planes.shape[1] / rate == pytest.approx(1.0, abs=0.05)  # the silence before and after is cut
    level = np.sqrt(np.mean(planes[:, int(0.1 * rate) : int(0.9 * rate)] ** 2, axis=1))
    assert level[0] == pytest.approx(gain * 0.02 / np.sqrt(2), rel=0.1)  # the job's gain, on both channels alike
    assert level[0] / level[1] == pytest.approx(2, rel=0.1)
    assert np.abs(planes).max() <= 1.0


# -- resume states -------------------------------------------------------------------------------------------


def test_resume_states_of_another_layout_or_timing_are_refused(tmp_path):
    output = tmp_path / "o.mp4"
    store = ResumeStore(output, "f" * 64, lead_in=True)
    store.dir.mkdir()
    old = {"stream": {"next_block": 4, "frames_emitted": 45}, "latents": None, "fingerprint": "f" * 64}
    torch.save(old, store.dir / "state-000000004.pt")  # what the version before the lead-in saved
    with pytest.raises(InputError) as refused:
        store.latest_usable({0, 45})
    message = str(refused.value)
    assert "saved by an earlier liveavatar, whose video started 120 ms into the speech" in message
    assert f"delete {store.dir} and {output}.partial, or rerun with --overwrite, to start over" in message

    torch.save({**old, "layout": STATE_LAYOUT, "lead_in": False}, store.dir / "state-000000004.pt")
    with pytest.raises(InputError, match="belongs to a run with other inputs or settings; delete"):
        store.latest_usable({0, 45})
    torch.save({**old, "layout": STATE_LAYOUT, "lead_in": True}, store.dir / "state-000000004.pt")
    assert store.latest_usable({0, 45})["stream"]["next_block"] == 4


def test_the_lead_in_is_part_of_the_fingerprint(tmp_path):
    image, audio = tmp_path / "i.png", tmp_path / "a.wav"
    Image.new("RGB", (8, 8)).save(image)
    audio.write_bytes(b"RIFF")
    spec = JobSpec(image, audio, "hi", tmp_path / "o.mp4")
    assert spec.fingerprint() != JobSpec(image, audio, "hi", tmp_path / "o.mp4", lead_in=False).fingerprint()
