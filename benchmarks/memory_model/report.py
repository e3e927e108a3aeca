"""docs/memory.md: the page rendered from the measurements and their analysis (sections in page order)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..gpu_check.report import memory_doc_section
from ..sd_archs import ARCHS
from .fit import Fit
from .gpu_correction import best_bytes
from .flow import flow_doc_section
from .full_size import RESULTS as FULL_SIZE_RESULTS
from .full_size import doc_section, summary_line
from .model import MARGIN_FIXED, MARGIN_FRACTION, OPTION_SETS, smallest_card, with_margin
from .store import GB, RESULTS, load


def _gb(b: float | None) -> str:
    return "-" if b is None else f"{b / GB:.2f}"



def render(data: dict, analysis: dict, out: Path, image_paths: Sequence[Path],
           results_dir: Path = RESULTS.parent) -> str:
    """docs/memory.md from the measurements and the analysis; the full-size check's and the GPU check's
    sections come from their results in ``results_dir``."""
    m = data.get("machine", {})
    rows = data.get("points", [])
    later = data.get("commands", [])[1:]
    resumed = " (resumed: " + ", ".join(f"`{c}`" for c in later) + ")" if later else ""
    counts = analysis["counts"]
    fits = analysis["fits"]
    lines = ["# Memory model", "",
             f"*{data.get('budget', 'full')} run, {data.get('started', '?')}; {m.get('cpu', '?')}, "
             f"{m.get('cores', '?')} "
             f"cores, torch {m.get('torch', '?')}, diffusers {m.get('diffusers', '?')}, transformers "
             f"{m.get('transformers', '?')}, peft {m.get('peft', '?')}, commit {m.get('commit', '?')}. "
             f"Command: `{data.get('command', 'python -m benchmarks.memory_model')}`"
             f"{resumed}; "
             f"re-render with `python -m benchmarks.memory_model --report-only`. Data: "
             f"`benchmarks/results/memory-model.json`.*", ""]
    lines += _doc_intro(counts)
    full_size_data = load(results_dir / FULL_SIZE_RESULTS.name)
    lines += _doc_predictions(analysis, full_size_data)
    lines += flow_doc_section(results_dir)
    lines += _doc_formula(fits)
    lines += _doc_measurements(rows, fits, analysis)
    lines += _doc_validation(data.get("validation", []))
    lines += doc_section(full_size_data) if full_size_data else []
    lines += memory_doc_section(results_dir)
    lines += _doc_caveats()
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def _doc_intro(counts: dict) -> list[str]:
    return [
        "Peak memory of one RLR update as a function of model, resolution, batch B, chain length T, "
        "half-order length h and the trainer's memory options, fitted to measurements of the real "
        "SD1.5 / SDXL architectures on CPU and validated against whole updates (small stacks, and full-size "
        "SD1.5 updates on the CPU). The flow models (SD3.5, FLUX.1, Z-Image) at 1024 px, with their base weights in "
        "bf16, int8 or NF4 (`--base-precision`), have [their own section](#flow-models-at-1024-px-on-12-16-and-24-gb-"
        "cards-modelled-not-measured-on-a-gpu) (when its measurements exist). The code is "
        "`benchmarks/memory_model/`.", "",
        "**What it rests on.** The real architectures built at random init from their public configs "
        f"(SD1.5 UNet {counts['unet_sd15'] / 1e6:.0f} M parameters, SDXL UNet {counts['unet_sdxl'] / 1e6:.0f} M, "
        f"SD VAE {counts['vae'] / 1e6:.1f} M, CLIP ViT-L/14 image tower + aesthetic head "
        f"{counts['reward_vision_only'] / 1e6:.0f} M ({counts['reward'] / 1e6:.0f} M as a full CLIP checkpoint), "
        f"text encoders {counts['text_sd15'] / 1e6:.0f} M (SD1.5) and {counts['text_sdxl'] / 1e6:.0f} M (SDXL)), "
        f"LoRA rank 4 on to_q/to_k/to_v/to_out.0 ({counts['lora_sd15_r4'] / 1e6:.2f} M / "
        f"{counts['lora_sdxl_r4'] / 1e6:.2f} M parameters, fp32), frozen weights in bfloat16 with CPU autocast. "
        "bfloat16 has the bytes of fp16; CPU fp16 kernels are missing or slow, so fp16 is measured as bf16. "
        "Bytes are the profiler's tensor allocations (live bytes, the CPU analogue of "
        "`torch.cuda.max_memory_allocated`), not the process RSS.", ""]


def _options_table(preds: list[dict], estimator: str) -> list[str]:
    lines = []
    for p in preds:
        if p["estimator"] != estimator:
            continue
        s, o = p["scenario"], p["options"]
        pers = p["persistent"]
        w = pers["unet weights"] + pers["vae weights"] + pers["text encoders"]
        lines.append(f"| {ARCHS[s['arch']]['label']} {s['resolution']} px | {s['batch']} | {s['fo_steps']} | "
                     f"{o['label']} | {_gb(w)} | {_gb(pers['reward weights'])} | "
                     f"{_gb(pers['lora + grad'] + pers['adam moments'])} | {_gb(p['step']['peak'])} / "
                     f"{_gb(p['decode_reward']['peak'])} | {_gb(p['activations'] + p['chain_store'])} "
                     f"({p['binding_phase'].replace('_', '-')}) | {_gb(p['bytes'])} | "
                     f"{_gb(p.get('gpu_bytes'))} | {_gb(with_margin(best_bytes(p)))} | **{smallest_card(best_bytes(p))}** |")
    return lines

def _doc_predictions(analysis: dict, full_size_data: dict) -> list[str]:
    preds = analysis["predictions"]
    if not preds:
        return ["**Predictions**: not available (missing fits: " + ", ".join(analysis["missing_fits"]) + ").", ""]
    head = ["| model | B | FO steps | options | UNet + VAE + text weights | reward weights | LoRA + grad + Adam | "
            "one step / decode + reward peak | activations (binding phase) | predicted peak (CPU fits) | GPU-corrected | "
            "+ margin | fits a card of |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rlr1 = [p for p in preds if p["estimator"] == "rlr" and p["scenario"]["fo_steps"] == 1]
    rlr4 = [p for p in preds if p["estimator"] == "rlr" and p["scenario"]["fo_steps"] == 4]
    verdict = _verdicts(preds)
    lines = ["## Predictions", "",
             f"T = 50, h = 2, LoRA rank 4, fp16 weights and activations, the LAION aesthetic reward (CLIP ViT-L/14) "
             f"backpropagated in the first-order window, and the trainer's evaluation between updates (8 images: 2 "
             f"seeds of each of 4 prompts, sampled together without grad; it binds where the phase says "
             f"\"evaluation\"). GB = 1e9 bytes. \"+ margin\" adds "
             f"{MARGIN_FRACTION:.0%} (caching-allocator fragmentation, kernel workspaces) and "
             f"{MARGIN_FIXED / GB:.1f} GB (CUDA context); compare that column with a card's memory.", "",
             *_gpu_correction(analysis.get("gpu_scales", {}), analysis.get("gpu_check_rows", [])), *verdict, *_dominant(preds), "",
             *_validation_summary(full_size_data),
             "**RLR, first-order window of 1 step (the paper's FO):**", "", *head, *_options_table(rlr1, "rlr"), "",
             "**RLR with the project's default recipe `fo_steps=4`:**", "", *head, *_options_table(rlr4, "rlr"), "",
             "**The other estimators: full backprop through all 50 steps, truncated backprop (the last K = 2 steps, "
             "`--truncation` default), DDPO and ZO (one likelihood-ratio step backpropagated at a time; code_compat, "
             "kept for comparison with the official code, is not modelled):**", "", *head,
             *_options_table(preds, "full_bp"), *_options_table(preds, "truncated_bp"),
             *_options_table(preds, "ddpo"), *_options_table(preds, "zo"), "",
             "Options: *gradient checkpointing* = diffusers' `unet.enable_gradient_checkpointing()` inside each "
             "UNet call + a step-level `torch.utils.checkpoint` of every backpropagated step (a window keeps one "
             "step's inputs per step and recomputes one step at a time) + the VAE decode sliced per sample under a "
             "checkpoint with the decoder's own up-block checkpointing (`vae.enable_gradient_checkpointing()`) and every "
             "resnet, attention and upsampler inside it under its own checkpoint (`set_decoder_checkpointing`), and "
             "evaluation images decoded one at a time; reward models are not checkpointed (their activations are "
             "the measured reward terms): this is what `rlr-train --gradient-checkpointing` does "
             "(`rlr_backend/train/memory.py` `prepare_model`); *text-encoder offload* = text encoders moved to the CPU after encoding; *8-bit Adam* = "
             "moments in 2 bytes per parameter (the LoRA is under 1% of the memory, so it barely matters); "
             "*reward in fp32* = the reward model's weights in fp32 and its activations counted twice (a reward "
             "model left in fp32; `rlr-train` loads model rewards in `--precision` on a GPU, so the other rows "
             "apply). `rlr-train` offloads the text encoders by default, so `--precision fp16 "
             "--gradient-checkpointing` is the \"checkpointing + text-encoder offload\" row. "
             "\"Activations\" includes the stored chain (T+1 latents, T noises in fp32: a few MB). Full backprop "
             "with step checkpointing holds only T latents, so its peak is RLR's: checkpointing trades its memory "
             "for an extra forward per step (see the cost table in docs/benchmarks.md), not the other way round.", ""]
    lines += ["![predicted peaks](images/memory_predictions.png)", ""]
    return lines


def _gpu_correction(scales: dict, rows: list[dict]) -> list[str]:
    """What the GPU-corrected column is, the part scales behind it and how it compares with the GPU's
    measured updates (nothing but a caveat without a GPU check)."""
    if not scales:
        return ["No GPU check has been run: the figures are the CPU fits' (read them as lower bounds: on the one "
                "GPU measured so far they were low).", ""]
    names = {"sd15": "SD1.5", "sdxl": "SDXL", "plain": "no options", "ckpt": "checkpointed"}

    def one(k: str, v: dict) -> str:
        a, o = k.split("/")
        return (f"{names[a]} {names[o]}: denoiser call x{v['step'][0]:.2f} (peak) / x{v['step'][1]:.2f} (kept), "
                f"decode + reward x{v['decode'][0]:.2f} / x{v['decode'][1]:.2f}")

    lines = ["**GPU-corrected.** On a GPU the CPU-fitted parts are low (see [Measured on a GPU](#measured-on-a-gpu)): "
             "CUDA keeps more bytes for backward than the CPU kernels the parts were measured with, while the "
             "composition is right. The GPU check measures the two parts of each model (one CFG denoiser call, one "
             "decode + reward of its batch) with and without checkpointing, and the GPU-corrected column recomputes "
             "each prediction with its parts scaled by GPU / CPU fit (`benchmarks/memory_model/gpu_correction.py`): "
             + "; ".join(one(k, v) for k, v in sorted(scales.items())) + ". The scale measured at the check's "
             "batch (SD1.5: 4, SDXL: 1) is assumed at the other; the card column and the verdicts below use the "
             "GPU-corrected figure where there is one.", ""]
    if rows:
        lines += ["The GPU check's updates against the model (one update, no evaluation; GB):", "",
                  "| update | measured | CPU fits | GPU-corrected (binding phase) | corrected / measured |",
                  "|---|---|---|---|---|"]
        for r in rows:
            c = r["corrected"]
            off = "-" if c is None else f"{c / r['measured'] - 1:+.1%}"
            lines.append(f"| {r['name']} | {_gb(r['measured'])} | {_gb(r['cpu'])} | "
                         f"{_gb(c)} ({(r['phase'] or '-').replace('_', '-')}) | {off} |")
        lines.append("")
    return lines


def _validation_summary(full_size_data: dict) -> list[str]:
    line = summary_line(full_size_data)
    return [line, ""] if line else []


def _dominant(preds: list[dict]) -> list[str]:
    """One line per architecture: what the activations of the checkpointed RLR update consist of."""
    out = []
    for p in preds:
        s, o = p["scenario"], p["options"]
        if p["estimator"] != "rlr" or s["fo_steps"] != 1 or s["batch"] != 1 or o["label"] != OPTION_SETS[2].label:
            continue
        w = sum(p["persistent"].values())
        out.append(f"- {ARCHS[s['arch']]['label']} {s['resolution']} px, batch 1, {o['label']}: {_gb(w)} GB of "
                   f"weights and optimizer state, then the {p['binding_phase'].replace('_', '-')} phase: "
                   f"{_gb(p['activations'])} GB, where one checkpointed UNet step peaks at {_gb(p['step']['peak'])} GB "
                   f"and the decode + reward backward at {_gb(p['decode_reward']['peak'])} GB.")
    return out


def _verdicts(preds: list[dict]) -> list[str]:
    """Per target budget and batch: the first option set (in OPTION_SETS order) whose predicted peak
    with the margin fits, for RLR with the paper's 1-step FO window."""
    out = []
    for arch, res, budget in (("sd15", 512, 8), ("sdxl", 1024, 16), ("sdxl", 1024, 24)):
        mine = [p for p in preds if p["estimator"] == "rlr" and p["scenario"]["arch"] == arch
                and p["scenario"]["fo_steps"] == 1]
        if not mine:
            continue
        parts = []
        for b in sorted({p["scenario"]["batch"] for p in mine}):
            by = {p["options"]["label"]: p for p in mine if p["scenario"]["batch"] == b}
            fit = next((o for o in OPTION_SETS if o.label in by and with_margin(best_bytes(by[o.label])) <= budget * GB),
                       None)
            none = with_margin(best_bytes(by[OPTION_SETS[0].label])) / GB
            if fit is None:
                best = min(with_margin(best_bytes(p)) for p in by.values()) / GB
                parts.append(f"batch {b}: **no** (best {best:.1f} GB with the margin; no options {none:.1f} GB)")
            elif fit is OPTION_SETS[0]:
                parts.append(f"batch {b}: **yes**, with no options ({none:.1f} GB with the margin)")
            else:
                parts.append(f"batch {b}: **yes** with {fit.label} ({with_margin(best_bytes(by[fit.label])) / GB:.1f} GB "
                             f"with the margin; no options {none:.1f} GB)")
        how = "GPU-corrected" if all(p.get("gpu_bytes") is not None for p in mine) else "CPU fits"
        out.append(f"- {ARCHS[arch]['label']} {res}x{res} in {budget} GB (RLR, FO 1 step, {how}): " + "; ".join(parts)
                   + ".")
    return out


def _fit_str(f: dict) -> str:
    return (f"{f['c'] / 1e6:.0f} MB + n x ({f['b'] / 1e6:.1f} MB + {f['a'] / 1e3:.2f} kB x P + "
            f"{f['q']:.3g} B x P^2)")


def _doc_formula(fits: dict) -> list[str]:
    lines = ["## The model", "",
             "For a scenario (architecture, resolution R, batch B, T, h, FO steps K, options):", "",
             "    peak = weights(UNet, VAE, reward, text encoders unless offloaded; 2 bytes/param)",
             "         + LoRA (fp32) + its gradient (fp32) + Adam moments (8 or 2 bytes/param)",
             "         + stored chain 4 bytes x ((2T+1) x B x 4 x P + B x T),   P = (R/8)^2 latent pixels",
             "         + max(sampling, FO, HO, ZO)",
             "    sampling = max(U_nograd(2B), D_nograd(B))",
             "    FO       = chain(U x K, D),   HO = chain(U x h),   ZO (latent_lr) = U.peak",
             "    chain(s_1..s_m) = max_i (sum_{j<i} s_j.retained + s_i.peak)",
             "    full backprop: chain(U x T, D);  DDPO: max(sampling, U.peak)", "",
             "U is one UNet step with classifier-free guidance (a call of batch n = 2B); D is the VAE decode "
             "followed by the reward. Each measured quantity is fitted as `c + n x (b + a x P + q x P^2)` "
             "(non-negative, relative-error least squares); the reward runs at 224 px, so it is `c + n x b`. "
             "With checkpointing U keeps only its inputs (retained = 2B x 4 x P x 4 bytes) and peaks as a "
             "block-checkpointed call; D decodes one sample at a time under a checkpoint "
             "(peak = one checkpointed sample + the B decoded images).", "",
             "| component / variant / quantity | fit (P = latent pixels, n = batch of the call) | points | "
             "max fit error |", "|---|---|---|---|"]
    for k, f in sorted(fits.items()):
        lines.append(f"| {k} | {_fit_str(f)} | {f['points']} | {f['max_rel_error']:.1%} |")
    lines.append("")
    return lines


def _doc_measurements(rows: list[dict], fits: dict, analysis: dict) -> list[str]:
    lines = ["## Measurements (bf16 on CPU) against the fit", "",
             "Peak = forward + backward peak, retained = kept after the forward until backward, no-grad = peak "
             "of a no-grad forward; all relative to what was live before (weights and inputs excluded). "
             "Error = fit / measured - 1.", "",
             "| component | arch | variant | n | latent | peak GB | fit err | retained GB | fit err | no-grad GB | "
             "fit err | time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["component"], r["arch"], r["variant"], r["n"] * r["pixels"])):
        errs = []
        for q in ("peak", "retained", "nograd_peak"):
            f = fits.get(f"{r['component']}/{r['arch']}/{r['variant']}/{q}")
            errs.append("-" if f is None or r.get(q) is None else f"{Fit(**f)(r['n'], r['pixels']) / r[q] - 1:+.1%}")
        lat = f"{r['lat']}x{r['lat']}" if r["component"] != "reward" else f"{8 * r['lat']} px image"
        lines.append(f"| {r['component']} | {r['arch']} | {r['variant']} | {r['n']} | {lat} | {_gb(r['peak'])} | "
                     f"{errs[0]} | {_gb(r['retained'])} | {errs[1]} | {_gb(r.get('nograd_peak'))} | {errs[2]} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "![measured and fitted activation bytes](images/memory_fit.png)", ""]
    lines += _doc_quadratic(fits, analysis.get("linear_only", {}), rows)
    if analysis["holdout"]:
        lines += ["**Extrapolation check**: each family fitted without its largest point, then asked for it "
                  "(with the full form and with the linear-only form `c + n (b + a P)`):", "",
                  "| family | quantity | point | measured GB | predicted GB (error) | linear-only GB (error) |",
                  "|---|---|---|---|---|---|"]
        for h in analysis["holdout"]:
            lines.append(f"| {h['family']} | {h['quantity']} | n={h['n']}, {h['lat']}x{h['lat']} | "
                         f"{_gb(h['measured'])} | {_gb(h['predicted'])} ({h['predicted'] / h['measured'] - 1:+.1%}) | "
                         f"{_gb(h['predicted_linear'])} ({h['predicted_linear'] / h['measured'] - 1:+.1%}) |")
        lines.append("")
    return lines


def _doc_quadratic(fits: dict, linear_only: dict, rows: list[dict]) -> list[str]:
    out = ["**Linear or quadratic in pixels?** Share of the fitted peak coming from the `q P^2` term, and the "
           "largest error on the measured points of the full fit and of a fit without `q`:", "",
           "| family | q share at the largest measured size | "
           "at the target (SD1.5 64x64 / SDXL 128x128, n=2; VAE n=1) | "
           "max error, full fit | max error, linear only |", "|---|---|---|---|---|"]
    for k, f in sorted(fits.items()):
        comp, arch, var, q = k.split("/")
        if q != "peak" or comp == "reward":
            continue
        F = Fit(**f)
        target = 128 * 128 if arch == "sdxl" else 64 * 64
        n = 1 if comp == "vae" else 2
        big = max((r["pixels"] for r in rows if (r["component"], r["arch"], r["variant"]) == (comp, arch, var)),
                  default=target)
        lin = linear_only.get(k)
        out.append(f"| {comp}/{arch}/{var} | {F.quadratic_share(n, big):.1%} | {F.quadratic_share(n, target):.1%} | "
                   f"{F.max_rel_error:.1%} | {'-' if lin is None else format(lin['max_rel_error'], '.1%')} |")
    out += ["", "With torch's default scaled-dot-product attention (a flash / memory-efficient kernel on CPU, as "
            "on GPUs with SDPA or xFormers) the attention scores are never stored, and the data choose a "
            "(near-)linear model. Forcing the math kernel (`sdpa_kernel(SDPBackend.MATH)`, the `math` rows, "
            "SD1.5 only) materialises them and a quadratic term appears: that is the regime of attention "
            "without SDPA, which these predictions do not assume.", ""]
    return out


def _doc_validation(vals: list[dict]) -> list[str]:
    if not vals:
        return []
    lines = ["## Validation against whole updates", "",
             "Whole estimator calls (`rlr_estimate`, `full_bp_estimate`, `ddpo_estimate`) on the random-init "
             "SD-shaped stacks of `benchmarks/stacks.py` (fp32, LoRA rank 4), measured end to end (weights + "
             "peak tensor allocations, as the cost suite does), against the composition above fed with the "
             "same stack's step and decode+reward segments, measured separately. This checks the composition "
             "(phases, chain rule of retained bytes, stored chain), which is what carries over to the large "
             "models.", "",
             "| stack | estimator | T | h | FO steps | B | px | measured MB | predicted MB | error | binding phase |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in vals:
        lines.append(f"| {v['model']} | {v['estimator']} | {v['T']} | {v['h']} | {v['fo_steps']} | {v['batch']} | "
                     f"{v['pixels']} | {v['measured'] / 1e6:.1f} | {v['predicted'] / 1e6:.1f} | "
                     f"{v['rel_error']:+.1%} | {v['binding_phase'].replace('_', '-')} |")
    worst = max(abs(v["rel_error"]) for v in vals)
    lines += ["", f"Largest error: {worst:.1%}.", ""]
    return lines


def _doc_caveats() -> list[str]:
    return ["## Caveats", "",
            "- **Allocator.** These are live tensor bytes. PyTorch's CUDA caching allocator reserves more than "
            "it allocates (block rounding, fragmentation; often 5-20%); `nvidia-smi` also shows the CUDA context "
            "(~0.3-0.5 GB) and cuDNN/cuBLAS workspaces (up to a few hundred MB). The margin column adds "
            f"{MARGIN_FRACTION:.0%} + {MARGIN_FIXED / GB:.1f} GB for these; set "
            "`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` to keep fragmentation low.",
            "- **Kernels.** CPU kernels are not CUDA kernels: GPU convolutions may allocate workspaces the CPU "
            "ones do not, and the attention kernel decides whether the scores are stored (SDPA / xFormers: "
            "not stored, as measured here; plain attention without SDPA: add the quadratic term of the "
            "`math` rows).",
            "- **bf16 for fp16.** Same bytes per element; fp16 on a GPU may need fp32 upcasts in a few places "
            "(e.g. SDXL's VAE overflows in fp16 and is often run in fp32 or replaced by the fp16-fix VAE: "
            "a fp32 SDXL VAE doubles its weights and decode activations).",
            "- **Extrapolation.** SDXL's UNet is measured up to 64x64 latents and extrapolated to 128x128 "
            "(4x the pixels); the extrapolation check above shows how well the fitted form carries one step "
            "further. SD1.5's UNet (64x64) and the VAE (64x64 and 128x128 latents) are measured at the target "
            "sizes. The checkpointed SDXL UNet's peak is the least regular family (the peak is a maximum over "
            "blocks); its fit keeps a small quadratic term that adds 0.5 GB (batch 1) to 1 GB (batch 2) at "
            "1024 px over the linear-only fit, which is kept (the conservative choice; it is not the binding "
            "term).",
            "- **Where the memory goes.** With checkpointing, the VAE decode's backward is the largest "
            "activation term (one sample; the last up block runs at full resolution with 128 channels). The "
            "trainer checkpoints every resnet, attention and upsampler of the decoder inside diffusers' "
            "up-block checkpoints (on an H200 this took SDXL's decode + reward backward at 1024 px from 11.4 to "
            "6.5 GB); tiled decoding would lower it further and is not done.",
            "- **Reward.** The aesthetic reward is modelled as a CLIP ViT-L/14 image tower (its activations "
            "for B images at 224 px, measured) and the full CLIP checkpoint's weights in fp16 (the text tower "
            "is loaded but unused). Another reward changes the reward-weights column and the FO window.",
            "- **Not modelled.** The optimizer step's temporaries (a few LoRA-sized tensors), dataloader and "
            "prompt batches, EMA copies of the LoRA, other processes on the GPU.", ""]

