"""Helpers of the reliability battery (``python -m benchmarks.reliability``) and its fast cases
(tests/test_reliability.py, tests/test_pickles.py): the tiny run, kills at named points of a forked child,
outcome checks, pickle canaries and a tiny aesthetic reward. The ways to damage files are in benchmarks/damage.py.
Nothing malicious is committed: every pickle is written at run time, and unpickling one would only
create an empty canary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from rlr_backend.safe_io import FAULT_ENV

#: the smallest useful run of the embedded default model (seconds on a CPU core)
TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=3, eval_every=0, eval_seeds=1,
            ckpt_every=2, lr=1e-2, reward="brightness")
#: the battery's run: checkpoints at 2, 4, 6 (pruned to the last 2), grids at 0, 3, 6
CFG = {**TINY, "steps": 6, "eval_every": 3}
ARGS = ["--eval-every", "3", "--threads", "1"]


def tiny_args(out: Path, name: str, steps: int, *extra: str) -> list[str]:
    """``rlr-train`` arguments of the TINY run."""
    flags = {"batch_size": "2", "images_per_prompt": "2", "fo_steps": "1", "num_inference_steps": "3",
             "eval_every": "0", "eval_seeds": "1", "ckpt_every": "2", "lr": "1e-2", "reward": "brightness"}
    args = [a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), v)]
    return [*args, "--steps", str(steps), "--output-dir", str(out), "--run-name", name, "--quiet", *extra]


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file (symlinks: their target), to show that nothing changed."""
    out = {}
    if not os.path.lexists(folder):
        return out
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- outcomes ----------------------------------------------------------------------------------------
def case(kind: str, name: str, ok: bool, detail: str = "", **extra) -> dict:
    return {"kind": kind, "name": name, "ok": bool(ok), "detail": detail[:300], **extra}


def cli(fn, argv: list[str]) -> tuple[int | None, str]:
    """Run an entry point in-process: (exit code, stderr); a raised exception gives (None, its traceback)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return fn(argv), err.getvalue()
        except BaseException:  # noqa: BLE001 -- a traceback is what the battery counts
            return None, err.getvalue() + traceback.format_exc()


def refused(rc: int | None, err: str) -> tuple[bool, str]:
    """Exit code 2 with exactly one line on stderr, and no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    ok = rc == 2 and len(lines) == 1 and "Traceback" not in err
    return ok, (lines[-1] if lines else f"exit code {rc}")


def same_run(run: Path, ref: Path) -> str:
    """'' if ``run`` ended bitwise equal to ``ref`` (LoRA, last checkpoint, metrics rows without timing),
    with no temporary file and every checkpoint loadable; else what differs."""
    from rlr_backend.safe_io import load_tensors

    last = (ref / "ckpt" / "LATEST").read_text()
    for rel in ("lora.safetensors", "ckpt/LATEST", *[f"ckpt/{last}/{n}" for n in
                                                     ("lora.safetensors", "optim.safetensors", "rng.safetensors",
                                                      "state.json")]):
        if not (run / rel).is_file() or (run / rel).read_bytes() != (ref / rel).read_bytes():
            return f"{rel} differs"
    rows = [[{k: v for k, v in json.loads(line).items() if k not in ("seconds", "cpu_seconds")}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (run, ref)]
    if rows[0] != rows[1]:
        return "metrics.jsonl rows differ"
    if list(run.rglob(".tmp-*")):
        return "temporary files left"
    if sorted(p.name for p in (run / "ckpt").iterdir()) != sorted(p.name for p in (ref / "ckpt").iterdir()):
        return "other checkpoint folders than the uninterrupted run's"
    for ckpt in (run / "ckpt").glob("step-*"):
        for name in ("lora.safetensors", "optim.safetensors", "rng.safetensors"):
            load_tensors(ckpt / name)
    return ""



# -- kills -------------------------------------------------------------------------------------------
def run_killed(fn: Callable[[], object], point: str | None = None, delay: float | None = None,
               timeout: float = 300.0) -> str:
    """Run ``fn`` in a forked child and kill it with SIGKILL: at the named fault point (``point``, see
    ``rlr_backend.safe_io.fault_point``) or ``delay`` seconds after the start. Returns "killed",
    "finished" (it ended first) or "failed" (it raised)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 0
        try:
            if point:
                os.environ[FAULT_ENV] = point
            fn()
        except BaseException:  # noqa: BLE001 -- reported to the parent by the exit code
            code = 3
        finally:
            os._exit(code)
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        elapsed = time.monotonic() - start
        if (delay is not None and elapsed >= delay) or elapsed > timeout:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return "finished" if os.WEXITSTATUS(status) == 0 else "failed"


# -- pickle canaries ----------------------------------------------------------------------------------
class Canary:
    """Unpickling this creates the file ``path``: a canary that is absent proves nothing was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_payloads(canary: Path) -> dict[str, bytes]:
    """Pickled canaries in the forms a hostile file takes: torch's zip, torch's legacy format, raw pickles."""
    import io

    out = {}
    for label, kw in (("torch-zip", {}), ("torch-legacy", {"_use_new_zipfile_serialization": False})):
        buf = io.BytesIO()
        torch.save({"weight": Canary(canary)}, buf, **kw)
        out[label] = buf.getvalue()
    out["pickle-p2"] = pickle.dumps({"weight": Canary(canary)}, protocol=2)
    out["pickle-p4"] = pickle.dumps({"weight": Canary(canary)}, protocol=4)
    return out


def model_with_symlinked_pickle(good_model: Path, dest: Path, payload: bytes, weight_name: str,
                                beside: bool = False) -> Path:
    """A copy of a diffusers folder whose ``unet/`` is a symlink to a folder elsewhere that holds a pickled
    canary named ``weight_name`` (a scan that does not follow links never sees it). A canary with a pickle
    name (``.bin``) replaces the UNet's ``.safetensors`` weights, so the UNet exists only as a pickle (refused),
    unless ``beside`` (then it is ignored); one named ``.safetensors`` is a pickle in disguise (refused)."""
    shutil.copytree(good_model, dest, symlinks=True)
    elsewhere = dest.parent / f"{dest.name}-elsewhere"
    shutil.move(str(dest / "unet"), elsewhere)
    (dest / "unet").symlink_to(elsewhere, target_is_directory=True)
    if not beside and not weight_name.endswith(".safetensors"):
        for f in elsewhere.glob("*.safetensors"):
            f.unlink()
    (elsewhere / weight_name).write_bytes(payload)
    return dest


# -- a tiny aesthetic reward (head + CLIP image tower), to damage reward-model weights -----------------
def tiny_aesthetic(root: Path) -> Path:
    """``root/aesthetic/<head>.safetensors`` and ``root/clip_vision/<tower>.safetensors`` with random weights of
    the aesthetic reward's architecture at toy width (64-wide CLIP, 16-d embedding); returns the head file."""
    import math

    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from rlr_backend.rewards.models.aesthetic import HEAD_FILE

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                           hidden_act="quick_gelu", image_size=32, patch_size=8, projection_dim=16)
    tower = CLIPVisionModelWithProjection(cfg).eval()
    (root / "clip_vision").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()},
              str(root / "clip_vision" / "clip-vit-large-patch14.safetensors"))
    gen = torch.Generator().manual_seed(0)
    head = {}
    for i, (o, n) in zip((0, 2, 4, 6, 7), [(1024, 16), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        head[f"layers.{i}.weight"] = torch.randn(o, n, generator=gen) / math.sqrt(n)
        head[f"layers.{i}.bias"] = torch.randn(o, generator=gen) * 0.1
    (root / "aesthetic").mkdir(exist_ok=True)
    save_file(head, str(root / "aesthetic" / HEAD_FILE))
    return root / "aesthetic" / HEAD_FILE
