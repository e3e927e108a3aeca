"""The flow models' part of the memory model (benchmarks/memory_model/flow*.py, benchmarks/flow_archs.py): the depth
combination, the quantized base weights and the CFG-less call batch in the composition, the docs section."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from benchmarks import memory_model as mm
from benchmarks.flow_archs import FLOW_ARCHS, build_transformer, stored_count
from benchmarks.memory_model import flow, flow_measure

G = 1e9


def test_depth_combination_rebuilds_the_full_models_parameter_count():
    """Parameters grow by a fixed amount per block, as the bytes are modelled to: the combination of the reduced
    builds' counts must give the full model's count exactly (checks the builds and the block numbers)."""
    for arch, a in FLOW_ARCHS.items():
        src = a.get("measured_as", arch)
        weights = flow_measure.depth_combination(arch)
        built = {b: stored_count(build_transformer(src, b, meta=True)) for b in weights}
        extra = stored_count(build_transformer(arch, meta=True)) - stored_count(build_transformer(src, meta=True))
        assert sum(w * built[b] for b, w in weights.items()) + extra == stored_count(build_transformer(arch, meta=True))


def _rows(per_block: dict[str, float], base: float) -> list[dict]:
    """Synthetic measurements of FLUX.1's builds: bytes = n * pixels * (base + blocks of each kind x per block)."""
    blocks = {"base": {"double": 1, "single": 1}, "double": {"double": 2, "single": 1},
              "single": {"double": 1, "single": 2}}
    rows = []
    for build, kinds in blocks.items():
        per_px = base + sum(per_block[k] * c for k, c in kinds.items())
        for variant in ("plain", "ckpt"):
            for n, lat, nograd in flow_measure.POINTS:
                b = 5e6 + n * lat * lat * per_px
                rows.append({"component": "flow", "arch": f"flux-dev:{build}", "variant": variant, "n": n, "lat": lat,
                             "pixels": lat * lat, "peak": b, "retained": 0.9 * b,
                             "nograd_peak": 0.1 * b if nograd and variant == "plain" else None,
                             "key": f"{build}/{variant}/{n}/{lat}", "holdout": False})
    return rows


def test_full_depth_fit_is_the_depth_law():
    rows = _rows({"double": 3000.0, "single": 1000.0}, base=500.0)
    fits = flow_measure.flow_fits(rows)
    full = fits.get("unet", "flux-dev", "plain", "peak")(2, 128 * 128)
    assert full == pytest.approx(5e6 + 2 * 128 * 128 * (500 + 19 * 3000 + 38 * 1000), rel=1e-6)
    # schnell is measured as dev (same network)
    assert fits.get("unet", "flux-schnell", "ckpt", "retained")(1, 64 * 64) == \
        pytest.approx(fits.get("unet", "flux-dev", "ckpt", "retained")(1, 64 * 64))


def _synthetic_sd_data() -> dict:
    rows = [{"component": "reward", "arch": "clip-vit-l14", "variant": "plain", "n": n, "lat": 64, "pixels": 4096,
             "peak": 0.2 * G * n, "retained": 0.1 * G * n, "nograd_peak": 0.05 * G * n, "key": f"r{n}"} for n in (1, 2)]
    for var, (peak, kept) in {"plain": (2.5, 2.0), "ckpt": (1.2, 0.5)}.items():
        for n, lat in ((1, 16), (2, 16), (1, 32)):
            s = n * lat * lat / 4096
            rows.append({"component": "vae", "arch": "sd-vae", "variant": var, "n": n, "lat": lat, "pixels": lat * lat,
                         "peak": peak * G * s, "retained": kept * G * s, "nograd_peak": 0.3 * G * s,
                         "key": f"v{var}{n}{lat}"})
    return {"points": rows, "counts": {"reward": 430_000_000, "vae": 84_000_000}}


def test_quantized_base_and_no_cfg_in_the_composition(tmp_path):
    sd = _synthetic_sd_data()
    fl = {"points": _rows({"double": 3000.0, "single": 1000.0}, base=500.0),
          "counts": {"vae_flux-dev": 84_000_000, "unet_flux-dev": 11_900_000_000, "unet_linear_flux-dev": 11_800_000_000,
                     "text_flux-dev": 4_900_000_000, "lora_flux-dev_r4": 6_500_000}}
    fits = flow.combined_fits(sd["points"], fl["points"])
    counts = {**sd["counts"], **fl["counts"]}
    s = flow.flow_scenario("flux-dev")
    assert not s.cfg and s.call_batch == 1 and s.channels == 16
    bf16, int8, nf4 = (predict := lambda base: mm.predict(fits, s, flow.flow_options(base, True), counts, "rlr"))("auto"), \
        predict("int8"), predict("nf4")
    lin, rest = 11_800_000_000, 100_000_000
    assert bf16["persistent"]["unet weights"] == 2 * (lin + rest)
    assert int8["persistent"]["unet weights"] == pytest.approx(2 * rest + 1.0 * lin)
    assert nf4["persistent"]["unet weights"] == pytest.approx(2 * rest + 0.5625 * lin)
    assert bf16["activations"] == int8["activations"] == nf4["activations"]
    assert bf16["persistent"]["text encoders"] == 0  # offloaded, as rlr-train's default
    # with CFG the same step is a call of batch 2B
    cfg = mm.predict(fits, replace(s, cfg=True), flow.flow_options("auto", False), counts, "ddpo")
    no_cfg = mm.predict(fits, s, flow.flow_options("auto", False), counts, "ddpo")
    assert cfg["step"]["peak"] - 5e6 == pytest.approx(2 * (no_cfg["step"]["peak"] - 5e6))
    # the page section: every model x base row that has fits, marked as modelled
    (tmp_path / "memory-model.json").write_text(json.dumps(sd))
    (tmp_path / "memory-flow.json").write_text(json.dumps({**fl, "counts": _all_counts(fl["counts"])}))
    text = "\n".join(flow.flow_doc_section(tmp_path))
    assert "modelled, not measured on a GPU" in text and "only planned" in text
    rows = [line for line in text.splitlines() if line.startswith("| FLUX.1")]
    assert len([r for r in rows if "| nf4 |" in r]) == 4  # dev and schnell, with and without checkpointing
    assert flow.verdict(10 * G) == "12 GB" and flow.verdict(30 * G) == "no"


def _all_counts(c: dict) -> dict:
    """The section's model table needs every arch's counts: copy FLUX.1-dev's."""
    out = dict(c)
    for arch in FLOW_ARCHS:
        for k in ("vae", "unet", "unet_linear", "text"):
            out.setdefault(f"{k}_{arch}", c[f"{k}_flux-dev"])
        out.setdefault(f"lora_{arch}_r4", c["lora_flux-dev_r4"])
    return out
