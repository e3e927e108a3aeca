"""Frozen base weights of the denoiser in 8 or 4 bits (``--base-precision``): the quantized-base LoRA setup of
16-24 GB cards (QLoRA's idea applied to the transformer / UNet).

Every ``nn.Linear`` of the denoiser except the LoRA's own layers gets its weight stored quantized, and the
matmul dequantizes it on the fly to the compute dtype (``--precision``); biases, norms, embeddings, convolutions
and the LoRA (fp32, the only trainable tensors) are unchanged. peft's LoRA wrapper calls its ``base_layer`` as
a black box, so the adapter's output and gradients are computed as before, on top of the quantized layer's output.

* ``int8``: torchao's weight-only int8 (``Int8WeightOnlyConfig``: symmetric, one scale per output channel),
  1 byte per weight; runs on the CPU and CUDA.
* ``nf4``: bitsandbytes' 4-bit NormalFloat (``Linear4bit``, ``quant_type="nf4"``, blocks of 64 weights with an
  fp32 absmax each), 0.5625 bytes per weight; bitsandbytes >= 0.48 runs it on the CPU too.

Both packages are optional (the ``quant`` extra); ``choices.check_base_precision_available`` (run by
``TrainConfig``) says which one is missing before anything is loaded. The choices and their bytes per weight are the memory model's
(``benchmarks.memory_model``: ``Options.base_bytes``).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable, NamedTuple

import torch

from ..choices import BASE_PRECISION_NAMES, BASE_PRECISION_PACKAGES, check_base_precision_available

logger = logging.getLogger(__name__)


class BaseQuantization(NamedTuple):
    bytes_per_weight: float  # stored bytes per weight of a large layer (per-channel scales ~0; the memory model's)
    layer_bytes: Callable[[int, int], int]  # (out_features, in_features) -> stored bytes of the weight, exactly
    describe: str


BASE_QUANTIZATIONS: dict[str, BaseQuantization] = {
    # int8 data + per output channel an fp32 scale and an int8 zero point (torchao's Int8Tensor)
    "int8": BaseQuantization(1.0, lambda o, i: o * i + 5 * o, "torchao int8 weight-only, one scale per output channel"),
    # two 4-bit codes per byte + an fp32 absmax per block of 64 (bitsandbytes' Params4bit, no double quantization)
    "nf4": BaseQuantization(0.5 + 4 / 64, lambda o, i: (o * i + 1) // 2 + 4 * -(-o * i // 64),
                            "bitsandbytes NF4, blocks of 64 with an fp32 absmax"),
}
assert ("auto", *BASE_QUANTIZATIONS) == BASE_PRECISION_NAMES and set(BASE_QUANTIZATIONS) == set(BASE_PRECISION_PACKAGES), \
    "choices.BASE_PRECISION_NAMES / BASE_PRECISION_PACKAGES and BASE_QUANTIZATIONS disagree"


def _is_base_linear(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and "lora_" not in name


def quantize_base(model: torch.nn.Module, name: str, compute_dtype: torch.dtype) -> int:
    """Store the weights of ``model``'s frozen ``nn.Linear`` layers (not the LoRA's) as ``name``, computing in
    ``compute_dtype``; returns how many layers were quantized. ``auto`` does nothing. The layers stay on the
    device they are on (quantize on the CPU, then move: the full-precision weights never reach the GPU)."""
    if name == "auto":
        return 0
    if name not in BASE_QUANTIZATIONS:
        raise ValueError(f"unknown base precision {name!r}; choose one of {list(BASE_PRECISION_NAMES)}")
    check_base_precision_available(name)
    targets = [n for n, m in model.named_modules() if _is_base_linear(n, m)]
    if any(model.get_submodule(n).weight.requires_grad for n in targets):
        raise ValueError("quantize_base: a Linear layer to quantize is trainable; only frozen weights are quantized")
    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: _is_base_linear(fqn, m))
        for n in targets:  # backward dequantizes again instead of keeping a dequantized copy per layer
            model.get_submodule(n).__class__ = _FrozenQuantizedLinear
    else:
        _replace_linears(model, targets, lambda lin: _nf4_linear(lin, compute_dtype))
    logger.info("base weights: %d Linear layers of %s stored as %s (%s)", len(targets), type(model).__name__, name,
                BASE_QUANTIZATIONS[name].describe)
    return len(targets)


class _LinearOfFrozenWeight(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` for a frozen (quantized) weight: the gradient goes to ``x`` only, and backward
    dequantizes the weight again. Through torchao's own dispatch autograd keeps the dequantized bf16 weight of every
    Linear until backward (measured: +0.62 GB on FLUX.1's 1.1 GB two-block build, the bf16 weights' size again),
    which would undo the saving wherever a step is backpropagated without checkpointing. bitsandbytes' NF4 matmul
    already works this way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the stored (quantized) parameter itself, no copy
        ctx.x_dtype = x.dtype
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        dense = weight.dequantize() if hasattr(weight, "dequantize") else weight
        return (grad.to(dense.dtype) @ dense).to(ctx.x_dtype), None, None


class _FrozenQuantizedLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose quantized weight is frozen: :class:`_LinearOfFrozenWeight` (its class is set on the
    quantized layers in place, so peft's wrapper and the module tree are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearOfFrozenWeight.apply(x, self.weight, self.bias)


def _replace_linears(model: torch.nn.Module, names: list[str], make: Callable[[torch.nn.Linear], torch.nn.Module]) -> None:
    for fqn in names:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def _nf4_linear(lin: torch.nn.Linear, compute_dtype: torch.dtype) -> torch.nn.Module:
    bnb = importlib.import_module("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=compute_dtype,
                          quant_type="nf4", compress_statistics=False, device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=False)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
    return q.to(lin.weight.device)  # Params4bit quantizes when moved to a device


def stored_bytes(module: torch.nn.Module, include: Callable[[str], bool] = lambda name: "lora_" not in name) -> int:
    """Bytes the parameters and buffers of ``module`` named ``include`` take as stored: a quantized tensor counts
    its packed data and scales (torchao's tensor subclasses: their inner tensors; bitsandbytes' ``Params4bit``: the
    packed bytes + the absmax), not its logical shape x dtype."""
    total = 0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if include(name):
            total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    quant_state = getattr(t, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: uint8 packed data + per-block absmax
        return t.data.numel() * t.data.element_size() + quant_state.absmax.numel() * quant_state.absmax.element_size()
    inner = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):  # torchao subclass
        names, _ = inner.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(inner, n)) for n in names)
    return t.numel() * t.element_size()
