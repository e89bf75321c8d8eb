"""End-to-end parity of the streaming engine with the original real-time pipeline (golden cases T, T1)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import CKPT, GOLDEN, assert_close, golden_case, golden_params, requires_golden
from liveavatar.engine import scheduler
from liveavatar.engine.pipeline import Encodings, LiveAvatarPipeline
from liveavatar.engine.stream import StreamSettings
from liveavatar.media.audio import load_audio

pytestmark = requires_golden


@pytest.mark.parametrize("name", ["A", "B", "T", "T1"])
def test_scheduler_noise_and_rd_rules(name):
    g, p = golden_case(name), golden_params(name)
    timesteps, sigmas = scheduler.flow_sigmas(4)
    assert torch.equal(timesteps, g["scheduler_timesteps"])
    assert torch.equal(sigmas, g["scheduler_sigmas"])
    h, w = p["latent_hw"]
    assert torch.equal(scheduler.clip_noise(p["seed"], 0, 12, h, w)[:, :3], g["dit_b0_x"][0])
    table = torch.tensor([[scheduler.ref_roll(p["seed"], k, s) for s in range(4)] for k in range(len(g["rd_table"]))])
    assert torch.equal(table, g["rd_table"])


@pytest.fixture(scope="module")
def pipe():
    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


def run_case(pipe, name):
    """Runs a golden case through the Python API; records the velocity of each (block, step) call."""
    p = golden_params(name)
    case_dir = GOLDEN / "cases" / name
    wave = load_audio(case_dir / "audio.wav")
    cond = pipe.prepare(case_dir / "image.png", wave, (case_dir / "prompt.txt").read_text(), size=p["size"])
    stream = pipe.stream(cond, StreamSettings(seed=p["seed"]))
    calls = []  # (x, v) per DiT call, in order: block k, step s is call 4k + s
    forward = pipe.dit.forward_block

    def recording_forward(x, *args, **kwargs):
        v = forward(x, *args, **kwargs)
        calls.append((x[0], v[0]))
        return v

    pipe.dit.forward_block = recording_forward
    try:
        blocks = list(stream.blocks(min(p["num_clip_requested"], cond.num_clips)))
    finally:
        del pipe.dit.forward_block
    return cond, stream, blocks, {(i // 4, i % 4): xv for i, xv in enumerate(calls)}


@requires_golden
def test_a_repeated_image_and_prompt_are_not_encoded_again(pipe, monkeypatch):
    """A service's next stream of the same avatar and prompt skips the VAE and the text encoder; the encodings
    are the golden ones, and each caller gets its own copy."""
    g, p = golden_case("T"), golden_params("T")
    case_dir = GOLDEN / "cases" / "T"
    wave, prompt = load_audio(case_dir / "audio.wav"), (case_dir / "prompt.txt").read_text()
    pipe.encodings = Encodings()
    calls = []
    for model in (pipe.vae, pipe.text_encoder):
        real = model.encode
        monkeypatch.setattr(model, "encode", lambda *a, real=real, model=model: calls.append(model) or real(*a))
    first = pipe.prepare(case_dir / "image.png", wave, prompt, size=p["size"])
    assert len(calls) == 3  # the reference frame, the 73 motion frames, the prompt
    first.ref_latent.add_(1.0)  # a caller's change reaches neither the kept encoding nor the next caller
    again = pipe.prepare(case_dir / "image.png", wave, prompt, size=p["size"])
    assert len(calls) == 3 and pipe.encodings.hits == 2
    assert_close("ref_latents", again.ref_latent, g["ref_latents"])
    assert_close("motion_latents", again.motion_latents, g["motion_latents"])
    assert_close("text_context", again.text_context, g["text_context"])
    pipe.prepare(case_dir / "image.png", wave, "Another prompt.", size=p["size"])
    assert calls[3:] == [pipe.text_encoder]


def test_encodings_keep_the_most_recently_used():
    kept = Encodings(kept=2)
    encodes = []

    def encoder(value):
        return lambda: encodes.append(value) or (torch.tensor([value]),)

    for key in ("a", "b", "a", "c", "a", "b"):
        assert kept.get((key,), encoder(ord(key)))[0].item() == ord(key)
    assert encodes == [ord("a"), ord("b"), ord("c"), ord("b")]  # c pushed b out; a, used last, stayed


@pytest.mark.parametrize("name", ["T", "T1"])
def test_stream_matches_realtime_pipeline(pipe, name):
    g, p = golden_case(name), golden_params(name)
    cond, stream, blocks, vel = run_case(pipe, name)
    assert (cond.height, cond.width) == (p["H"], p["W"])
    assert cond.num_clips == p["audio_clips_available"]
    assert_close("ref_image_resized_u8", torch.from_numpy(cond.reference), g["ref_image_resized_u8"])
    assert_close("text_context", cond.text_context, g["text_context"])
    assert_close("audio_emb", cond.audio.embedding, g["audio_emb"])
    assert_close("ref_latents", cond.ref_latent, g["ref_latents"])
    assert_close("motion_latents", cond.motion_latents, g["motion_latents"])

    for s in range(4):
        assert_close(f"dit_b0_x[{s}]", vel[(0, s)][0], g["dit_b0_x"][s])
        assert_close(f"dit_b0_v[{s}]", vel[(0, s)][1], g["dit_b0_v"][s])
    if "dit_c1b0_v0" in g:
        assert_close("dit_c1b0_v0", vel[(4, 0)][1], g["dit_c1b0_v0"])
        assert_close("ref_latents_after_sink_replacement", stream.ref_latent, g["ref_latents_after_sink_replacement"])

    latents = torch.cat([b.latents for b in blocks], dim=1)
    n = p["num_clips_generated"]
    assert_close("latents_final", latents.view(16, n, 12, *latents.shape[2:]).transpose(0, 1), g["latents_final"])

    assert [len(b.frames) for b in blocks] == g["decode_frames_kept"].tolist()
    video = torch.cat([b.frames for b in blocks])  # [N, H, W, 3] uint8
    assert list(video.permute(3, 0, 1, 2).shape) == g["video_shape"].tolist()
    # The golden frames are float in [-1, 1]; ours are the uint8 the MP4 encoder gets, quantised like the
    # original's saver ((x+1)/2*255, truncated): below the float value by less than one step (2/255).
    # The float frames themselves are checked at 1e-4 in test_float_video_matches_before_quantisation.
    frames = video.permute(3, 0, 1, 2).double() / 127.5 - 1
    step, tol = 2 / 255, 1e-4
    for key, mine in (("video_sel", frames[:, g["video_sel_idx"]]), ("video_pool4", F.avg_pool2d(frames, 4))):
        diff = g[key].double() - mine
        assert -tol <= diff.min() and diff.max() <= step + tol, key


@pytest.mark.parametrize("name", ["T1"])
def test_float_video_matches_before_quantisation(pipe, name):
    """The decoder's float output (before uint8) meets the 1e-4 tolerance on the stored frames."""
    g, p = golden_case(name), golden_params(name)
    case_dir = GOLDEN / "cases" / name
    cond = pipe.prepare(case_dir / "image.png", load_audio(case_dir / "audio.wav"), (case_dir / "prompt.txt").read_text(), size=p["size"])
    stream = pipe.stream(cond, StreamSettings(seed=p["seed"]))
    captured = []
    decode = stream.decoder.decode
    stream.decoder.decode = lambda z: captured.append(decode(z)) or captured[-1]
    list(stream.blocks(1))
    video = torch.cat([captured[0][:, :, 3:]] + captured[1:], dim=2)[0]  # the warm-up ran in the constructor
    assert_close("video_sel", video[:, g["video_sel_idx"]], g["video_sel"])
    assert_close("video_pool4", F.avg_pool2d(video, 4), g["video_pool4"])
    assert_close("video_frame_mean", video.double().mean(dim=(2, 3)).T, g["video_frame_mean"])
    assert_close("video_frame_std", video.double().std(dim=(2, 3)).T, g["video_frame_std"])


def test_stream_state_round_trip_continues_identically(pipe):
    """A stream restored from state_dict() in a fresh object yields the same blocks as the original."""
    case_dir = GOLDEN / "cases" / "T1"
    wave = load_audio(GOLDEN / "cases" / "T" / "audio.wav")  # 3 clips of audio with T1's small image
    cond = pipe.prepare(case_dir / "image.png", wave, "talking", size="384*256")
    settings = StreamSettings(seed=5)
    first = pipe.stream(cond, settings)
    blocks = first.blocks(3)
    for _ in range(8):  # two clips: the sink has been replaced and the ring has wrapped
        next(blocks)
    state = first.state_dict()
    rest = [b for b in blocks]
    second = pipe.stream(cond, settings)
    second.load_state_dict(state)
    again = list(second.blocks(3))
    assert [b.index for b in again] == [b.index for b in rest] == [8, 9, 10, 11]
    for a, b in zip(rest, again):
        assert torch.equal(a.latents, b.latents)
        assert torch.equal(a.frames, b.frames)
        assert a.first_frame == b.first_frame


def test_fixed_sink_reproduces_single_gpu_case_A_latents(pipe):
    """Case A (single-GPU pipeline, no online decode) keeps its reference for the whole video. Given its
    conditioning (5-frame ref latent, last 19 of the 92 motion latents), the DiT path is the same as ours."""
    from liveavatar.engine.audio_source import PrecomputedAudio
    from liveavatar.engine.stream import AvatarStream

    g, p = golden_case("A"), golden_params("A")
    audio = PrecomputedAudio(g["audio_emb"], p["audio_clips_available"])
    stream = AvatarStream(pipe.dit, pipe.vae, g["text_context"], g["ref_latents"], g["motion_latents_init"][:, :, -19:],
                          audio, StreamSettings(seed=p["seed"], rolling_sink=False))
    latents = torch.cat([b.latents for b in stream.blocks(p["num_clips_generated"])], dim=1)
    assert not stream.sink_replaced
    assert_close("latents_final", latents.view(16, 2, 12, 32, 48).transpose(0, 1), g["latents_final"])


# --------------------------------------------------------------------------------------------------
# The light TAEW2.1 decoder (--decoder taew2_1) in the stream

TAEW = GOLDEN / "taew2_1" / "taew2_1.pth"


@pytest.fixture(scope="module")
def light(pipe):
    """The same models with the light decoder added: it then decodes the streams unless one asks for "wan"."""
    from liveavatar.models.taehv import TinyDecoder

    tiny = TinyDecoder.from_checkpoint(TAEW)
    light = LiveAvatarPipeline(pipe.dit, pipe.vae, pipe.text_encoder, pipe.audio_encoder, tiny_decoder=tiny)
    assert light.decoder_name == "taew2_1" and list(light.decoders) == ["wan", "taew2_1"] and pipe.decoder_name == "wan"
    case_dir = GOLDEN / "cases" / "T1"
    cond = light.prepare(case_dir / "image.png", load_audio(GOLDEN / "cases" / "T" / "audio.wav"), "talking",
                         size="128*128")
    return light, cond


def test_light_decoder_stream_has_the_vae_streams_frames_timing_and_latents(light):
    """Same blocks, frame counts and first frames as with the VAE's decoder (the audio stays in sync), and the
    frames are those of decoding the decoder's whole input at once: the 7 warm-up motion latents, then the
    blocks' latents, minus the 25 warm-up frames and the stream's 3 dropped frames."""
    pipe, cond = light
    settings = StreamSettings(seed=3)
    stream = pipe.stream(cond, settings)
    assert stream.decoder_name == "taew2_1"
    decoded = []
    decode = stream.decoder.decode
    stream.decoder.decode = lambda z: decoded.append(decode(z)) or decoded[-1]
    blocks = list(stream.blocks(1))
    vae_blocks = list(pipe.stream(cond, StreamSettings(seed=3, decoder="wan")).blocks(1))
    assert [len(b.frames) for b in blocks] == [len(b.frames) for b in vae_blocks] == [9, 12, 12, 12]
    assert [b.first_frame for b in blocks] == [b.first_frame for b in vae_blocks] == [0, 9, 21, 33]
    assert [b.audio_time_span for b in blocks] == [b.audio_time_span for b in vae_blocks]
    assert blocks[0].frames.shape == vae_blocks[0].frames.shape == (9, 128, 128, 3)
    for a, b in zip(blocks, vae_blocks):
        assert torch.equal(a.latents, b.latents)  # the decoder changes no latent
    assert not torch.equal(blocks[1].frames, vae_blocks[1].frames)

    latents = torch.cat([cond.motion_latents[:, :, :7]] + [b.latents[None] for b in blocks], dim=2)
    whole = pipe.decoders["taew2_1"].decode_video(latents.transpose(1, 2))  # NTCHW, [0, 1]
    assert whole.shape[1] == 25 + 3 + 45
    streamed = torch.cat([decoded[0][:, :, 3:]] + decoded[1:], dim=2)  # [-1, 1]
    err = float((streamed.transpose(1, 2) - (whole[:, 28:] * 2 - 1)).abs().max())
    assert err <= 2e-4, err  # 1e-4 on [0, 1] frames
    # The frames shown are those values as uint8 ((x + 1) / 2 * 255, truncated).
    expected = ((streamed[0].clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0)
    assert torch.equal(torch.cat([b.frames for b in blocks]), expected)


def test_light_decoder_stream_resumes_identically_and_refuses_the_other_decoder(light):
    from liveavatar.errors import InputError

    pipe, cond = light
    settings = StreamSettings(seed=5)
    first = pipe.stream(cond, settings)
    blocks = first.blocks(2)
    for _ in range(5):  # past the sink replacement
        next(blocks)
    state = first.state_dict()
    assert state["decoder_name"] == "taew2_1" and len(state["decoder"]) == 9
    rest = list(blocks)
    second = pipe.stream(cond, settings)
    second.load_state_dict(state)
    again = list(second.blocks(2))
    assert [b.index for b in again] == [b.index for b in rest] == [5, 6, 7]
    for a, b in zip(rest, again):
        assert torch.equal(a.frames, b.frames) and a.first_frame == b.first_frame
    with pytest.raises(InputError, match="--resume: the interrupted run decoded with --decoder taew2_1, this one "
                                         "with --decoder wan; resume with --decoder taew2_1"):
        pipe.stream(cond, StreamSettings(seed=5, decoder="wan")).load_state_dict(state)


def test_a_decoder_the_pipeline_lacks_is_refused(pipe, light):
    from liveavatar.errors import InputError

    _, cond = light
    with pytest.raises(InputError, match="decoder taew2_1: this pipeline was started without it .*available: wan"):
        pipe.stream(cond, StreamSettings(decoder="taew2_1"))
