"""Random-weight models with the real architectures, built directly on their device (no checkpoint needed).

    from benchmarks.random_models import FULL, build_pipeline
    pipe = build_pipeline(FULL, device="cuda")            # Wan2.2-S2V-14B sizes, 16.3 B parameters
    pipe = build_pipeline(TINY, device="cpu", dtype=torch.float32)   # seconds on a laptop
    pipe = build_pipeline(FULL, device="cuda", decoder="taew2_1")    # with the light TAEW2.1 decoder too

Every model is created on the meta device, given its storage dtype there, materialised on the target
device with `to_empty` and then initialised in place. So a 16.3 B-parameter transformer never exists in
float32 or in host memory, and building it takes seconds. Weights are drawn at the scale of a trained
model (std 1/sqrt(fan_in), norms at 1), so activations stay in a realistic range through all 40 layers:
timings of fp8 scaling, softmax and the VAE then see the value ranges they will see in production.
The text tokenizer is a whitespace word-level one: the text encoder always runs on 512 padded positions,
so its cost does not depend on how the words are split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from liveavatar.engine.pipeline import LiveAvatarPipeline
from liveavatar.engine.runtime import RuntimeOptions
from liveavatar.models.audio_encoder import AudioEncoder
from liveavatar.models.dit import S2VConfig, S2VTransformer
from liveavatar.models.taehv import NAME as TINY_DECODER
from liveavatar.models.taehv import TinyDecoder, tiny_decoder_dtype
from liveavatar.models.text_encoder import TEXT_LEN, TextEncoder, UMT5Config, UMT5Encoder
from liveavatar.models.vae import WanVAE
from liveavatar.weights.checkpoint import FP32_MODULES


@dataclass(frozen=True)
class ModelScale:
    """The sizes of all four models of one benchmark scale."""

    name: str
    dit: S2VConfig
    vae_dim: int
    t5: UMT5Config
    wav2vec2: dict  # transformers Wav2Vec2Config fields


# The released wav2vec2-large-xlsr-53 (config.json of wav2vec2-large-xlsr-53-english).
_WAV2VEC2_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
    conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_bias=True, feat_extract_norm="layer", feat_extract_activation="gelu", do_stable_layer_norm=True,
    num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, vocab_size=33,
)

FULL = ModelScale(
    name="full",
    dit=S2VConfig(),  # the defaults are Wan2.2-S2V-14B's config.json
    vae_dim=96,
    t5=UMT5Config(vocab=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_buckets=32, num_layers=24),
    wav2vec2=_WAV2VEC2_LARGE,
)

# The sizes of the golden tiny checkpoints (../shared/golden/ckpt/TINY_DIMS.json): every code path of the
# full model, a million parameters. The text and audio widths stay at 4096 / 24+1 layers because the
# transformer's input projections are fixed to them.
TINY = ModelScale(
    name="tiny",
    dit=S2VConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=8, audio_dim=32, audio_inject_layers=(0, 4, 7)),
    vae_dim=8,
    t5=UMT5Config(vocab=448, dim=4096, dim_attn=16, dim_ffn=32, num_heads=4, num_buckets=32, num_layers=2),
    wav2vec2=dict(_WAV2VEC2_LARGE, hidden_size=32, num_attention_heads=4, intermediate_size=64, conv_dim=(16,) * 7),
)

SCALES = {s.name: s for s in (FULL, TINY)}


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def init_like_trained(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Fills every parameter in place: matrices and conv kernels N(0, 1/fan_in), norm gains 1, everything
    else (biases, modulation tables, learned tokens) N(0, 0.02); mixing weights keep their constructor value."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() >= 2 and leaf in ("weight", "original1"):  # original1: wav2vec2's weight-normed conv
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=generator)
        elif leaf in ("gamma", "original0") or (leaf == "weight" and p.dim() == 1):  # norm gains, weight-norm magnitude
            p.fill_(1.0)
        elif name.endswith("casual_audio_encoder.weights"):
            p.fill_(0.01)  # the constructor's value: a plain average of the wav2vec2 layers
        else:
            p.normal_(0.0, 0.02, generator=generator)
    return module


def _materialise(module: nn.Module, device, generator) -> nn.Module:
    """Meta module -> uninitialised storage on `device` -> initialised in place (the models have no buffers)."""
    module.to_empty(device=device)
    return init_like_trained(module, generator).eval().requires_grad_(False)


def build_dit(config: S2VConfig = FULL.dit, device="cuda", dtype=torch.bfloat16, seed: int = 0,
              init_device=None) -> S2VTransformer:
    """The S2V transformer in `dtype` (the audio encoder in float32, as the checkpoint loader keeps it).

    init_device: where the weights are drawn, one block at a time, before they move to `device` (a GPU
    draws 16 B random numbers in a second, a CPU in minutes); default `device`.
    """
    with torch.device("meta"):
        model = S2VTransformer(config)
    model.to(dtype)
    for name, sub in model.named_children():
        if f"{name}." in FP32_MODULES:
            sub.float()
    init_device = init_device or device
    generator = _generator(init_device, seed)
    for name, sub in model.named_children():
        parts = sub if name == "blocks" else [sub]
        for part in parts:
            _materialise(part, init_device, generator).to(device)
    return model.eval()


def build_vae(base_dim: int = FULL.vae_dim, device="cuda", dtype=torch.bfloat16, seed: int = 1) -> WanVAE:
    with torch.device("meta"):
        model = WanVAE(base_dim)
    return _materialise(model.to(dtype), device, _generator(device, seed))


@torch.no_grad()
def build_tiny_decoder(device="cuda", dtype=torch.float16, seed: int = 4) -> TinyDecoder:
    """The light TAEW2.1 decoder at the release's widths (every scale: it is the real one's cost that is
    measured), channels-last as the loader leaves it. Drawn as the golden random checkpoint's values are
    (../shared/golden/taew2_1): convolutions N(0, 0.81/fan_in), biases N(0, 1e-4), the RGB head's bias 0.5. So
    the frames stay inside (0, 1) (mean ~0.49, std ~0.1, none clamped) and a comparison of two precisions sees
    every pixel; with He-scaled weights the nine residual MemBlocks saturate 99.6 % of the pixels."""
    with torch.device("meta"):
        model = TinyDecoder()
    model.to(dtype).to_empty(device=device)
    generator = _generator(device, seed)
    for name, p in model.named_parameters():
        if p.dim() == 4:
            p.normal_(0.0, 0.9 / math.sqrt(p[0].numel()), generator=generator)
        else:
            p.normal_(0.0, 0.01, generator=generator)
    model.decoder[-1].bias.fill_(0.5)
    return model.to(memory_format=torch.channels_last).eval().requires_grad_(False)


def build_text_encoder(config: UMT5Config = FULL.t5, device="cuda", dtype=torch.bfloat16, seed: int = 2,
                       init_device=None) -> TextEncoder:
    """umT5 with a word tokenizer; init_device as in build_dit."""
    init_device = init_device or device
    with torch.device("meta"):
        model = UMT5Encoder(config)
    model = _materialise(model.to(dtype), init_device, _generator(init_device, seed)).to(device)
    return TextEncoder(model, word_tokenizer())


def build_audio_encoder(fields: dict = FULL.wav2vec2, device="cuda", seed: int = 3) -> AudioEncoder:
    """wav2vec2 in float32 (as the pipeline runs it), through transformers' own classes."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    config = Wav2Vec2Config(**fields)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = Wav2Vec2ForCTC(config)
    model = _materialise(model, device, _generator(device, seed))
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=True)
    return AudioEncoder(model, extractor)


def build_pipeline(scale: ModelScale = FULL, device="cuda", dtype=torch.bfloat16, vae_dtype=None,
                   options: RuntimeOptions = RuntimeOptions(), decoder: str = "wan") -> LiveAvatarPipeline:
    """All four models of a scale on `device`, with the runtime options applied as `LiveAvatarPipeline.from_pretrained`
    applies them (`LiveAvatarPipeline.assemble`). decoder="taew2_1": a random light decoder too (in the dtype the
    loader gives it), which then decodes the streams unless one asks for "wan"."""
    device = torch.device(device)
    encoders_at = "cpu" if options.offload_encoders else device
    text = build_text_encoder(scale.t5, encoders_at, dtype, init_device=device)
    audio = build_audio_encoder(scale.wav2vec2, encoders_at)
    vae = build_vae(scale.vae_dim, device, vae_dtype or dtype)
    dit = build_dit(scale.dit, "cpu" if options.offload_transformer else device, dtype, init_device=device)
    tiny = build_tiny_decoder(device, tiny_decoder_dtype(device, dtype)) if decoder == TINY_DECODER else None
    return LiveAvatarPipeline.assemble(dit, vae, text, audio, device, options, tiny_decoder=tiny)


def word_tokenizer():
    """A whitespace tokenizer with umT5's special ids (pad 0, </s> 1): every word becomes <unk> (2), so a
    prompt gives one token per word plus </s>, without a vocabulary file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_LEN)
    return fast


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
