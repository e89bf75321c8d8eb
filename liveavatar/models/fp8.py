"""FP8 (e4m3) linear layers and quantisation helpers.

Scaling, chosen for accuracy rather than the last few percent of speed:
* weights: one scale per output channel (row of the [out, in] matrix), amax / 448, computed once;
* activations: one scale per token (row of the input), amax / 448, computed on the fly for every call.
The product of the two e4m3 matrices is accumulated in float32 and rescaled by the outer product of the
scales, which is exactly what `torch._scaled_mm` does with row-wise scales on GPUs with FP8 tensor cores
(compute capability 8.9+: Ada, Hopper). Elsewhere (CPU, older GPUs) the same numbers are computed by
dequantising and multiplying in float32, so the CPU tests see the arithmetic the GPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
_TINY = 1e-12  # keeps all-zero rows at a finite scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], float32 scales [..., 1]) with x ~= q * scale, one scale per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_TINY) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale in `dtype` directly (every e4m3 value is exact in bf16; the scale's rounding to bf16, 2^-9,
    is far below e4m3's 2^-4), so dequantising a ring layer writes no float32 temporaries."""
    return q.to(dtype) * scale.to(dtype)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs on `device` (FP8 tensor cores)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """nn.Linear with an e4m3 weight and per-output-channel scales; inputs are quantised per token.

    Output (and bias) in the dtype of the original layer's weight; inputs of any float dtype.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 use_scaled_mm: bool):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.out_dtype = out_dtype
        # Decided once, for the device the layer will run on (its weights may live elsewhere until then,
        # see liveavatar.models.offload), and kept out of the traced code.
        self.use_scaled_mm = use_scaled_mm and out_dtype == torch.bfloat16
        self.weight = nn.Parameter(weight, requires_grad=False)  # [out, in] e4m3
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)  # [1, out] float32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, run_device: torch.device) -> "FP8Linear":
        q, scale = quantize_rows(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale.reshape(1, -1).contiguous(), bias, linear.weight.dtype, scaled_mm_supported(run_device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, x_scale = quantize_rows(x.reshape(-1, self.in_features))
        if self.use_scaled_mm:
            # Row-wise scaled FP8 GEMM; mat2 must be column-major, which the transposed [out, in] weight is.
            out = torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=self.out_dtype)
        else:
            out = F.linear(xq.float() * x_scale, self.weight.float() * self.weight_scale.t()).to(self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, out_dtype={self.out_dtype}"


# The linear layers run on every token of every block step: those of the transformer blocks and the
# audio injectors' query/output projections. The injectors' key/value and AdaLN projections see 15 or 3
# rows per step and stay in the model's dtype.
def _targets(dit: nn.Module) -> list[str]:
    names = [n for n, m in dit.blocks.named_modules() if isinstance(m, nn.Linear)]
    targets = [f"blocks.{n}" for n in names]
    for j in range(len(dit.audio_injector.injector)):
        targets += [f"audio_injector.injector.{j}.q", f"audio_injector.injector.{j}.o"]
    return targets


@torch.no_grad()
def quantize_transformer(dit: nn.Module, run_device: torch.device | None = None) -> list[str]:
    """Replaces the transformer's per-token linear layers by FP8Linear, in place, one layer at a time (the
    peak memory is the model plus one layer). run_device: where the model will run (default: where its
    weights are). Returns the names of the replaced layers."""
    run_device = torch.device(run_device) if run_device is not None else dit.blocks[0].ffn[0].weight.device
    targets = _targets(dit)
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        setattr(parent, attr, FP8Linear.from_linear(getattr(parent, attr), run_device))
    return targets
