"""Media I/O: reference image, driving audio, and the streaming MP4 writer."""

import io
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import av
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, golden_case, golden_params, requires_golden
from liveavatar.errors import InputError
from liveavatar.media import image as image_io
from liveavatar.media.audio import integrated_loudness, load_audio, normalize_loudness, trim_silence
from liveavatar.media.image import (
    SIZE_PRESETS,
    load_image,
    output_size,
    parse_size,
    prepare_reference,
    to_tensor,
)
from liveavatar.media.video import FragmentedMP4Writer, frames_to_uint8, read_video

CASES = ["A", "B", "T", "T1"]
SR = 16000


# -- sizes ---------------------------------------------------------------------------------


def test_parse_size_presets_and_variants():
    assert [parse_size(p) for p in SIZE_PRESETS] == [720 * 400, 704 * 384, 688 * 368, 384 * 256]
    assert parse_size("704x384") == parse_size(" 704 X 384 ") == 704 * 384
    assert parse_size("100*100") == 10000  # any budget of at least 64*64 is allowed


@pytest.mark.parametrize(
    "text", ["", "704", "704*", "a*b", "704*384*2", "-704*384", "704.5*384", "0*384", "63*64"]
)
def test_parse_size_errors(text):
    with pytest.raises(InputError) as err:
        parse_size(text)
    assert "704*384" in str(err.value)  # the message lists the presets


@requires_golden
@pytest.mark.parametrize("case", CASES)
def test_output_size_matches_golden(case):
    params = golden_params(case)
    with Image.open(GOLDEN / "cases" / case / "image.png") as img:
        width, height = img.size
    assert parse_size(params["size"]) == params["max_area"]
    assert output_size(height, width, params["max_area"]) == (params["H"], params["W"])


def test_output_size_edge_cases():
    area = parse_size("384*256")
    assert output_size(256, 384, area) == (256, 384)  # exactly the budget
    assert output_size(150, 200, area) == (192, 256)  # fits: only rounded up
    assert output_size(1, 1, area) == (64, 64)
    assert output_size(720, 1280, parse_size("704*384")) == (384, 704)
    assert output_size(10, 10000, area) == (64, 1536)
    with pytest.raises(InputError, match="aspect ratio is too extreme"):
        output_size(6276, 3, area)  # the narrow side would scale to 0 pixels
    with pytest.raises(InputError):
        output_size(0, 10, area)


def test_output_size_always_fits_the_budget():
    rng = np.random.default_rng(0)
    for area in (parse_size(p) for p in SIZE_PRESETS):
        for height, width in rng.integers(16, 5000, size=(300, 2)):
            out_h, out_w = output_size(int(height), int(width), area)
            assert out_h % 64 == 0 and out_w % 64 == 0 and 0 < out_h * out_w <= area


# -- reference image -----------------------------------------------------------------------


@requires_golden
@pytest.mark.parametrize("case", CASES)
def test_prepare_reference_bit_exact(case):
    params = golden_params(case)
    img = load_image(GOLDEN / "cases" / case / "image.png")
    mine = prepare_reference(img, params["H"], params["W"])
    ref = golden_case(case)["ref_image_resized_u8"].numpy()
    assert mine.dtype == np.uint8 and mine.shape == ref.shape
    assert np.array_equal(mine, ref)


def test_prepare_reference_pads_wide_images_with_black_bars():
    # 16:9 at the 704*384 preset: the short side becomes 384, the long one int(384*16/9) = 682,
    # so 22 columns are missing: 11 black on each side.
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(1, 255, (180, 320, 3), dtype=np.uint8))
    height, width = output_size(720, 1280, parse_size("704*384"))
    assert (height, width) == (384, 704)
    out = prepare_reference(img, height, width)
    resized = np.asarray(img.resize((682, 384), Image.BILINEAR))
    assert np.array_equal(out[:, :11], np.zeros((384, 11, 3), np.uint8))
    assert np.array_equal(out[:, 693:], np.zeros((384, 11, 3), np.uint8))
    assert np.array_equal(out[:, 11:693], resized)


def test_center_crop_offsets_and_padding_follow_torchvision():
    pixels = np.arange(10 * 7 * 3, dtype=np.int64).reshape(10, 7, 3)
    # Offsets are round((size - crop) / 2) with Python's half-to-even rounding: 1.5 -> 2, 2.5 -> 2.
    assert np.array_equal(image_io._center_crop(pixels, 10, 4), pixels[:, 2:6])
    assert np.array_equal(image_io._center_crop(pixels, 5, 7), pixels[2:7])
    # Padding puts the odd pixel at the end: width 7 -> 10 pads 1 left, 2 right.
    padded = image_io._center_crop(pixels, 10, 10)
    assert np.array_equal(padded[:, 1:8], pixels)
    assert not padded[:, :1].any() and not padded[:, 8:].any()
    # Pad one axis, crop the other.
    mixed = image_io._center_crop(pixels, 4, 9)
    assert np.array_equal(mixed[:, 1:8], pixels[3:7])


def test_to_tensor_range():
    pixels = np.array([[[0, 128, 255]]], dtype=np.uint8)
    tensor = to_tensor(pixels)
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    assert torch.equal(tensor.flatten(), torch.tensor([0, 128, 255]).float().div(255).mul(2).sub(1))
    assert tensor.min() == -1 and tensor.max() == 1


# -- load_image ------------------------------------------------------------------------------


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_wav(path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    import wave

    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "garbage.png").write_bytes(os.urandom(2000))
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "garbage.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _png_bytes(Image.fromarray(noise))
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(tmp_path / "truncated.png")
    _write_wav(tmp_path / "sound.png", np.zeros(1600), SR)
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "sound.png")


def test_load_image_refuses_decompression_bombs(tmp_path):
    # A valid PNG header claiming 20000 x 20000 pixels; the check happens before decoding.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    (tmp_path / "bomb.png").write_bytes(data + chunk(b"IEND", b""))
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "bomb.png")


def test_load_image_mode_conversions(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 255, (8, 10, 3), dtype=np.uint8)

    gray = Image.fromarray(rgb[:, :, 0], mode="L")
    gray.save(tmp_path / "gray.png")
    out = load_image(tmp_path / "gray.png")
    assert out.mode == "RGB" and out.size == (10, 8)
    assert np.array_equal(np.asarray(out), np.repeat(rgb[:, :, :1], 3, axis=2))

    # Alpha is dropped (the colour channels are kept as they are), like the reference.
    alpha = rng.integers(0, 255, (8, 10, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgb)

    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").mode == "RGB"

    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    cmyk = np.asarray(load_image(tmp_path / "cmyk.jpg"))
    assert cmyk.shape == (8, 10, 3) and abs(int(cmyk[0, 0, 0]) - 255) <= 2 and cmyk[0, 0, 1:].max() <= 2

    # 16-bit grayscale is scaled to 8 bits, not clipped.
    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert np.asarray(load_image(tmp_path / "gray16.png"))[0, :, 0].tolist() == [0, 100, 255]


def test_load_image_16bit_rgb(tmp_path):
    # 16-bit RGB PNG made with FFmpeg's encoder; Pillow reads it as 8-bit RGB.
    deep = np.zeros((4, 6, 3), dtype=np.uint16)
    deep[..., 0] = 65535
    deep[..., 2] = 257 * 60
    frame = av.VideoFrame.from_ndarray(deep, format="rgb48le")
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 6, 4, "rgb48be"
    packets = encoder.encode(frame.reformat(format="rgb48be")) + encoder.encode(None)
    (tmp_path / "rgb16.png").write_bytes(b"".join(bytes(p) for p in packets))
    out = np.asarray(load_image(tmp_path / "rgb16.png"))
    assert out.shape == (4, 6, 3)
    assert out[0, 0].tolist() == [255, 0, 60]


def _quadrants(height: int, width: int) -> np.ndarray:
    """An upright picture no turn or mirror maps onto itself: four coloured quadrants, a white top row."""
    pixels = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    pixels[:h, :w], pixels[:h, w:] = (220, 30, 30), (30, 200, 30)  # top: red, green
    pixels[h:, :w], pixels[h:, w:] = (30, 30, 220), (220, 220, 30)  # bottom: blue, yellow
    pixels[:4] = 255
    return pixels


# How a camera stores an upright picture under each EXIF Orientation value (EXIF 2.32, tag 0x0112: where
# the stored 0th row and 0th column lie in the picture as shown), written with numpy, not Pillow.
_STORED = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored left-right
    3: lambda u: u[::-1, ::-1],  # turned 180
    4: lambda u: u[::-1],  # mirrored top-bottom
    5: lambda u: u.transpose(1, 0, 2),  # 0th row = left side, 0th column = top
    6: lambda u: np.rot90(u, 1),  # 0th row = right side (shown turned 90 clockwise): the phone held upright
    7: lambda u: u.transpose(1, 0, 2)[::-1, ::-1],  # 0th row = right side, 0th column = bottom
    8: lambda u: np.rot90(u, -1),  # 0th row = left side, 0th column = bottom
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_image_applies_the_exif_orientation_of_a_phone_jpeg(tmp_path, orientation):
    """A portrait photo shown 512x640 (width x height); tags 5-8 store it 640x512 (a phone's sensor)."""
    upright = _quadrants(640, 512)
    stored = np.ascontiguousarray(_STORED[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone-{orientation}.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif.tobytes())
    data = path.read_bytes()
    assert b"Exif\x00\x00" in data[:64]  # a real APP1 Exif segment
    with Image.open(path) as raw:
        assert raw.size == (stored.shape[1], stored.shape[0]) and raw.getexif()[0x0112] == orientation

    out = load_image(path)
    assert out.mode == "RGB" and out.size == (512, 640)  # shown size: portrait, whatever the storage
    diff = np.abs(np.asarray(out).astype(int) - upright.astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) < 40  # JPEG loss only, at the colour edges
    assert output_size(out.height, out.width, parse_size("384*256")) == (320, 256)  # a portrait video (H, W)


def test_load_image_ignores_a_broken_exif_block(tmp_path):
    path = tmp_path / "broken.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_quadrants(64, 48)).save(path, "JPEG", quality=95, exif=exif.tobytes())
    data = bytearray(path.read_bytes())
    at = data.index(b"Exif\x00\x00") + 6
    data[at : at + 8] = b"XX\xff\xff\xff\xff\xff\xff"  # not a TIFF header: the tag cannot be read
    path.write_bytes(bytes(data))
    out = load_image(path)
    assert out.size == (48, 64)  # as stored


# -- audio -----------------------------------------------------------------------------------


@requires_golden
@pytest.mark.parametrize("case", CASES)
def test_load_audio_golden_is_int16_over_32768(case):
    import wave

    path = GOLDEN / "cases" / case / "audio.wav"
    with wave.open(str(path)) as handle:
        assert (handle.getnchannels(), handle.getframerate(), handle.getsampwidth()) == (1, SR, 2)
        raw = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    wave_ = load_audio(path)
    assert wave_.dtype == np.float32 and wave_.ndim == 1
    assert len(wave_) == golden_params(case)["audio_samples"]
    assert np.array_equal(wave_, raw.astype(np.float32) / 32768)


def _sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def _peak_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)])


def _encode_audio_file(path, codec: str, wave: np.ndarray, rate: int, fmt: str | None = None) -> None:
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        chunk = 1024
        for start in range(0, len(wave), chunk):
            block = np.ascontiguousarray(np.stack([wave[start : start + chunk]] * 2).astype(np.float32))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
            frame.sample_rate = rate
            frame.pts = start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_load_audio_resamples_44k_stereo_wav(tmp_path):
    left = _sine(440, 2.0, 44100)
    stereo = np.stack([left, left], axis=1).reshape(-1)
    _write_wav(tmp_path / "stereo.wav", np.round(stereo * 32767), 44100, channels=2)
    wave_ = load_audio(tmp_path / "stereo.wav")
    assert wave_.dtype == np.float32 and wave_.ndim == 1
    assert abs(len(wave_) - 2 * SR) <= 16
    assert abs(_peak_frequency(wave_, SR) - 440) < 1.0
    assert 0.45 < np.abs(wave_[SR // 2 : SR]).max() < 0.55  # the downmix keeps the level


@pytest.mark.parametrize(
    "name, codec, fmt",
    [
        ("tone.mp3", "libmp3lame", None),
        ("tone.ogg", "libopus", None),
        ("tone.m4a", "aac", "mp4"),
        ("tone.flac", "flac", None),
    ],
)
def test_load_audio_compressed_formats(tmp_path, name, codec, fmt):
    rate = 48000 if codec == "libopus" else 44100
    _encode_audio_file(tmp_path / name, codec, _sine(1000, 1.5, rate), rate, fmt)
    wave_ = load_audio(tmp_path / name)
    assert abs(len(wave_) / SR - 1.5) < 0.06  # encoder priming/padding at most a few ms
    assert abs(_peak_frequency(wave_, SR) - 1000) < 1.5


def test_load_audio_from_video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    audio = _sine(300, 1.0, SR).astype(np.float32)
    with FragmentedMP4Writer(path, 64, 64, audio=audio, preset="ultrafast") as writer:
        writer.write(np.zeros((25, 64, 64, 3), np.uint8))
    wave_ = load_audio(path)
    assert abs(len(wave_) / SR - 1.0) < 0.07
    assert abs(_peak_frequency(wave_, SR) - 300) < 1.5


def test_load_audio_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(InputError, match="directory"):
        load_audio(tmp_path)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "corrupt.wav").write_bytes(os.urandom(4000))
    with pytest.raises(InputError):
        load_audio(tmp_path / "corrupt.wav")
    (tmp_path / "picture.wav").write_bytes(_png_bytes(Image.new("RGB", (16, 16))))
    with pytest.raises(InputError, match="no audio stream|not a readable"):
        load_audio(tmp_path / "picture.wav")
    _write_wav(tmp_path / "zero.wav", np.zeros(0), SR)
    with pytest.raises(InputError, match="zero length"):
        load_audio(tmp_path / "zero.wav")


def test_trim_silence():
    tone = _sine(500, 0.5, SR).astype(np.float32)
    padded = np.concatenate([np.zeros(SR // 4), tone, np.full(SR // 2, 1e-4)]).astype(np.float32)
    trimmed = trim_silence(padded, SR)
    assert abs(len(trimmed) - len(tone)) <= SR // 100 * 2  # within one 10 ms frame on each side
    assert np.array_equal(trim_silence(np.zeros(100, np.float32), SR), np.zeros(100, np.float32))
    assert len(trim_silence(np.zeros(0, np.float32), SR)) == 0


def test_normalize_loudness_hits_target():
    # A full-scale 1 kHz sine is -3.01 LUFS (mono); at amplitude 0.1 it is -23.
    assert abs(integrated_loudness(_sine(1000, 3.0, SR, 0.1).astype(np.float32), SR) + 23.0) < 0.1
    quiet = _sine(440, 3.0, SR, 0.01).astype(np.float32)
    louder = normalize_loudness(quiet, SR, target_lufs=-20.0)
    assert louder.dtype == np.float32
    assert abs(integrated_loudness(louder, SR) + 20.0) < 0.1
    # The gain is capped so nothing clips.
    capped = normalize_loudness(quiet, SR, target_lufs=0.0)
    assert np.abs(capped).max() <= 1.0 + 1e-6
    silence = np.zeros(SR, np.float32)
    assert np.array_equal(normalize_loudness(silence, SR), silence)


# -- video writer -----------------------------------------------------------------------------

WIDTH, HEIGHT, FPS, BLOCK = 96, 64, 25, 12
FAST = {"preset": "ultrafast"}


def _block(start: int, count: int) -> np.ndarray:
    """Frames with moving content and noise, deterministic per frame index."""
    frames = np.zeros((count, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(count):
        index = start + i
        rng = np.random.default_rng(index)
        frames[i, :, :, 0] = (index * 7) % 256
        frames[i, 8:40, (index * 3) % WIDTH] = 255
        noise = rng.integers(60, 200, ((HEIGHT - 40) // 8, WIDTH // 8), dtype=np.uint8)
        frames[i, 40:, :, 1] = np.kron(noise, np.ones((8, 8), np.uint8))  # blocky: survives 4:2:0
    return frames


def _speech_like(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(5)
    return (_sine(220, seconds, SR, 0.3) + rng.normal(0, 0.02, int(round(seconds * SR)))).astype(np.float32)


def test_frames_to_uint8_matches_reference_arithmetic():
    video = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).reshape(1, 7, 1, 1).expand(3, 7, 1, 1)
    out = frames_to_uint8(video)
    assert out.shape == (7, 1, 1, 3) and out.dtype == np.uint8
    assert out[:, 0, 0, 0].tolist() == [0, 0, 63, 127, 254, 255, 255]  # truncation, not rounding
    assert np.array_equal(frames_to_uint8(video[None]), out)


def test_writer_output_properties(tmp_path):
    path = tmp_path / "out.mp4"
    audio = _speech_like(3.0)
    with FragmentedMP4Writer(path, WIDTH, HEIGHT, FPS, audio, SR, **FAST) as writer:
        assert writer.partial_path.name == "out.mp4.partial"
        for start in range(0, 48, BLOCK):
            writer.write(_block(start, BLOCK))
        writer.write(torch.zeros(3, 2, HEIGHT, WIDTH))  # float [3, N, H, W] in [-1, 1]
        assert writer.partial_path.exists() and not path.exists()
    assert path.exists() and not writer.partial_path.exists()

    frames, fps, decoded_audio, rate = read_video(path)
    assert frames.shape == (50, HEIGHT, WIDTH, 3) and fps == 25.0 and rate == SR
    assert np.abs(frames[:48].astype(int) - _block(0, 48)).mean() < 4  # lossy but close
    assert np.abs(frames[48:].astype(int) - 127).max() <= 3
    # The audio stops with the video (to within one 1024-sample AAC packet).
    assert 50 / FPS <= len(decoded_audio) / SR < 50 / FPS + 1024 / SR
    with av.open(str(path)) as container:
        video, sound = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, video.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert sound.codec_context.name == "aac" and sound.codec_context.sample_rate == SR
        keyframes = [i for i, p in enumerate(p for p in container.demux(video) if p.size) if p.is_keyframe]
    assert keyframes == [0, 12, 24, 36, 48]  # one GOP per write() call


def test_writer_audio_is_in_sync(tmp_path):
    # A click at 1.0 s and a white frame at frame 25 must line up after decoding.
    audio = np.zeros(2 * SR, np.float32)
    audio[SR : SR + 32] = 0.8
    frames = np.zeros((50, HEIGHT, WIDTH, 3), np.uint8)
    frames[25] = 255
    path = tmp_path / "sync.mp4"
    with FragmentedMP4Writer(path, WIDTH, HEIGHT, FPS, audio, SR, **FAST) as writer:
        writer.write(frames[:25])
        writer.write(frames[25:])
    video, _, sound, _ = read_video(path)
    assert int(np.argmax(video.reshape(50, -1).mean(axis=1))) == 25
    click = int(np.argmax(np.abs(sound)))
    assert abs(click - SR) < 40  # within 2.5 ms; without the AAC priming edit list it is 1024 off


def test_writer_without_audio_and_bad_input(tmp_path):
    path = tmp_path / "silent.mp4"
    with FragmentedMP4Writer(path, WIDTH, HEIGHT, **FAST) as writer:
        writer.write(_block(0, 5))
        with pytest.raises(ValueError, match="shape"):
            writer.write(np.zeros((2, HEIGHT + 2, WIDTH, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((2, HEIGHT, WIDTH, 3), np.int32))
        writer.write(_block(5, 3))
    frames, fps, audio, rate = read_video(path)
    assert frames.shape[0] == 8 and audio is None and rate is None
    with pytest.raises(ValueError, match="even"):
        FragmentedMP4Writer(tmp_path / "odd.mp4", 95, 64)
    empty = FragmentedMP4Writer(tmp_path / "empty.mp4", WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="no frames"):
        empty.close()
    empty.abort()
    assert not (tmp_path / "empty.mp4").exists() and not (tmp_path / "empty.mp4.partial").exists()


def test_writer_keeps_partial_file_on_error(tmp_path):
    path = tmp_path / "failed.mp4"
    with pytest.raises(RuntimeError):
        with FragmentedMP4Writer(path, WIDTH, HEIGHT, FPS, _speech_like(2.0), SR, **FAST) as writer:
            writer.write(_block(0, BLOCK))
            writer.write(_block(BLOCK, BLOCK))
            raise RuntimeError("generation failed")
    assert not path.exists()
    frames, _, audio, _ = read_video(writer.partial_path)
    assert frames.shape[0] == 24 and abs(len(audio) / SR - 24 / FPS) < 1024 / SR


_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import numpy as np
    from test_media import _block, _speech_like, BLOCK, FPS, HEIGHT, SR, WIDTH
    from liveavatar.media.video import FragmentedMP4Writer

    settings = {{}} if sys.argv[3] == "default" else {{"preset": "ultrafast"}}
    writer = FragmentedMP4Writer(sys.argv[1], WIDTH, HEIGHT, FPS, _speech_like(3.0), SR, **settings)
    for start in range(0, int(sys.argv[2]), BLOCK):
        writer.write(_block(start, BLOCK))
    os._exit(0)  # like SIGKILL: no close, no trailer, no Python cleanup
    """
)


def _killed_run(tmp_path, path, frames: int, settings: str = "fast") -> None:
    script = tmp_path / "child.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(_CHILD.format(repo=os.path.dirname(tests), tests=tests))
    subprocess.run([sys.executable, str(script), str(path), str(frames), settings], check=True, timeout=120)


def test_killed_writer_leaves_a_playable_partial_file(tmp_path):
    path = tmp_path / "killed.mp4"
    _killed_run(tmp_path, path, 48)
    partial = tmp_path / "killed.mp4.partial"
    assert not path.exists() and partial.exists()
    # The newest block is still in the muxer when the process dies; the earlier ones are on disk.
    assert FragmentedMP4Writer.resume_points(partial) == [0, 12, 24, 36]
    frames, fps, audio, _ = read_video(partial)
    assert frames.shape[0] == 36 and fps == 25.0
    assert abs(len(audio) / SR - 36 / FPS) < 1024 / SR  # the audio matches the video on disk
    assert np.abs(frames.astype(int) - _block(0, 36)).mean() < 4


def test_resume_points_ignore_a_cut_fragment(tmp_path):
    path = tmp_path / "killed.mp4"
    _killed_run(tmp_path, path, 48)
    partial = tmp_path / "killed.mp4.partial"
    data = partial.read_bytes()
    partial.write_bytes(data[: len(data) - 1000])  # as if killed while writing the last fragment
    assert FragmentedMP4Writer.resume_points(partial) == [0, 12, 24]
    frames, _, audio, _ = read_video(partial)  # reads up to the last complete fragment
    assert frames.shape[0] == 24 and abs(len(audio) / SR - 24 / FPS) < 1024 / SR
    partial.write_bytes(data[:30])
    assert FragmentedMP4Writer.resume_points(partial) == [0]


def test_resume_reproduces_the_uninterrupted_file(tmp_path):
    audio, total = _speech_like(3.0), 60
    full = tmp_path / "full.mp4"
    with FragmentedMP4Writer(full, WIDTH, HEIGHT, FPS, audio, SR) as writer:
        for start in range(0, total, BLOCK):
            writer.write(_block(start, BLOCK))

    path = tmp_path / "resumed.mp4"
    _killed_run(tmp_path, path, 48, "default")  # the real settings: medium preset, 4 threads
    partial = tmp_path / "resumed.mp4.partial"
    with pytest.raises(InputError, match="valid cuts"):
        FragmentedMP4Writer.resume(partial, 30, WIDTH, HEIGHT, FPS, audio, SR)
    with pytest.raises(InputError, match="96x64"):
        FragmentedMP4Writer.resume(partial, 24, WIDTH * 2, HEIGHT, FPS, audio, SR)

    keep = 24  # not the last point, to check that a cut inside the partial file works too
    writer = FragmentedMP4Writer.resume(partial, keep, WIDTH, HEIGHT, FPS, audio, SR)
    assert writer.frames_written == keep
    for start in range(keep, total, BLOCK):
        writer.write(_block(start, BLOCK))
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if "resumed" in p.name) == ["resumed.mp4"]

    ref_frames, _, ref_audio, _ = read_video(full)
    frames, _, sound, _ = read_video(path)
    assert frames.shape == ref_frames.shape == (total, HEIGHT, WIDTH, 3)
    assert np.array_equal(frames, ref_frames)
    assert np.array_equal(sound, ref_audio)
    # Stronger: same packets in the same fragments, so the files are byte-identical.
    assert path.read_bytes() == full.read_bytes()


def test_resume_after_a_crashed_resume_and_from_zero(tmp_path):
    audio = _speech_like(3.0)
    path = tmp_path / "again.mp4"
    _killed_run(tmp_path, path, 36)
    partial = tmp_path / "again.mp4.partial"
    # A resume that dies before writing anything leaves the old file as the resume source ...
    abandoned = FragmentedMP4Writer.resume(partial, 12, WIDTH, HEIGHT, FPS, audio, SR, **FAST)
    abandoned.abort()
    assert (tmp_path / "again.mp4.partial.resume-source").exists()
    # ... which the next resume uses, so no frames are lost.
    writer = FragmentedMP4Writer.resume(partial, 24, WIDTH, HEIGHT, FPS, audio, SR, **FAST)
    writer.write(_block(24, BLOCK))
    assert not (tmp_path / "again.mp4.partial.resume-source").exists()
    writer.close()
    frames, _, _, _ = read_video(path)
    assert frames.shape[0] == 36

    # Cutting at 0 simply starts over.
    _killed_run(tmp_path, path, 24)
    with FragmentedMP4Writer.resume(partial, 0, WIDTH, HEIGHT, FPS, audio, SR, **FAST) as writer:
        writer.write(_block(0, BLOCK))
    assert read_video(path)[0].shape[0] == 12
    assert sorted(p.name for p in tmp_path.iterdir() if "again" in p.name) == ["again.mp4"]


# -- the speech as the video's sound track -------------------------------------------------------------


def _multichannel_wav(path, rate: int, channels: int, seconds: float) -> np.ndarray:
    """Channel c is a tone at 200 * (c + 1) Hz; returns the samples [channels, n] as stored (int16 / 32767)."""
    t = np.arange(int(round(seconds * rate))) / rate
    planes = np.stack([0.3 * np.sin(2 * np.pi * 200 * (c + 1) * t) for c in range(channels)])
    samples = np.round(planes * 32767)
    _write_wav(path, samples.T.reshape(-1), rate, channels)
    return samples / 32767


def test_track_reader_keeps_rate_and_channels_and_reads_the_stretch(tmp_path):
    from liveavatar.media.audio import SpeechTrack

    source = _multichannel_wav(tmp_path / "stereo.wav", 44100, 2, 1.0)
    with SpeechTrack(tmp_path / "stereo.wav", start_s=0.25, duration_s=0.5, gain=0.5).open() as reader:
        assert (reader.sample_rate, reader.channels, reader.layout) == (44100, 2, "stereo")
        parts = [reader.read(1000) for _ in range(30)]
    assert [p.shape[1] for p in parts[:22]] == [1000] * 22 and parts[22].shape[1] == 50 and parts[23].shape[1] == 0
    got = np.concatenate(parts, axis=1)
    start = int(0.25 * 44100)
    np.testing.assert_allclose(got, 0.5 * source[:, start : start + 22050], atol=1e-4)  # 16-bit PCM passes as is
    with SpeechTrack(tmp_path / "stereo.wav").open() as reader:  # to the end of the file
        assert reader.read(10**6).shape == (2, 44100) and reader.read(10).shape == (2, 0)


@pytest.mark.parametrize("rate, channels, want_rate, want_layout", [
    (16000, 1, 16000, "mono"),
    (37800, 2, 44100, "stereo"),  # no AAC rate: the next one up
    (192000, 2, 96000, "stereo"),
    (48000, 6, 48000, None),  # six channels stay six
    (48000, 10, 48000, "stereo"),  # more than AAC carries: mixed down to stereo
])
def test_track_reader_picks_what_aac_carries(tmp_path, rate, channels, want_rate, want_layout):
    from liveavatar.media.audio import SpeechTrack

    _multichannel_wav(tmp_path / "in.wav", rate, channels, 0.5)
    with SpeechTrack(tmp_path / "in.wav").open() as reader:
        assert reader.sample_rate == want_rate
        if want_layout is None:
            assert reader.channels == channels
        else:
            assert reader.layout == want_layout
        samples = reader.read(10**6)
    assert abs(samples.shape[1] - 0.5 * want_rate) <= 64 and samples.shape[0] == reader.channels
    if reader.channels == channels:  # each channel keeps its own tone
        n = min(16384, samples.shape[1])
        for c in range(channels):
            spectrum = np.abs(np.fft.rfft(samples[c, :n] * np.hanning(n)))
            assert abs(np.fft.rfftfreq(n, 1 / want_rate)[np.argmax(spectrum)] - 200 * (c + 1)) < 5


def test_writer_muxes_a_track_at_its_own_rate_and_channels_and_resumes_identically(tmp_path):
    from liveavatar.media.audio import SpeechTrack
    from liveavatar.media.video import read_audio

    source = _multichannel_wav(tmp_path / "stereo.wav", 44100, 2, 3.0)
    track = SpeechTrack(tmp_path / "stereo.wav", start_s=0.5)
    full = tmp_path / "full.mp4"
    with FragmentedMP4Writer(full, WIDTH, HEIGHT, FPS, track, **FAST) as writer:
        for start in range(0, 48, BLOCK):
            writer.write(_block(start, BLOCK))
        assert (writer.sample_rate, writer.audio_channels) == (44100, 2)
    with av.open(str(full)) as container:
        sound = container.streams.audio[0]
        assert (sound.codec_context.sample_rate, sound.codec_context.channels) == (44100, 2)
        assert 160_000 < sound.bit_rate <= 200_000
    planes, rate, layout = read_audio(full)
    assert (rate, layout) == (44100, "stereo")
    assert 48 / FPS <= planes.shape[1] / rate < 48 / FPS + 1024 / rate  # the sound stops with the video
    middle = slice(4410, 4410 + 32768)
    for channel, freq in ((0, 200), (1, 400)):
        spectrum = np.abs(np.fft.rfft(planes[channel, middle] * np.hanning(32768)))
        assert abs(np.fft.rfftfreq(32768, 1 / rate)[np.argmax(spectrum)] - freq) < 2
    # From 0.5 s of the file on: output sample i is file sample 22050 + i.
    scores = [np.dot(planes[0, :8192], source[0, 22050 + d : 22050 + d + 8192]) for d in range(-50, 51)]
    assert int(np.argmax(scores)) - 50 == 0

    # A resume re-reads the track from the start: the same packets, a byte-identical file.
    cut = tmp_path / "cut.mp4"
    writer = FragmentedMP4Writer(cut, WIDTH, HEIGHT, FPS, track, **FAST)
    for start in range(0, 24, BLOCK):
        writer.write(_block(start, BLOCK))
    writer.abort()
    writer = FragmentedMP4Writer.resume(tmp_path / "cut.mp4.partial", 24, WIDTH, HEIGHT, FPS, track, **FAST)
    for start in range(24, 48, BLOCK):
        writer.write(_block(start, BLOCK))
    writer.close()
    assert cut.read_bytes() == full.read_bytes()
