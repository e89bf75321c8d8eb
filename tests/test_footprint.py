"""Memory a mode needs, counted before loading, and the refusal of a mode that does not fit the machine."""

import argparse

import pytest

from conftest import CKPT, requires_golden
from liveavatar.engine import footprint
from liveavatar.errors import LiveAvatarError
from liveavatar.models.dit import S2VConfig

GIB = 2**30
FULL = S2VConfig()
T5_AND_WAV2VEC2 = int(11.36e9 + 1.27e9)  # the released files


def test_full_size_counts_match_what_the_gpu_runs_measured():
    block, rest = footprint.transformer_bytes(FULL, fp8=False)
    assert 40 * block + rest == pytest.approx(32.6e9, rel=0.02)  # 16.3 B parameters in bf16
    fp8_block, _ = footprint.transformer_bytes(FULL, fp8=True)
    assert fp8_block == pytest.approx(block / 2, rel=0.01)
    # 704*384: 1056 tokens a latent frame, 12 latent frames a clip; bf16 rings 41.5 GB, FP8 rings 21.4 GB.
    assert footprint.ring_bytes(FULL, 1056, 4, fp8=False) == 4 * 40 * 2 * 12672 * 40 * 128 * 2
    assert footprint.ring_bytes(FULL, 1056, 4, fp8=True) / 1e9 == pytest.approx(21.4, abs=0.05)
    area = 704 * 384
    assert footprint.tokens_per_frame(area) == 1056
    # Measured peaks on the H100: bf16 75.3 GiB, FP8 61.7 GiB.
    bf16 = footprint.footprint(FULL, area, 4, fp8=False, offload=False, encoder_bytes=T5_AND_WAV2VEC2)
    fp8 = footprint.footprint(FULL, area, 4, fp8=True, offload=False, encoder_bytes=T5_AND_WAV2VEC2)
    assert bf16.device / GIB == pytest.approx(75.3, abs=1.5) and fp8.device / GIB == pytest.approx(61.7, abs=1.5)
    low = footprint.footprint(FULL, area, 4, fp8=True, offload=True, encoder_bytes=T5_AND_WAV2VEC2)
    assert low.device == footprint.OFFLOAD_DEVICE
    assert low.pinned / GIB == pytest.approx((14.07e9 + 21.41e9) / GIB, abs=0.3)
    # Loading holds the bf16 transformer in host memory before the FP8 blocks are pinned.
    assert low.host >= 32.6e9 + T5_AND_WAV2VEC2
    fewer_steps = footprint.footprint(FULL, area, 3, fp8=True, offload=True, encoder_bytes=T5_AND_WAV2VEC2)
    assert low.pinned - fewer_steps.pinned == footprint.ring_bytes(FULL, 1056, 1, fp8=True)


def test_a_mode_that_does_not_fit_is_refused_with_the_numbers():
    need = footprint.footprint(FULL, 704 * 384, 4, fp8=True, offload=False, encoder_bytes=T5_AND_WAV2VEC2)
    with pytest.raises(LiveAvatarError) as e:
        footprint.check_fits(need, "--fp8", "704*384", gpu_bytes=24 * GIB, host_bytes=64 * GIB)
    assert str(e.value) == ("--fp8 at 704*384 needs about 62 GiB of GPU memory and 14 GiB of host memory; this GPU "
                            "has 24 GiB; --offload_model runs in about 12 GiB")
    low = footprint.footprint(FULL, 704 * 384, 4, fp8=False, offload=True, encoder_bytes=T5_AND_WAV2VEC2)
    with pytest.raises(LiveAvatarError, match=r"^--offload_model at 704\*384 needs about 12 GiB of GPU memory and "
                                              r"\d+ GiB of host memory \(\d+ GiB of it pinned\); this machine has 32 GiB "
                                              r"of host memory available; --fp8 halves the transformer's share$"):
        footprint.check_fits(low, "--offload_model", "704*384", gpu_bytes=24 * GIB, host_bytes=32 * GIB)
    footprint.check_fits(low, "--offload_model", "704*384", gpu_bytes=24 * GIB, host_bytes=128 * GIB)
    footprint.check_fits(need, "--fp8", "704*384", gpu_bytes=None, host_bytes=None)  # nothing known: no refusal


@requires_golden
def test_the_command_refuses_before_loading(monkeypatch):
    """Backend.from_args counts the checkpoint's own architecture (here the tiny one) for the asked size."""
    from liveavatar.interfaces import backend

    monkeypatch.setattr(backend, "resolve_device", lambda device, dtype, fp8: ("cuda", None))
    monkeypatch.setattr(footprint, "gpu_memory", lambda device: 1 * 2**20)  # a 1 MiB GPU
    monkeypatch.setattr(footprint, "host_memory_available", lambda: 64 * GIB)
    args = argparse.Namespace(device="cuda", dtype=None, fp8=False, gpus=1, sample_steps=4, ckpt_dir=CKPT,
                              lora_path_dmd=None, offload_model=False, size="704*384", decoder="wan", decoder_path=None)
    with pytest.raises(LiveAvatarError, match=r"^the default mode \(bf16\) at 704\*384 needs about 6 GiB of GPU "
                                              r"memory .*; this GPU has 0 GiB; --offload_model runs in about 12 GiB$"):
        backend.Backend.from_args(args)
    monkeypatch.setattr(footprint, "gpu_memory", lambda device: 80 * GIB)
    assert backend.Backend.from_args(args).device == "cuda"
