"""Wan2.1 VAE: module checks, the conditioning encodes of cases A/B/T/T1, and the TPP streaming decode
(README §1.4, §2.4-2.5, §6; TPP.md §2, §5), plus checkpoint errors and reduced precision."""

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import WAN_DIR, assert_close, golden_case, module_checks, requires_golden
from liveavatar.errors import CheckpointError
from liveavatar.models.vae import VAE_FILE, WanVAE

VAE_PATH = WAN_DIR / VAE_FILE
TPP_CASES = ["T", "T1"]
WARMUP_LATENTS = 7  # TPP.md §5: the oldest 7 motion latents fill the decoder caches
FIRST_BLOCK_DROP = 3  # frames dropped from clip 0 block 0
LATENTS_PER_BLOCK = 3


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    return WanVAE.from_checkpoint(VAE_PATH)


def ref_frame(case: str) -> torch.Tensor:
    """The resized reference image as a [1, 3, 1, H, W] video in [-1, 1]."""
    u8 = golden_case(case)["ref_image_resized_u8"]
    return (u8.permute(2, 0, 1).float() / 255 * 2 - 1)[None, :, None]


# --------------------------------------------------------------------------------------------------
# Single-call module checks (README §6)


@requires_golden
def test_module_check_decode(vae):
    mc = module_checks()
    out = vae.decode(mc["vae_dec_in"])
    assert out.dtype == torch.float32 and out.abs().max() <= 1.0
    assert_close("vae_dec_out", out, mc["vae_dec_out"], tol=1e-5)


@requires_golden
def test_module_check_encode(vae):
    mc = module_checks()
    assert_close("vae_enc_out", vae.encode(mc["vae_enc_in"]), mc["vae_enc_out"], tol=1e-5)


# --------------------------------------------------------------------------------------------------
# Conditioning encodes (README §2.4-2.5, TPP.md §2)


@requires_golden
def test_case_a_reference_encodes(vae):
    gold = golden_case("A")
    frame = ref_frame("A")
    five = vae.encode(frame.repeat(1, 1, 5, 1, 1))
    assert_close("ref_encode_5frames", five, gold["ref_encode_5frames"])
    assert_close("ref_latents", five[:, :, 1:], gold["ref_latents"])
    assert_close("vae_encode_ref_alone", vae.encode(frame), gold["vae_encode_ref_alone"])


@requires_golden
@pytest.mark.parametrize("case", ["A", "B"])
def test_single_gpu_motion_latents(vae, case):
    """The reference repeated 5x, then 73x: a 365-frame static clip -> 92 latents."""
    gold = golden_case(case)
    latents = vae.encode(ref_frame(case).repeat(1, 1, 5 * 73, 1, 1))
    assert latents.shape[2] == 92
    if case == "A":
        assert latents.shape[2] == int(gold["motion_latents_init_num_frames"])
        assert_close("motion_latents_init", latents, gold["motion_latents_init"])
    else:
        assert_close("motion_latents_init_last19", latents[:, :, -19:], gold["motion_latents_init_last19"])


@requires_golden
@pytest.mark.parametrize("case", TPP_CASES)
def test_tpp_conditioning_encodes(vae, case):
    gold = golden_case(case)
    frame = ref_frame(case)
    assert_close(f"{case} ref_latents", vae.encode(frame), gold["ref_latents"])
    assert_close(f"{case} motion_latents", vae.encode(frame.repeat(1, 1, 73, 1, 1)), gold["motion_latents"])


# --------------------------------------------------------------------------------------------------
# TPP streaming decode (TPP.md §5)


_streams: dict = {}


def streamed_video(vae: WanVAE, case: str) -> dict:
    """The rank-4 decode of a TPP case (run once per case): warm-up, then one call per block of 3 latents."""
    if case not in _streams:
        gold = golden_case(case)
        decoder = vae.streaming_decoder()
        warmup = gold["motion_latents"][:, :, :WARMUP_LATENTS]
        frames_per_call = [decoder.decode(warmup).shape[2]]
        blocks = [
            clip[None, :, start:start + LATENTS_PER_BLOCK]
            for clip in gold["latents_final"]
            for start in range(0, clip.shape[1], LATENTS_PER_BLOCK)
        ]
        kept, cache_sizes = [], []
        for block in blocks:
            frames = decoder.decode(block)[0]
            frames_per_call.append(frames.shape[1])
            kept.append(frames if kept else frames[:, FIRST_BLOCK_DROP:])
            cache_sizes.append([tuple(t.shape) for t in decoder._cache.values()])
        _streams[case] = dict(
            video=torch.cat(kept, dim=1),
            frames_per_call=torch.tensor(frames_per_call),
            frames_kept=torch.tensor([v.shape[1] for v in kept]),
            latents=torch.cat([warmup, *blocks], dim=2),
            cache_sizes=cache_sizes,
        )
    return _streams[case]


@requires_golden
@pytest.mark.parametrize("case", TPP_CASES)
def test_streaming_decode_matches_golden(vae, case):
    gold = golden_case(case)
    out = streamed_video(vae, case)
    assert_close("decode_frames_per_call", out["frames_per_call"], gold["decode_frames_per_call"])
    assert_close("decode_frames_kept", out["frames_kept"], gold["decode_frames_kept"])
    video = out["video"]  # [3, F, H, W]
    assert_close("video_shape", torch.tensor(video.shape), gold["video_shape"])
    assert_close("video_sel", video[:, gold["video_sel_idx"]], gold["video_sel"])
    assert_close("video_pool4", F.avg_pool2d(video, 4), gold["video_pool4"])
    frames = video.double().transpose(0, 1).flatten(2)  # [F, 3, H*W]
    assert_close("video_frame_mean", frames.mean(-1), gold["video_frame_mean"])
    assert_close("video_frame_std", frames.std(-1), gold["video_frame_std"])


@requires_golden
@pytest.mark.parametrize("case", TPP_CASES)
def test_streaming_decoder_memory_is_constant(vae, case):
    """Every cache entry holds at most 2 frames, and the cache neither gains entries nor grows between calls."""
    sizes = streamed_video(vae, case)["cache_sizes"]
    assert all(shape[2] <= 2 for shape in sizes[0])
    assert all(call == sizes[0] for call in sizes)


@requires_golden
def test_streaming_equals_one_shot_decode(vae):
    """TPP.md §5: one causal decode of (warm-up latents + all blocks), minus its first 25 + 3 frames, is the stream."""
    out = streamed_video(vae, "T1")
    one_shot = vae.decode(out["latents"])[0, :, 4 * WARMUP_LATENTS - 3 + FIRST_BLOCK_DROP:]
    assert torch.equal(one_shot, out["video"])


@requires_golden
def test_streaming_decoder_reset(vae):
    latents = module_checks()["vae_dec_in"]
    decoder = vae.streaming_decoder()
    first = decoder.decode(latents[:, :, :1])
    assert first.shape[2] == 1
    assert decoder.decode(latents[:, :, 1:]).shape[2] == 8
    decoder.reset()
    again = decoder.decode(latents[:, :, :1])
    assert torch.equal(again, first)


def test_rejects_bad_shapes():
    vae = WanVAE(base_dim=2).eval()
    with pytest.raises(ValueError, match="1\\+4k"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 8, 1, 2, 2))


# --------------------------------------------------------------------------------------------------
# Checkpoint errors: one line naming the file


def expect_checkpoint_error(path, *fragments: str):
    with pytest.raises(CheckpointError) as info:
        WanVAE.from_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert re.search(fragment, message), message


def test_missing_file(tmp_path):
    expect_checkpoint_error(tmp_path / VAE_FILE, "missing")


@requires_golden
def test_truncated_file(tmp_path):
    path = tmp_path / VAE_FILE
    path.write_bytes(VAE_PATH.read_bytes()[:100_000])
    expect_checkpoint_error(path, "cannot read")


def test_garbage_file(tmp_path):
    path = tmp_path / VAE_FILE
    path.write_bytes(b"not a checkpoint" * 100)
    expect_checkpoint_error(path, "cannot read")


@pytest.fixture(scope="module")
def state_dict() -> dict:
    return torch.load(VAE_PATH, map_location="cpu", weights_only=True)


@requires_golden
@pytest.mark.parametrize("key", ["decoder.head.2.bias", "encoder.conv1.weight"])
def test_missing_tensor(tmp_path, state_dict, key):
    path = tmp_path / VAE_FILE
    torch.save({k: v for k, v in state_dict.items() if k != key}, path)
    expect_checkpoint_error(path, re.escape(key))


@requires_golden
def test_unexpected_tensor(tmp_path, state_dict):
    path = tmp_path / VAE_FILE
    torch.save({**state_dict, "decoder.extra.weight": torch.zeros(1)}, path)
    expect_checkpoint_error(path, "unexpected", "decoder.extra.weight")


@requires_golden
def test_wrong_shape(tmp_path, state_dict):
    path = tmp_path / VAE_FILE
    key = "decoder.upsamples.3.time_conv.weight"
    torch.save({**state_dict, key: state_dict[key][:, :, :2].clone()}, path)
    expect_checkpoint_error(path, re.escape(key), "shape")


# --------------------------------------------------------------------------------------------------
# Reduced precision


@requires_golden
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_reduced_precision_cpu(dtype, tol):
    """Runs in bf16/fp16; the reference itself, run in bf16, is 5.4e-2 off on vae_dec_out (fp16: 7e-3)."""
    vae = WanVAE.from_checkpoint(VAE_PATH, dtype=dtype)
    assert vae.dtype == dtype and all(p.dtype == dtype for p in vae.parameters())
    mc = module_checks()
    video = vae.decode(mc["vae_dec_in"])
    latents = vae.encode(mc["vae_enc_in"])
    assert video.dtype == latents.dtype == torch.float32
    assert_close(f"vae_dec_out {dtype}", video, mc["vae_dec_out"], tol=tol)
    assert_close(f"vae_enc_out {dtype}", latents, mc["vae_enc_out"], tol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 0.01), (torch.bfloat16, 0.15), (torch.float16, 0.02)])
def test_cuda_matches_cpu(dtype, tol):
    """Random weights; float32 on the GPU may use TF32 convolutions, hence its loose tolerance."""
    torch.manual_seed(0)
    cpu = WanVAE(base_dim=8).eval().requires_grad_(False)
    gpu = WanVAE(base_dim=8).eval().requires_grad_(False)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to("cuda", dtype)
    video = torch.rand(1, 3, 9, 64, 96) * 2 - 1
    latents = cpu.encode(video)
    assert_close(f"encode cuda {dtype}", gpu.encode(video.cuda()).cpu(), latents, tol=tol)
    decoder = gpu.streaming_decoder()
    streamed = torch.cat([decoder.decode(latents[:, :, :1].cuda()), decoder.decode(latents[:, :, 1:].cuda())], 2)
    assert_close(f"decode cuda {dtype}", streamed.cpu(), cpu.decode(latents), tol=tol)
