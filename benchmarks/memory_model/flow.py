"""The flow models on consumer cards, on paper: SD3.5 medium / large, FLUX.1-dev / schnell and Z-Image-Turbo at
1024 px, per estimator, with the denoiser's base weights in bf16, int8 or NF4 (``--base-precision``), composed by
``model.predict`` from the flow transformers' fits (``flow_measure``) and the UNet model's VAE and reward fits;
rendered as a section of docs/memory.md (``report.render``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlr_backend.train.quantize import BASE_QUANTIZATIONS

from ..flow_archs import FLOW_ARCHS, LATENT_CHANNELS
from .fit import Fits, fit_components
from .flow_measure import FLOW_RESULTS, HOLDOUT, POINTS, depth_combination, flow_fits, holdout_errors
from .model import Options, Scenario, gpu_config, predict, with_margin
from .store import GB, RESULTS, load

#: the consumer cards of the question (GB)
CONSUMER_CARDS: tuple[int, ...] = (12, 16, 24)
#: (column, estimator, fo_steps): RLR with h = 2 and the paper's 1-step FO window; truncated backprop through the
#: last K = 2 steps (--truncation's default); DDPO; full backprop through all T steps (with checkpointing only)
FLOW_ESTIMATORS: tuple[tuple[str, str, int], ...] = (("RLR h=2, FO 1", "rlr", 1), ("truncated_bp K=2", "truncated_bp", 2),
                                                   ("DDPO", "ddpo", 1), ("full_bp", "full_bp", 1))
#: base precisions of the rows: label -> --base-precision (bf16 = auto with --precision bf16)
FLOW_BASES: tuple[tuple[str, str], ...] = (("bf16", "auto"), ("int8", "int8"), ("nf4", "nf4"))


def flow_options(base: str, checkpointing: bool) -> Options:
    """``rlr-train --precision bf16 --base-precision <base> [--gradient-checkpointing]`` with the aesthetic reward and
    the text encoders offloaded (the default). Built from a bf16 config and the quantization's bytes, so the page
    renders without torchao / bitsandbytes installed."""
    opts = Options.from_config(gpu_config(precision="bf16", gradient_checkpointing=checkpointing,
                                          offload_text_encoders=True))
    q = BASE_QUANTIZATIONS.get(base)
    return replace(opts, base_bytes=None if q is None else q.bytes_per_weight,
                   label=f"{base if q else 'bf16'}{', checkpointing' if checkpointing else ''}")


def flow_scenario(arch: str, batch: int = 1, fo_steps: int = 1) -> Scenario:
    a = FLOW_ARCHS[arch]
    return Scenario(arch, 1024, batch, T=a["T"], h=2, fo_steps=fo_steps, cfg=a["cfg"], channels=LATENT_CHANNELS)


def combined_fits(sd_rows: list[dict], flow_rows: list[dict]) -> Fits:
    """The UNet model's fits (the VAE and the reward: the 16-channel VAE decodes with the SD VAE's blocks, only its
    first convolution reads 16 channels instead of 4) + the flow transformers' full-depth fits."""
    fits = fit_components(sd_rows)
    fits.table.update(flow_fits(flow_rows).table)
    return fits


def flow_predictions(sd: dict, flow: dict, batches=(1,)) -> list[dict]:
    fits = combined_fits(sd.get("points", []), flow.get("points", []))
    counts = {**sd["counts"], **flow["counts"]}
    out = []
    for arch in FLOW_ARCHS:
        if not fits.has("unet", arch, "ckpt", "peak") or not fits.has("unet", arch, "plain", "nograd_peak"):
            continue
        for b in batches:
            for base_label, base in FLOW_BASES:
                for ckpt in (True, False):
                    opts = flow_options(base, ckpt)
                    for col, est, fo in FLOW_ESTIMATORS:
                        if est == "full_bp" and not ckpt:
                            continue  # all T steps' activations: hundreds of GB, as for the UNets
                        p = predict(fits, flow_scenario(arch, b, fo), opts, counts, est)
                        out.append({**p, "arch": arch, "base": base_label, "column": col, "checkpointing": ckpt})
    return out


def verdict(b: float) -> str:
    """The smallest consumer card the peak fits with the margin, or 'no' (over 24 GB)."""
    return next((f"{c} GB" for c in CONSUMER_CARDS if with_margin(b) <= c * GB), "no")


def _cell(p: dict) -> str:
    v = verdict(p["bytes"])
    text = f"{with_margin(p['bytes']) / GB:.1f}: {v}"
    return f"**{text}**" if v != "no" else text


def flow_doc_section(results_dir: Path = RESULTS.parent) -> list[str]:
    sd, flow = load(results_dir / RESULTS.name), load(results_dir / FLOW_RESULTS.name)
    if not flow.get("points") or not sd.get("points"):
        return []
    preds = flow_predictions(sd, flow)
    if not preds:
        return []
    counts = {**sd["counts"], **flow["counts"]}
    m = flow.get("machine", {})
    lines = ["## Flow models at 1024 px on 12, 16 and 24 GB cards (modelled, not measured on a GPU)", "",
             f"*{flow.get('started', '?')}; `python -m benchmarks.memory_model.flow_measure` ({m.get('cpu', '?')}, "
             f"{m.get('cores', '?')} cores, torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}). Data: "
             "`benchmarks/results/memory-flow.json`; the page section is re-rendered by `--report-only`.*", "",
             "**Modelled, not measured on a GPU.** The same method as the UNets above: the published architectures "
             "built at random init from configs written in `benchmarks/flow_archs.py` (nothing downloads), bf16 under "
             "CPU autocast, LoRA rank 4 (fp32) on each adapter's targets, tensor bytes from the profiler. The full "
             "transformers (5-24 GB in bf16) do not fit this machine's share of RAM, but they are stacks of "
             "identical blocks: each is measured at full width with few blocks (a base build, and one more block of "
             "each kind), every build fitted as `c + n (b + a P)` on "
             + ", ".join(f"n={n} at {lat}x{lat}" for n, lat, _ in POINTS) + " latents, and the full depth is "
             "`base + sum_k (blocks_k - base_k) x (build_k - base)`. Attention runs in SDPA (no stored scores), so "
             "the form is linear in the pixels; the extrapolation check below fits without a larger point and "
             "predicts it. VAE decode and reward are the UNet model's measured fits (the 16-channel VAE has the SD "
             "VAE's blocks). Then the composition above: weights + LoRA state + the stored chain + the binding phase "
             "of each estimator, and the margin for the CUDA allocator (+15%, +0.5 GB).", "",
             "| model | transformer (params, of which Linear) | text encoders (params) | text tokens | VAE | LoRA r4 | T | "
             "CFG (call batch) | bf16 / int8 / NF4 transformer weights GB |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, a in FLOW_ARCHS.items():
        n, lin = counts[f"unet_{arch}"], counts[f"unet_linear_{arch}"]
        w = [2 * n] + [2 * (n - lin) + BASE_QUANTIZATIONS[q].bytes_per_weight * lin for q in ("int8", "nf4")]
        lines.append(f"| {a['label']} | {n / 1e9:.2f} B ({lin / n:.1%}) | {counts[f'text_{arch}'] / 1e9:.2f} B "
                     f"({' + '.join(a['text'])}) | {a['text_tokens']} | {counts[f'vae_{arch}'] / 1e6:.1f} M | "
                     f"{counts[f'lora_{arch}_r4'] / 1e6:.1f} M | {a['T']} | {'yes (2B)' if a['cfg'] else 'no (B)'} | "
                     + " / ".join(f"{x / GB:.1f}" for x in w) + " |")
    lines += ["", "Text tokens as the adapters encode them: SD3.5 77 CLIP + 256 T5 (`max_sequence_length` 256), FLUX.1 512 "
              "T5 (schnell too: the adapter's default), Z-Image the prompt's own Qwen tokens (variable; 128 assumed, "
              "a long prompt). T: the usual sampling steps (the chain store is a few MB either way; DDPO and the "
              "estimators with checkpointing do not depend on it).", "",
              "**Text encoders: offloaded, as `rlr-train` does by default.** `--offload-text-encoders` (on unless "
              "`--no-offload-text-encoders`) keeps them on the CPU in fp32: each prompt is encoded once and cached "
              "(`FlowModel.encode`), so the GPU holds the transformer, the VAE and the reward only; the tables assume "
              "this. They cost CPU RAM instead: fp32 T5-XXL + CLIPs is "
              f"{4 * counts['text_sd35m'] / GB:.0f} GB (SD3.5), {4 * counts['text_flux-dev'] / GB:.0f} GB (FLUX.1), "
              f"Qwen3-4B {4 * counts['text_zimage'] / GB:.0f} GB (Z-Image) of system memory; on the GPU in bf16 they "
              f"would add {2 * counts['text_sd35m'] / GB:.1f} / {2 * counts['text_flux-dev'] / GB:.1f} / "
              f"{2 * counts['text_zimage'] / GB:.1f} GB, more than a 12-16 GB card can spare.", "",
              "Each cell: predicted peak with the margin in GB, then the smallest of the 12 / 16 / 24 GB cards it fits "
              "(**bold**), or \"no\" (over 24 GB). Batch 1, 1024x1024, bf16 compute, the aesthetic reward (CLIP "
              "ViT-L/14, bf16) backpropagated where the estimator needs it, the trainer's evaluation between updates "
              "(8 images).", "", *_summary(preds), ""]
    for ckpt in (True, False):
        mine = [p for p in preds if p["checkpointing"] == ckpt]
        cols = [c for c, e, _ in FLOW_ESTIMATORS if ckpt or e != "full_bp"]
        lines += [f"**{'With `--gradient-checkpointing`' if ckpt else 'Without checkpointing'}:**", "",
                  "| model | base weights | GPU weights + LoRA state GB | " + " | ".join(cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for arch, a in FLOW_ARCHS.items():
            for base_label, _ in FLOW_BASES:
                row = {p["column"]: p for p in mine if p["arch"] == arch and p["base"] == base_label}
                if not row:
                    continue
                pers = sum(next(iter(row.values()))["persistent"].values())
                lines.append(f"| {a['label']} | {base_label} | {pers / GB:.1f} | "
                             + " | ".join(_cell(row[c]) if c in row else "-" for c in cols) + " |")
        lines.append("")
    lines += _binding(preds) + _holdout(flow) + _measured_quantization(load(results_dir / "base-precision.json"))
    lines += _planned()
    return lines


def _measured_quantization(bp: dict) -> list[str]:
    """The full-width check of ``--base-precision`` (``python -m benchmarks.base_precision``), if it ran."""
    rows = bp.get("rows", [])
    if not rows:
        return []
    label = FLOW_ARCHS[bp["arch"]]["label"]
    lines = [f"**Quantized base at full width, measured on the CPU** (`python -m benchmarks.base_precision`: "
             f"{label}'s base build, one block of each kind at full width, LoRA rank 4, n=1 at {bp['lat']}x{bp['lat']} "
             "latents, quantized by the trainer's `train.quantize.quantize_base`; data "
             "`benchmarks/results/base-precision.json`):", "",
             "| base | stored GB | bytes per quantized weight (measured / modelled) | forward + backward peak GB | "
             "output error vs bf16 | LoRA gradient cosine vs bf16 |", "|---|---|---|---|---|---|"]
    for r in rows:
        bpw = "-" if "bytes_per_weight" not in r else \
            f"{r['bytes_per_weight']:.4f} / {r['modelled_bytes_per_weight']:.4f}"
        lines.append(f"| {'bf16' if r['base'] == 'auto' else r['base']} | {r['stored_bytes'] / GB:.3f} | {bpw} | "
                     f"{r['peak'] / GB:.3f} | {r['output_rel_error']:.3f} | {r['lora_grad_cosine']:.4f} |")
    lines += ["", "The activation peak does not change with the base precision: both keep only the stored weight for "
              "backward and dequantize one layer at a time (torchao's int8 through its own dispatch kept every "
              "layer's dequantized bf16 weight until backward, +0.62 GB here, the weights' bf16 size again; "
              "`train.quantize` routes its layers through a linear that dequantizes again in backward). Random-init "
              "weights are uniform, not the bell-shaped trained weights NF4's levels are placed for, so its error "
              "here is likely larger than on a trained model.", ""]
    return lines


def _summary(preds: list[dict]) -> list[str]:
    """Per card: per model, each estimator that fits (with checkpointing) and the widest base precision it fits in."""
    out = []
    for card in CONSUMER_CARDS:
        parts = []
        for arch, a in FLOW_ARCHS.items():
            fits = []
            for col, est, _ in FLOW_ESTIMATORS:
                base = next((b for b, _ in FLOW_BASES for p in preds if p["arch"] == arch and p["column"] == col
                             and p["base"] == b and p["checkpointing"] and with_margin(p["bytes"]) <= card * GB), None)
                if base is not None:
                    fits.append(f"{col} ({base})")
            parts.append(f"{a['label']}: " + (", ".join(fits) if fits else "none"))
        out.append(f"- **{card} GB** (with `--gradient-checkpointing`; in brackets the widest base precision that "
                   "fits): " + "; ".join(parts) + ".")
    return out


def _binding(preds: list[dict]) -> list[str]:
    out = ["**What binds** (checkpointing, bf16 base, RLR): "]
    parts = []
    for arch, a in FLOW_ARCHS.items():
        p = next((p for p in preds if p["arch"] == arch and p["base"] == "bf16" and p["checkpointing"]
                  and p["estimator"] == "rlr"), None)
        if p:
            parts.append(f"{a['label']}: {sum(p['persistent'].values()) / GB:.1f} GB of weights and LoRA state, then "
                         f"the {p['binding_phase'].replace('_', '-')} phase {p['activations'] / GB:.1f} GB (one "
                         f"checkpointed transformer step peaks at {p['step']['peak'] / GB:.2f} GB, the decode + reward "
                         f"backward at {p['decode_reward']['peak'] / GB:.2f} GB)")
    return [out[0] + "; ".join(parts) + ". The decode + reward backward is the same for every model (the VAE "
            "decodes 1024 px under its up-block checkpointing, then the reward): with checkpointing it sets the "
            "activations of the backpropagating estimators, and the base precision decides the rest.", ""]


def _holdout(flow: dict) -> list[str]:
    errs = holdout_errors(flow["points"], flow_fits(flow["points"]))
    if not errs:
        return []
    lines = [f"**Extrapolation check**: each base build fitted on the small points, asked for n={HOLDOUT[0]} at "
             f"{HOLDOUT[1]}x{HOLDOUT[1]} latents (measured, not in the fit; the full-size target is 128x128):", "",
             "| build | quantity | measured GB | fit GB | error |", "|---|---|---|---|---|"]
    for h in errs:
        lines.append(f"| {h['family']} | {h['quantity']} | {h['measured'] / GB:.3f} | {h['predicted'] / GB:.3f} | "
                     f"{h['error']:+.1%} |")
    worst = min(errs, key=lambda h: h["error"])
    lines += ["", f"Retained bytes (what each block adds) extrapolate within {max(abs(h['error']) for h in errs if h['quantity'] == 'retained'):.1%}; "
              f"the peak's transient part (a block's backward) grows a little faster than linear, so peaks run low by "
              f"up to {-worst['error']:.1%} ({worst['family']}: {(worst['measured'] - worst['predicted']) / 1e6:.0f} MB) "
              "at 4x the pixels. That error is one block's transient: it does not add up over the depth (the builds' "
              "differences cancel it), so at full size it stays tens of MB, inside the margin."]
    weights = {arch: depth_combination(arch) for arch in FLOW_ARCHS}
    lines += ["", "Depth combination (weight of each build's fit in the full model): "
              + "; ".join(f"{FLOW_ARCHS[a]['label']} " + ", ".join(f"{b} {w:+g}" for b, w in ws.items())
                          for a, ws in weights.items()) + ".", ""]
    return lines


def _planned() -> list[str]:
    return ["**What runs, and what was only planned.** Runnable with this project: `--base-precision int8` (torchao "
            "weight-only int8) and `--base-precision nf4` (bitsandbytes NF4), both tested on the CPU on the flow "
            "default (`tests/test_base_precision.py`: output within 1.1% (int8) / 9.8% (NF4) of the bf16 model, gradients on the "
            "LoRA only, stored bytes as modelled); their GPU runs are the same code but have not been run here (no "
            "GPU). Only planned, not runnable on this machine: torchao int4 weight-only (its CPU path needs the mslk "
            "kernels, its tile-packed format CUDA: 0.52 bytes per weight, about NF4's memory), float8 weight-only "
            "(needs an sm89+ GPU; int8's memory), bitsandbytes' LLM.int8 (`Linear8bitLt`, int8's memory) and NF4 "
            "with double quantization (0.51 instead of 0.56 bytes per weight). Not modelled: the dequantized copy of "
            "one layer's weight during its matmul (at most 0.1 GB: FLUX.1's largest Linear, 15360 x 3072; inside the margin), and "
            "the time: weight-only quantization makes each step slower, not the memory larger.", ""]
