"""umT5 text encoder: prompt cleaning, tokenizer ids and context against the golden data (README §1.3, §2.6, §6)."""

import json
import shutil

import pytest
import torch

from conftest import GOLDEN, WAN_DIR, assert_close, golden_case, module_checks, requires_golden
from liveavatar.errors import CheckpointError
from liveavatar.models.text_encoder import T5_FILE, TEXT_LEN, TOKENIZER_DIR, TextEncoder, UMT5Encoder, clean_prompt

CASES = ["A", "B", "T", "T1"]


def check_prompts() -> list[str]:
    return json.loads((GOLDEN / "module_checks.json").read_text())["prompts"]


def case_prompt(case: str) -> str:
    return (GOLDEN / "cases" / case / "prompt.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(WAN_DIR)


# --------------------------------------------------------------------------------------------------
# Prompt cleaning


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("cafÃ© lighting", "café lighting"),  # mojibake repaired by ftfy
        ("salt &amp; pepper", "salt & pepper"),
        ("salt &amp;amp; pepper", "salt & pepper"),  # unescaped twice
        ("  two  spaces\tand\na newline  ", "two spaces and a newline"),
        ("wide\u3000space", "wide space"),
        ("一个，两个", "一个,两个"),  # ftfy folds full-width punctuation
        ("Talking.", "Talking."),
        ("", ""),
    ],
)
def test_clean_prompt(raw, cleaned):
    assert clean_prompt(raw) == cleaned


def test_clean_prompt_drops_separator_controls():
    # U+001C..U+001F are Python whitespace but not Unicode White_Space (the reference's `regex` \s);
    # clean_prompt relies on ftfy / html.unescape removing them before whitespace is collapsed
    assert clean_prompt("a\x1cb&#29;c&amp;#30;d") == "abcd"


# --------------------------------------------------------------------------------------------------
# Golden checks


@requires_golden
def test_architecture_read_from_shapes(encoder):
    arch = json.loads((GOLDEN / "module_checks.json").read_text())["t5_arch"]
    config = encoder.model.config
    assert isinstance(encoder.model, UMT5Encoder)
    assert (config.vocab, config.dim, config.dim_attn, config.dim_ffn) == (
        arch["vocab_size"], arch["dim"], arch["dim_attn"], arch["dim_ffn"]
    )
    assert (config.num_heads, config.num_buckets, config.num_layers) == (
        arch["num_heads"], arch["num_buckets"], arch["encoder_layers"]
    )
    assert encoder.dim == arch["dim"]
    assert not any(p.is_meta or p.requires_grad for p in encoder.model.parameters())
    assert all(p.dtype == torch.float32 for p in encoder.model.parameters())


@requires_golden
@pytest.mark.parametrize("index", range(5))
def test_module_check_prompts(encoder, index):
    prompt = check_prompts()[index]
    checks = module_checks()
    assert_close(f"t5_{index}_ids", encoder.token_ids(prompt), checks[f"t5_{index}_ids"])
    assert_close(f"t5_{index}_out", encoder.encode(prompt), checks[f"t5_{index}_out"])


@requires_golden
@pytest.mark.parametrize("case", CASES)
def test_case_text(encoder, case):
    prompt = case_prompt(case)
    gold = golden_case(case)
    ids = encoder.token_ids(prompt)
    assert_close("text_ids", ids, gold["text_ids"])
    assert int(ids[-1]) == encoder.tokenizer.eos_token_id
    # the files have no trailing newline, and a trailing one would be stripped by the cleaning anyway
    assert torch.equal(encoder.token_ids(prompt + "\n"), ids)
    context = encoder.encode(prompt)
    assert context.dtype == torch.float32
    assert_close("text_context", context, gold["text_context"])


@requires_golden
def test_golden_ids_come_from_the_cleaned_prompt(encoder):
    # case B has a double space, `&amp;` and mojibake: tokenizing it uncleaned gives other ids
    raw = encoder.tokenizer(case_prompt("B"))["input_ids"]
    assert raw != golden_case("B")["text_ids"].tolist()


@requires_golden
def test_long_prompt_is_truncated_with_eos(encoder):
    ids = encoder.token_ids("a long prompt " * 400)
    assert ids.shape == (TEXT_LEN,)
    assert int(ids[-1]) == encoder.tokenizer.eos_token_id


@requires_golden
def test_to_moves_the_model(encoder):
    moved = TextEncoder(UMT5Encoder(encoder.model.config), encoder.tokenizer)
    assert moved.to("meta") is moved
    assert moved.device.type == "meta"


@requires_golden
def test_bfloat16_load(encoder):
    enc = TextEncoder.from_pretrained(WAN_DIR, dtype=torch.bfloat16)
    out = enc.encode("Talking.")
    assert out.dtype == torch.bfloat16
    ref = module_checks()["t5_4_out"]
    # bf16 arithmetic: only a sanity bound, the golden data is float32
    assert float((out.double() - ref.double()).abs().max() / ref.abs().max()) < 5e-2


# --------------------------------------------------------------------------------------------------
# Error paths, on copies under tmp_path


@pytest.fixture
def wan_copy(tmp_path):
    """A Wan folder holding the golden tokenizer and a writable copy of the T5 checkpoint."""
    shutil.copytree(WAN_DIR / TOKENIZER_DIR, tmp_path / TOKENIZER_DIR)
    shutil.copyfile(WAN_DIR / T5_FILE, tmp_path / T5_FILE)
    return tmp_path


def edit_checkpoint(wan_dir, edit):
    state = torch.load(wan_dir / T5_FILE, map_location="cpu", weights_only=True)
    edit(state)
    torch.save(state, wan_dir / T5_FILE)


def expect_error(wan_dir, *fragments):
    with pytest.raises(CheckpointError) as info:
        TextEncoder.from_pretrained(wan_dir)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@requires_golden
def test_missing_checkpoint(wan_copy):
    (wan_copy / T5_FILE).unlink()
    expect_error(wan_copy, str(wan_copy / T5_FILE), "missing")


@requires_golden
def test_corrupt_checkpoint(wan_copy):
    data = (wan_copy / T5_FILE).read_bytes()
    (wan_copy / T5_FILE).write_bytes(data[: len(data) // 2])
    expect_error(wan_copy, str(wan_copy / T5_FILE), "cannot read")


@requires_golden
@pytest.mark.parametrize("key", ["blocks.1.ffn.fc2.weight", "blocks.0.attn.q.weight", "token_embedding.weight"])
def test_removed_key(wan_copy, key):
    edit_checkpoint(wan_copy, lambda state: state.pop(key))
    expect_error(wan_copy, str(wan_copy / T5_FILE), "missing", key)


@requires_golden
def test_removed_layer_in_the_middle(wan_copy):
    def drop_block0(state):
        for key in [k for k in state if k.startswith("blocks.0.")]:
            del state[key]

    edit_checkpoint(wan_copy, drop_block0)
    expect_error(wan_copy, str(wan_copy / T5_FILE), "missing", "blocks.0.")


@requires_golden
def test_unexpected_key(wan_copy):
    edit_checkpoint(wan_copy, lambda state: state.update({"blocks.0.attn.extra.weight": torch.zeros(2)}))
    expect_error(wan_copy, str(wan_copy / T5_FILE), "unexpected", "blocks.0.attn.extra.weight")


@requires_golden
@pytest.mark.parametrize("key", ["blocks.1.attn.k.weight", "norm.weight", "blocks.1.pos_embedding.embedding.weight"])
def test_wrong_shape(wan_copy, key):
    edit_checkpoint(wan_copy, lambda state: state.update({key: state[key][:-1].clone()}))
    expect_error(wan_copy, str(wan_copy / T5_FILE), key, "shape")


@requires_golden
def test_missing_tokenizer_folder(wan_copy):
    shutil.rmtree(wan_copy / TOKENIZER_DIR)
    expect_error(wan_copy, str(wan_copy / TOKENIZER_DIR), "missing folder")


@requires_golden
def test_corrupt_tokenizer(wan_copy):
    (wan_copy / TOKENIZER_DIR / "tokenizer.json").write_text("{not json")
    expect_error(wan_copy, str(wan_copy / TOKENIZER_DIR), "tokenizer")
