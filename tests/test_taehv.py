"""The TAEW2.1 light decoder (liveavatar.models.taehv) against the reference implementation's frames on random
weights in the released file's layout (../shared/golden/taew2_1/), its streaming, its resume state, the
safetensors copy and the loader's errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN, WAN_DIR, requires_golden
from liveavatar.errors import CheckpointError
from liveavatar.models.taehv import FILES, DecoderChoice, TinyDecoder, tiny_decoder_dtype

pytestmark = requires_golden

CASE = GOLDEN / "taew2_1"
CHECKPOINT = CASE / "taew2_1.pth"
TOL = 1e-4  # max abs, on frames in [0, 1] (the bound)


@pytest.fixture(scope="module")
def model() -> TinyDecoder:
    return TinyDecoder.from_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def golden() -> dict:
    return load_file(str(CASE / "outputs.safetensors"))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return float((a.double() - b.double()).abs().max())


def stream(model: TinyDecoder, latents: torch.Tensor, pieces: list[int]) -> list[torch.Tensor]:
    """Feeds NTCHW latents to one streaming decoder in pieces of the given lengths; the frames of each call."""
    decoder, start, out = model.streaming_decoder(), 0, []
    for n in pieces:
        out.append(decoder.frames(latents[:, start:start + n]))
        start += n
    assert start == latents.shape[1]
    return out


def test_params_describe_this_case(golden):
    params = json.loads((CASE / "params.json").read_text())
    assert list(golden["latents"].shape) == params["latents"] == [1, 7, 16, 12, 16]
    assert list(golden["frames_streamed"].shape) == params["frames_streamed"]
    assert params["frames_per_latent_streamed"] == [1, 4, 4, 4, 4, 4, 4]


def test_loads_the_released_layout_with_widths_from_the_weights(model):
    assert model.widths == (256, 128, 64, 64) and model.latent_channels == 16
    assert model.dtype == torch.float32 and not model.training
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert set(own) == {k for k in state if k.startswith("decoder.")}  # the file's keys, unchanged
    for name, value in own.items():
        assert torch.equal(value, state[name].float()), name


def test_whole_sequence_matches_reference(model, golden):
    frames = model.decode_video(golden["latents"])
    assert frames.dtype == torch.float32 and 0 <= frames.min() and frames.max() <= 1
    err = max_abs(frames, golden["frames_whole"])
    print(f"whole: max abs {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize(
    "pieces",
    [
        [1, 3, 3],  # the stream's first latent alone, then blocks of 3
        [7],  # the engine's start: 7 latents decoded at once (its warm-up), then blocks of 3 (below)
        [3, 3, 1],  # blocks of 3 from the start
        [1] * 7,  # the reference's streaming wrapper: one latent at a time
    ],
)
def test_streamed_in_blocks_matches_reference_streaming(model, golden, pieces):
    out = stream(model, golden["latents"], pieces)
    # The first latent of the stream gives 1 frame (its first 3 are dropped), every later one 4.
    assert [o.shape[1] for o in out] == [4 * pieces[0] - 3] + [4 * n for n in pieces[1:]]
    err = max_abs(torch.cat(out, dim=1), golden["frames_streamed"])
    print(f"streamed {pieces}: max abs {err:.2e}")
    assert err <= TOL
    assert max_abs(torch.cat(out, dim=1), golden["frames_sequential"]) <= TOL


def test_engine_layout_and_range(model, golden):
    """decode() takes the engine's [B, 16, T, h, w] latents and gives its [-1, 1] video [B, 3, n, H, W]."""
    latents = golden["latents"]
    frames = torch.cat(stream(model, latents, [4, 3]), dim=1)
    decoder = model.streaming_decoder()
    video = torch.cat([decoder.decode(latents[:, :4].transpose(1, 2)), decoder.decode(latents[:, 4:].transpose(1, 2))], 2)
    assert list(video.shape) == [1, 3, 25, 96, 128] and video.dtype == torch.float32
    assert -1 <= video.min() and video.max() <= 1
    assert max_abs(video, frames.transpose(1, 2) * 2 - 1) <= 1e-6
    with pytest.raises(ValueError, match=r"decode expects \[B, 16, T, h, w\]"):
        decoder.decode(latents[:, :3])  # NTCHW given where NCTHW is expected


def test_state_dict_resumes_the_stream_in_a_new_decoder(model, golden):
    latents = golden["latents"].transpose(1, 2)  # the engine's layout
    first = model.streaming_decoder()
    assert first.state_dict() == {}  # nothing decoded yet: the next call is the stream's first
    first.decode(latents[:, :, :4])
    state = first.state_dict()
    assert sorted(state) == sorted(f"decoder.{i}" for i in model.memory_blocks()) and len(state) == 9
    assert all(t.device.type == "cpu" for t in state.values())
    expected = first.decode(latents[:, :, 4:])
    second = model.streaming_decoder()
    second.load_state_dict(state)
    assert torch.equal(second.decode(latents[:, :, 4:]), expected)
    second.reset()
    assert second.decode(latents[:, :, :4]).shape[2] == 13  # a reset decoder starts a new stream
    with pytest.raises(ValueError, match="not a TAEW2.1 decoder state"):
        second.load_state_dict({"decoder.conv1": torch.zeros(1)})  # the Wan VAE decoder's cache keys


def test_safetensors_copy_and_older_tgrow_layout_load_the_same(model, golden, tmp_path):
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    save_file(state, str(tmp_path / "taew2_1.safetensors"))
    copy = TinyDecoder.from_checkpoint(tmp_path / "taew2_1.safetensors")
    assert torch.equal(copy.decode_video(golden["latents"]), model.decode_video(golden["latents"]))
    # A first-stage TGrow saved with temporal upscaling (2x the channels): the last frame's group is used.
    key = "decoder.7.conv.weight"
    wide = dict(state, **{key: torch.cat([torch.randn_like(state[key]), state[key]])})
    torch.save(wide, tmp_path / "wide.pth")
    assert torch.equal(TinyDecoder.from_checkpoint(tmp_path / "wide.pth").decoder[7].conv.weight,
                       model.decoder[7].conv.weight)


def test_decoder_choice():
    assert DecoderChoice().load("cpu", torch.float32) is None  # the VAE decodes
    tiny = DecoderChoice("taew2_1", CHECKPOINT).load("cpu", torch.bfloat16)
    assert isinstance(tiny, TinyDecoder) and tiny.dtype == torch.float32  # float32 on the CPU
    assert tiny_decoder_dtype(torch.device("cuda"), torch.bfloat16) == torch.float16
    assert tiny_decoder_dtype(torch.device("cuda"), torch.float32) == torch.float32
    with pytest.raises(ValueError, match="expected one of wan, taew2_1"):
        DecoderChoice("taew2_2")
    with pytest.raises(ValueError, match="needs the weights' path"):
        DecoderChoice("taew2_1")
    assert FILES[0] == "taew2_1.pth"


def test_half_precision_stays_close(golden):
    """The GPU path's precision, on the CPU: float16 weights and activations (measured 8.5e-4 from the float32
    frames), bfloat16 (6.5e-3)."""
    for dtype, bound in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        half = TinyDecoder.from_checkpoint(CHECKPOINT, dtype=dtype)
        assert half.dtype == dtype
        frames = torch.cat(stream(half, golden["latents"][:, :4], [1, 3]), 1)
        assert frames.dtype == torch.float32
        assert max_abs(frames, golden["frames_streamed"][:, :13]) < bound, dtype


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "absent.pth", "absent.pth: missing; expected the TAEW2.1 decoder"),
        (lambda d: _write(d / "empty.pth", b""), "empty.pth: empty file; expected the TAEW2.1 decoder"),
        (lambda d: _write(d / "junk.pth", b"not a checkpoint at all" * 10), "junk.pth: cannot read the TAEW2.1 decoder"),
        (lambda d: _write(d / "page.pth", b"<!DOCTYPE html><html>404</html>"), "page.pth: this is an HTML page"),
        (lambda d: _write(d / "junk.safetensors", b"\x00" * 64), "junk.safetensors: not a safetensors file"),
        (lambda d: shutil.copy(WAN_DIR / "Wan2.1_VAE.pth", d / "vae.pth"), "not a TAEW2.1 checkpoint (no 4-D tensor decoder.1.weight)"),
    ],
)
def test_unusable_files_are_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        TinyDecoder.from_checkpoint(path)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("decoder.22.bias"), "is missing 1 tensor(s), e.g. decoder.22.bias"),
        (lambda s: s.update({"decoder.23.weight": torch.zeros(3)}), "has 1 unexpected tensor(s), e.g. decoder.23.weight"),
        (lambda s: s.update({"decoder.3.conv.2.weight": torch.zeros(256, 256, 1, 1)}), "tensor decoder.3.conv.2.weight has shape [256, 256, 1, 1]"),
        (lambda s: s.update({"decoder.1.weight": torch.zeros(256, 48, 3, 3)}), "a decoder for 48-channel latents, not Wan 2.1's 16"),
    ],
)
def test_wrong_keys_or_shapes_are_named(tmp_path, change, message):
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth: ") as info:
        TinyDecoder.from_checkpoint(tmp_path / "bad.pth")
    assert message in str(info.value)


def test_cuda_graph_bookkeeping_replays_the_eager_stream(model, golden, caplog):
    """The CUDA-graph path's logic on the CPU, with a stand-in for the capture that behaves as one: capturing
    runs nothing (the memory is left as it was), a replay reruns the recorded work on the buffers that were
    captured (their identity is checked) and writes the captured output tensor."""
    latents = torch.cat([golden["latents"], golden["latents"].flip(1)], dim=1)[:, :13].transpose(1, 2)
    eager, graphed = model.streaming_decoder(), model.streaming_decoder()
    graphed.cuda_graphs = True  # what cuda_graphs=True gives on a GPU
    captures = []

    def capture(run):
        buffers = dict(graphed._memory)
        before = {i: t.clone() for i, t in buffers.items()}
        out = run()
        for i, t in buffers.items():
            t.copy_(before[i])
        captures.append(out)

        def replay():
            assert all(graphed._memory[i] is t for i, t in buffers.items()), "the graph's memory buffers were replaced"
            out.copy_(run())

        return replay, out

    graphed._capture = capture
    start = 0
    for n in (1, 3, 3, 3, 3):  # the first call (trimmed), a warm eager call, a capture, two replays
        piece = latents[:, :, start:start + n]
        start += n
        assert torch.equal(graphed.decode(piece), eager.decode(piece)), n
    assert len(captures) == 1 and list(graphed.graphs) == [(1, 16, 3, 12, 16)] and graphed.graph_error is None

    def failing(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    broken = model.streaming_decoder()
    broken.cuda_graphs, broken._capture = True, failing
    for n in (1, 3, 3, 3):
        piece = latents[:, :, :n]
        broken.decode(piece)
    assert broken.graph_error == "RuntimeError: operation not permitted when stream is capturing"
    assert "CUDA graph capture of the TAEW2.1 decoder failed, decoding eagerly" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_float16_channels_last_cuda_graphs(tmp_path):
    """The light decoder as the engine runs it on a GPU (benchmarks.smoke's light_parity check)."""
    from benchmarks.smoke import LIGHT_TOLERANCE, light_decoder_parity

    light_decoder_parity(str(GOLDEN / "taew2_1" / "taew2_1.pth"), str(tmp_path / "parity.json"))
    result = json.loads((tmp_path / "parity.json").read_text())
    print(result)
    assert result["dtype"] == "torch.float16" and result["graphs"] == 1 and result["graph_error"] is None
    assert result["vs_float32"] <= LIGHT_TOLERANCE
