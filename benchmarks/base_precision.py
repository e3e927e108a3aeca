"""``--base-precision`` at full width: the stored bytes and an update's tensor peak of a flow transformer's reduced
build (``benchmarks.flow_archs``: FLUX.1-dev with one double and one single block, 3072 wide) with its Linear weights
in bf16, int8 (torchao) and NF4 (bitsandbytes), quantized by the trainer's own ``train.quantize.quantize_base``.

    python -m benchmarks.base_precision [--arch flux-dev] [--lat 16]

Measured: stored bytes of the transformer (``quantize.stored_bytes``) against the memory model's
``bytes_per_weight``; the forward + backward tensor peak above the weights (profiler, as the memory model measures
its points; the quantized matmuls' dequantized weight copies are in it); the output's distance from bf16's; the
LoRA's gradient against bf16's (cosine). Needs the ``quant`` extra; writes benchmarks/results/base-precision.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import torch

from rlr_backend.train.quantize import BASE_QUANTIZATIONS, quantize_base, stored_bytes

from .flow_archs import FLOW_ARCHS, build_transformer, flow_inputs, linear_weight_params
from .memory_model.measure import measure_segment
from .memory_model.store import GB

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).parent / "results" / "base-precision.json"
PACKAGES = {"int8": "torchao", "nf4": "bitsandbytes"}


def _build(arch: str, base: str) -> torch.nn.Module:
    from rlr_backend.lora import add_lora

    m = build_transformer(arch, "base")
    add_lora(m, rank=4, seed=0, target_modules=FLOW_ARCHS[arch]["targets"])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.02)
    quantize_base(m, base, torch.bfloat16)
    return m


def measure(arch: str, lat: int) -> dict:
    out: dict = {"arch": arch, "build": "base", "lat": lat, "rows": []}
    ref_out = ref_grad = None
    for base in ("auto", "int8", "nf4"):
        if base in PACKAGES and importlib.util.find_spec(PACKAGES[base]) is None:
            logger.warning("%s: %s not installed, skipped", base, PACKAGES[base])
            continue
        t0 = time.perf_counter()
        m = _build(arch, base)
        built = time.perf_counter() - t0
        x, call = flow_inputs(arch, 1, lat)

        def fwd() -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call(m, x)

        with torch.no_grad():
            y = fwd().float()
        seg = measure_segment(fwd)
        m.zero_grad()
        fwd().float().square().mean().backward()
        grad = torch.cat([p.grad.flatten() for n, p in m.named_parameters() if "lora_" in n])
        row = {"base": base, "stored_bytes": stored_bytes(m), "linear_weights": linear_weight_params(m),
               "peak": seg.peak, "retained": seg.retained, "build_and_quantize_s": round(built, 1)}
        if ref_out is None:
            ref_out, ref_grad = y, grad
        row["output_rel_error"] = float((y - ref_out).norm() / ref_out.norm())
        row["lora_grad_cosine"] = float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))
        out["rows"].append(row)
        logger.info("%-5s stored %.3f GB  peak %.3f GB  output error %.3f  grad cosine %.4f  (%.0f s to build)", base,
                    row["stored_bytes"] / GB, row["peak"] / GB, row["output_rel_error"], row["lora_grad_cosine"], built)
        del m
    return summarise(out)


def summarise(out: dict) -> dict:
    """Bytes per quantized weight, from each row's saving against bf16 over the bf16 build's Linear weights (a
    quantized layer's ``weight.numel()`` is its packed size)."""
    auto = next((r for r in out["rows"] if r["base"] == "auto"), None)
    for r in out["rows"]:
        if auto and r["base"] != "auto":
            r["bytes_per_weight"] = 2 - (auto["stored_bytes"] - r["stored_bytes"]) / auto["linear_weights"]
            r["modelled_bytes_per_weight"] = BASE_QUANTIZATIONS[r["base"]].bytes_per_weight
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.base_precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="flux-dev", choices=[a for a in FLOW_ARCHS if "measured_as" not in FLOW_ARCHS[a]])
    ap.add_argument("--lat", type=int, default=16, help="latent side (16: 256 px)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("rlr_backend.lora.inject").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    from .common import machine

    res = {**measure(args.arch, args.lat), "machine": machine()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(RESULTS)


if __name__ == "__main__":
    main()
