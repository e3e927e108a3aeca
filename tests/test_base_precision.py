"""--base-precision: the denoiser's frozen Linear weights in int8 (torchao) / NF4 (bitsandbytes), LoRA in fp32.

The quantized runs need the optional packages: they are the ``quant`` tier, excluded from the default run
(``pip install -e ".[dev,quant]" && python -m pytest -m quant``; without the packages they fail, never skip).
The errors for a missing package run in the default suite."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

PROBE = r"""
import contextlib, io, json, sys
for name in ("torchao", "bitsandbytes"):
    sys.modules[name] = None  # as if not installed: importlib.util.find_spec gives None
from rlr_backend.cli import train_main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = train_main(argv)
        except SystemExit as e:
            code = e.code
    out.append({"code": code, "err": err.getvalue().strip(), "torch": "torch" in sys.modules})
print(json.dumps(out))
"""


def test_missing_package_or_unknown_choice_is_one_line_exit_2_before_torch(tmp_path):
    cases = [["--base-precision", "int8"], ["--base-precision", "nf4"], ["--base-precision", "int4"]]
    cases = [[*c, "--output-dir", str(tmp_path / "runs")] for c in cases]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    for r in res:
        assert r["code"] == 2 and len(r["err"].splitlines()) == 1 and not r["torch"], r
    assert "needs torchao" in res[0]["err"] and "needs bitsandbytes" in res[1]["err"]
    assert "invalid choice" in res[2]["err"]
    assert list(tmp_path.iterdir()) == []


def test_non_diffusers_models_refuse_a_quantized_base():
    from rlr_backend.train.memory import prepare_model

    with pytest.raises(ValueError, match="base_precision"):
        prepare_model(object(), [], device="cpu", precision="fp32", gradient_checkpointing=False,
                      offload_text_encoders=True, base_precision="int8")


def _prepared(base_precision: str):
    """The flow default in bf16 with a trained-looking LoRA (non-zero B), prepared as the trainer does."""
    from rlr_backend.models.loader import load_pipeline, model_for_pipeline
    from rlr_backend.train.memory import load_dtypes, prepare_model

    model = model_for_pipeline(load_pipeline("default-flow", **load_dtypes("bf16", True)))
    named = model.add_lora(4, None, 0)
    with torch.no_grad():
        for n, p in named:
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.05)
    prepare_model(model, [p for _, p in named], device="cpu", precision="bf16", gradient_checkpointing=False,
                  offload_text_encoders=True, base_precision=base_precision)
    return model, named


def _velocity(model, grad: bool = False):
    den = model.denoiser(1.0)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        return den(x, 600.0, model.conditioning(["a red circle", "a blue square"]))


@pytest.fixture(scope="module")
def reference():
    model, _ = _prepared("auto")
    from rlr_backend.train.quantize import stored_bytes

    return _velocity(model), stored_bytes(model.transformer)


@pytest.mark.parametrize("name,max_err", [pytest.param("int8", 0.08, marks=pytest.mark.quant),
                                          pytest.param("nf4", 0.35, marks=pytest.mark.quant)])
def test_quantized_base_is_close_trains_only_the_lora_and_stores_fewer_bytes(reference, name, max_err):
    """Against the bf16 model: output close, gradients on the LoRA only (fp32), the Linear weights' bytes exactly
    as ``layer_bytes`` says (the base of the memory model's ``bytes_per_weight``)."""
    from rlr_backend.train.quantize import BASE_QUANTIZATIONS, stored_bytes

    ref, ref_bytes = reference
    model, named = _prepared(name)
    out = _velocity(model)
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < max_err, err  # quantized (not bit-equal), and close to the bf16 model
    _velocity(model, grad=True).square().mean().backward()
    grads = [p.grad for _, p in named]
    assert all(p.dtype == torch.float32 for _, p in named)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)
    assert all(p.grad is None for n, p in model.transformer.named_parameters() if "lora_" not in n)
    # the stored bytes: bf16 (2 bytes) -> bytes_per_weight for the Linear weights, everything else unchanged
    shapes = [(m.out_features, m.in_features) for n, m in model.transformer.named_modules()
              if "lora_" not in n and isinstance(m, torch.nn.Linear)]
    assert len(shapes) > 50
    layer_bytes = BASE_QUANTIZATIONS[name].layer_bytes
    expected = ref_bytes - sum(2 * o * i - layer_bytes(o, i) for o, i in shapes)
    assert stored_bytes(model.transformer) == expected


@pytest.mark.parametrize("arch", ["flux_dev", "zimage"])
@pytest.mark.quant
def test_nf4_base_on_flux_and_zimage_computes_in_the_precision(arch):
    """FLUX.1's and Z-Image's first weight is a Linear's (stored as uint8 in NF4): the denoiser still computes in
    bf16 and the LoRA gets gradients."""
    from rlr_backend.models.loader import model_for_pipeline
    from rlr_backend.models.tiny_flow_pipelines import build_tiny_flow_pipeline
    from rlr_backend.train.memory import prepare_model

    pipe = build_tiny_flow_pipeline(arch)
    pipe.rlr_image_size = 32  # as tests/test_flow_models.py samples them
    model = model_for_pipeline(pipe)
    model.max_sequence_length = 16
    named = model.add_lora(4, None, 0)
    prepare_model(model, [p for _, p in named], device="cpu", precision="bf16", gradient_checkpointing=False,
                  offload_text_encoders=True, base_precision="nf4")
    den = model.denoiser(1.0)
    assert den.dtype == torch.bfloat16
    x = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = den(x, 700.0, model.conditioning(["a cat"]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    v.square().mean().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in named if "lora_B" in n)  # A gets none while B = 0


@pytest.mark.parametrize("name", [pytest.param("int8", marks=pytest.mark.quant),
                                  pytest.param("nf4", marks=pytest.mark.quant)])
def test_backward_keeps_no_dequantized_copy_of_the_weights(name):
    """A stack of frozen quantized Linears backpropagated to its input: the peak stays near one layer's dequantized
    weight, not all of them (torchao's own dispatch kept every layer's bf16 weight until backward)."""
    from rlr_backend.train.memory import peak_allocated
    from rlr_backend.train.quantize import quantize_base

    torch.manual_seed(0)
    layers, width = 8, 512
    stack = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(torch.bfloat16)
    stack.requires_grad_(False)
    quantize_base(stack, name, torch.bfloat16)
    x = torch.randn(4, width, dtype=torch.bfloat16, requires_grad=True)

    def step():
        stack(x).float().sum().backward()

    one_layer = 2 * width * width  # bytes of one dequantized bf16 weight
    assert peak_allocated(step) < 2.5 * one_layer
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
