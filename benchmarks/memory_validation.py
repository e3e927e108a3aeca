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
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import memory_model as mm
from benchmarks.load_memory import process_memory

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "memory-validation.json"
GB = 1e9
#: the runs: (case name, gradient checkpointing, image size in pixels)
RUNS: tuple[tuple[str, bool, int], ...] = (("checkpointing, 512 px", True, 512), ("checkpointing, 256 px", True, 256),
                                           ("no options, 256 px", False, 256), ("no options, 128 px", False, 128))
#: runs repeated under the profiler: tensor bytes, as the component points are measured (their RSS includes the
#: profiler's own memory, so the RSS comparison uses the untraced runs)
TRACED: tuple[str, ...] = ("checkpointing, 256 px", "no options, 256 px", "no options, 128 px")
BATCH, T, H, FO = 2, 3, 1, 1
#: fp32 component points at the runs' sizes: (component, arch, variant, call batch n, latent side, grad, no-grad)
POINTS: tuple[tuple[str, str, str, int, int, bool, bool], ...] = (
    ("unet", "sd15", "ckpt", 2 * BATCH, 64, True, False), ("unet", "sd15", "plain", 2 * BATCH, 64, False, True),
    ("unet", "sd15", "plain", 2 * BATCH, 32, True, True), ("unet", "sd15", "ckpt", 2 * BATCH, 32, True, False),
    ("vae", "sd-vae", "ckpt", 1, 64, True, False), ("vae", "sd-vae", "plain", 1, 64, False, True),
    ("vae", "sd-vae", "plain", BATCH, 32, True, True), ("vae", "sd-vae", "plain", 1, 32, False, True),
    ("unet", "sd15", "plain", 2 * BATCH, 16, True, True), ("vae", "sd-vae", "plain", BATCH, 16, True, True),
    ("vae", "sd-vae", "ckpt", 1, 32, True, False),
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


def compare(data: dict) -> list[dict]:
    """Each measured run against the model: the update's peak RSS against libraries + the tensor bytes the
    composition predicts (uncorrected), the traced tensor peak against the predicted activations + chain, and
    the corrected CPU prediction (:func:`rss_correction`)."""
    out = []
    counts = data["counts"]
    for name, ckpt, size in RUNS:
        run = data["runs"].get(name)
        if run is None:
            continue
        pred = cpu_prediction(data["points"], counts, ckpt, size)
        predicted = run["rss_libraries"] + pred["bytes"]
        traced = data.get("traced", {}).get(name) or {}
        act = pred["activations"] + pred["chain_store"]
        out.append({"case": name, "checkpointing": ckpt, "size": size, "measured": run["peak_update"],
                    "predicted": predicted, "error": predicted / run["peak_update"] - 1,
                    "tensor_measured": traced.get("tensor_peak"), "tensor_predicted": act,
                    "tensor_error": act / traced["tensor_peak"] - 1 if traced.get("tensor_peak") else None,
                    "libraries": run["rss_libraries"], "rss_built": run["rss_built"], "tensor_bytes": pred["bytes"],
                    "binding_phase": pred["binding_phase"], "persistent": pred["persistent"],
                    "activations": pred["activations"], "chain_store": pred["chain_store"],
                    "rss_growth_ratio": (run["peak_update"] - run["rss_built"]) / act,
                    "update_seconds": run["update_seconds"], "peak_load": run["peak_load"]})
    corr = rss_correction(out)
    for r in out:
        r["corrected"] = r["libraries"] + sum(r["persistent"].values()) + corr["extra"] + \
            corr["factor"][r["checkpointing"]] * r["tensor_predicted"]
        r["corrected_error"] = r["corrected"] / r["measured"] - 1
        r["fitted_on"] = r["case"] == corr["fitted_on"][r["checkpointing"]]
    return out


def rss_correction(rows: list[dict]) -> dict:
    """The CPU correction, from the runs: ``extra``, the process's bytes once the trainer is built beyond
    the libraries, weights and LoRA state (median over the runs: tokenizer, modules, caches), and per option
    (checkpointing or not) ``factor``, the update's RSS growth over the predicted tensor bytes of its largest
    run (the smaller runs of that option check it). Memory the profiler does not see: the C allocator's
    cached and fragmented heap and the kernels' own scratch buffers."""
    extras = sorted(r["rss_built"] - r["libraries"] - sum(r["persistent"].values()) for r in rows)
    factor, fitted_on = {}, {}
    for ckpt in (False, True):
        mine = [r for r in rows if r["checkpointing"] == ckpt]
        if mine:
            big = max(mine, key=lambda r: r["size"])
            factor[ckpt], fitted_on[ckpt] = big["rss_growth_ratio"], big["case"]
    if len(factor) == 1:  # one option measured: the other gets the same factor (stated as such in the doc)
        factor[not next(iter(factor))] = next(iter(factor.values()))
    return {"extra": extras[len(extras) // 2] if extras else 0.0, "factor": factor, "fitted_on": fitted_on}


def _allocator_check(data: dict) -> str:
    a = data.get("allocator_check")
    row = next((r for r in compare(data) if a and r["case"] == a["case"]), None)
    if row is None:
        return ""
    env = " ".join(f"{k}={v}" for k, v in a["env"].items())
    growth = (a["peak_update"] - a["rss_built"]) / row["tensor_predicted"]
    return (f"With the threshold fixed (`{env}`) the {a['case']} update grew by {growth:.2f}x its tensor bytes "
            f"instead of {row['rss_growth_ratio']:.2f}x (peak {a['peak_update'] / GB:.2f} GB instead of "
            f"{row['measured'] / GB:.2f} GB): on a CPU that setting lowers the peak. ")


def summary_line(data: dict | None = None) -> str:
    """One sentence for the predictions section: what the full-size check found (empty if nothing ran)."""
    if data is None:
        if not RESULTS.is_file():
            return ""
        data = json.loads(RESULTS.read_text())
    rows = compare(data) if data.get("runs") else []
    if not rows:
        return ""
    traced = [r for r in rows if r["tensor_error"] is not None]
    ratios = [r["rss_growth_ratio"] for r in rows]
    tensor = (f"the composition's tensor bytes came within {max(abs(r['tensor_error']) for r in traced):.1%} of "
              f"the traced updates ({'; '.join(r['case'] for r in traced)}); ") if traced else ""
    return (f"**Checked at full size** (SD1.5 on the CPU, fp32, [below](#checked-at-full-size-real-sd15-updates-on-the-"
            f"cpu)): {tensor}the process's resident memory grew by {min(ratios):.2f}-{max(ratios):.2f}x the update's "
            "predicted tensor bytes (memory glibc's allocator keeps after freeing, as far as checked, which the "
            "profiler does not see; "
            "the largest ratio with checkpointing), so the uncorrected CPU prediction was low by up to "
            f"{-min(r['error'] for r in rows):.0%}; the corrected CPU model below adds it. The GPU figures here are "
            "tensor bytes plus the margin for the CUDA caching allocator; they have not been measured on a GPU.")


def doc_section(data: dict | None = None) -> list[str]:
    """The docs/memory.md section (rendered by benchmarks.memory_model)."""
    if data is None:
        if not RESULTS.is_file():
            return []
        data = json.loads(RESULTS.read_text())
    rows = compare(data)
    if not rows:
        return []
    corr = rss_correction(rows)
    traced = [r for r in rows if r["tensor_error"] is not None]
    lines = ["## Checked at full size: real SD1.5 updates on the CPU", "",
             f"*{data.get('date', '?')}; `python -m benchmarks.memory_validation` ({data.get('machine', '?')}). "
             "Data: `benchmarks/results/memory-validation.json`.*", "",
             "A fresh process builds `Trainer` on a random-weight SD1.5 single file (fp32, `--device cpu`) and runs "
             f"one `update()`: batch {BATCH}, T = {T}, h = {H}, {FO} first-order step, RLR, reward `brightness` (no "
             "reward model), LoRA rank 4. Measured: the process's peak resident memory during the update (VmHWM) "
             "and, in a second run of the same update under the profiler, the peak of live tensor bytes (what the "
             "component points measure; the GPU analogue of `torch.cuda.max_memory_allocated`). Predicted: the "
             "composition above fed with the SD1.5 UNet and VAE measured in fp32 at each run's sizes (fp32 weights "
             "of the UNet, VAE and text encoder, LoRA state, stored chain, binding phase) + the process's memory with "
             "the libraries imported (measured before the model is loaded).", "",
             "| run | measured peak RSS GB | predicted GB (tensor bytes + libraries) | error | measured tensor peak "
             "of the update GB | predicted activations + chain GB (binding phase) | error | RSS growth / predicted "
             "tensor bytes | corrected prediction GB | error | update s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tm = "not traced" if r["tensor_measured"] is None else f"{r['tensor_measured'] / GB:.2f}"
        te = "" if r["tensor_error"] is None else f"{r['tensor_error']:+.1%}"
        fit = " (sets the factor)" if r["fitted_on"] else ""
        lines.append(f"| {r['case']} | {r['measured'] / GB:.2f} | {r['predicted'] / GB:.2f} | {r['error']:+.1%} | "
                     f"{tm} | {r['tensor_predicted'] / GB:.2f} ({r['binding_phase'].replace('_', '-')}) | {te} | "
                     f"{r['rss_growth_ratio']:.2f}x | {r['corrected'] / GB:.2f} | {r['corrected_error']:+.1%}{fit} | "
                     f"{r['update_seconds']:.0f} |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    held = [r for r in rows if not r["fitted_on"]]
    lines += ["", f"**Tensor bytes: the composition holds.** " + (
        "Largest error of the predicted tensor peak against the traced update: "
        f"{max((r['tensor_error'] for r in traced), key=abs):+.1%} "
        f"({'; '.join(r['case'] for r in traced)})." if traced else "No run traced yet."),
        "",
        f"**Resident memory: the uncorrected model is low by up to {-worst['error']:.0%}** ({worst['case']}). The "
        "process grows by more than the tensor bytes during an update: freed blocks stay in glibc's heap (its "
        "mmap threshold rises to 32 MB after the first large free, so activations of up to 32 MB come from the heap "
        "and its freed blocks are kept), and the profiler sees only live tensors. " + _allocator_check(data) +
        "The corrected CPU model adds what the runs measured: "
        f"{corr['extra'] / GB:.2f} GB of process memory once the trainer is built (beyond libraries, weights and "
        "LoRA state) and the update's tensor bytes times "
        + ", ".join(f"{corr['factor'][c]:.2f} {'with' if c else 'without'} checkpointing" for c in (False, True))
        + " (each factor set by the largest run of that option"
        + (f"; the other runs check it: largest error {max((r['corrected_error'] for r in held), key=abs):+.1%}"
           if held else "") + ").", ""]
    plain = next((r for r in rows if not r["checkpointing"] and r["size"] == 256), None)
    if plain is not None and not any(not r["checkpointing"] and r["size"] == 512 for r in rows):
        at512 = plain["libraries"] + sum(plain["persistent"].values()) + corr["extra"] + \
            corr["factor"][False] * 4 * plain["tensor_predicted"]
        lines += [f"Without checkpointing the update was run at 256 px and 128 px only: at 512 px the corrected model "
                  f"predicts {at512 / GB:.1f} GB (the 256 px activations x 4: they grow linearly with the pixels, "
                  "docs' fits), more than this shared 24 GB machine gives one process.", ""]
    return lines


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
