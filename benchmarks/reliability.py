"""The reliability and security battery: kills, damaged files, pickles, path escapes, NaN rewards, full disks.

    python -m benchmarks.reliability            # about 30-60 minutes on 2 busy CPU cores
    python -m benchmarks.reliability --quick    # a sample of every kind, a few minutes
    python -m benchmarks.reliability --report-only

Every case runs the real entry points (``rlr-train``/``rlr-sample`` called in-process, the trainer in
forked children killed with SIGKILL, the app's run manager and run viewer, the ComfyUI nodes on the
stand-in host of tests/comfy_standin, the reward loaders) on the embedded default model, a tiny
random SD1.x folder and a tiny aesthetic reward, all built here. Results: benchmarks/results/
reliability.json (every case) and the summary page docs/reliability.md. The cases live in
benchmarks/damage.py and benchmarks/faults.py, shared with the fast tests (tests/test_reliability.py,
tests/test_pickles.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlr_backend.cli import train_main
from rlr_backend.rewards import CallableReward, make_reward
from rlr_backend.safe_io import StorageError, dumps_json, one_line, write_bytes
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.checkpoint import latest_checkpoint

from . import faults, reliability_inputs
from .common import machine
from .faults import ARGS, CFG, case, cli, refused, run_killed, same_run

RESULTS = Path(__file__).parent / "results" / "reliability.json"
DOC = Path(__file__).parent.parent / "docs" / "reliability.md"
NAMED = ["open:before_metrics@1", *[f"step:{p}@{k}" for p in ("begin", "after_metrics") for k in range(1, 7)],
         *[f"ckpt:{p}@{k}" for p in ("begin", "after_lora", "after_optim", "before_state", "before_rename",
                                     "before_latest", "before_prune") for k in (1, 2, 3)],
         "ckpt:mid_prune@1", *[f"atomic:before_replace@{k}" for k in range(1, 24)]]
#: (first kill, kill of the resume): the resume is killed too, then resumed again
DOUBLE = [("step:begin@4", "atomic:before_replace@1"), ("step:begin@4", "step:begin@1"),
          ("ckpt:before_rename@2", "ckpt:before_rename@1"), ("step:begin@2", "ckpt:after_optim@1")]


# -- kills -----------------------------------------------------------------------------------------
def kills(work: Path, quick: bool) -> tuple[list[dict], Path]:
    cfg = TrainConfig(**CFG, output_dir=work / "k", run_name="run")
    trainer = Trainer(cfg, progress=False)  # stays untouched: every run is a forked copy of it
    run, ref = cfg.run_dir, work / "ref"
    t0 = time.monotonic()
    assert run_killed(trainer.run) == "finished", "the reference run failed"
    run_seconds = time.monotonic() - t0
    shutil.move(run, ref)
    rng = random.Random(0)
    trials = [(p, None, None) for p in NAMED] + [(None, rng.uniform(0.05, 0.9 * run_seconds), None) for _ in range(12)]
    trials += [(a, None, b) for a, b in DOUBLE]
    if quick:
        trials = trials[::8]
    out = []
    for i, (point, delay, second) in enumerate(trials):
        shutil.rmtree(run, ignore_errors=True)
        t = time.monotonic()
        first = run_killed(trainer.run, point, delay)
        while delay is not None and first == "finished" and delay > 0.1:  # the run was faster this time
            delay /= 2
            shutil.rmtree(run, ignore_errors=True)
            first = run_killed(trainer.run, point, delay)
        had_checkpoint = latest_checkpoint(run) is not None
        resume = had_checkpoint or i % 2 == 0  # before the first checkpoint: every other run a plain rerun
        how = "--resume" if resume else "plain rerun"
        if second:
            again = run_killed(lambda: trainer.run(resume=True), second)
            how = f"--resume killed at {second} ({again}), then --resume"
        final = run_killed(lambda: trainer.run(resume=resume or bool(second)))
        problem = "the continued run failed" if final != "finished" else same_run(run, ref)
        name = point or f"SIGKILL after {delay:.2f} s"
        out.append(case("kill", name, first == "killed" and not problem, problem or f"{first}; {how}; bitwise equal",
                        killed=first == "killed", before_first_checkpoint=not had_checkpoint,
                        in_save=bool(point) and point.startswith(("ckpt:", "atomic:")),
                        seconds=round(time.monotonic() - t, 1)))
        print(f"kill {i + 1}/{len(trials)}: {name}: {out[-1]['detail']}", flush=True)
    out += cli_kills(work, ref, 1 if quick else 4)
    return out, ref


def cli_kills(work: Path, ref: Path, n: int) -> list[dict]:
    """``rlr-train`` as a separate process (imports and model load included), SIGKILLed at a random time."""
    rng, out = random.Random(1), []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    base = [sys.executable, "-m", "rlr_backend.cli", *faults.tiny_args(work / "cli", "run", 6, *ARGS)]
    metrics = work / "cli" / "run" / "metrics.jsonl"
    for i in range(n):
        shutil.rmtree(work / "cli", ignore_errors=True)
        rows, extra = rng.randint(0, 5), rng.uniform(0, 1.5)  # killed this long after update ``rows`` was logged
        proc = subprocess.Popen(base, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= rows):
            time.sleep(0.02)
        time.sleep(extra)
        status = "finished" if proc.poll() is not None else "killed"
        if status == "killed":
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        had_checkpoint = latest_checkpoint(work / "cli" / "run") is not None
        done = subprocess.run(base + ["--resume"], env=env, capture_output=True, text=True)
        problem = f"exit code {done.returncode}" if done.returncode else same_run(work / "cli" / "run", ref)
        out.append(case("kill", f"rlr-train process, SIGKILL {extra:.2f} s after update {rows} was logged",
                        status == "killed" and not problem,
                        problem or f"{status}; rlr-train --resume; bitwise equal", killed=status == "killed",
                        before_first_checkpoint=not had_checkpoint))
        print(f"cli kill {i + 1}/{n}: {out[-1]['detail']}", flush=True)
    return out


# -- non-finite rewards ----------------------------------------------------------------------------------
def nan_rewards(work: Path) -> list[dict]:
    base = make_reward("brightness")
    calls = [0]

    def every_other_batch(images, prompts):  # whole batches of NaN, never 3 in a row
        r = base(images, prompts)
        if not images.requires_grad and len(images) == 2:
            calls[0] += 1
            if calls[0] % 2 == 0:
                return r * float("nan")
        return r
    rewards = {
        "all NaN": (lambda i, p: torch.full((len(i),), float("nan")), {}, "stop"),
        "all +inf": (lambda i, p: torch.full((len(i),), float("inf")), {}, "stop"),
        "all NaN, max_nonfinite_batches=0": (lambda i, p: torch.full((len(i),), float("nan")),
                                             {"max_nonfinite_batches": 0}, "finish"),
        "NaN for one image per batch": (lambda i, p: torch.where(torch.arange(len(i)) == 0, float("nan"), base(i, p)),
                                        {}, "finish"),
        "NaN batches alternating with good ones": (every_other_batch, {}, "finish"),
        "NaN in the first-order term's second reward call": (
            lambda i, p: base(i, p) * float("nan") if i.requires_grad else base(i, p), {}, "finish"),
    }
    out = []
    for name, (fn, options, expect) in rewards.items():
        run = work / "nan" / str(len(out))
        warnings = _Capture()
        logging.getLogger("rlr_backend").addHandler(warnings)
        logging.getLogger("rlr_backend").setLevel(logging.WARNING)
        try:
            Trainer(TrainConfig(**{**CFG, **options}, output_dir=run.parent, run_name=run.name), progress=False,
                    reward=CallableReward(fn, differentiable=True, name="broken")).run()
            ended, message = "finish", ""
        except ValueError as e:
            ended, message = "stop", str(e)
        finally:
            logging.getLogger("rlr_backend").removeHandler(warnings)
            logging.getLogger("rlr_backend").setLevel(logging.NOTSET)
        rows = [json.loads(line, parse_constant=_no_nan) for line in (run / "metrics.jsonl").read_text().splitlines()]
        params_finite = all(torch.isfinite(p).all() for p in _lora(run))
        dropped = sum(r.get("dropped_first_order_term", 0) for r in rows)
        logged = sum("was dropped" in m for m in warnings.messages)
        skipped = sum(r.get("skipped_batch", 0) for r in rows)
        ok = ended == expect and params_finite and "\n" not in message and (expect == "finish" or "'broken'" in message)
        if "second reward call" in name:
            ok = ok and dropped == len(rows) and logged == 1
        detail = (message or f"finished {len(rows)} updates") + \
            f"; skipped batches {skipped:g}, dropped terms {dropped:g} (logged {logged}x); metrics.jsonl strict JSON"
        out.append(case("nan", name, ok, detail))
        print(f"nan: {name}: {detail}", flush=True)
    return out


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _no_nan(token):
    raise ValueError(f"{token} is not JSON")


def _lora(run: Path) -> list[torch.Tensor]:
    from rlr_backend.safe_io import load_tensors

    ckpts = sorted((run / "ckpt").glob("step-*"))
    return list(load_tensors(ckpts[-1] / "lora.safetensors", finite=False)[0].values()) if ckpts else []


# -- full disk, read-only folder ------------------------------------------------------------------------------
def storage(work: Path, ref: Path) -> list[dict]:
    out = []
    cfg = TrainConfig(**CFG, output_dir=work / "disk", run_name="run")
    for limit in (0, 1_000, 6_000, 20_000, 60_000, 100_000):  # a fresh run under a file-size limit (EFBIG)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        msg = work / "disk-message"

        def child():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            rc, err = cli(train_main, faults.tiny_args(cfg.output_dir, "run", 6, *ARGS))
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            msg.write_text(json.dumps([rc, err]))
        run_killed(child)
        rc, err = json.loads(msg.read_text())
        ok, detail = refused(rc, err)
        resumed = run_killed(lambda: train_main(faults.tiny_args(cfg.output_dir, "run", 6, *ARGS, "--resume")))
        problem = same_run(cfg.run_dir, ref) if resumed == "finished" else "the resume failed"
        out.append(case("disk", f"file-size limit {limit} bytes from the start", ok and "cannot write" in detail
                        and not problem, f"{detail} | then --resume: {problem or 'bitwise equal'}"))
    for after, kind in ((2, "EFBIG"), (4, "EFBIG"), (2, "EROFS"), (4, "ENOSPC")):
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        msg = work / "disk-message"

        def fail_from(info, after=after, kind=kind):
            if info.step != after:
                return
            if kind == "EFBIG":
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
            else:
                import errno

                def broken(*args, **kwargs):
                    raise OSError(getattr(errno, kind), os.strerror(getattr(errno, kind)))
                os.replace = broken  # in the forked child only

        def child():
            try:
                Trainer(cfg, progress=False, on_step=fail_from).run()
            except (StorageError, OSError) as e:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
                msg.write_text(one_line(e) if "\n" not in str(e) else "MULTI-LINE " + str(e))
                raise
        status = run_killed(child)
        message = msg.read_text() if msg.exists() else status
        last = latest_checkpoint(cfg.run_dir)
        intact = last is not None and last.name == f"step-{after:06d}" and not list(cfg.run_dir.rglob(".tmp-*"))
        resumed = run_killed(lambda: Trainer(cfg, progress=False).run(resume=True))
        problem = same_run(cfg.run_dir, ref) if resumed == "finished" else "the resume failed"
        out.append(case("disk", f"{kind} from update {after + 1} on", status == "failed" and "cannot write" in message
                        and not message.startswith("MULTI") and intact and not problem,
                        f"{message} | last checkpoint {last.name if last else None} intact | then --resume: "
                        f"{problem or 'bitwise equal'}"))
        msg.unlink(missing_ok=True)
    return out


def mounted_cases(work: Path, ref: Path) -> list[dict]:
    """A real full file system (a 300 KB tmpfs) and a real read-only one (remounted ro): needs the right to
    mount (root in a privileged container); skipped otherwise."""
    out = []
    full, ro = work / "tmpfs-full", work / "tmpfs-ro"
    for folder, size in ((full, "300k"), (ro, "8m")):
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode:
            print("storage: cannot mount a tmpfs here; the real full/read-only file system cases are skipped")
            return out
    args = faults.tiny_args(full, "run", 6, *ARGS)
    try:
        ok, detail = refused(*cli(train_main, args))
        last = latest_checkpoint(full / "run")
        intact = not list((full / "run").rglob(".tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=8m", str(full)], check=True)  # space freed
        rc, err = cli(train_main, [*args, "--resume"])
        problem = same_run(full / "run", ref) if rc == 0 else f"the resume failed: {err.strip()[-200:]}"
        out.append(case("disk", "a full file system (tmpfs of 300 KB), then space freed", ok and intact and
                        "no space left" in detail and not problem,
                        f"{detail} | last checkpoint {last.name if last else None}, no temporary file left | then "
                        f"--resume: {problem or 'bitwise equal'}"))
        run = TrainConfig(**CFG, output_dir=ro, run_name="run")
        run_killed(Trainer(run, progress=False).run, "step:begin@5")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = faults.snapshot(ro)
        ok1, detail1 = refused(*cli(train_main, faults.tiny_args(ro, "run", 6, *ARGS, "--resume")))
        ok2, detail2 = refused(*cli(train_main, faults.tiny_args(ro, "new", 6, *ARGS)))
        unchanged = faults.snapshot(ro) == before
        subprocess.run(["mount", "-o", "remount,rw", str(ro)], check=True)
        rc, err = cli(train_main, faults.tiny_args(ro, "run", 6, *ARGS, "--resume"))
        problem = same_run(ro / "run", ref) if rc == 0 else f"the resume failed: {err.strip()[-200:]}"
        out.append(case("disk", "a read-only file system: --resume and a new run, then made writable again",
                        ok1 and ok2 and unchanged and "read-only" in detail1 and not problem,
                        f"{detail1} | {detail2} | nothing changed | then --resume: {problem or 'bitwise equal'}"))
    finally:
        for folder in (full, ro):
            subprocess.run(["umount", str(folder)], capture_output=True)
    return out


# -- the page ---------------------------------------------------------------------------------------------
KINDS = {
    "kill": ("kill -9 at a point of a run, then continue", "continued, bitwise equal to the uninterrupted run"),
    "damaged": ("damaged or wrong input files", "refused: exit code 2, one line, no traceback, no file changed"),
    "recovered": ("damage a resume recovers from", "resumed, bitwise equal"),
    "pickle": ("pickled canaries at every entry point (torch.load forced to unpickle)",
               "refused, canary never created, torch.load never called"),
    "traversal": ("traversal names and planted symlinks", "refused (one line), nothing outside changed"),
    "nan": ("non-finite rewards", "skipped and counted; a clear stop after 3 all-NaN batches; strict JSON"),
    "disk": ("full disk / read-only folder", "one line naming the path, last checkpoint intact, resume equal"),
}


def render(data: dict) -> str:
    cases = data["cases"]
    m = data["machine"]
    lines = ["# Reliability and security", "",
             "What happens when a run is killed, a file is damaged or hostile, a name or a symlink points "
             "elsewhere, a reward returns NaN or the disk fills up. Every figure below comes from "
             "`python -m benchmarks.reliability` (cases in `benchmarks/damage.py` and `benchmarks/faults.py`; "
             "the fast subset runs in the test suite, `tests/test_reliability.py` and `tests/test_pickles.py`).", "",
             f"Last run: {data['date']}, {data['minutes']:.0f} min on {m['cores']} CPU cores (load "
             f"{m['load_at_start']:.1f} at start, {m['load_at_end']:.1f} at end; torch {m['torch']}, "
             f"commit {m['commit']}){' — quick sample' if data['quick'] else ''}.", "",
             "| Battery | Cases | Passed | Passing means |", "|---|---:|---:|---|"]
    for kind, (title, meaning) in KINDS.items():
        got = [c for c in cases if c["kind"] == kind]
        if got:
            lines.append(f"| {title} | {len(got)} | {sum(c['ok'] for c in got)} | {meaning} |")
    kills = [c for c in cases if c["kind"] == "kill"]
    killed = sum(c.get("killed", False) for c in kills)
    lines += ["", f"Kill points: {killed} of {len(kills)} runs were killed before they ended"
              f"{'' if killed == len(kills) else ' (the rest finished first; they count as failures)'}; "
              f"{sum(c.get('in_save', False) for c in kills)} of them inside a save (between writing a checkpoint's "
              "files, before renaming it into place, before moving LATEST, while pruning, or between writing any file "
              "and renaming it over the old one), and "
              f"{sum(c.get('before_first_checkpoint', False) for c in kills)} before the run had a complete checkpoint "
              "(continued by `--resume` or, every other time, by a plain rerun of the same command).", ""]
    for kind, (title, _) in KINDS.items():
        got = [c for c in cases if c["kind"] == kind]
        if not got:
            continue
        lines += [f"<details><summary>{title}: every case</summary>", "", "| Case | Result | Detail |",
                  "|---|---|---|"]
        for c in got:
            detail = re.sub(r"/\S*?rlr-reliability-\w+/", "$WORK/", c["detail"]).replace("|", "\\|").replace("\n", " ")
            name = c["name"].replace("|", "\\|").replace("\n", "\\n")
            lines.append(f"| {name} | {'pass' if c['ok'] else '**FAIL**'} | {detail} |")
        lines += ["", "</details>", ""]
    lines += [Path(__file__).with_name("reliability_notes.md").read_text().rstrip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a sample of every kind (minutes)")
    ap.add_argument("--report-only", action="store_true", help="re-render docs/reliability.md from the results")
    ap.add_argument("--only", nargs="+", choices=["kill", "inputs", "nan", "disk"], help="run these parts only")
    args = ap.parse_args(argv)
    if not args.report_only:
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.ERROR)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        start, info = time.monotonic(), machine()
        parts = set(args.only or ["kill", "inputs", "nan", "disk"])
        cases: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="rlr-reliability-") as tmp:
            work = Path(tmp)
            kill_cases, ref = kills(work, args.quick) if "kill" in parts else ([], None)
            cases += kill_cases
            if ref is None:  # the other parts compare with an uninterrupted run too
                cfg = TrainConfig(**CFG, output_dir=work, run_name="ref")
                run_killed(Trainer(cfg, progress=False).run)
                ref = cfg.run_dir
            if "disk" in parts:  # forked children: before anything trains in this process
                cases += storage(work, ref)
                cases += mounted_cases(work, ref)
            if "inputs" in parts:
                cases += reliability_inputs.damaged(work, ref, args.quick)
                cases += reliability_inputs.pickles(work, ref, args.quick)
                cases += reliability_inputs.traversal(work, ref)
            if "nan" in parts:
                cases += nan_rewards(work)
        info["load_at_end"] = os.getloadavg()[0]
        data = {"date": datetime.date.today().isoformat(), "minutes": (time.monotonic() - start) / 60,
                "quick": args.quick, "machine": info, "cases": cases}
        write_bytes(dumps_json(data, indent=1).encode(), RESULTS)
    data = json.loads(RESULTS.read_text())
    write_bytes(render(data).encode(), DOC)
    failed = [c for c in data["cases"] if not c["ok"]]
    print(f"{len(data['cases'])} cases, {len(failed)} failed; wrote {RESULTS} and {DOC}")
    for c in failed:
        print(f"FAIL {c['kind']}: {c['name']}: {c['detail']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
