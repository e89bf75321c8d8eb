"""Per-block audio features: exact for short files, bounded memory (segments) for long ones."""

import pytest
import torch

from conftest import GOLDEN, WAN_DIR, golden_params, requires_golden
from liveavatar.engine import audio_source
from liveavatar.engine.audio_source import PrecomputedAudio, SegmentedAudio, audio_source_for, clips_covered
from liveavatar.media.audio import load_audio
from liveavatar.models.audio_encoder import AudioEncoder

pytestmark = requires_golden


@pytest.fixture(scope="module")
def encoder():
    return AudioEncoder.from_pretrained(WAN_DIR / "wav2vec2-large-xlsr-53-english")


@pytest.mark.parametrize("name", ["A", "B", "T", "T1"])
def test_clip_count_formula_matches_features(encoder, name):
    wave = load_audio(GOLDEN / "cases" / name / "audio.wav")
    assert clips_covered(len(wave)) == encoder.features(wave).num_clips == golden_params(name)["audio_clips_available"]


def test_short_audio_is_exact(encoder):
    wave = load_audio(GOLDEN / "cases" / "T" / "audio.wav")
    source = audio_source_for(encoder, wave)
    assert isinstance(source, PrecomputedAudio)
    assert torch.equal(source.block(5, 12), encoder.features(wave).embedding[..., 60:72])


def test_segmented_audio_has_the_same_layout(encoder, monkeypatch):
    """Segments of one clip each (48 frames) with 2 s of context: same block shapes, clip count and silent tail."""
    monkeypatch.setattr(audio_source, "SEGMENT_CLIPS", 1)
    wave = load_audio(GOLDEN / "cases" / "T" / "audio.wav")
    exact = encoder.features(wave).embedding
    seg = SegmentedAudio(encoder, wave)
    assert seg.num_clips == 3
    blocks = [seg.block(k, 12) for k in range(12)]
    assert all(b.shape == (1, 25, 32, 12) and torch.isfinite(b).all() for b in blocks)
    joined = torch.cat(blocks, dim=-1)
    silent_exact = exact.abs().sum(dim=(0, 1, 2)) == 0
    silent_seg = joined.abs().sum(dim=(0, 1, 2)) == 0
    assert torch.equal(silent_exact, silent_seg) and silent_seg[-10:].all()
    assert seg._segment[0] == 2  # one segment held at a time: the last one


def test_long_audio_switches_to_segments(encoder, monkeypatch):
    monkeypatch.setattr(audio_source, "EXACT_LIMIT_S", 1.0)
    wave = load_audio(GOLDEN / "cases" / "T1" / "audio.wav")
    source = audio_source_for(encoder, wave)
    assert isinstance(source, SegmentedAudio) and source.num_clips == 1
