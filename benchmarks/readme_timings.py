"""Time the README's commands, as a user runs them, against a fixed reference workload measured in the same run.

    python -m benchmarks.readme_timings                         # rlr-train, rlr-demo, rlr-sample (about 6 min)
    python -m benchmarks.readme_timings --commands train demo sample tests comfyui   # + the test command

Each command runs exactly as the README writes it, in a fresh empty working folder, through a small
wrapper process that reports the command's wall seconds, CPU seconds (user + system of the whole
process tree) and peak resident memory. Between commands the script times the reference workload
(one no-grad sample of 8 images at T=20 on the embedded default model, torch's default threads, in
this process), so each command is also given as a multiple of it: "train = 60 references" holds on a
faster or a busier machine, where seconds do not. The load average before and after each command is
recorded. Writes benchmarks/results/readme-timings.json and docs/results/readme_timings.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "readme-timings.json"
PAGE = REPO / "docs" / "results" / "readme_timings.md"

# name -> (the README's command line, the folder it runs in: "tmp" = a fresh empty folder, "repo" = the clone)
COMMANDS: dict[str, tuple[list[str], str]] = {
    "train": (["rlr-train"], "tmp"),
    "demo": (["rlr-demo"], "tmp"),
    "sample": (["rlr-sample", "a red circle on a blue background"], "tmp"),
    "tests": ([sys.executable, "-m", "pytest", "-q"], "repo"),
    "comfyui": ([".ci/comfyui"], "repo"),
}
QUICK_ARGS = {"train": ["--steps", "1", "--num-inference-steps", "6", "--eval-seeds", "1"],
              "sample": ["--num", "1", "--steps", "2"], "demo": []}

WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
code = subprocess.run(sys.argv[2:], cwd=sys.argv[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}))
"""


def _executable(argv: list[str]) -> list[str]:
    """A console script of this environment (next to this Python), else whatever PATH finds."""
    head = Path(sys.executable).parent / argv[0]
    if head.is_file():
        return [str(head), *argv[1:]]
    found = shutil.which(argv[0])
    return [found, *argv[1:]] if found else argv


def time_command(argv: list[str], cwd: Path) -> dict:
    """Wall and CPU seconds and peak RSS of ``argv`` (its whole process tree), run in ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(cwd), *_executable(argv)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"timing wrapper failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Reference:
    """One no-grad sample of 8 images at T=20 on the embedded default (``steps`` smaller for a quick check)."""

    def __init__(self, steps: int = 20):
        from rlr_backend.cli import quiet_libraries

        quiet_libraries()
        from rlr_backend.models.loader import load_pipeline

        self.pipe, self.steps = load_pipeline(None), steps
        self.seconds: list[float] = []
        self.measure()  # warm-up (first-call allocations), not recorded
        self.seconds.clear()

    def measure(self, repeats: int = 2) -> float:
        from rlr_backend.train import DEFAULT_PROMPTS
        from rlr_backend.train.sample import sample_images

        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            sample_images(self.pipe, DEFAULT_PROMPTS[:2], num_per_prompt=4, steps=self.steps, seed=0)
            best = min(best, time.perf_counter() - t0)
        self.seconds.append(best)
        return best


def run(commands: list[str], quick: bool = False) -> dict:
    import torch

    ref = Reference(steps=2 if quick else 20)
    rows = []
    for name in commands:
        argv, where = COMMANDS[name]
        argv = argv + (QUICK_ARGS.get(name, []) if quick else [])
        before = ref.measure()
        load0 = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix=f"rlr-timing-{name}-") as tmp:
            out = time_command(argv, Path(tmp) if where == "tmp" else REPO)
        load1 = os.getloadavg()[0]
        after = ref.measure()
        unit = (before + after) / 2
        shown = argv if name != "tests" else ["python", *argv[1:]]
        rows.append({"command": shlex.join(shown),
                     "name": name, **out, "reference_s": unit, "wall_in_references": out["wall_s"] / unit,
                     "cpu_in_references": out["cpu_s"] / unit, "load_before": load0, "load_after": load1})
    return {"date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__, "quick": quick,
            "reference": "one no-grad sample of 8 images at T=%d on the embedded default" % ref.steps,
            "reference_s_all": ref.seconds, "rows": rows}


def render(result: dict) -> str:
    lines = [
        "# How long the README's commands take",
        "",
        f"Measured by `python -m benchmarks.readme_timings` on {result['date']}: {result['cores']} cores, torch "
        f"{result['torch']} ({result['torch_threads']} threads), Python {result['python']}. Each command ran exactly "
        "as the README writes it, in a fresh folder. The reference is " + result["reference"] + ", timed before and "
        "after each command in the same run; a command's time in references carries over to another machine or "
        "load better than its seconds do.",
        "",
        "| command | wall | CPU (user + system) | peak memory | wall in references | load average before / after |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        status = "" if r["code"] == 0 else f" (exit code {r['code']})"
        lines.append(f"| `{r['command']}`{status} | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['peak_rss_mb']:.0f} MB | "
                     f"{r['wall_in_references']:.0f} x {r['reference_s']:.2f} s | {r['load_before']:.1f} / "
                     f"{r['load_after']:.1f} |")
    refs = result["reference_s_all"]
    lines += ["", f"Reference workload: {min(refs):.2f}-{max(refs):.2f} s over the run (median "
                  f"{statistics.median(refs):.2f} s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", nargs="+", choices=tuple(COMMANDS), default=["train", "demo", "sample"])
    ap.add_argument("--quick", action="store_true", help="tiny versions of the commands (a check that it runs)")
    ap.add_argument("--json", type=Path, default=RESULTS)
    ap.add_argument("--page", type=Path, default=PAGE)
    args = ap.parse_args(argv)
    result = run(args.commands, quick=args.quick)
    from rlr_backend.safe_io import atomic_path, save_json

    save_json(result, args.json)
    with atomic_path(args.page) as tmp:
        tmp.write_text(render(result))
    print(render(result))
    return 0 if all(r["code"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
