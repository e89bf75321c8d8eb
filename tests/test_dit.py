"""Transformer parity with the original on the golden tiny checkpoint, and loader / LoRA error paths."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import LORA_FILE, WAN_DIR, assert_close, golden_case, module_checks, requires_golden
from liveavatar.errors import CheckpointError
from liveavatar.models.dit import S2VConfig, S2VTransformer
from liveavatar.models.kv_cache import RingCache
from liveavatar.weights.lora import merge_lora, target_modules

pytestmark = requires_golden


@pytest.fixture(scope="module")
def base_model():
    return S2VTransformer.from_pretrained(WAN_DIR, dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_model():
    return S2VTransformer.from_pretrained(WAN_DIR, lora_file=LORA_FILE, dtype=torch.float32)


def test_config_from_json_reads_architecture():
    cfg = S2VConfig.from_json(WAN_DIR / "config.json")
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim) == (64, 4, 8, 128)
    assert cfg.audio_inject_layers == (0, 4, 7)
    assert cfg.text_dim == 4096 and cfg.patch_size == (1, 2, 2)


def test_plain_forward_matches_original(base_model):
    mc = module_checks()
    g = {k[len("dit_plain_") :]: v for k, v in mc.items() if k.startswith("dit_plain_")}
    out = base_model.forward_full(g["x"][None], g["t"], mc["t5_0_out"][None], g["ref"], g["motion"], g["audio"], g["cond"])
    assert_close("dit_plain_out", out[0], g["out"], tol=1e-5)


def _motion_for(case: dict) -> torch.Tensor:
    if "motion_latents_init" in case:
        return case["motion_latents_init"][:, :, -19:]
    if "motion_latents_init_last19" in case:
        return case["motion_latents_init_last19"]
    return case["motion_latents"]


@pytest.mark.parametrize("name", ["A", "B", "T"])
def test_first_block_velocity_every_step(lora_model, name):
    """Sink prefill + block 0 of clip 0 at each of the 4 steps, each with its own empty ring cache."""
    g = golden_case(name)
    m = lora_model
    text_kv = m.text_kv(g["text_context"][None])
    sink = m.prefill_sink(g["ref_latents"], _motion_for(g), text_kv)
    h, w = g["dit_b0_x"].shape[-2:]
    tokens_per_frame = (h // 2) * (w // 2)
    for s in range(4):
        ring = RingCache.allocate(m.config.num_layers, 1, 12 * tokens_per_frame, m.config.num_heads, m.config.head_dim, "cpu", torch.float32)
        v = m.forward_block(
            g["dit_b0_x"][s][None], g["dit_b0_t"][s], g["dit_b0_audio_input"], text_kv, sink, ring,
            start_frame=0, ref_roll=int(g["rd_table"][0, s]),
        )
        assert_close(f"{name}.dit_b0_v[{s}]", v[0], g["dit_b0_v"][s], tol=1e-5)
        assert ring.written == 3 * tokens_per_frame


def test_lora_changes_weights_by_half_b_times_a(base_model, lora_model):
    lora = load_file(str(LORA_FILE))
    name = "blocks.3.ffn.2"
    a = lora[f"{name}.lora_A.default.weight"].float()
    b = lora[f"{name}.lora_B.default.weight"].float()
    base = base_model.get_submodule(name).weight
    merged = lora_model.get_submodule(name).weight
    torch.testing.assert_close(merged, base + 0.5 * (b @ a), rtol=0, atol=1e-6)
    assert len(target_modules(base_model)) == 92


def test_loads_in_bfloat16_with_fp32_audio_encoder():
    m = S2VTransformer.from_pretrained(WAN_DIR, dtype=torch.bfloat16)
    assert m.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert m.casual_audio_encoder.weights.dtype == torch.float32
    assert not any(p.is_meta for p in m.parameters())


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture()
def wan_copy(tmp_path):
    dst = tmp_path / "Wan2.2-S2V-14B"
    dst.mkdir()
    for f in WAN_DIR.iterdir():
        if f.name.startswith(("config", "diffusion_pytorch_model")):
            shutil.copy(f, dst / f.name)
    return dst


def _shard_with(wan_copy, key_filter=None, replace=None):
    index = json.loads((wan_copy / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = wan_copy / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(shard))
    if key_filter:
        tensors = {k: v for k, v in tensors.items() if key_filter(k)}
    if replace:
        tensors.update(replace(tensors))
    save_file(tensors, str(shard))
    return shard


def test_missing_shard_is_named(wan_copy):
    shard = sorted(wan_copy.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors: missing"):
        S2VTransformer.from_pretrained(wan_copy, dtype=torch.float32)


def test_missing_tensor_is_named(wan_copy):
    _shard_with(wan_copy, key_filter=lambda k: k != "blocks.0.self_attn.q.weight")
    with pytest.raises(CheckpointError, match=r"lack 1 tensor\(s\), e.g. blocks.0.self_attn.q.weight"):
        S2VTransformer.from_pretrained(wan_copy, dtype=torch.float32)


def test_wrong_shape_is_named(wan_copy):
    _shard_with(wan_copy, replace=lambda t: {"blocks.0.self_attn.q.weight": torch.zeros(64, 32, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError, match=r"blocks.0.self_attn.q.weight has shape \[64, 32\], expected \[64, 64\]"):
        S2VTransformer.from_pretrained(wan_copy, dtype=torch.float32)


def test_integer_dtype_is_refused(wan_copy):
    _shard_with(wan_copy, replace=lambda t: {"blocks.0.self_attn.q.weight": torch.zeros(64, 64, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="dtype torch.int32, expected a float dtype"):
        S2VTransformer.from_pretrained(wan_copy, dtype=torch.float32)


def test_corrupt_shard_is_named(wan_copy):
    shard = sorted(wan_copy.glob("*-00001-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="00001-of-00002.safetensors: not a readable safetensors file"):
        S2VTransformer.from_pretrained(wan_copy, dtype=torch.float32)


def test_unsupported_config_value_is_refused(wan_copy):
    cfg = json.loads((wan_copy / "config.json").read_text())
    cfg["adain_mode"] = "attn_norm_out"
    (wan_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="adain_mode='attn_norm_out' is not supported"):
        S2VTransformer.from_pretrained(wan_copy, dtype=torch.float32)


def test_missing_config_is_named(wan_copy):
    (wan_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        S2VTransformer.from_pretrained(wan_copy, dtype=torch.float32)


def _lora_variant(tmp_path, transform):
    tensors = transform(load_file(str(LORA_FILE)))
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    return path


def test_lora_accepts_peft_prefix_and_no_default(base_model, tmp_path):
    path = _lora_variant(
        tmp_path, lambda t: {"base_model.model." + k.replace(".default", ""): v for k, v in t.items()}
    )
    m = S2VTransformer.from_pretrained(WAN_DIR, dtype=torch.float32)
    assert merge_lora(m, path) == 92


def test_lora_matching_nothing_is_an_error(base_model, tmp_path):
    path = _lora_variant(tmp_path, lambda t: {"transformer." + k: v for k, v in t.items()})
    with pytest.raises(CheckpointError, match="match no target layer of the transformer, e.g. transformer.audio_injector"):
        merge_lora(base_model, path)


def test_lora_partial_coverage_is_an_error(base_model, tmp_path):
    path = _lora_variant(tmp_path, lambda t: {k: v for k, v in t.items() if ".ffn." not in k})
    with pytest.raises(CheckpointError, match=r"covers 76 of 92 target layers; missing e.g. blocks.0.ffn.0"):
        merge_lora(base_model, path)


def test_lora_unpaired_and_foreign_keys_are_errors(base_model, tmp_path):
    path = _lora_variant(tmp_path, lambda t: {k: v for k, v in t.items() if k != "blocks.0.self_attn.q.lora_B.default.weight"})
    with pytest.raises(CheckpointError, match="pair incomplete for 1 module"):
        merge_lora(base_model, path)
    path = _lora_variant(tmp_path, lambda t: {**t, "blocks.0.self_attn.q.alpha": torch.tensor([64.0])})
    with pytest.raises(CheckpointError, match="not LoRA weights"):
        merge_lora(base_model, path)


def test_lora_shape_mismatch_and_missing_file(base_model, tmp_path):
    path = _lora_variant(
        tmp_path, lambda t: {**t, "blocks.0.ffn.0.lora_B.default.weight": torch.zeros(64, 4, dtype=torch.bfloat16)}
    )
    with pytest.raises(CheckpointError, match=r"blocks.0.ffn.0.lora_B @ lora_A is \[64, 64\], the layer weight is \[128, 64\]"):
        merge_lora(base_model, path)
    with pytest.raises(CheckpointError, match="nope.safetensors: missing"):
        merge_lora(base_model, tmp_path / "nope.safetensors")
