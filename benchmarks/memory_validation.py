"""The memory model checked at full size: one real ``rlr-train`` update of SD1.5 on the CPU against its prediction.

    python -m benchmarks.memory_validation                # fp32 components (~15 min) + two full updates (~1 h)
    python -m benchmarks.memory_validation --report-only  # re-render the docs/memory.md section

The memory model (``benchmarks.memory_model``) composes an update's peak from per-component
measurements. Here the composition is fed with the real SD1.5 UNet and VAE measured in fp32 (the
trainer's precision on a CPU, no autocast) at the exact sizes of the runs, and its prediction
(libraries + fp32 weights of UNet, VAE and text encoder + LoRA, gradient and Adam state + stored
chain + the binding phase) is compared with the peak resident memory (VmHWM) of a fresh process
that builds a ``Trainer`` on a random-weight SD1.5 single file and runs one ``update()``:

* with ``--gradient-checkpointing`` at 512 px (SD1.5's native size);
* without it at 256 px: at 512 px it needs about 20 GB (the VAE decoder's backward alone ~12 GB in
  fp32), more than this shared 24 GB machine can give one process; the model predicts 512 px from the
  same composition.

Both: batch 2 (the config's minimum), T = 3, h = 1, one first-order step, reward ``brightness`` (no
reward model: the reward terms are zero), rank-4 LoRA. Results: benchmarks/results/memory-validation.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import memory_model as mm

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "memory-validation.json"
GB = 1e9
#: the runs: (case name, gradient checkpointing, image size in pixels)
RUNS: tuple[tuple[str, bool, int], ...] = (("checkpointing, 512 px", True, 512), ("no options, 256 px", False, 256))
BATCH, T, H, FO = 2, 3, 1, 1
#: fp32 component points at the runs' sizes: (component, arch, variant, call batch n, latent side, grad, no-grad)
POINTS: tuple[tuple[str, str, str, int, int, bool, bool], ...] = (
    ("unet", "sd15", "ckpt", 2 * BATCH, 64, True, False), ("unet", "sd15", "plain", 2 * BATCH, 64, False, True),
    ("unet", "sd15", "plain", 2 * BATCH, 32, True, True), ("unet", "sd15", "ckpt", 2 * BATCH, 32, True, False),
    ("vae", "sd-vae", "ckpt", 1, 64, True, False), ("vae", "sd-vae", "plain", 1, 64, False, True),
    ("vae", "sd-vae", "plain", BATCH, 32, True, True), ("vae", "sd-vae", "plain", 1, 32, False, True),
)


class ExactFits(mm.Fits):
    """Measured values at exact (n, latent pixels) points, served through the ``Fits`` interface the
    composition uses; asking for an unmeasured point is an error (no extrapolation)."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self.rows = rows

    def has(self, component, arch, variant, quantity) -> bool:
        return any((r["component"], r["arch"], r["variant"]) == (component, arch, variant) and r.get(quantity) is not None
                   for r in self.rows)

    def get(self, component, arch, variant, quantity):
        def value(n: float, pixels: float) -> float:
            for r in self.rows:
                if (r["component"], r["arch"], r["variant"], r["n"], r["pixels"]) == (component, arch, variant, n,
                                                                                      pixels) and r.get(quantity) is not None:
                    return r[quantity]
            raise KeyError(f"{component}/{arch}/{variant}/{quantity} not measured at n={n}, {pixels} latent pixels")
        return value


def measure_components(rows: list[dict], save) -> None:
    """The fp32 points not yet in ``rows`` (forward + backward and/or no-grad forward only)."""
    done = {(r["component"], r["arch"], r["variant"], r["n"], r["lat"]) for r in rows}
    meas = mm.Measurer(torch.float32)
    for comp, arch, var, n, lat, grad, nograd in POINTS:
        if (comp, arch, var, n, lat) in done:
            continue
        p = mm.Point(comp, arch, var, n, lat)
        fwd = meas.forward_fn(p)
        t0 = time.perf_counter()
        seg = mm.measure_segment(fwd) if grad else None
        row = {"component": comp, "arch": arch, "variant": var, "n": n, "lat": lat, "pixels": lat * lat,
               "peak": seg.peak if seg else None, "retained": seg.retained if seg else None,
               "nograd_peak": mm.measure_nograd(fwd) if nograd else None, "dtype": "float32",
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        save()
        logger.info("%s/%s/%s n=%d %dx%d fp32: peak %s retained %s no-grad %s (%.0f s)", comp, arch, var, n, lat, lat,
                    *(f"{row[q] / GB:.3f} GB" if row[q] is not None else "-" for q in ("peak", "retained", "nograd_peak")),
                    row["seconds"])
        gc.collect()


def cpu_prediction(rows: list[dict], counts: dict, ckpt: bool, size: int) -> dict:
    """The memory model's tensor bytes for the run: fp32 weights (text encoder included: it is in RAM on a
    CPU), no reward model, no evaluation (the run calls ``update()`` alone)."""
    opts = mm.Options(checkpointing=ckpt, offload_text=False, weight_bytes=4.0, reward_model=False,
                      label="CPU fp32" + (", checkpointing" if ckpt else ""))
    scenario = mm.Scenario("sd15", size, BATCH, T=T, h=H, fo_steps=FO, eval_images=0)
    return mm.predict(ExactFits(rows), scenario, opts, counts, "rlr")


# ------------------------------------------------------------------------------------------ the runs
def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def child(path: str, ckpt: bool, size: int, out_dir: str) -> dict:
    """One ``Trainer.update()`` in this fresh process; VmHWM from after the trainer is built."""
    import diffusers  # noqa: F401 -- the libraries, before the baseline
    import transformers  # noqa: F401

    from rlr_backend.train import TrainConfig, Trainer

    base = _status()["VmRSS"]
    cfg = TrainConfig(model=path, image_size=size, precision="fp32", device="cpu", batch_size=BATCH,
                      images_per_prompt=BATCH, num_inference_steps=T, h=H, fo_steps=FO, estimator="rlr",
                      reward="brightness", gradient_checkpointing=ckpt, steps=1, eval_every=0,
                      output_dir=Path(out_dir), run_name="v")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    built = _status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here: the update's peak (the load's is lower: no activations yet)
    t1 = time.perf_counter()
    metrics = trainer.update()
    peak = _status()["VmHWM"]
    return {"rss_libraries": base, "rss_built": built["VmRSS"], "peak_load": built["VmHWM"], "peak_update": peak,
            "build_seconds": round(t1 - t0, 1), "update_seconds": round(time.perf_counter() - t1, 1),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def run_case(path: Path, ckpt: bool, size: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="memory-validation-run-") as out:
        cmd = [sys.executable, "-m", "benchmarks.memory_validation", "--child", str(path), str(int(ckpt)), str(size),
               out]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    if proc.returncode:
        raise RuntimeError(f"the update failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_model(root: Path) -> Path:
    """A random-weight SD1.5 single file (fp16, as most downloads are) under ``root``."""
    from benchmarks.load_memory import build_components, write_single_file

    path = root / "sd15.safetensors"
    write_single_file(build_components("sd15", torch.float16), path)
    gc.collect()
    return path


def compare(data: dict) -> list[dict]:
    out = []
    counts = data["counts"]
    for name, ckpt, size in RUNS:
        run = data["runs"].get(name)
        if run is None:
            continue
        pred = cpu_prediction(data["points"], counts, ckpt, size)
        predicted = run["rss_libraries"] + pred["bytes"]
        out.append({"case": name, "checkpointing": ckpt, "size": size, "measured": run["peak_update"],
                    "predicted": predicted, "error": predicted / run["peak_update"] - 1,
                    "libraries": run["rss_libraries"], "tensor_bytes": pred["bytes"],
                    "binding_phase": pred["binding_phase"], "persistent": pred["persistent"],
                    "activations": pred["activations"], "chain_store": pred["chain_store"],
                    "update_seconds": run["update_seconds"], "peak_load": run["peak_load"]})
    return out


def doc_section(data: dict | None = None) -> list[str]:
    """The docs/memory.md section (rendered by benchmarks.memory_model)."""
    if data is None:
        if not RESULTS.is_file():
            return []
        data = json.loads(RESULTS.read_text())
    rows = compare(data)
    if not rows:
        return []
    lines = ["## Checked at full size: one real SD1.5 update on the CPU", "",
             f"*{data.get('date', '?')}; `python -m benchmarks.memory_validation` ({data.get('machine', '?')}). "
             "Data: `benchmarks/results/memory-validation.json`.*", "",
             "A fresh process builds `Trainer` on a random-weight SD1.5 single file (fp32, `--device cpu`) and runs "
             f"one `update()`: batch {BATCH}, T = {T}, h = {H}, {FO} first-order step, RLR, reward `brightness` (no "
             "reward model), LoRA rank 4. Measured: the process's peak resident memory during the update (VmHWM). "
             "Predicted: the process's memory with the libraries imported (measured before the model is loaded) + "
             "the memory model's bytes, the composition above fed with the SD1.5 UNet and VAE measured in fp32 at "
             "the run's sizes (fp32 weights of the UNet, VAE and text encoder, LoRA state, stored chain, binding "
             "phase). Without checkpointing the update is run at 256 px: at 512 px it would need about "
             f"{_gb(data.get('predicted_512_plain'))} GB (the 256 px activations x 4: they grow linearly with the "
             "pixels), more than this shared machine gives one process.", "",
             "| run | measured peak GB | predicted GB | error | libraries GB | weights + LoRA state GB | activations "
             "+ chain GB (binding phase) | update s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['measured'] / GB:.2f} | {r['predicted'] / GB:.2f} | {r['error']:+.1%} | "
                     f"{r['libraries'] / GB:.2f} | {sum(r['persistent'].values()) / GB:.2f} | "
                     f"{(r['activations'] + r['chain_store']) / GB:.2f} ({r['binding_phase'].replace('_', '-')}) | "
                     f"{r['update_seconds']:.0f} |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines += ["", f"Largest error: {worst['error']:+.1%} ({worst['case']}).", ""]
    return lines


def _gb(b: float | None) -> str:
    return "?" if b is None else f"{b / GB:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=[name for name, _, _ in RUNS], help="run one case")
    ap.add_argument("--redo", action="store_true", help="measure the runs again (default: keep those measured)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        path, ckpt, size, out = args.child
        print(json.dumps(child(path, ckpt == "1", int(size), out)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data.setdefault("points", [])
    data.setdefault("runs", {})

    def save() -> None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1))

    if not args.report_only:
        data["counts"] = mm.model_counts()
        data.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                    machine=f"{os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, "
                            f"{args.threads} threads")
        measure_components(data["points"], save)
        with tempfile.TemporaryDirectory(prefix="memory-validation-") as tmp:
            path = write_model(Path(tmp))
            for name, ckpt, size in RUNS:
                if (args.only and name != args.only) or (name in data["runs"] and not args.redo):
                    continue  # resumable: a measured run is kept unless --redo
                logger.info("%s: one update ...", name)
                data["runs"][name] = run_case(path, ckpt, size, args.threads)
                save()
                logger.info("%s: %s", name, data["runs"][name])
    if data["points"] and "counts" in data:
        data["comparison"] = compare(data)
        plain = next((r for r in data["comparison"] if not r["checkpointing"]), None)
        if plain is not None:  # activations grow linearly with pixels (docs/memory.md's fits): x4 from 256 to 512 px
            data["predicted_512_plain"] = plain["libraries"] + sum(plain["persistent"].values()) + \
                4 * (plain["activations"] + plain["chain_store"])
        save()
        for r in data["comparison"]:
            logger.info("%s: measured %.2f GB, predicted %.2f GB (%+.1f%%)", r["case"], r["measured"] / GB,
                        r["predicted"] / GB, 100 * r["error"])


if __name__ == "__main__":
    main()
