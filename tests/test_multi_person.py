"""Multi-person mode (two speakers in one picture) against the original's real-time pipeline (golden case M):
the mask processing (exact), the per-actor audio and injection, the velocities, and `generate` end to end on
one and on two processes; the bad inputs; and the automatic masks on real photographs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from conftest import CKPT, GOLDEN, WAN_DIR, LORA_FILE, assert_close, golden_case, golden_params, requires_golden
from liveavatar.engine.multi_person import (
    ActorAudio, Speakers, dilate, dilation_radius, exclusive, mix_tracks, routing_masks, split_plus, token_grid,
)
from liveavatar.errors import InputError
from liveavatar.interfaces.cli import main
from liveavatar.media.audio import load_audio
from liveavatar.media.masks import load_masks
from liveavatar.media.video import read_video

pytestmark = requires_golden

CASE = GOLDEN / "cases" / "M"
CPU = ["--ckpt_dir", str(CKPT), "--device", "cpu", "--dtype", "float32"]
TRACKS = f"{CASE / 'audio.wav'}+{CASE / 'audio2.wav'}"
MASKS = f"{CASE / 'mask_actor1.png'}+{CASE / 'mask_actor2.png'}"


def case_m_args(out: Path, *extra: str, original: bool = True) -> list[str]:
    """`generate` on case M; `original`: its two whole clips on the original's timing (what the golden data holds)."""
    timing = ["--num_clip", "2", "--original_timing"] if original else []
    return ["generate", "--image", str(CASE / "image.png"), "--audio", TRACKS, "--masks", MASKS,
            "--prompt", (CASE / "prompt.txt").read_text(), "--size", "384*256", "--base_seed", "21",
            "--save_file", str(out), *CPU, *timing, *extra]


def as_clips(latents: torch.Tensor, clips: int) -> torch.Tensor:
    """[16, clips*12, h, w] -> [clips, 16, 12, h, w], the golden layout."""
    return latents.view(16, clips, 12, *latents.shape[2:]).transpose(0, 1)


# ---------------------------------------------------------------------------------------------- masks
def test_mask_processing_is_exact():
    g, p = golden_case("M"), golden_params("M")
    grid = token_grid(p["H"], p["W"], p["infer_frames"])
    assert grid == tuple(p["multi_person"]["masks"]["token_grid"])
    raw = load_file(str(CASE / "masks.safetensors"))["masks_raw"]
    drawn = load_masks([CASE / "mask_actor1.png", CASE / "mask_actor2.png"], Image.open(CASE / "image.png").size)
    assert np.array_equal(drawn, raw[:, 0].numpy() > 0)  # the drawn PNGs are the reference loader's input
    for masks in (raw, drawn):
        r = routing_masks(masks, grid)
        assert torch.equal(r.logits, g["mask_routing_logits"])
        assert torch.equal(r.dilated, g["mask_dilated"])
        assert torch.equal(r.processed, g["mask_processed"])
        assert r.radius == p["multi_person"]["masks"]["radius_per_actor_frame"]
    counts = p["multi_person"]["masks"]
    assert r.logits[0].sum(0).tolist() == counts["tokens_per_actor_routed"]
    assert r.dilated.sum((1, 2, 3, 4)).tolist() == counts["tokens_per_actor_dilated"]
    assert r.processed.sum((1, 2, 3, 4)).tolist() == counts["tokens_per_actor_final"]
    # The transformer's weights of a block: the mask's first 3 frames, in token order.
    weights = r.token_weights(3)
    assert weights.shape == (2, 3 * 16 * 24, 1) and torch.equal(weights, g["mask_processed"][:, :3].reshape(2, -1, 1))


def test_dilation_radius_and_exclusivity_rules():
    assert [dilation_radius(n, 1) for n in (1, 5, 10, 11, 13, 20, 21, 30)] == [1, 1, 1, 2, 2, 2, 3, 3]
    a = torch.zeros(2, 1, 5, 9)
    a[0, 0, 2, 1] = 1  # actor 1: one token (radius 1)
    a[1, 0, 2, 3] = 1  # actor 2: one token two columns to the right
    dilated, radius = dilate(a)
    assert radius == [[1], [1]]
    assert dilated[0, 0].sum() == 9 and dilated[1, 0].sum() == 9
    final = exclusive(dilated[..., None])[..., 0]
    assert final[0, 0, 2, 1] == 1 and final[1, 0, 2, 1] == 0  # only actor 1 there
    assert final[0, 0, 2, 2] == 0 and final[1, 0, 2, 2] == 0  # both dilated masks: nobody
    assert final[0, 0, 2, 4] == 0 and final[1, 0, 2, 4] == 1  # only actor 2's
    assert final[0, 0, 0, 8] == 1 and final[1, 0, 0, 8] == 1  # nobody's: everybody
    empty, radius = dilate(torch.zeros(1, 1, 3, 3))
    assert radius == [[0]] and empty.sum() == 0


def test_later_mask_wins_an_overlap():
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, :, :20] = True
    masks[1, :, 12:] = True
    r = routing_masks(masks, (1, 2, 2))
    assert r.logits[0].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]


# ---------------------------------------------------------------------------------------------- audio and injection
@pytest.fixture(scope="module")
def dit():
    from liveavatar.models.dit import S2VTransformer

    return S2VTransformer.from_pretrained(WAN_DIR, lora_file=LORA_FILE, dtype=torch.float32)


def test_per_actor_audio_and_the_cut():
    from liveavatar.engine.audio_source import audio_source_for
    from liveavatar.models.audio_encoder import AudioEncoder

    g, p = golden_case("M"), golden_params("M")
    encoder = AudioEncoder.from_pretrained(WAN_DIR / "wav2vec2-large-xlsr-53-english")
    sources = [audio_source_for(encoder, load_audio(CASE / name)) for name in ("audio.wav", "audio2.wav")]
    for k, source in enumerate(sources, start=1):
        assert_close(f"audio_emb_actor{k}", source.embedding, g[f"audio_emb_actor{k}"])
    assert [s.num_clips for s in sources] == [a["clips_available"] for a in p["multi_person"]["audio"]]
    audio = ActorAudio(sources)
    assert audio.num_clips == p["multi_person"]["audio_cut"]["nr"] == 2
    assert_close("audio_emb", audio.embedding, g["audio_emb"])
    assert_close("dit_b0_audio_input", audio.block(0, 12), g["dit_b0_audio_input"])
    assert torch.equal(audio.block(7, 12), audio.embedding[..., 84:96])


def test_per_actor_injection(dit):
    from liveavatar.models.audio_modules import AudioInjector

    g = golden_case("M")
    audio_global, audio_tokens = dit.audio_tokens(g["dit_b0_audio_input"], 3)
    assert_close("inj_audio_tokens", audio_tokens, g["inj_audio_tokens"], tol=1e-5)
    assert_close("inj_audio_global", audio_global, g["inj_audio_global"], tol=1e-5)
    mask = g["mask_processed"][:, :3].reshape(2, -1, 1)
    injector = dit.audio_injector
    for layer in (0, 4, 7):
        j = injector.layer_to_injector[layer]
        x = g[f"inj_L{layer}_hidden_in"]
        residual = AudioInjector.actor_residuals(injector.injector_adain_layers[j], injector.injector[j], x,
                                                 g["inj_audio_tokens"], g["inj_audio_global"])
        assert_close(f"inj_L{layer}_residual_per_actor", residual, g[f"inj_L{layer}_residual_per_actor"], tol=1e-5)
        out = injector(layer, x, g["inj_audio_tokens"], g["inj_audio_global"], mask)
        assert_close(f"inj_L{layer}_hidden_out", out, g[f"inj_L{layer}_hidden_out"], tol=1e-5)
        # Exactly the masked sum: nothing where both actors' dilated masks meet, both residuals where neither is.
        assert torch.equal(out - x, (residual * mask).sum(0, keepdim=True) + x - x)
    with pytest.raises(ValueError, match="several actors need a mask"):
        injector(0, g["inj_L0_hidden_in"], g["inj_audio_tokens"], g["inj_audio_global"])


def test_first_block_velocity_every_step(dit):
    from liveavatar.models.kv_cache import RingCache

    g = golden_case("M")
    text_kv = dit.text_kv(g["text_context"][None])
    sink = dit.prefill_sink(g["ref_latents"], g["motion_latents"], text_kv)
    mask = g["mask_processed"][:, :3].reshape(2, -1, 1)
    for s in range(4):
        ring = RingCache.allocate(dit.config.num_layers, 1, 12 * 384, dit.config.num_heads, dit.config.head_dim, "cpu", torch.float32)
        v = dit.forward_block(g["dit_b0_x"][s][None], g["dit_b0_t"][s], g["dit_b0_audio_input"], text_kv, sink, ring,
                              start_frame=0, ref_roll=int(g["rd_table"][0, s]), mask=mask)
        assert_close(f"M.dit_b0_v[{s}]", v[0], g["dit_b0_v"][s], tol=1e-5)


def test_mixed_track_is_the_originals():
    """The video's sound: the mean of the tracks cut to the shortest, as the original's ffmpeg amix (which
    wrote merged_audio.wav as 16-bit PCM: within half a step of the float mean)."""
    a, b = load_audio(CASE / "audio.wav"), load_audio(CASE / "audio2.wav")
    merged = load_audio(CASE / "merged_audio.wav")
    mixed = mix_tracks([a, b])
    assert len(mixed) == len(merged) == min(len(a), len(b)) == golden_params("M")["audio_samples"][0]
    assert np.abs(mixed - merged).max() <= 0.5 / 32768 + 1e-7


def test_audio_argument_split():
    assert split_plus("a.wav+b.wav") == [Path("a.wav"), Path("b.wav")]
    assert split_plus("x/a.wav") == [Path("x/a.wav")]
    assert split_plus(CASE / "audio.wav") == [CASE / "audio.wav"]


def test_a_file_named_with_plus_is_one_file(tmp_path):
    name = tmp_path / "a+b.wav"
    shutil.copy(CASE / "audio.wav", name)
    assert split_plus(str(name)) == [name]  # the original would split it and find neither half


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def pipe():
    from liveavatar.engine.pipeline import LiveAvatarPipeline

    return LiveAvatarPipeline.from_pretrained(CKPT, device="cpu", dtype=torch.float32)


def test_stream_matches_realtime_pipeline(pipe):
    """The Python API (pipe.prepare with one track and one mask per person) against every stored tensor."""
    from liveavatar.engine.stream import StreamSettings

    g, p = golden_case("M"), golden_params("M")
    masks = load_masks([CASE / "mask_actor1.png", CASE / "mask_actor2.png"], Image.open(CASE / "image.png").size)
    waves = [load_audio(CASE / "audio.wav"), load_audio(CASE / "audio2.wav")]
    cond = pipe.prepare(CASE / "image.png", waves, (CASE / "prompt.txt").read_text(), size=p["size"], masks=masks)
    assert (cond.height, cond.width, cond.num_clips) == (p["H"], p["W"], p["audio_clips_available"])
    assert_close("ref_image_resized_u8", torch.from_numpy(cond.reference), g["ref_image_resized_u8"])
    assert_close("text_context", cond.text_context, g["text_context"])
    assert_close("audio_emb", cond.audio.embedding, g["audio_emb"])
    assert_close("ref_latents", cond.ref_latent, g["ref_latents"])
    assert_close("motion_latents", cond.motion_latents, g["motion_latents"])
    assert torch.equal(cond.routing.processed, g["mask_processed"])
    assert np.array_equal(cond.wave, mix_tracks(waves))

    stream = pipe.stream(cond, StreamSettings(seed=p["seed"]))
    calls = []
    forward = pipe.dit.forward_block

    def recording_forward(x, t, audio, *args, **kwargs):
        v = forward(x, t, audio, *args, **kwargs)
        calls.append((x[0], v[0], audio, kwargs["mask"]))
        return v

    pipe.dit.forward_block = recording_forward
    decoded = []  # the decoder's float frames, before uint8 (its warm-up ran in the constructor)
    decode = stream.decoder.decode
    stream.decoder.decode = lambda z: decoded.append(decode(z)) or decoded[-1]
    try:
        blocks = list(stream.blocks(cond.num_clips))
    finally:
        del pipe.dit.forward_block
    assert all(torch.equal(mask, g["mask_processed"][:, :3].reshape(2, -1, 1)) for *_, mask in calls)
    for s in range(4):
        assert_close(f"dit_b0_x[{s}]", calls[s][0], g["dit_b0_x"][s])
        assert_close(f"dit_b0_v[{s}]", calls[s][1], g["dit_b0_v"][s])
        assert_close("dit_b0_audio_input", calls[s][2], g["dit_b0_audio_input"])
    assert_close("dit_c1b0_v0", calls[16][1], g["dit_c1b0_v0"])
    assert_close("ref_latents_after_sink_replacement", stream.ref_latent, g["ref_latents_after_sink_replacement"])
    latents = torch.cat([b.latents for b in blocks], dim=1)
    assert_close("latents_final", as_clips(latents, 2), g["latents_final"])
    assert [len(b.frames) for b in blocks] == g["decode_frames_kept"].tolist()
    video = torch.cat([b.frames for b in blocks]).permute(3, 0, 1, 2)
    assert list(video.shape) == g["video_shape"].tolist()
    frames = video.double() / 127.5 - 1  # uint8 frames: below the float frames by less than one step
    for key, mine in (("video_sel", frames[:, g["video_sel_idx"]]), ("video_pool4", F.avg_pool2d(frames, 4))):
        diff = g[key].double() - mine
        assert -1e-4 <= diff.min() and diff.max() <= 2 / 255 + 1e-4, key
    floats = torch.cat([decoded[0][:, :, 3:]] + decoded[1:], dim=2)[0]
    assert_close("video_sel", floats[:, g["video_sel_idx"]], g["video_sel"])
    assert_close("video_pool4", F.avg_pool2d(floats, 4), g["video_pool4"])
    assert_close("video_frame_mean", floats.double().mean(dim=(2, 3)).T, g["video_frame_mean"])
    assert_close("video_frame_std", floats.double().std(dim=(2, 3)).T, g["video_frame_std"])


def test_generate_case_M_matches_original(tmp_path, capsys):
    """`generate --audio a.wav+b.wav --masks a.png+b.png` on one process: latents, the MP4 and its sound."""
    out, lat = tmp_path / "m.mp4", tmp_path / "m.safetensors"
    assert main(case_m_args(out, "--save_latents", str(lat))) == 0
    assert capsys.readouterr().out.strip() == str(out)
    g = golden_case("M")
    assert_close("latents_final", as_clips(load_file(str(lat))["latents"], 2), g["latents_final"])
    frames, fps, audio, rate = read_video(out)
    assert frames.shape == (93, 256, 384, 3) and fps == 25 and rate == 16000
    # The sound is the two tracks mixed, cut to the shorter (3.2 s), muxed from input time 3/25 s like one
    # speaker's, so the MP4 ends with it (the original's -shortest).
    assert abs(len(audio) / rate - (3.2 - 3 / 25)) < 0.1
    log = out.with_suffix(".log").read_text()
    assert "person 1 (mask" in log and "person 2 (mask" in log and "2 people (given)" in log
    spec = json.loads(out.with_suffix(".json").read_text())["spec"]
    assert spec["speakers"]["masks"] == [str(CASE / "mask_actor1.png"), str(CASE / "mask_actor2.png")]


def test_generate_several_people_with_the_lead_in_keeps_the_whole_shorter_track(tmp_path):
    """The default timing: the model hears 120 ms of silence first, so the video starts with the speech's first
    sample and ends with the shorter track (3.2 s: 80 frames), its sound the whole mix of the two tracks."""
    out = tmp_path / "lead.mp4"
    assert main(case_m_args(out, original=False)) == 0
    frames, fps, audio, rate = read_video(out)
    assert len(frames) == 80 and fps == 25 and rate == 16000
    assert abs(len(audio) / rate - 3.2) < 0.05
    log = out.with_suffix(".log").read_text()
    assert "with 120 ms of silence in front for the model" in log and "2 people (given)" in log


def test_generate_case_M_on_two_processes(tmp_path):
    """`--gpus 2 --device cpu`: the actors' audio of each block and their mask travel to the other rank."""
    out, lat = tmp_path / "m2.mp4", tmp_path / "m2.safetensors"
    assert main(case_m_args(out, "--save_latents", str(lat), "--gpus", "2")) == 0
    assert_close("latents_final", as_clips(load_file(str(lat))["latents"], 2), golden_case("M")["latents_final"])
    assert json.loads(out.with_suffix(".json").read_text())["frames"] == 93


# ---------------------------------------------------------------------------------------------- bad input
def _mask(tmp_path: Path, name: str, size=(640, 400), box=(0, 0, 100, 100)) -> str:
    pixels = np.zeros(size[::-1], dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 255
    Image.fromarray(pixels).save(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "audio, masks, message",
    [
        (TRACKS, str(CASE / "mask_actor1.png"), "1 mask(s) for 2 speech tracks: give one mask per track"),
        (f"{TRACKS}+{CASE / 'audio.wav'}", MASKS, "2 mask(s) for 3 speech tracks: give one mask per track"),
        (TRACKS, f"{CASE / 'mask_actor1.png'}+SMALL", "small.png: the mask is 320x200, the image 640x400; a mask must "
                                                      "have the image's size"),
        (TRACKS, f"{CASE / 'mask_actor1.png'}+EMPTY", "empty.png: the mask is empty (no white pixel)"),
        (TRACKS, f"{CASE / 'mask_actor1.png'}+DOT", "dot.png covers no token of the 24x16 grid at 384x256"),
        (str(CASE / "audio.wav"), str(CASE / "mask_actor1.png"), "several people need two or more speech tracks"),
        (f"{CASE / 'audio.wav'}+{CASE / 'nope.wav'}", MASKS, "nope.wav: audio not found"),
        (TRACKS, f"{CASE / 'mask_actor1.png'}+{CASE / 'nope.png'}", "nope.png"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, audio, masks, message):
    masks = (masks.replace("SMALL", _mask(tmp_path, "small.png", size=(320, 200)))
             .replace("EMPTY", _mask(tmp_path, "empty.png", box=(0, 0, 0, 0)))
             .replace("DOT", _mask(tmp_path, "dot.png", box=(300, 200, 302, 202))))
    out = tmp_path / "o.mp4"
    args = ["generate", "--image", str(CASE / "image.png"), "--audio", audio, "--masks", masks, "--size", "384*256",
            "--save_file", str(out), *CPU]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_a_mask_at_another_token_grid_is_checked_at_the_output_size(tmp_path, capsys):
    """A region of 40x40 image pixels covers token centres at 384*256 but none on the 8x8 grid of 128*128."""
    dot = _mask(tmp_path, "dot.png", box=(300, 180, 340, 220))
    args = ["generate", "--image", str(CASE / "image.png"), "--audio", TRACKS, "--masks",
            f"{CASE / 'mask_actor1.png'}+{dot}", "--save_file", str(tmp_path / "o.mp4"), *CPU]
    assert main(args + ["--size", "128*128"]) == 2
    assert "dot.png covers no token of the 8x8 grid at 128x128" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- automatic masks
def two_people(path: Path, swap: bool = False) -> Path:
    """A real photograph of two people side by side: scikit-image's astronaut (Eileen Collins, NASA) and a face
    from Labeled Faces in the Wild (scikit-image's lfw_subset), on grey."""
    from skimage import data

    astronaut = data.astronaut()
    face = Image.fromarray((data.lfw_subset()[0] * 255).astype(np.uint8)).resize((160, 160), Image.BICUBIC)
    other = np.full((512, 512), 128, dtype=np.uint8)
    other[60:220, 176:336] = np.asarray(face)
    other = np.repeat(other[:, :, None], 3, axis=2)
    Image.fromarray(np.concatenate([other, astronaut] if swap else [astronaut, other], axis=1)).save(path)
    return path


def test_faces_found_left_to_right_in_a_real_photograph(tmp_path):
    from liveavatar.media import faces

    photo = two_people(tmp_path / "two.png")
    found = faces.faces_in(photo)
    assert len(found) == 2
    astronaut, other = found
    assert 150 < astronaut.x < 200 and 50 < astronaut.y < 90 and 80 < astronaut.width < 120  # her face
    assert 660 < other.x < 720 and other.width > 120
    masks, same = faces.automatic_masks(photo, 2)
    assert same == found and masks.shape == (2, 512, 1024)
    assert not (masks[0] & masks[1]).any()
    for mask, face in zip(masks, found):  # each region holds its own face, from above it to the bottom
        assert mask[face.y + face.height // 2, int(face.centre_x)] and mask[-1, int(face.centre_x)]
    assert masks[0][:, :450].any() and not masks[0][:, 560:].any()
    swapped = faces.faces_in(two_people(tmp_path / "swapped.png", swap=True))
    assert swapped[0].width > 120 and swapped[0].x < 250 and 660 < swapped[1].x < 720  # the LFW face is now first


def test_faces_found_in_the_golden_picture_lie_in_the_drawn_masks():
    """Case M's two drawn people: found left to right, each face inside that person's drawn mask."""
    from liveavatar.media import faces

    found = faces.faces_in(CASE / "image.png")
    drawn = load_masks([CASE / "mask_actor1.png", CASE / "mask_actor2.png"], (640, 400))
    assert len(found) == 2
    for mask, face in zip(drawn, found):
        assert mask[face.y + face.height // 2, int(face.centre_x)]
    regions, _ = faces.automatic_masks(CASE / "image.png", 2)
    for region, mask in zip(regions, drawn):
        assert (region & mask).sum() > 0.8 * region.sum()


def test_faces_found_differ_from_the_tracks_is_a_one_line_error(tmp_path, capsys):
    from skimage import data

    one = tmp_path / "one.png"
    Image.fromarray(data.astronaut()).save(one)
    two = two_people(tmp_path / "two.png")
    nobody = tmp_path / "nobody.png"
    Image.fromarray(np.full((400, 640, 3), 90, dtype=np.uint8)).save(nobody)
    for image, tracks, found in ((one, TRACKS, "found 1 face(s) ("),
                                 (two, f"{TRACKS}+{CASE / 'audio.wav'}", "found 2 face(s)"),
                                 (nobody, TRACKS, "found no face")):
        args = ["generate", "--image", str(image), "--audio", tracks, "--size", "256*128",
                "--save_file", str(tmp_path / "o.mp4"), *CPU]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and found in err[0], err
        assert "speech tracks; the people are found by their faces" in err[0]


def test_generate_finds_the_people_when_no_mask_is_given(tmp_path):
    photo = two_people(tmp_path / "two.png")
    out = tmp_path / "auto.mp4"
    args = ["generate", "--image", str(photo), "--audio", TRACKS, "--size", "256*128", "--num_clip", "1",
            "--save_file", str(out), *CPU]
    assert main(args) == 0
    frames, *_ = read_video(out)
    assert frames.shape == (45, 128, 256, 3)
    log = out.with_suffix(".log").read_text()
    assert "person 1 (face " in log and "person 2 (face " in log
    assert "2 people (found by their faces, numbered left to right)" in log


def test_job_spec_summary_and_fingerprint_cover_the_people(tmp_path):
    from liveavatar.engine.job import JobSpec

    spec = JobSpec(CASE / "image.png", CASE / "audio.wav", "hi", tmp_path / "o.mp4",
                   speakers=Speakers((CASE / "audio.wav", CASE / "audio2.wav"), (CASE / "mask_actor1.png", CASE / "mask_actor2.png")))
    swapped = JobSpec(CASE / "image.png", CASE / "audio.wav", "hi", tmp_path / "o.mp4",
                      speakers=Speakers((CASE / "audio.wav", CASE / "audio2.wav"), (CASE / "mask_actor2.png", CASE / "mask_actor1.png")))
    assert spec.fingerprint() != swapped.fingerprint()
    with pytest.raises(InputError, match="is not the job's audio"):
        from liveavatar.engine.job import check_speakers

        check_speakers(JobSpec(CASE / "image.png", CASE / "audio2.wav", "hi", tmp_path / "o.mp4",
                               speakers=spec.speakers), 256, 384)


# ---------------------------------------------------------------------------------------------- job API and app
@pytest.fixture(scope="module")
def service(pipe, tmp_path_factory):
    """The job API (`liveavatar serve`) on the tiny model, over HTTP."""
    httpx = pytest.importorskip("httpx")
    from liveavatar.engine.worker import EngineWorker
    from liveavatar.interfaces.server import create_app
    from test_server import serve_in_thread

    worker = EngineWorker(pipe, max_queue=2)
    app = create_app(worker, tmp_path_factory.mktemp("serve"), max_upload_mb=5, default_size="128*128")
    with serve_in_thread(app) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client
    worker.shutdown()


def post_job(client, more_audio=("audio2.wav",), masks=(CASE / "mask_actor1.png", CASE / "mask_actor2.png"), **form):
    files = [("image", ("two.png", (CASE / "image.png").read_bytes())),
             ("audio", ("audio.wav", (CASE / "audio.wav").read_bytes()))]
    files += [("more_audio", (name, (CASE / name).read_bytes())) for name in more_audio]
    files += [("mask", (path.name, path.read_bytes())) for path in masks]
    return client.post("/jobs", files=files, data={k: str(v) for k, v in form.items()})


def test_job_api_with_two_speakers(service, tmp_path):
    from test_server import wait_until

    client = service
    fields = client.get("/openapi.json").json()["components"]["schemas"]["Body_submit_job_jobs_post"]["properties"]
    assert {"more_audio", "mask"} <= set(fields)
    response = post_job(client, num_clip=1, seed=3)
    assert response.status_code == 202, response.text
    job = response.json()
    status = wait_until(lambda: (s := client.get(f"/jobs/{job['id']}").json())["state"] in ("done", "failed") and s,
                        "the job to end")
    assert status["state"] == "done", status
    assert status["result"]["frames"] == 45
    video = client.get(job["links"]["video"])
    path = tmp_path / "two.mp4"
    path.write_bytes(video.content)
    frames, fps, audio, rate = read_video(path)
    assert frames.shape[0] == 45 and abs(len(audio) / rate - 45 / 25) < 0.1


def test_job_api_refuses_bad_people_inputs_by_their_names(service, tmp_path):
    client = service
    one = post_job(client, masks=(CASE / "mask_actor1.png",))
    assert one.status_code == 400
    assert one.json()["detail"] == ("1 mask(s) for 2 speech tracks: give one mask per track, in the same order "
                                    "(a.png+b.png; white = that person)")
    Image.new("L", (320, 200), 255).save(tmp_path / "small.png")
    small = post_job(client, masks=(CASE / "mask_actor1.png", tmp_path / "small.png"))
    assert small.status_code == 400 and small.json()["detail"].startswith("small.png: the mask is 320x200, the image 640x400")
    three = post_job(client, more_audio=("audio2.wav", "audio.wav"), masks=())
    assert three.status_code == 400
    assert three.json()["detail"].startswith("the image: found 2 face(s)") and "for 3 speech tracks" in three.json()["detail"]


@pytest.fixture(scope="module")
def web_app(pipe, tmp_path_factory):
    pytest.importorskip("gradio")
    from liveavatar.engine.worker import EngineWorker
    from liveavatar.interfaces.app import build_app

    worker = EngineWorker(pipe, max_queue=2)
    yield build_app(worker, tmp_path_factory.mktemp("app"), default_size="128*128")
    worker.shutdown()


def test_app_with_two_speakers(web_app):
    import gradio as gr

    generate = next(f.fn for f in web_app.fns.values() if f.name == "generate")

    def run(audio2=None, mask1=None, mask2=None):
        return generate(str(CASE / "image.png"), str(CASE / "audio.wav"), "Two people talk", "128*128", 1, 4, 3, False,
                        False, audio2=audio2, mask1=mask1, mask2=mask2)

    with pytest.raises(gr.Error, match="Add the second person's speech"):
        next(run(mask1=str(CASE / "mask_actor1.png")))
    with pytest.raises(gr.Error, match="Add a mask for each person, or none"):
        next(run(audio2=str(CASE / "audio2.wav"), mask1=str(CASE / "mask_actor1.png")))
    outputs = list(run(str(CASE / "audio2.wav"), str(CASE / "mask_actor1.png"), str(CASE / "mask_actor2.png")))
    assert outputs[-1][1].startswith("Done: 45 frames (128x128)")
    frames, _, audio, rate = read_video(outputs[-1][2])
    assert frames.shape == (45, 128, 128, 3) and abs(len(audio) / rate - 45 / 25) < 0.1


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_injection_matches_eager(dit):
    """The fast path (GPU runs) compiles the per-actor injection as it compiles the single-speaker one."""
    import copy

    from liveavatar.models import fastpath

    g = golden_case("M")
    compiled = copy.deepcopy(dit)
    fastpath.compile_transformer(compiled)
    mask = g["mask_processed"][:, :3].reshape(2, -1, 1)
    for layer in (0, 7):
        args = (layer, g[f"inj_L{layer}_hidden_in"], g["inj_audio_tokens"], g["inj_audio_global"], mask)
        torch.testing.assert_close(compiled.audio_injector(*args), dit.audio_injector(*args), rtol=1e-5, atol=1e-6)


def test_text_speaks_for_one_person(tmp_path, capsys):
    """--text (text to speech) makes one track: several people need a speech file each."""
    base = ["generate", "--image", str(CASE / "image.png"), "--save_file", str(tmp_path / "o.mp4"), *CPU]
    assert main(base + ["--text", "Hello there", "--masks", MASKS]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --masks: for several speech tracks (--audio a.wav+b.wav); a --text speaks for one person")
    assert main(base + ["--text", "Hello there", "--audio", TRACKS]) == 2
    assert "--audio and --text: give one of them" in capsys.readouterr().err
