"""wav2vec2 speech features (golden README §1.5, §2.3, §4; TPP.md §7)."""

import shutil
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import WAN_DIR, GOLDEN, assert_close, golden_case, golden_params, module_checks, requires_golden
from liveavatar.errors import CheckpointError, InputError
from liveavatar.models import audio_encoder as audio_encoder_module
from liveavatar.models.audio_encoder import (
    AudioEncoder,
    AudioFeatures,
    bucket_to_video_frames,
    interpolate_to_30fps,
)

W2V_DIR = WAN_DIR / "wav2vec2-large-xlsr-53-english"
POS_CONV = "wav2vec2.encoder.pos_conv_embed.conv."


def read_wav_16k(path) -> np.ndarray:
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getsampwidth(), f.getnchannels()) == (16000, 2, 1)
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768


def case_audio(name: str) -> np.ndarray:
    return read_wav_16k(GOLDEN / "cases" / name / "audio.wav")


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    return AudioEncoder.from_pretrained(W2V_DIR)


@pytest.fixture
def w2v_copy(tmp_path):
    folder = tmp_path / "wav2vec2"
    shutil.copytree(W2V_DIR, folder)
    for path in [folder, *folder.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


# ---------------------------------------------------------------------------------------------
# golden parity


@requires_golden
def test_probe_matches_module_checks(encoder):
    gold = module_checks()
    audio = gold["w2v_probe_audio"]
    assert_close("w2v_probe_input_values", encoder.input_values(audio), gold["w2v_probe_input_values"])
    states = encoder.hidden_states(audio)
    ref = gold["w2v_probe_hidden_states"]
    assert states.shape[0] == encoder.model.config.num_hidden_layers + 1
    assert_close("w2v_probe_hidden_states", states, ref)
    # The 25th state is the final LayerNorm output, not layer 23's raw output (the transformers-5 trap).
    assert_close("w2v_probe_hidden_states[24]", states[24], ref[24])


@requires_golden
@pytest.mark.parametrize("case", ["A", "B"])
def test_case_intermediates(encoder, case):
    gold, params = golden_case(case), golden_params(case)
    audio = case_audio(case)
    assert audio.shape[0] == params["audio_samples"]

    assert_close("w2v_input_values", encoder.input_values(audio), gold["w2v_input_values"])
    states = encoder.hidden_states(audio)
    assert states.shape[1] == params["wav2vec_frames_50hz"]
    assert_close("w2v_hidden_states", states, gold["w2v_hidden_states"])
    assert_close("w2v_hidden_states[24]", states[24], gold["w2v_hidden_states"][24])

    feat30 = interpolate_to_30fps(states)
    assert feat30.shape[1] == params["audio_frames_30fps"]
    assert_close("audio_feat_30fps", feat30, gold["audio_feat_30fps"])
    # Bucketing copies frames, so on the golden 30 fps features it must be exact.
    emb, num_clips = bucket_to_video_frames(gold["audio_feat_30fps"])
    assert torch.equal(emb, gold["audio_emb"])
    assert num_clips == params["audio_clips_available"]


@requires_golden
@pytest.mark.parametrize("case", ["A", "B", "T", "T1"])
def test_case_audio_emb(encoder, case):
    gold, params = golden_case(case), golden_params(case)
    features = encoder.features(case_audio(case))
    assert isinstance(features, AudioFeatures)
    assert features.num_clips == params["audio_clips_available"]
    assert features.embedding.shape[-1] == 48 * features.num_clips == params["audio_emb_frames"]
    assert_close("audio_emb", features.embedding, gold["audio_emb"])
    # Clip 0 block 0 of the DiT reads the first 12 video frames.
    assert torch.equal(gold["audio_emb"][..., 0:12], gold["dit_b0_audio_input"])
    assert_close("dit_b0_audio_input", features.embedding[..., 0:12], gold["dit_b0_audio_input"])


@requires_golden
def test_chunked_conv_encoder_matches_one_pass(encoder, monkeypatch):
    audio = case_audio("B")
    one_pass = encoder.hidden_states(audio)  # 249 frames: a single conv chunk
    monkeypatch.setattr(audio_encoder_module, "_CONV_CHUNK_FRAMES", 7)
    chunked = encoder.hidden_states(audio)
    # Same frames, different conv input lengths: only float32 summation order differs (~1e-6).
    assert_close("chunked vs one pass", chunked, one_pass, tol=1e-5)
    assert_close("chunked vs golden", chunked, golden_case("B")["w2v_hidden_states"])


@requires_golden
def test_input_forms_agree(encoder):
    audio = case_audio("T1")
    ref = encoder.hidden_states(audio)
    assert torch.equal(encoder.hidden_states(torch.from_numpy(audio)), ref)
    assert torch.equal(encoder.hidden_states(audio[None]), ref)
    assert encoder.to("cpu") is encoder


@requires_golden
def test_new_style_weight_norm_names_load_the_same(encoder, w2v_copy):
    weights = w2v_copy / "model.safetensors"
    state = load_file(weights)
    assert POS_CONV + "weight_g" in state  # the golden file uses the legacy names
    state[POS_CONV + "parametrizations.weight.original0"] = state.pop(POS_CONV + "weight_g")
    state[POS_CONV + "parametrizations.weight.original1"] = state.pop(POS_CONV + "weight_v")
    save_file(state, weights, metadata={"format": "pt"})
    audio = module_checks()["w2v_probe_audio"]
    assert torch.equal(AudioEncoder.from_pretrained(w2v_copy).hidden_states(audio), encoder.hidden_states(audio))


@requires_golden
def test_dtype_argument(encoder):
    bf16 = AudioEncoder.from_pretrained(W2V_DIR, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    features = bf16.features(case_audio("T1"))
    assert features.embedding.dtype == torch.bfloat16
    assert features.embedding.shape == golden_case("T1")["audio_emb"].shape


# ---------------------------------------------------------------------------------------------
# resampling and bucketing rules (no checkpoint needed)


def test_interpolation_length_uses_the_reference_float_rule():
    # int(205 / 50 * 30) = int(122.99999999999999) = 122, one less than exact arithmetic.
    assert interpolate_to_30fps(torch.zeros(2, 205, 3)).shape == (2, 122, 3)
    assert interpolate_to_30fps(torch.zeros(2, 164, 3)).shape == (2, 98, 3)
    # align_corners=True keeps both end frames.
    ramp = torch.arange(10.0).view(1, 10, 1)
    out = interpolate_to_30fps(ramp)
    assert out.shape == (1, 6, 1)
    torch.testing.assert_close(out.flatten(), torch.linspace(0, 9, 6), rtol=0, atol=1e-6)
    with pytest.raises(InputError):
        interpolate_to_30fps(torch.zeros(1, 1, 3))


def numbered_frames(num_frames: int, layers: int = 2, channels: int = 3) -> torch.Tensor:
    """[L, T30, C] whose frame t holds t + 1 everywhere, so a picked frame is readable and 0 means none."""
    return (torch.arange(num_frames, dtype=torch.float32) + 1).view(1, -1, 1).expand(layers, -1, channels).clone()


def picked_frames(emb: torch.Tensor) -> list[int]:
    """Feature-frame index per video frame (-1 for a zero frame)."""
    assert emb.shape[0] == 1
    assert torch.all(emb == emb[:, :1, :1]), "every layer/channel of a video frame comes from one feature frame"
    return [int(v) - 1 for v in emb[0, 0, 0]]


def test_bucketing_at_25fps():
    # 57 feature frames < 48 * 30/25 = 57.6: one clip; 58: two clips.
    emb, num_clips = bucket_to_video_frames(numbered_frames(57))
    assert (num_clips, emb.shape) == (1, (1, 2, 3, 48))
    assert picked_frames(emb) == [round(1.2 * k) for k in range(48)]

    emb, num_clips = bucket_to_video_frames(numbered_frames(58))
    assert (num_clips, emb.shape) == (2, (1, 2, 3, 96))
    picked = picked_frames(emb)
    # Video frame k takes feature frame round(1.2 k); 48 * 1.2 = 57.6 -> 58 is past the end: zero tail.
    assert picked[:48] == [round(1.2 * k) for k in range(48)]
    assert picked[48:] == [-1] * 48


def test_bucketing_rounds_half_to_even():
    # At 16 fps video frame k sits at 1.875 k feature frames: k = 4, 12, 20 are exact ties.
    emb, num_clips = bucket_to_video_frames(numbered_frames(100), fps=16, frames_per_clip=48)
    assert num_clips == int(100 / 90) + 1 == 2
    picked = picked_frames(emb)
    assert picked[4] == 8  # 7.5 -> 8
    assert picked[12] == 22  # 22.5 -> 22 (half up would give 23)
    assert picked[20] == 38  # 37.5 -> 38
    assert picked[53] == 99  # 99.375
    assert picked[54:] == [-1] * (96 - 54)  # 101.25 and later: past the audio


def test_bucketing_without_audio_frames_is_one_zero_clip():
    emb, num_clips = bucket_to_video_frames(torch.zeros(25, 0, 4))
    assert num_clips == 1 and emb.shape == (1, 25, 4, 48)
    assert not emb.any()


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        AudioEncoder.from_pretrained(tmp_path / "nowhere")


@requires_golden
def test_missing_model_file(w2v_copy):
    (w2v_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AudioEncoder.from_pretrained(w2v_copy)


@requires_golden
@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty"])
def test_corrupt_model_file(w2v_copy, corruption):
    weights = w2v_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"\xff" * 4096, "truncated": data[: len(data) // 2], "empty": b""}[corruption])
    with pytest.raises(CheckpointError, match="model.safetensors") as info:
        AudioEncoder.from_pretrained(w2v_copy)
    assert "\n" not in str(info.value)


@requires_golden
def test_missing_tensor(w2v_copy):
    weights = w2v_copy / "model.safetensors"
    state = load_file(weights)
    del state["wav2vec2.encoder.layer_norm.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="encoder.layer_norm.weight"):
        AudioEncoder.from_pretrained(w2v_copy)


@requires_golden
def test_bad_audio(encoder):
    with pytest.raises(InputError, match="too short"):
        encoder.hidden_states(np.zeros(399, np.float32))
    with pytest.raises(InputError, match="mono"):
        encoder.hidden_states(np.zeros((2, 16000), np.float32))
