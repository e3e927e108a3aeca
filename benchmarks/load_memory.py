"""Peak memory of loading a full-size SD1.5 / SD2.1 / SDXL model, folder and single file, per precision.

    python -m benchmarks.load_memory                      # all kinds (~30 min, ~20 GB of temporary disk)
    python -m benchmarks.load_memory --kinds sd15         # one kind
    python -m benchmarks.load_memory --report-only        # re-render docs/models.md from the saved results

For each kind the real architecture is built at random init from its published configs (nothing is
downloaded) and written to a temporary folder, which is deleted afterwards (never committed):

* a diffusers folder laid out as the official repositories are: SD1.5 and SD2.1 with fp32 weights and
  ``*.fp16.safetensors`` variants beside them (and, as in a full clone, ``.bin`` pickles beside every
  component; they are only created, never loaded), SDXL with fp16 weights (the ``fp16`` variant of
  stabilityai/stable-diffusion-xl-base-1.0, without the 14 GB fp32 files);
* a single-file fp16 checkpoint in the ComfyUI/A1111 layout (``benchmarks.ldm_export``).

Each case loads one of them in a fresh Python process with ``load_pipeline`` as ``rlr-train`` does
(UNet and VAE in the precision, the text encoders in fp32: they stay on the CPU by default) and
reports that process's peak resident memory (VmHWM, reset after the imports) against the loaded
model's bytes and the file's size. Results: benchmarks/results/load-memory.json; the table goes into
docs/models.md between the ``load-memory`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.sd_archs import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SD15_UNET, SD_VAE, SDXL_UNET

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "load-memory.json"
DOC = Path(__file__).parent.parent / "docs" / "models.md"
MARK_BEGIN, MARK_END = "<!-- load-memory:begin -->", "<!-- load-memory:end -->"
GB = 1e9

# stabilityai/stable-diffusion-2-1 unet/ and text_encoder/ config.json (architecture fields)
SD21_UNET: dict = {**SD15_UNET, "sample_size": 96, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
                   "use_linear_projection": True, "upcast_attention": True}
OPENCLIP_H_TEXT: dict = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                         "num_attention_heads": 16, "max_position_embeddings": 77, "vocab_size": 49408,
                         "projection_dim": 512, "hidden_act": "gelu"}

#: kind -> pipeline class, UNet config, VAE scaling factor, text encoders (config, with projection), prediction,
#: whether the folder holds fp32 weights with fp16 variants (else fp16 weights only)
KINDS: dict[str, dict] = {
    "sd15": {"pipeline": "StableDiffusionPipeline", "unet": SD15_UNET, "vae_scale": 0.18215,
             "text": ((CLIP_L_TEXT, False),), "prediction": "epsilon", "fp32_files": True, "label": "SD1.5"},
    "sd2": {"pipeline": "StableDiffusionPipeline", "unet": SD21_UNET, "vae_scale": 0.18215,
            "text": ((OPENCLIP_H_TEXT, False),), "prediction": "v_prediction", "fp32_files": True, "label": "SD2.1-v"},
    "sdxl": {"pipeline": "StableDiffusionXLPipeline", "unet": SDXL_UNET, "vae_scale": 0.13025,
             "text": ((CLIP_L_TEXT, False), (OPENCLIP_BIGG_TEXT, True)), "prediction": "epsilon",
             "fp32_files": False, "label": "SDXL base"},
}
#: (kind, source, precision) measured; fp32 SDXL (14 GB of weights) is left out on this 24 GB machine
CASES: tuple[tuple[str, str, str], ...] = (
    ("sd15", "folder", "fp32"), ("sd15", "folder", "fp16"), ("sd15", "folder-fp32-only", "fp16"),
    ("sd15", "single", "fp32"), ("sd15", "single", "fp16"),
    ("sd2", "folder", "fp32"), ("sd2", "folder", "fp16"), ("sd2", "single", "fp32"), ("sd2", "single", "fp16"),
    ("sdxl", "folder", "fp16"), ("sdxl", "folder", "bf16"), ("sdxl", "single", "fp16"), ("sdxl", "single", "bf16"),
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


# ------------------------------------------------------------------------------------------- writing
def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """A safetensors file written tensor by tensor (no second copy of the model in memory); returns its size."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return path.stat().st_size


def _random(module: torch.nn.Module, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Allocate a meta-built module in ``dtype`` and fill it with small random values (fast; any finite
    values do for memory)."""
    module = module.to(dtype).to_empty(device="cpu").requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for t in module.state_dict().values():
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).mul_(0.02)) if t.numel() < 1 << 24 \
                else t.normal_(0, 0.02, generator=g)
    return module


def build_components(kind: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The kind's UNet, VAE and text encoder(s) at random init in ``dtype``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = KINDS[kind]
    with torch.device("meta"):
        comps = {"unet": UNet2DConditionModel(**spec["unet"]),
                 "vae": AutoencoderKL(**SD_VAE, scaling_factor=spec["vae_scale"])}
        for i, (cfg, proj) in enumerate(spec["text"]):
            name = "text_encoder" if i == 0 else "text_encoder_2"
            comps[name] = (CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**cfg))
    return {name: _random(m, dtype, seed) for seed, (name, m) in enumerate(comps.items())}


def write_folder(kind: str, comps: dict[str, torch.nn.Module], out: Path, variant: str | None = None) -> int:
    """Write ``comps`` as a diffusers folder (configs, tokenizers, scheduler, model_index.json on the first
    call; weights as ``*.safetensors`` or ``*.<variant>.safetensors``); returns the weights' bytes."""
    import diffusers
    from diffusers import DDIMScheduler

    from rlr_backend.models.default_model import DEFAULT_MODEL_DIR

    spec = KINDS[kind]
    total = 0
    for name, m in comps.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        if hasattr(m, "save_config"):
            m.save_config(d)
            weights = "diffusion_pytorch_model"
        else:
            m.config.architectures = [type(m).__name__]
            m.config.save_pretrained(d)
            weights = "model"
        suffix = f".{variant}.safetensors" if variant else ".safetensors"
        total += write_safetensors(m.state_dict(), d / (weights + suffix))
        if spec["fp32_files"] and not variant:  # a full clone of the official repository has pickles too
            (d / ("pytorch_model.bin" if weights == "model" else weights + ".bin")).write_bytes(b"\x80\x02}q\x00.")
    index = {"_class_name": spec["pipeline"], "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if "text_encoder_2" in comps:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    for tok in [k for k in index if k.startswith("tokenizer")]:
        shutil.copytree(DEFAULT_MODEL_DIR / "tokenizer", out / tok, dirs_exist_ok=True)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  clip_sample=False, set_alpha_to_one=False, prediction_type=spec["prediction"]
                  ).save_pretrained(out / "scheduler")
    return total


def write_single_file(comps: dict[str, torch.nn.Module], path: Path) -> int:
    from benchmarks.ldm_export import pipeline_to_ldm

    pipe = SimpleNamespace(**comps)
    return write_safetensors(pipeline_to_ldm(pipe), path)


def build_kind(kind: str, root: Path) -> dict[str, dict]:
    """Write the kind's folder and single file under ``root``; returns source -> {path, weights bytes}."""
    spec = KINDS[kind]
    t0 = time.perf_counter()
    folder, single = root / f"{kind}-folder", root / f"{kind}.safetensors"
    if spec["fp32_files"]:
        comps = build_components(kind, torch.float32)
        fp32_bytes = write_folder(kind, comps, folder)
        comps = {k: m.half() for k, m in comps.items()}
        fp16_bytes = write_folder(kind, comps, folder, variant="fp16")
    else:
        comps = build_components(kind, torch.float16)
        fp16_bytes = fp32_bytes = write_folder(kind, comps, folder)
    single_bytes = write_single_file(comps, single)
    del comps
    built = {"folder": {"path": str(folder), "bytes": fp32_bytes, "fp16_bytes": fp16_bytes},
             "single": {"path": str(single), "bytes": single_bytes}}
    if spec["fp32_files"]:  # the same folder without its fp16 variant: half precision is cast from fp32 files
        only = root / f"{kind}-folder-fp32-only"
        for f in folder.rglob("*"):
            if f.is_file() and ".fp16." not in f.name:
                (only / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
                (only / f.relative_to(folder)).symlink_to(f)
        built["folder-fp32-only"] = {"path": str(only), "bytes": fp32_bytes, "fp16_bytes": fp32_bytes}
    logger.info("%s: wrote the folder and the single file in %.0f s", kind, time.perf_counter() - t0)
    return built


# ------------------------------------------------------------------------------------------ measuring
def process_memory() -> dict[str, int]:
    """This process's resident memory now (``VmRSS``) and its peak so far (``VmHWM``), in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def child(path: str, precision: str) -> dict:
    """Load ``path`` as rlr-train does (UNet/VAE in ``precision``, text encoders fp32) and measure (runs in a
    fresh process: its peak is this load's alone)."""
    import diffusers  # noqa: F401 -- imported before the baseline, as the trainer has them
    import transformers  # noqa: F401

    from rlr_backend.models.loader import load_pipeline

    torch.set_num_threads(1)
    before = process_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak from here on is the load's
    t0 = time.perf_counter()
    pipe = load_pipeline(path, dtype=DTYPES[precision], text_encoder_dtype=torch.float32)
    seconds = time.perf_counter() - t0
    after = process_memory()
    comps = {name: getattr(pipe, name, None) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    model = {name: sum(t.numel() * t.element_size() for t in m.state_dict().values())
             for name, m in comps.items() if m is not None}
    return {"rss_before": before["VmRSS"], "peak": after["VmHWM"], "rss_after": after["VmRSS"],
            "model_bytes": sum(model.values()), "components": model, "seconds": round(seconds, 1)}


def measure(kind: str, source: str, precision: str, built: dict) -> dict:
    info = built[source]
    cmd = [sys.executable, "-m", "benchmarks.load_memory", "--child", info["path"], precision]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    if proc.returncode:
        raise RuntimeError(f"{kind} {source} {precision}: the load failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    file_bytes = info["fp16_bytes"] if source.startswith("folder") and precision != "fp32" else info["bytes"]
    row.update(kind=kind, source=source, precision=precision, file_bytes=file_bytes)
    logger.info("%s %s %s: peak %.2f GB over %.2f GB before (model %.2f GB, files %.2f GB), %.0f s", kind, source,
                precision, row["peak"] / GB, row["rss_before"] / GB, row["model_bytes"] / GB, file_bytes / GB,
                row["seconds"])
    return row


# ------------------------------------------------------------------------------------------- report
def render(data: dict) -> str:
    rows = data["rows"]
    lines = [MARK_BEGIN, "",
             f"*Measured {data['date']} on {data['machine']}; `python -m benchmarks.load_memory` (each load in a fresh "
             "process; random-weight models built from the official configs in a temporary folder).*", "",
             "| model | source (files read) | precision (UNet + VAE; text encoders fp32) | loaded model GB | files GB | "
             "peak RSS GB | peak - RSS before load, GB | / loaded model | peak RSS / files | load s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        files = {"single": "single file, fp16", "folder-fp32-only": "folder, fp32 (no fp16 variant)"}.get(
            r["source"], "folder, fp16 variant" if r["precision"] != "fp32" and KINDS[r["kind"]]["fp32_files"] else
            "folder, fp32" if KINDS[r["kind"]]["fp32_files"] else "folder, fp16")
        extra = r["peak"] - r["rss_before"]
        lines.append(f"| {KINDS[r['kind']]['label']} | {files} | {r['precision']} | {r['model_bytes'] / GB:.2f} | "
                     f"{r['file_bytes'] / GB:.2f} | {r['peak'] / GB:.2f} | {extra / GB:.2f} | "
                     f"{extra / r['model_bytes']:.2f}x | {r['peak'] / r['file_bytes']:.2f}x | {r['seconds']:.0f} |")
    worst = max(rows, key=lambda r: (r["peak"] - r["rss_before"]) / r["model_bytes"])
    lines += ["", f"Largest load overhead: {(worst['peak'] - worst['rss_before']) / worst['model_bytes']:.2f}x the "
                  f"loaded model ({KINDS[worst['kind']]['label']} {worst['source']} {worst['precision']}). \"RSS before "
                  "load\" is the process with torch, diffusers and transformers imported "
                  f"({min(r['rss_before'] for r in rows) / GB:.2f}-{max(r['rss_before'] for r in rows) / GB:.2f} GB).",
              "", MARK_END]
    return "\n".join(lines)


def write_doc(data: dict) -> None:
    text = DOC.read_text()
    table = render(data)
    if MARK_BEGIN in text:
        a, b = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:a] + table + text[b:]
    else:
        text = text.rstrip() + "\n\n## Peak memory of loading\n\n" + table + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ", ".join(KINDS))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--tmp", type=Path, default=None, help="where the temporary models go (default: the system's)")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "PRECISION"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(child(*args.child)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    if not args.report_only:
        kinds = [k.strip() for k in args.kinds.split(",")]
        for kind in kinds:
            if kind not in KINDS:
                raise SystemExit(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix=f"load-memory-{kind}-", dir=args.tmp) as tmp:
                built = build_kind(kind, Path(tmp))
                rows = [measure(kind, s, p, built) for k, s, p in CASES if k == kind]
            data["rows"] = [r for r in data["rows"] if r["kind"] != kind] + rows
            data["rows"].sort(key=lambda r: CASES.index((r["kind"], r["source"], r["precision"])))
            data.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(data, indent=1))
    if data["rows"]:
        write_doc(data)


if __name__ == "__main__":
    main()
