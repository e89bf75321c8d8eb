"""Property-based tests: no input to the media loaders or the option parser may crash unexplained or hang."""

import contextlib
import io
import wave

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from liveavatar.errors import InputError, LiveAvatarError
from liveavatar.interfaces.cli import main
from liveavatar.media.audio import load_audio
from liveavatar.media.image import load_image, parse_size

FUZZ = settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((np.sin(np.arange(8000) / 5) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


PNG, WAV = _png_bytes(), _wav_bytes()


def _mutations(original: bytes):
    """Random bytes, truncations and byte flips of a valid file."""
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(0, len(original)).map(lambda n: original[:n]),
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(0, 255)), max_size=8).map(
            lambda edits: bytes(b if all(i != j for j, _ in edits) else next(v for j, v in edits if j == i)
                                for i, b in enumerate(original))
        ),
    )


@FUZZ
@given(data=_mutations(PNG), suffix=st.sampled_from([".png", ".jpg", ".webp", ".wav"]))
def test_load_image_accepts_or_explains(tmp_path, data, suffix):
    path = tmp_path / f"in{suffix}"
    path.write_bytes(data)
    try:
        img = load_image(path)
    except InputError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert img.mode == "RGB" and img.width > 0 and img.height > 0


@FUZZ
@given(data=_mutations(WAV), suffix=st.sampled_from([".wav", ".mp3", ".png"]))
def test_load_audio_accepts_or_explains(tmp_path, data, suffix):
    path = tmp_path / f"in{suffix}"
    path.write_bytes(data)
    try:
        audio = load_audio(path)
    except InputError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0 and np.isfinite(audio).all()


@settings(max_examples=300, deadline=1000)
@given(st.text(max_size=40))
def test_parse_size_accepts_or_explains(text):
    try:
        area = parse_size(text)
    except InputError as e:
        assert "\n" not in str(e)
    else:
        assert area >= 64 * 64


FLAGS = ["--size", "--num_clip", "--infer_frames", "--sample_steps", "--base_seed", "--sample_guide_scale",
         "--sample_solver", "--offload_model", "--dtype", "--device", "--image", "--audio", "--prompt", "--bogus"]
VALUES = ["", "0", "-1", "48", "704*384", "abc", "1e9", "True", "cpu", "euler", "nan", "/nonexistent/x.png", "☃"]


@settings(max_examples=80, deadline=10000)
@given(st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES)), max_size=10))
def test_generate_options_never_crash(args):
    argv = ["generate", "--image", "/nonexistent/face.png", "--audio", "/nonexistent/a.wav",
            "--ckpt_dir", "/nonexistent/ckpt", "--device", "cpu", *args]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        assert e.code == 2
        return
    assert code == 2
    err = stderr.getvalue().strip().splitlines()
    assert err and err[-1].startswith("error: ")


def test_refused_and_invalid_options_are_liveavatar_errors(capsys):
    assert issubclass(InputError, LiveAvatarError)
    with pytest.raises(SystemExit):
        main(["generate", "--image", "x.png", "--sample_steps", "four"])  # argparse's own type check
    # Speech may come as --audio or --text, so its absence is the command's error, not argparse's.
    assert main(["generate", "--image", "x.png"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no speech: give --audio")
