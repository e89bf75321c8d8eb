"""The fast and low-memory paths on the CPU: RoPE arithmetic, the split block step CUDA graphs capture, the
static ring writes they rely on, compiled regions, streamed blocks and rings, and the pipelined stream's
resumable state."""

import copy
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.random_models import TINY, build_pipeline
from liveavatar.engine.stream import StreamSettings
from liveavatar.models import fastpath, offload, rope
from liveavatar.models.kv_cache import RingCache

H, W = 8, 8  # latent size: 16 tokens per frame
TOKENS_PER_FRAME = (H // 2) * (W // 2)


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(TINY, "cpu", torch.float32)


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, H, W, generator=gen), torch.randn(1, 25, TINY.dit.audio_dim, 12, generator=gen))


def _stream_velocities(dit, rings=None, blocks=6, forward=None) -> torch.Tensor:
    """Velocities of `blocks` consecutive block steps (the ring wraps after 4) with fixed random inputs, through
    `forward` (default: dit.forward_block)."""
    forward = forward or dit.forward_block
    c = dit.config
    gen = torch.Generator().manual_seed(1)
    text_kv = dit.text_kv(torch.randn(1, 5, 4096, generator=gen))
    sink = dit.prefill_sink(torch.randn(1, 16, 1, H, W, generator=gen), torch.randn(1, 16, 19, H, W, generator=gen), text_kv)
    ring = rings[0] if rings else RingCache.allocate(c.num_layers, 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu", dit.dtype)
    out = []
    for k in range(blocks):
        x, audio = _inputs(10 + k)
        out.append(forward(x, 700.0, audio, text_kv, sink, ring, start_frame=3 * k, ref_roll=4 + k))
    return torch.stack(out)


def test_rope_real_arithmetic_equals_complex_rotation():
    gen = torch.Generator().manual_seed(0)
    mult = rope.grid_multipliers(range(-3, 2), range(4), range(3), 32)
    x = torch.randn(2, mult.shape[0], 4, 32, generator=gen, dtype=torch.float64)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * mult[None, :, None]).flatten(3)
    torch.testing.assert_close(rope.apply_rope(x, mult), ref, rtol=1e-14, atol=1e-14)
    table32 = rope.rotation_table(mult, torch.float32)
    torch.testing.assert_close(rope.apply_rope(x.float(), table32), ref.float(), rtol=1e-5, atol=1e-5)


def test_rope_positions_from_ranges_equal_listed_positions():
    assert torch.equal(rope.grid_multipliers(range(5, 8), range(4), range(6), 64),
                       rope.grid_multipliers([5, 6, 7], [0, 1, 2, 3], list(range(6)), 64))


def test_block_step_is_the_forward_block_and_writes_the_ring_in_place(pipe):
    dit = pipe.dit
    c = dit.config
    gen = torch.Generator().manual_seed(2)
    text_kv = dit.text_kv(torch.randn(1, 5, 4096, generator=gen))
    sink = dit.prefill_sink(torch.randn(1, 16, 1, H, W, generator=gen), torch.randn(1, 16, 19, H, W, generator=gen), text_kv)
    rings = [RingCache.allocate(c.num_layers, 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu", dit.dtype) for _ in range(2)]
    rings[0].keys.normal_(generator=gen)
    rings[0].values.normal_(generator=gen)
    rings[1].load_state_dict(rings[0].state_dict())
    for ring in rings:  # full: the steady state, where the step has static shapes
        ring.written = ring.capacity
    before = [ring.keys.clone() for ring in rings]
    pointers = [ring.keys.data_ptr() for ring in rings]
    x, audio = _inputs(3)
    start_frame = 21  # block 7: ring slot 9 frames in
    v = dit.forward_block(x, 500.0, audio, text_kv, sink, rings[0], start_frame, ref_roll=9)
    inputs = dit.block_step_inputs(x, audio, 500.0, start_frame, 9, sink)
    v2 = dit.block_step(inputs, text_kv, sink, rings[1], start_frame * TOKENS_PER_FRAME)
    assert torch.equal(v, v2)
    for ring, old, ptr in zip(rings, before, pointers):
        assert ring.keys.data_ptr() == ptr  # written in place: a captured graph would see the same storage
        changed = (ring.keys != old).flatten(0, 1).any(dim=-1).any(dim=-1)  # [layers*batch, tokens]
        slot = (start_frame * TOKENS_PER_FRAME) % ring.capacity
        assert changed[:, slot : slot + 3 * TOKENS_PER_FRAME].all() and not changed[:, :slot].any()
    assert torch.equal(rings[0].keys, rings[1].keys)


class _ReplayingGraph:
    """A stand-in for torch.cuda.CUDAGraph on the CPU: capture records the block step's call (its buffers), and
    replay runs it again on those buffers into the output captured, as the GPU replays the recorded kernels."""

    capturing = None

    def __init__(self):
        self.call = None

    def replay(self):
        call, output = self.call
        output.copy_(call())


def test_step_graphs_feed_each_replay_its_inputs_through_the_captured_buffers(pipe, monkeypatch):
    """StepGraphs' plumbing, with the capture faked on the CPU: once the ring is full, every step copies its
    inputs into the buffers its (ring, slot) graph was captured with and replays it; the velocities and the ring
    are those of the eager steps, and the whole and split steps each get a graph per slot."""
    import contextlib

    dit = copy.deepcopy(pipe.dit)
    real_block_step = dit.block_step

    def recording_block_step(*args, **kwargs):
        out = real_block_step(*args, **kwargs)
        if _ReplayingGraph.capturing is not None:
            _ReplayingGraph.capturing.call = (lambda: real_block_step(*args, **kwargs), out)
        return out

    @contextlib.contextmanager
    def capture(graph, pool=None):
        _ReplayingGraph.capturing = graph
        try:
            yield
        finally:
            _ReplayingGraph.capturing = None

    dit.block_step = recording_block_step
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _ReplayingGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    graphs = fastpath.StepGraphs(dit)
    c = dit.config
    ring = RingCache.allocate(c.num_layers, 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu", dit.dtype)
    reference_ring = RingCache.allocate(c.num_layers, 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu", dit.dtype)
    eager = _stream_velocities(dit, [reference_ring], blocks=10)
    # (A velocity lives in its graph's output buffer until that graph's next replay: kept here, it is copied.)
    graphed = _stream_velocities(dit, [ring], blocks=10, forward=lambda *a, **k: graphs.forward_block(*a, **k).clone())
    assert not graphs.error
    # Blocks 0-3 fill the ring, block 4 runs eagerly once (the warm-up), blocks 5-9 go through graphs: one per
    # ring slot they write (the ring holds 4 blocks, so block 9 replays block 5's graph).
    assert sorted(slot for _, slot in graphs.graphs) == sorted({(3 * k * TOKENS_PER_FRAME) % ring.capacity
                                                                for k in range(5, 10)})
    assert all(isinstance(g.inputs.x, torch.Tensor) and g.inputs.tokens is None for g in graphs.graphs.values())
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert torch.equal(ring.keys, reference_ring.keys) and ring.written == reference_ring.written

    # A step split between two ranks: each part has its own ring and graphs; the first hands on its residual
    # stream (a copy: the graph's buffer is rewritten by its next replay), which the second's graph reads.
    gen = torch.Generator().manual_seed(1)  # the inputs of _stream_velocities
    text_kv = dit.text_kv(torch.randn(1, 5, 4096, generator=gen))
    sink = dit.prefill_sink(torch.randn(1, 16, 1, H, W, generator=gen), torch.randn(1, 16, 19, H, W, generator=gen), text_kv)
    parts = (range(3), range(3, c.num_layers))
    rings = [RingCache.allocate(len(p), 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu", dit.dtype,
                                first_layer=p.start) for p in parts]
    split_graphs = [fastpath.StepGraphs(dit) for _ in parts]
    for k in range(10):
        x, audio = _inputs(10 + k)
        args = (700.0, audio, text_kv, sink)
        tokens = split_graphs[0].forward_block(x, *args, rings[0], 3 * k, 4 + k, layers=parts[0])
        v = split_graphs[1].forward_block(x, *args, rings[1], 3 * k, 4 + k, layers=parts[1], tokens=tokens)
        assert torch.equal(v, eager[k]), k
    assert all(len(g.graphs) == 4 for g in split_graphs)
    assert all(g.inputs.tokens is not None for g in split_graphs[1].graphs.values())


def test_a_step_split_between_layer_ranges_is_the_whole_step(pipe):
    """What the ranks of the multi-device pipeline do with a step they share: the first part returns the
    residual stream, the second continues it; each holds the ring of its own layers only."""
    dit = pipe.dit
    c = dit.config
    whole = _stream_velocities(dit)
    gen = torch.Generator().manual_seed(1)  # the inputs of _stream_velocities
    text_kv = dit.text_kv(torch.randn(1, 5, 4096, generator=gen))
    sink = dit.prefill_sink(torch.randn(1, 16, 1, H, W, generator=gen), torch.randn(1, 16, 19, H, W, generator=gen), text_kv)
    cut = 3
    first, second = range(cut), range(cut, c.num_layers)
    rings = [RingCache.allocate(len(part), 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu", dit.dtype,
                       first_layer=part.start) for part in (first, second)]
    for k in range(len(whole)):
        x, audio = _inputs(10 + k)
        args = (700.0, audio, text_kv, sink)
        tokens = dit.forward_block(x, *args, rings[0], start_frame=3 * k, ref_roll=4 + k, layers=first)
        assert tokens.shape == (1, 3 * TOKENS_PER_FRAME, c.dim) and tokens.dtype == torch.float32
        v = dit.forward_block(x, *args, rings[1], start_frame=3 * k, ref_roll=4 + k, layers=second, tokens=tokens)
        assert torch.equal(v, whole[k])
    assert [r.keys.shape[0] for r in rings] == [cut, c.num_layers - cut]
    with pytest.raises(ValueError, match="needs its tokens"):
        dit.forward_block(x, *args, rings[1], start_frame=0, ref_roll=4, layers=second)
    with pytest.raises(ValueError, match="not a contiguous part"):
        dit.forward_block(x, *args, rings[1], start_frame=0, ref_roll=4, layers=range(cut, c.num_layers + 1), tokens=tokens)


def test_streamed_blocks_and_rings_match_resident_ones(pipe):
    reference = _stream_velocities(pipe.dit)
    streamed = copy.deepcopy(pipe.dit)
    streamer = offload.stream_blocks(streamed, "cpu")
    assert streamer.host_bytes > 0 and len({b.self_attn.q.weight.data_ptr() for b in streamed.blocks}) == 2
    assert torch.equal(_stream_velocities(streamed), reference)
    c = pipe.dit.config
    host = offload.HostRings(1, c.num_layers, 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu",
                             torch.float32, torch.float32)
    assert torch.equal(_stream_velocities(pipe.dit, host.rings), reference)
    with pytest.raises(RuntimeError, match="out of order"):
        host.rings[0].write(5, 0, *torch.zeros(2, 1, 3 * TOKENS_PER_FRAME, c.num_heads, c.head_dim))


def test_blocks_kept_resident_give_the_same_velocities_and_are_spread_over_the_depth(pipe):
    """What the low-memory mode does once a stream shows memory to spare: some blocks stay on the device, the
    others keep cycling through the two buffers, and the numbers do not change, also when the split changes
    between two block steps."""
    reference = _stream_velocities(pipe.dit)
    streamed = copy.deepcopy(pipe.dit)
    streamer = offload.stream_blocks(streamed, "cpu")
    n = streamer.num_blocks  # 8
    for asked, kept, streamed_blocks in [(3, 2, [0, 1, 2, 4, 5, 6]), (5, 4, [0, 2, 4, 6]), (6, 6, [0, 4]),
                                         (8, 8, []), (0, 0, list(range(n)))]:
        assert streamer.keep_resident(asked) == kept and streamer.resident_count == kept
        assert streamer.streamed == streamed_blocks
        assert torch.equal(_stream_velocities(streamed), reference)

    def velocities_switching_split() -> torch.Tensor:  # _stream_velocities with the split changed after each step
        gen = torch.Generator().manual_seed(1)
        text_kv = streamed.text_kv(torch.randn(1, 5, 4096, generator=gen))
        sink = streamed.prefill_sink(torch.randn(1, 16, 1, H, W, generator=gen),
                                     torch.randn(1, 16, 19, H, W, generator=gen), text_kv)
        c = streamed.config
        ring = RingCache.allocate(c.num_layers, 1, 12 * TOKENS_PER_FRAME, c.num_heads, c.head_dim, "cpu", streamed.dtype)
        out = []
        for k, count in enumerate([0, 2, 8, 4, 0, 6]):
            streamer.keep_resident(count)
            x, audio = _inputs(10 + k)
            out.append(streamed.forward_block(x, 700.0, audio, text_kv, sink, ring, start_frame=3 * k, ref_roll=4 + k))
        return torch.stack(out)

    assert torch.equal(velocities_switching_split(), reference)


def test_resident_blocks_fit_the_memory_left_after_the_first_clip():
    gib = 2**30
    # 24 GiB allowed, 9 GiB allocated after a clip whose peak was 11.2 GiB, 0.41 GB FP8 blocks, 1 GiB margin.
    block = int(0.41e9)
    assert offload.resident_blocks_that_fit(0, block, 9 * gib, int(11.2 * gib), 15 * gib) == \
        (15 * gib - int(2.2 * gib) - gib) // block
    assert offload.resident_blocks_that_fit(10, block, 9 * gib, 9 * gib, 2 * gib) == 12  # the room for 2 more
    # 1 GiB short (2.6 blocks): 3 go back.
    assert offload.resident_blocks_that_fit(10, block, 20 * gib, 23 * gib, 3 * gib) == 7
    assert offload.resident_blocks_that_fit(1, block, 20 * gib, 30 * gib, 0) == 0


def test_fit_resident_blocks_on_a_cuda_device_given_without_index(monkeypatch):
    """`--device cuda` (no index) reached torch.cuda.get_per_process_memory_fraction, which refuses a device
    without an index: the 24 GB mode stopped at clip 1 on every GPU. The CUDA calls are replaced here by fakes
    as strict as torch's, with a 24 GiB cap on an 80 GiB card."""
    gib = 2**30

    def strict(value):
        if not isinstance(value, int) and not (isinstance(value, torch.device) and value.index is not None):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{value}")
        return value

    fake = {
        "current_device": lambda: 0,
        "synchronize": lambda device=None: None,
        "memory_allocated": lambda device=None: strict(device) and 9 * gib,
        "memory_reserved": lambda device=None: strict(device) and 10 * gib,
        "max_memory_allocated": lambda device=None: strict(device) and 11 * gib,
        "mem_get_info": lambda device=None: strict(device) and (70 * gib, 80 * gib),
        "get_per_process_memory_fraction": lambda device=None: strict(device) is not None and 0.3,
    }
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn, raising=False)

    class Streamer:
        device, resident_count, num_blocks, block_bytes = torch.device("cuda"), 0, 40, int(0.41e9)
        memory_margin = offload.MEMORY_MARGIN
        kept = None

        def keep_resident(self, count):
            self.kept = count
            return count

    streamer = Streamer()
    kept = offload.fit_resident_blocks(streamer)
    # 24 GiB allowed - 9 allocated - 2 GiB of work above it - 1 GiB margin = 12 GiB of blocks.
    assert kept == streamer.kept == (12 * gib) // streamer.block_bytes
    assert offload.indexed("cuda") == torch.device("cuda", 0)
    assert offload.indexed("cpu") == torch.device("cpu")


def test_offloaded_stream_fits_its_blocks_after_one_clip_and_prepare_takes_them_back(pipe, monkeypatch):
    from liveavatar.engine import stream as stream_module
    from liveavatar.engine.pipeline import LiveAvatarPipeline
    from liveavatar.engine.runtime import RuntimeOptions
    from liveavatar.engine.steps import StepRunner

    dit = copy.deepcopy(pipe.dit)
    streamer = offload.stream_blocks(dit, "cpu")
    low_memory = LiveAvatarPipeline(dit, pipe.vae, pipe.text_encoder, pipe.audio_encoder,
                                    RuntimeOptions(offload_transformer=True))
    denoised, fitted = [], []
    monkeypatch.setattr(stream_module, "fit_resident_blocks",
                        lambda s: fitted.append(len(denoised)) or s.keep_resident(4))
    real_denoise = stream_module.AvatarStream._denoise
    monkeypatch.setattr(stream_module.AvatarStream, "_denoise",
                        lambda self, k, clock: denoised.append(k) or real_denoise(self, k, clock))
    with tempfile.TemporaryDirectory() as folder:
        image = Path(folder) / "face.png"
        Image.new("RGB", (64, 64), (200, 150, 120)).save(image)
        cond = low_memory.prepare(image, np.zeros(16000 * 4, np.float32), "talking", size="64*64")
        blocks = list(low_memory.stream(cond, StreamSettings(seed=3)).blocks(2))
        assert fitted == [5]  # once, before block 4 (the first of clip 1): blocks 0-3 ran with every block streamed
        assert streamer.resident_count == 4
        reference = list(pipe.stream(cond, StreamSettings(seed=3)).blocks(2))
        assert all(torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames) for a, b in zip(blocks, reference))
        low_memory.prepare(image, np.zeros(16000, np.float32), "talking", size="64*64")
        assert streamer.resident_count == 0

        # A block whose steps run out of memory with blocks kept resident streams them all again and goes on.
        real_step = StepRunner.denoise_step
        failures = []

        def step_short_of_memory(self, k, step, x, audio):
            if k == 6 and step == 2 and not failures:
                failures.append(streamer.resident_count)
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real_step(self, k, step, x, audio)

        monkeypatch.setattr(StepRunner, "denoise_step", step_short_of_memory)
        retried = list(low_memory.stream(cond, StreamSettings(seed=3)).blocks(2))
        assert failures == [4] and streamer.resident_count == 0
        assert streamer.memory_margin == 2 * offload.MEMORY_MARGIN  # the next stream's fit leaves more room
        assert all(torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames) for a, b in zip(retried, reference))


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_regions_match_eager(pipe):
    compiled = copy.deepcopy(pipe.dit)
    fastpath.compile_transformer(compiled)
    torch.testing.assert_close(_stream_velocities(compiled, blocks=2), _stream_velocities(pipe.dit, blocks=2),
                               rtol=1e-4, atol=1e-5)


def test_pipelined_stream_resumes_from_any_block(pipe):
    """At every yield the next block is already denoised (its keys are in the rings); the state carries it."""
    wave = torch.randn(16000 * 6, generator=torch.Generator().manual_seed(7)).numpy() * 0.1
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "ref.png"
        Image.new("RGB", (64, 64), (120, 80, 200)).save(image)
        cond = pipe.prepare(image, wave, "talking", size="64*64")
    settings = StreamSettings(seed=3)
    first = pipe.stream(cond, settings)
    blocks = first.blocks(2)
    for _ in range(5):  # past the sink replacement, mid-clip
        next(blocks)
    state = first.state_dict()
    assert "ahead_latents" in state and state["next_block"] == 5
    rest = list(blocks)
    second = pipe.stream(cond, settings)
    second.load_state_dict(state)
    again = list(second.blocks(2))
    assert [b.index for b in again] == [b.index for b in rest] == [5, 6, 7]
    for a, b in zip(rest, again):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)


def test_attention_by_parts_merges_to_the_concatenated_attention():
    """The fast path may attend to the ring and the sink separately (kernels that return the log-sum-exp of
    the scores) and merge: the same numbers as one attention over both, without concatenating 313 MB of keys
    and values per layer at 704x384."""
    from liveavatar.models.layers import attention, merge_attention_parts, two_part_attention

    gen = torch.Generator().manual_seed(0)
    q, k1, v1, k2, v2 = (torch.randn(2, n, 3, 8, generator=gen, dtype=torch.float64) for n in (5, 11, 11, 4, 4))
    whole = attention(q, torch.cat([k1, k2], 1), torch.cat([v1, v2], 1))
    assert torch.equal(two_part_attention(q, k1, v1, k2, v2), whole)

    def part(k, v):  # what the CUDA kernels return: output [B, heads, L, d] and log-sum-exp [B, heads, L]
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / 8**0.5
        return torch.einsum("bhlm,bmhd->bhld", scores.softmax(-1), v), scores.logsumexp(-1)

    merged = merge_attention_parts(*part(k1, v1), *part(k2, v2)).transpose(1, 2)
    assert torch.allclose(merged, whole, rtol=0, atol=1e-12)
    names = set(fastpath.attention_candidates())
    assert {"CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION by parts",
            "FLASH_ATTENTION by parts"} == names


def test_attention_is_timed_once_per_shape_and_the_fastest_is_used(pipe, monkeypatch):
    """What use_fastest_attention decides, with the GPU timing replaced: each stream shape (query, ring, sink
    tokens) is timed once per transformer, and the fastest candidate becomes the step's self-attention."""
    dit = copy.deepcopy(pipe.dit)
    dit.attention_timings = {}  # as compile_transformer leaves it
    timed = []

    def fake_timing(q_len, history_len, sink_len, *_):
        timed.append((q_len, history_len, sink_len))
        return {"CUDNN_ATTENTION": 2.0, "FLASH_ATTENTION by parts": 1.0} if q_len == 48 else {"FLASH_ATTENTION": 3.0}

    monkeypatch.setattr(fastpath, "time_attention", fake_timing)
    wave = torch.zeros(16000 * 2).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "ref.png"
        Image.new("RGB", (128, 128), (120, 80, 200)).save(image)
        small = pipe.prepare(image, wave, "talking", size="64*64")
        large = pipe.prepare(image, wave, "talking", size="128*128")
    for cond in (small, large, small):
        stream = pipe.stream(cond, StreamSettings(seed=3))
        times = fastpath.use_fastest_attention(dit, stream.steps)
    assert timed == [(48, 192, 40), (192, 768, 160)], "each shape timed once"
    assert times == {"CUDNN_ATTENTION": 2.0, "FLASH_ATTENTION by parts": 1.0}
    assert dit.self_attention.func is fastpath._attention_by_parts and dit.self_attention.args == ("FLASH_ATTENTION",)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decoder_matches_eager(pipe):
    """The decoder's compiled elementwise work (one kernel family for every stage and frame count) gives the
    eager frames: the stream's first latent, then blocks of 3."""
    compiled = copy.deepcopy(pipe.vae)
    fastpath.compile_decoder(compiled)
    latents = torch.randn(1, 16, 7, H, W, generator=torch.Generator().manual_seed(4))
    eager, fast = pipe.vae.streaming_decoder(), compiled.streaming_decoder()
    for part in (latents[:, :, :1], latents[:, :, 1:4], latents[:, :, 4:]):
        torch.testing.assert_close(fast.decode(part), eager.decode(part), rtol=1e-5, atol=1e-5)


def test_a_resumed_stream_takes_the_attention_kernel_the_interrupted_one_chose(pipe):
    """On the H100 two processes timed cuDNN and flash attention in another order (0.11 vs 0.09-0.12 ms) and
    their bf16 latents differed by 1.9e-2: the resume state names the kernel, and the resumed stream uses it."""
    wave = torch.randn(16000 * 3, generator=torch.Generator().manual_seed(7)).numpy() * 0.1
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "ref.png"
        Image.new("RGB", (64, 64), (120, 80, 200)).save(image)
        cond = pipe.prepare(image, wave, "talking", size="64*64")
    try:
        fastpath.use_attention(pipe.dit, "CUDNN_ATTENTION")  # what the interrupted process chose
        state = pipe.stream(cond, StreamSettings(seed=3)).state_dict()
        assert state["attention"] == "CUDNN_ATTENTION"
        fastpath.use_attention(pipe.dit, "FLASH_ATTENTION")  # what the new process's timing chose
        pipe.stream(cond, StreamSettings(seed=3)).load_state_dict(state)
        assert pipe.dit.attention_choice == "CUDNN_ATTENTION"
        assert pipe.dit.self_attention.args[0].name == "CUDNN_ATTENTION"
        with pytest.raises(ValueError, match="unknown attention kernel 'NOPE'"):
            fastpath.use_attention(pipe.dit, "NOPE")
    finally:
        from liveavatar.models.layers import two_part_attention

        pipe.dit.self_attention = two_part_attention
        del pipe.dit.attention_choice
