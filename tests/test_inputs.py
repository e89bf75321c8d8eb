"""The bad-input table: every input of a job (image, audio, prompt, options, checkpoint folder, LoRA file, output
folder) that can be missing, corrupt, disguised, huge or unusual gets a one-line error before any model work,
or is handled as a sensible input (grayscale, CMYK, 8 kHz mono, 96 kHz 6-channel, pure silence, long prompts).

The rows are listed, with their outcomes, in docs/reliability.md."""

import io
import logging
import os
import shutil
import struct
import subprocess
import sys
import wave
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import CKPT, REPO, requires_golden
from liveavatar.engine.job import MAX_SEED, JobResult, JobSpec, preflight, run_job
from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.errors import CheckpointError, InputError
from liveavatar.interfaces.cli import main
from liveavatar.media.audio import load_audio
from liveavatar.media.image import load_image, prepare_reference
from liveavatar.media.video import read_video
from liveavatar.models.vae import WanVAE
from liveavatar.weights.checkpoint import CheckpointLayout

SR = 16000
SIZE = "128*128"  # a square image makes a 128x128 video: the tiny model runs a clip in seconds


# -- input files -----------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int = SR, channels: int = 1) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.asarray(np.round(samples), dtype="<i2").tobytes())
    return path


def tone(freq: float, seconds: float, rate: int, amplitude: float = 8000.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)


def peak_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def noise_rgb(height: int = 128, width: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height pixels (with a few bytes of data)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def flac_without_duration(path: Path, seconds: float) -> Path:
    """Silence as FLAC written to a stream that cannot seek: the header never gets the length (a few KB for minutes)."""
    class Sink(io.RawIOBase):
        def __init__(self):
            super().__init__()
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += bytes(b)
            return len(b)

    sink, chunk = Sink(), 16384
    with av.open(sink, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=SR, layout="mono")
        total = int(seconds * SR)
        for start in range(0, total, chunk):
            samples = np.zeros((1, min(chunk, total - start)), np.int16)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate, frame.pts = SR, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    path.write_bytes(bytes(sink.data))
    return path


@pytest.fixture(scope="module")
def pipe():
    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


@pytest.fixture
def face(tmp_path) -> Path:
    path = tmp_path / "face.png"
    Image.fromarray(noise_rgb()).save(path)
    return path


@pytest.fixture
def speech(tmp_path) -> Path:
    return write_wav(tmp_path / "speech.wav", tone(220, 1.5, SR))


# -- the command line stops before the models load -------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Makes loading the models fail loudly: an error that reaches it was not caught by the preflight."""

    def refuse(*args, **kwargs):
        raise AssertionError("the models started loading")

    monkeypatch.setattr(LiveAvatarPipeline, "from_pretrained", refuse)


def generate_error(capsys, image, audio, output, *extra, ckpt=CKPT) -> str:
    """Runs `liveavatar generate` expecting exit code 2; returns its one-line error message."""
    code = main(["generate", "--image", str(image), "--audio", str(audio), "--save_file", str(output),
                 "--size", SIZE, "--ckpt_dir", str(ckpt), "--device", "cpu", *extra])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines, lines
    assert lines[-1].startswith("error: ")
    return lines[-1][len("error: "):]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--base_seed", "-1"], "--base_seed -1: must be between 0 and 9223372036854775807"),
        (["--base_seed", str(2**63)], f"--base_seed {2**63}: must be between 0 and"),
        (["--base_seed", str(2**64)], f"--base_seed {2**64}: must be between 0 and"),
        (["--sample_steps", "0"], "--sample_steps 0: must be at least 1"),
        (["--size", "0*0"], "size '0*0' is too small"),
        (["--num_clip", "0"], "--num_clip must be at least 1, got 0"),
        (["--infer_frames", "0"], "--infer_frames 0: must be a positive multiple of 12"),
        (["--save_file", "out.mov"], "the output must be an .mp4 file"),
    ],
)
def test_out_of_range_options(tmp_path, capsys, no_model_loading, face, speech, extra, message):
    assert message in generate_error(capsys, face, speech, tmp_path / "o.mp4", *extra)


def test_seed_limits_are_accepted(tmp_path, face, speech):
    for seed in (0, MAX_SEED):
        wave_ = preflight(JobSpec(face, speech, "hi", tmp_path / "o.mp4", size=SIZE, seed=seed))
        assert len(wave_) == int(1.5 * SR)


def _cmyk_jpeg(path):
    Image.fromarray(noise_rgb()).convert("CMYK").save(path, quality=95)


def _gray(path):
    Image.fromarray(noise_rgb()[:, :, 0], mode="L").save(path)


def _rgba(path):
    pixels = np.concatenate([noise_rgb(), noise_rgb(seed=1)[:, :, :1]], axis=2)
    Image.fromarray(pixels, mode="RGBA").save(path)


def _gray16(path):
    Image.fromarray(noise_rgb()[:, :, 0].astype(np.uint16) * 257).save(path)


def _palette(path):
    Image.fromarray(noise_rgb()).convert("P").save(path)


@requires_golden
@pytest.mark.parametrize("name, make", [("cmyk.jpg", _cmyk_jpeg), ("gray.png", _gray), ("rgba.png", _rgba),
                                        ("gray16.png", _gray16), ("palette.gif", _palette)])
def test_unusual_image_modes_become_the_rgb_reference(tmp_path, pipe, speech, name, make):
    path = tmp_path / name
    make(path)
    preflight(JobSpec(path, speech, "hi", tmp_path / "o.mp4", size=SIZE))
    cond = pipe.prepare(path, load_audio(speech), "hi", SIZE)
    assert (cond.height, cond.width) == (128, 128) and cond.reference.shape == (128, 128, 3)
    assert np.array_equal(cond.reference, prepare_reference(load_image(path), 128, 128))
    pixels = np.asarray(load_image(path))
    if name.startswith("gray"):  # gray stays gray, 16 bits are scaled to 8 (not clipped to white)
        assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], noise_rgb()[:, :, 0])
    if name == "rgba.png":  # alpha is dropped, the colours are kept (as the original reads images)
        assert np.array_equal(pixels, noise_rgb())
    if name == "cmyk.jpg":
        assert np.abs(pixels.astype(int) - noise_rgb()).mean() < 12  # JPEG loss only


def test_a_small_image_is_named_with_the_size_that_comes_out(tmp_path, capsys, no_model_loading, speech):
    """A 64x64 image at --size 256*256 makes a 64x64 video: the command says so before the models load."""
    small = tmp_path / "small.png"
    Image.fromarray(noise_rgb(64, 64)).save(small)
    with pytest.raises(AssertionError, match="the models started loading"):  # the warning came first
        main(["generate", "--image", str(small), "--audio", str(speech), "--save_file", str(tmp_path / "o.mp4"),
              "--size", "256*256", "--ckpt_dir", str(CKPT), "--device", "cpu"])
    err = capsys.readouterr().err
    assert ("WARNING liveavatar: the image is 64x64 pixels, smaller than --size 256*256 asks for: the "
            "video will be 64x64 (an image is not scaled up to fill --size); for a video of about that size use an "
            "image of at least 256x256 pixels, or pass a smaller --size") in err
    assert "the image is 64x64" in (tmp_path / "o.log").read_text()  # in the run log too
    notices = []
    preflight(JobSpec(small, speech, "hi", tmp_path / "p.mp4", size="256*256"), notices)
    assert len(notices) == 1 and notices[0].startswith("the image is 64x64 pixels")
    wide = tmp_path / "wide.png"
    Image.fromarray(noise_rgb(100, 300)).save(wide)
    notices = []
    preflight(JobSpec(wide, speech, "hi", tmp_path / "p.mp4", size="704*384"), notices)
    assert notices == ["the image is 300x100 pixels, smaller than --size 704*384 asks for: the video will be 320x128 "
                       "(an image is not scaled up to fill --size); for a video of about that size use an image of at "
                       "least 901x301 pixels, or pass a smaller --size"]
    notices = []
    preflight(JobSpec(small, speech, "hi", tmp_path / "p.mp4", size="64*64"), notices)  # what --size asks for
    assert notices == []


def test_num_clip_beyond_the_speech_is_said_on_the_console(tmp_path, capsys, no_model_loading, face, speech):
    with pytest.raises(AssertionError, match="the models started loading"):
        main(["generate", "--image", str(face), "--audio", str(speech), "--save_file", str(tmp_path / "o.mp4"),
              "--size", SIZE, "--num_clip", "5", "--ckpt_dir", str(CKPT), "--device", "cpu"])
    assert ("WARNING liveavatar: --num_clip 5: the speech covers only 1 clip(s) of 48 frames; "
            "generating 1 (a longer speech makes more)") in capsys.readouterr().err


def test_image_errors_come_before_the_models(tmp_path, capsys, no_model_loading, speech):
    out = tmp_path / "o.mp4"
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(30000, 30000))
    assert "image is too large: over the limit of 64000000 pixels (possible decompression bomb)" in generate_error(capsys, bomb, speech, out)
    bomb.write_bytes(png_claiming(9000, 8000))  # below Pillow's own limits, above ours
    assert "image is too large: 9000x8000 = 72000000 pixels exceeds the limit" in generate_error(capsys, bomb, speech, out)
    sliver = tmp_path / "sliver.png"
    Image.new("RGB", (3, 6276)).save(sliver)
    assert "the aspect ratio is too extreme; crop the image" in generate_error(capsys, sliver, speech, out)
    disguised = write_wav(tmp_path / "photo.jpg", tone(440, 0.5, SR))
    assert "not an image file (unknown or unsupported format)" in generate_error(capsys, disguised, speech, out)
    whole = io.BytesIO()
    Image.fromarray(noise_rgb()).save(whole, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    assert "image file is corrupt or truncated" in generate_error(capsys, truncated, speech, out)
    assert "reference image not found" in generate_error(capsys, tmp_path / "none.png", speech, out)
    assert not out.exists() and not (tmp_path / "o.log").exists()


# -- audio -------------------------------------------------------------------------------------


def test_8khz_mono_and_96khz_six_channels_decode_to_16khz_mono(tmp_path, face):
    low = load_audio(write_wav(tmp_path / "phone.wav", tone(440, 1.5, 8000), 8000))
    assert abs(len(low) - 1.5 * SR) <= 2 and abs(peak_frequency(low, SR) - 440) < 1
    # Six channels of the same tone at levels 1/6 .. 6/6: the mean of the channels is 7/12 of full level.
    channels = np.stack([tone(440, 1.5, 96000) * (c + 1) / 6 for c in range(6)], axis=1).reshape(-1)
    surround = load_audio(write_wav(tmp_path / "surround.wav", channels, 96000, channels=6))
    assert abs(len(surround) - 1.5 * SR) <= 2 and abs(peak_frequency(surround, SR) - 440) < 1
    level = np.abs(surround[SR // 2 : SR]).max()
    assert abs(level - 8000 / 32768 * 7 / 12) < 0.01
    for path in (tmp_path / "phone.wav", tmp_path / "surround.wav"):
        assert len(preflight(JobSpec(face, path, "hi", tmp_path / "o.mp4", size=SIZE))) == len(low)


def test_audio_errors_come_before_the_models(tmp_path, capsys, no_model_loading, face):
    out = tmp_path / "o.mp4"
    empty = write_wav(tmp_path / "zero.wav", np.zeros(0))
    assert "audio stream has no samples (zero length)" in generate_error(capsys, face, empty, out)
    blip = write_wav(tmp_path / "blip.wav", tone(440, 0.02, SR))
    assert "blip.wav: the audio is 20 ms long; at least 45 ms are needed" in generate_error(capsys, face, blip, out)
    picture = tmp_path / "song.mp3"
    Image.fromarray(noise_rgb()).save(picture, format="PNG")
    assert "song.mp3" in generate_error(capsys, face, picture, out)
    (tmp_path / "nothing.wav").write_bytes(b"")
    assert "audio file is empty (0 bytes)" in generate_error(capsys, face, tmp_path / "nothing.wav", out)


def test_audio_over_the_duration_limit_is_refused_without_decoding_it_all(tmp_path, face):
    declared = write_wav(tmp_path / "long.wav", np.zeros(90 * SR))
    with pytest.raises(InputError, match=r"audio is too long: 90.0 s, the limit is 60 s: .*long.wav"):
        load_audio(declared, max_seconds=60)
    # 10 minutes of silence in 100 KB that declare no length: decoding stops at the limit.
    bomb = flac_without_duration(tmp_path / "quiet.flac", 600)
    assert bomb.stat().st_size < 200_000
    with av.open(str(bomb)) as container:
        assert container.streams.audio[0].duration is None and container.duration is None
    with pytest.raises(InputError, match=r"audio is too long: more than 60.\d s, the limit is 60 s"):
        load_audio(bomb, max_seconds=60)
    spec = JobSpec(face, bomb, "hi", tmp_path / "o.mp4", size=SIZE, max_audio_s=60)
    with pytest.raises(InputError, match="the limit is 60 s"):
        preflight(spec)
    assert len(load_audio(bomb)) == 600 * SR  # without a limit (the command line) it is just long


@requires_golden
def test_silence_a_long_prompt_and_a_huge_num_clip_still_make_a_video(tmp_path, pipe, face, caplog):
    """Pure silence is a valid input: the avatar idles. A prompt over 512 tokens is cut with a notice, and
    --num_clip beyond the audio is capped at what the audio covers."""
    silence = write_wav(tmp_path / "silence.wav", np.zeros(int(1.5 * SR)))
    prompt = "A person sits still in a quiet, sunlit room and looks into the camera. " * 60
    spec = JobSpec(face, silence, prompt, tmp_path / "idle.mp4", size=SIZE, num_clip=10**12, seed=5)
    with caplog.at_level(logging.INFO, logger="liveavatar.engine.job"):
        result = [item for item in run_job(pipe, spec)][-1]
    assert isinstance(result, JobResult) and result.clips == 1 and result.frames == 45
    notes = [r.getMessage() for r in caplog.records]
    assert any(n.startswith("the prompt is ") and n.endswith("tokens long; only its first 512 are used") for n in notes)
    assert "output 128x128, 1 clip(s) of 48 frames (the audio covers 1), decoder wan" in notes
    frames, fps, audio, rate = read_video(tmp_path / "idle.mp4")
    assert frames.shape == (45, 128, 128, 3) and fps == 25 and frames.std() > 0
    assert rate == SR and np.abs(audio).max() < 1e-3  # the muxed track is the silence


# -- the prompt ---------------------------------------------------------------------------------


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cli(*args) -> list:
    return [sys.executable, "-m", "liveavatar.interfaces.cli", "generate", *args]


def test_prompt_bytes_that_are_not_utf8_are_refused(tmp_path, face, speech):
    """A command line in Latin-1 reaches Python as surrogate escapes; the error names the byte."""
    done = subprocess.run(_cli("--image", str(face), "--audio", str(speech), "--prompt", b"caf\xe9 au lait",
                               "--save_file", str(tmp_path / "o.mp4"), "--ckpt_dir", str(tmp_path / "no-ckpt")),
                          env=_env(), capture_output=True)
    assert done.returncode == 2
    assert done.stderr.decode().strip().splitlines()[-1] == (
        "error: the prompt is not UTF-8 text (byte 0xe9 at character 3); pass it UTF-8 encoded")


@requires_golden
def test_file_names_that_are_not_utf8_work_end_to_end(tmp_path):
    """Linux file names are bytes: the default output name is built from them, and the command prints it as is."""
    folder = os.fsencode(tmp_path)
    image, audio = folder + b"/visage-\xe9", folder + b"/voix-\xe8.wav"
    Image.fromarray(noise_rgb()).save(os.fsdecode(image), format="PNG")
    write_wav(Path(os.fsdecode(audio)), tone(300, 1.5, SR))
    done = subprocess.run(_cli("--image", image, "--audio", audio, "--save_dir", folder, "--size", SIZE,
                               "--num_clip", "1", "--ckpt_dir", str(CKPT), "--device", "cpu"),
                          env=_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    output = folder + b"/visage-\xe9_voix-\xe8.mp4"
    assert done.stdout == output + b"\n"
    frames, *_ = read_video(os.fsdecode(output))
    assert frames.shape == (45, 128, 128, 3)
    log = Path(os.fsdecode(folder + b"/visage-\xe9_voix-\xe8.log")).read_bytes()
    assert b"visage-\\udce9" in log  # escaped, never a logging traceback
    assert b"Logging error" not in done.stderr


# -- checkpoint folder and LoRA ------------------------------------------------------------------


def _ckpt_copy(tmp_path) -> Path:
    """The golden checkpoint as a tree of links, so that single parts can be removed or replaced."""
    copy = tmp_path / "ckpt"
    for src in CKPT.rglob("*"):
        dst = copy / src.relative_to(CKPT)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    return copy


PARTS = [
    "Wan2.2-S2V-14B/config.json",
    "Wan2.2-S2V-14B/diffusion_pytorch_model-00002-of-00002.safetensors",
    "Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.2-S2V-14B/google/umt5-xxl/tokenizer.json",
    "Wan2.2-S2V-14B/Wan2.1_VAE.pth",
    "Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/model.safetensors",
    "LiveAvatar/liveavatar.safetensors",
]


@requires_golden
@pytest.mark.parametrize("part", PARTS)
def test_each_missing_checkpoint_part_is_named_before_loading(tmp_path, capsys, no_model_loading, face, speech, part):
    ckpt = _ckpt_copy(tmp_path)
    (ckpt / part).unlink()
    message = generate_error(capsys, face, speech, tmp_path / "o.mp4", ckpt=ckpt)
    assert message.startswith(f"{ckpt / part}: missing; expected the ")


@requires_golden
def test_disguised_weight_files_are_named(tmp_path, capsys, no_model_loading, face, speech):
    ckpt = _ckpt_copy(tmp_path)
    renamed = tmp_path / "lora.safetensors"
    shutil.copy(face, renamed)
    message = generate_error(capsys, face, speech, tmp_path / "o.mp4", "--lora_path_dmd", str(renamed), ckpt=ckpt)
    assert message == f"{renamed}: this is a PNG image, not the LoRA weights (liveavatar.safetensors)"
    vae = ckpt / "Wan2.2-S2V-14B/Wan2.1_VAE.pth"
    vae.unlink()
    vae.write_bytes(b"<!DOCTYPE html><html>429 Too Many Requests</html>")
    message = f"{vae}: this is an HTML page (a failed download?), not the Wan2.1 VAE"
    assert generate_error(capsys, face, speech, tmp_path / "o.mp4", ckpt=ckpt) == message
    with pytest.raises(CheckpointError) as loading:  # the loader itself says the same
        WanVAE.from_checkpoint(vae)
    assert str(loading.value) == message
    shard = ckpt / PARTS[1]
    shard.unlink()
    shard.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 9999\n")
    message = generate_error(capsys, face, speech, tmp_path / "o.mp4", ckpt=ckpt)
    assert message.startswith(f"{shard}: this is a Git LFS pointer (fetch the weights with git lfs pull")


@requires_golden
def test_complete_checkpoint_passes_the_layout_check():
    CheckpointLayout.from_dir(CKPT).require_complete()


# -- output folder and disk ------------------------------------------------------------------------


def test_output_folder_problems_come_before_the_models(tmp_path, capsys, no_model_loading, face, speech):
    (tmp_path / "a-file").write_text("")
    message = generate_error(capsys, face, speech, tmp_path / "a-file" / "o.mp4")
    assert message == f"{tmp_path / 'a-file'}: is a file, not a folder to write o.mp4 into"
    message = generate_error(capsys, face, speech, tmp_path / "a-file" / "sub" / "o.mp4")
    assert message == f"{tmp_path / 'a-file' / 'sub'}: cannot create the output folder (Not a directory)"
    (tmp_path / "taken.mp4").mkdir()
    assert generate_error(capsys, face, speech, tmp_path / "taken.mp4") == (
        f"{tmp_path / 'taken.mp4'}: is a folder; expected a file name to write, such as {tmp_path / 'taken.mp4' / 'out.mp4'}")
    (tmp_path / "videos").mkdir()  # a folder without the .mp4 suffix: named as a folder, not as a wrong suffix
    assert generate_error(capsys, face, speech, tmp_path / "videos") == (
        f"{tmp_path / 'videos'}: is a folder; expected a file name to write, such as {tmp_path / 'videos' / 'out.mp4'}")
    message = generate_error(capsys, face, speech, tmp_path / "o.mp4", "--save_latents", str(tmp_path / "a-file" / "l.safetensors"))
    assert message == f"{tmp_path / 'a-file'}: is a file, not a folder to write l.safetensors into"


def test_read_only_output_folder(tmp_path, face, speech):
    """Run as an ordinary user would be: root passes permission checks, so it drops that capability here."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    done = subprocess.run(prefix + _cli("--image", str(face), "--audio", str(speech), "--save_file",
                                        str(read_only / "o.mp4"), "--ckpt_dir", str(tmp_path / "no-ckpt")),
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {read_only}: the output folder is not writable (Permission denied)"
    assert list(read_only.iterdir()) == []


def test_too_little_free_disk_is_refused_with_the_numbers(tmp_path, capsys, monkeypatch, no_model_loading, face, speech):
    real = shutil.disk_usage

    def nearly_full(path):
        return real(path)._replace(free=50 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    message = generate_error(capsys, face, speech, tmp_path / "o.mp4")
    assert message == (f"{tmp_path}: not enough free disk space: 50 MB free, about 100 MB needed (38 frames of "
                       f"128x128, the run log and a resume state)")
    assert not (tmp_path / "o.log").exists()


# -- property-based: any option values --------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.sampled_from(["128*128", "64*64", "0*0", "704x384", "1*99999999", "99999*99999"]), st.text(max_size=12)),
       seed=st.integers(-2**65, 2**65), steps=st.integers(-2, 60), num_clip=st.one_of(st.none(), st.integers(-2, 10**13)),
       infer_frames=st.integers(-24, 240), prompt=st.text(max_size=40))
def test_preflight_accepts_or_explains_any_options(tmp_path, face, speech, size, seed, steps, num_clip, infer_frames, prompt):
    spec = JobSpec(face, speech, prompt, tmp_path / "o.mp4", size=size, num_clip=num_clip, infer_frames=infer_frames,
                   sample_steps=steps, seed=seed)
    try:
        speech_wave = preflight(spec)
    except InputError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert len(speech_wave) == int(1.5 * SR)
        assert 0 <= seed <= MAX_SEED and steps >= 1 and infer_frames % 12 == 0 and infer_frames > 0

