"""The memory model checked at full size: real ``rlr-train`` updates of SD1.5 on the CPU against its prediction.

    python -m benchmarks.memory_validation --threads 1          # fp32 components, then every run not yet measured
    python -m benchmarks.memory_validation --trace              # the TRACED runs again under the profiler
    python -m benchmarks.memory_validation --only "no options, 128 px" --model sd15.safetensors --results x.json
    python -m benchmarks.memory_validation --report-only        # re-render (docs/memory.md via benchmarks.memory_model)

The memory model (``benchmarks.memory_model``) composes an update's peak from per-component
measurements. Here the composition is fed with the real SD1.5 UNet and VAE measured in fp32 (the
trainer's precision on a CPU, no autocast) at the exact sizes of the runs, and its prediction
(libraries + fp32 weights of UNet, VAE and text encoder + LoRA, gradient and Adam state + stored
chain + the binding phase) is compared with a fresh process that builds a ``Trainer`` on a
random-weight SD1.5 single file and runs one ``update()``:

* its peak resident memory (VmHWM, reset once the trainer is built), for each of RUNS: with
  ``--gradient-checkpointing`` at 512 px (SD1.5's native size) and 256 px, without it at 256 and 128 px
  (at 512 px it needs about 28 GB, more than this shared 24 GB machine gives one process);
* ``--trace``: the peak of live tensor bytes of the same update under the profiler (what the component
  points measure), for TRACED.

Every run: batch 2 (the config's minimum), T = 3, h = 1, one first-order step, reward ``brightness``
(no reward model: the reward terms are zero), rank-4 LoRA. Measured runs are kept (``--redo`` measures
them again). On 2 busy cores with one thread the 512 px checkpointed update takes about 35 minutes, the
others 2-11. Results: benchmarks/results/memory-validation.json.
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
from pathlib import Path

import torch

from benchmarks import memory_model as mm
from benchmarks.load_memory import process_memory
from benchmarks.memory_model.full_size import (BATCH, FO, GB, H, RESULTS, RUNS, TRACED, T, ExactFits,  # noqa: F401
                                               compare, cpu_prediction, doc_section, rss_correction, summary_line)

logger = logging.getLogger(__name__)

#: fp32 component points at the runs' sizes: (component, arch, variant, call batch n, latent side, grad, no-grad)
POINTS: tuple[tuple[str, str, str, int, int, bool, bool], ...] = (
    ("unet", "sd15", "ckpt", 2 * BATCH, 64, True, False), ("unet", "sd15", "plain", 2 * BATCH, 64, False, True),
    ("unet", "sd15", "plain", 2 * BATCH, 32, True, True), ("unet", "sd15", "ckpt", 2 * BATCH, 32, True, False),
    ("vae", "sd-vae", "ckpt", 1, 64, True, False), ("vae", "sd-vae", "plain", 1, 64, False, True),
    ("vae", "sd-vae", "plain", BATCH, 32, True, True), ("vae", "sd-vae", "plain", 1, 32, False, True),
    ("unet", "sd15", "plain", 2 * BATCH, 16, True, True), ("vae", "sd-vae", "plain", BATCH, 16, True, True),
    ("vae", "sd-vae", "ckpt", 1, 32, True, False),
)



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



def child(path: str, ckpt: bool, size: int, out_dir: str, trace: bool = False) -> dict:
    """One ``Trainer.update()`` in this fresh process; VmHWM from after the trainer is built. ``trace``: the
    update under the profiler, whose peak of live tensor bytes (from the update's start) is reported too."""
    import diffusers  # noqa: F401 -- the libraries, before the baseline
    import transformers  # noqa: F401

    from rlr_backend.train import TrainConfig, Trainer

    base = process_memory()["VmRSS"]
    cfg = TrainConfig(model=path, image_size=size, precision="fp32", device="cpu", batch_size=BATCH,
                      images_per_prompt=BATCH, num_inference_steps=T, h=H, fo_steps=FO, estimator="rlr",
                      reward="brightness", gradient_checkpointing=ckpt, steps=1, eval_every=0,
                      output_dir=Path(out_dir), run_name="v")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False)
    built = process_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM from here: the update's peak (the load's is lower: no activations yet)
    t1 = time.perf_counter()
    metrics: dict = {}
    tensor_peak = mm.live_bytes_trace(lambda: metrics.update(trainer.update()))[0] if trace else None
    if not trace:
        metrics = trainer.update()
    peak = process_memory()["VmHWM"]
    return {"rss_libraries": base, "rss_built": built["VmRSS"], "peak_load": built["VmHWM"], "peak_update": peak,
            "tensor_peak": tensor_peak, "build_seconds": round(t1 - t0, 1),
            "update_seconds": round(time.perf_counter() - t1, 1),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def run_case(path: Path, ckpt: bool, size: int, threads: int, trace: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="memory-validation-run-") as out:
        cmd = [sys.executable, "-m", "benchmarks.memory_validation", "--child", str(path), str(int(ckpt)), str(size),
               out, str(int(trace))]
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


def _gb(b: float | None) -> str:
    return "?" if b is None else f"{b / GB:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=[name for name, _, _ in RUNS], help="run one case")
    ap.add_argument("--redo", action="store_true", help="measure the runs again (default: keep those measured)")
    ap.add_argument("--trace", action="store_true", help="the TRACED runs under the profiler (tensor bytes)")
    ap.add_argument("--model", type=Path, help="an SD1.5 single file to use (default: a random-weight one is written)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results file (default: %(default)s)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        logging.basicConfig(level=logging.WARNING)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        path, ckpt, size, out, trace = args.child
        print(json.dumps(child(path, ckpt == "1", int(size), out, trace == "1")))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    results: Path = args.results
    data = json.loads(results.read_text()) if results.is_file() else {}
    data.setdefault("points", [])
    data.setdefault("runs", {})
    data.setdefault("traced", {})

    def save() -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(data, indent=1))

    if not args.report_only:
        data["counts"] = mm.model_counts()
        data.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                    machine=f"{os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, "
                            f"{args.threads} threads")
        measure_components(data["points"], save)
        with tempfile.TemporaryDirectory(prefix="memory-validation-") as tmp:
            path = args.model or write_model(Path(tmp))
            for name, ckpt, size in RUNS:
                store = data["traced"] if args.trace else data["runs"]
                if (args.only and name != args.only) or (args.trace and name not in TRACED) or \
                        (name in store and not args.redo):
                    continue  # resumable: a measured run is kept unless --redo
                logger.info("%s: one update%s ...", name, " under the profiler" if args.trace else "")
                store[name] = run_case(path, ckpt, size, args.threads, args.trace)
                save()
                logger.info("%s: %s", name, store[name])
    if data["points"] and "counts" in data:
        data["comparison"] = compare(data)
        save()
        for r in data["comparison"]:
            logger.info("%s: measured %.2f GB, predicted %.2f GB (%+.1f%%); tensor bytes of the update %s GB, "
                        "predicted %.2f GB", r["case"], r["measured"] / GB, r["predicted"] / GB, 100 * r["error"],
                        _gb(r["tensor_measured"]), r["tensor_predicted"] / GB)


if __name__ == "__main__":
    main()

