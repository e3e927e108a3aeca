"""Checkpoints that resume a run exactly: LoRA, Adam moments, RNG state and counters.

Layout: ``<run>/ckpt/step-NNNNNN/{lora.safetensors, optim.safetensors, rng.safetensors, state.json}``
and ``<run>/ckpt/LATEST`` naming the newest checkpoint. Tensors are safetensors, the rest JSON (never
pickle). A checkpoint is built in ``ckpt/.tmp-step-NNNNNN-*`` and renamed into place only when every
file is on disk, ``state.json`` (with the SHA-256 of its siblings) last; LATEST moves after that. So a
kill at any moment leaves every ``step-*`` folder complete, and the next start deletes the temporary one.

Loading checks everything before anything changes: the state's schema (version, step, optimizer
hyperparameters, baseline, RNG), the checksums, every tensor's name, shape, dtype and finiteness, and
Adam's moments (present when updates were made, second moments >= 0). A bad checkpoint is refused
with :class:`InvalidCheckpoint`, one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..safe_io import (InvalidModelFile, StorageError, atomic_path, fault_point, load_tensors, save_json, save_tensors,
                       storage_errors)

logger = logging.getLogger(__name__)

KEEP_LAST = 2
VERSION = 1
STEP_NAME = re.compile(r"step-(\d{6,12})")
FILES = ("lora.safetensors", "optim.safetensors", "rng.safetensors")


class InvalidCheckpoint(InvalidModelFile):
    """A checkpoint (or its LATEST pointer) that cannot be resumed from; the message names the file."""


# -- saving -----------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, step: int, named_params: Sequence[tuple[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, state: dict) -> Path:
    """Write checkpoint ``step`` (``state``: the trainer's JSON counters) and point LATEST at it."""
    root = Path(run_dir) / "ckpt"
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"
    with storage_errors(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        fault_point("ckpt:begin")
        opt_state = optimizer.state_dict()
        opt_tensors = {}
        for idx, s in opt_state["state"].items():
            for k, v in s.items():
                opt_tensors[f"{idx}.{k}"] = v.cpu() if isinstance(v, torch.Tensor) else torch.tensor(v)
        sums = {"lora.safetensors": save_tensors({n: p.detach().cpu() for n, p in named_params},
                                                 tmp / "lora.safetensors")}
        fault_point("ckpt:after_lora")
        sums["optim.safetensors"] = save_tensors(opt_tensors, tmp / "optim.safetensors")
        fault_point("ckpt:after_optim")
        sums["rng.safetensors"] = save_tensors({"generator": generator.get_state()}, tmp / "rng.safetensors")
        fault_point("ckpt:before_state")
        save_json({**state, "version": VERSION, "step": step, "param_groups": opt_state["param_groups"],
                   "optimizer_entries": len(opt_state["state"]), "sha256": sums}, tmp / "state.json")
        fault_point("ckpt:before_rename")
        with storage_errors(final):
            if final.exists():  # an earlier save of this step (a run re-done after a crash)
                old = root / f".tmp-old-{name}-{os.getpid()}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
    except StorageError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (e.__cause__.strerror if isinstance(e.__cause__, OSError) else None) or str(e)
        raise StorageError(e.errno, f"cannot write the checkpoint {final}: {reason.lower()}; the last complete "
                                    "checkpoint is unchanged") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("ckpt:before_latest")
    with atomic_path(root / "LATEST") as pointer:
        pointer.write_text(name)
    fault_point("ckpt:before_prune")
    _prune(root, keep=name)
    return final


def _complete(root: Path) -> list[Path]:
    """Checkpoint folders (``step-*`` with a state.json), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and not p.is_symlink()
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _prune(root: Path, keep: str) -> None:
    for old in _complete(root)[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
            fault_point("ckpt:mid_prune")


# -- finding --------------------------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None when the run has none yet.

    LATEST must name a ``step-NNNNNN`` folder of this ``ckpt/`` (anything else, e.g. ``../..``, is
    refused). If a crash left LATEST behind the newest complete checkpoint, or without its folder,
    the newest complete checkpoint is used."""
    root = Path(run_dir) / "ckpt"
    pointer = root / "LATEST"
    done = _complete(root)
    named = None
    if os.path.lexists(pointer):
        if pointer.is_symlink() or not pointer.is_file():
            raise InvalidCheckpoint(f"{pointer} is not a plain file; refused")
        text = pointer.read_bytes()[:64].decode("utf-8", "replace").strip()
        if not STEP_NAME.fullmatch(text):
            raise InvalidCheckpoint(f"{pointer} names {text!r}, not a checkpoint folder of {root} (expected "
                                    "step-NNNNNN); refused")
        named = root / text
    if named is not None and named in done and named == done[-1]:
        return named
    if done:
        if named is not None:
            logger.warning("%s names %s; using the newest complete checkpoint, %s", pointer, named.name, done[-1].name)
        return done[-1]
    if named is not None:
        logger.warning("%s names %s, which was never completed; no checkpoint to resume from", pointer, named.name)
    return None


def repair_latest(run_dir: Path, ckpt: Path) -> None:
    """Point LATEST at ``ckpt`` (a crash between a checkpoint's rename and LATEST's move leaves it behind)
    and prune the older checkpoints; called after ``ckpt`` was loaded."""
    root = Path(run_dir) / "ckpt"
    pointer = root / "LATEST"
    current = pointer.read_bytes()[:64].decode("utf-8", "replace").strip() if pointer.is_file() else None
    if current != ckpt.name:
        with atomic_path(pointer) as tmp:
            tmp.write_text(ckpt.name)
        logger.info("%s now names %s", pointer, ckpt.name)
    _prune(root, keep=ckpt.name)  # also when a crash came between LATEST's move and the pruning


# -- loading -----------------------------------------------------------------------------------------
def _fail(where: Path, problem: str) -> InvalidCheckpoint:
    return InvalidCheckpoint(f"{where}: {problem}; the checkpoint cannot be resumed from (delete the folder to "
                             "fall back to an earlier one, or start a new run)")


def _number(value, where: Path, what: str, *, low: float | None = None, high: float | None = None,
            integer: bool = False, low_open: bool = False, high_open: bool = False):
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else \
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise _fail(where, f"{what} is {value!r}, not a valid {'count' if integer else 'number'}")
    return value


def read_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict:
    """``state.json`` of ``ckpt``, checked against the schema and against ``optimizer``'s groups."""
    path = ckpt / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"not readable JSON ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise _fail(path, "not a JSON object")
    if state.get("version", VERSION) != VERSION:
        raise _fail(path, f"format version {state.get('version')!r}; this code reads version {VERSION}")
    step = _number(state.get("step"), path, "step", low=0, integer=True)
    if step != int(ckpt.name[5:]):
        raise _fail(path, f"step {step} does not match the folder name {ckpt.name}")
    groups = state.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise _fail(path, "param_groups is missing or does not match this optimizer")
    current = optimizer.state_dict()["param_groups"]
    for saved, now in zip(groups, current):
        if not isinstance(saved, dict) or saved.get("params") != now["params"]:
            raise _fail(path, "param_groups lists other parameters than this run's LoRA")
        _number(saved.get("lr"), path, "the learning rate (lr)", low=0, low_open=True)
        for key in ("eps", "weight_decay"):
            if key in now:
                _number(saved.get(key), path, key, low=0)
        if "betas" in now:
            betas = saved.get("betas")
            if not isinstance(betas, list) or len(betas) != 2:
                raise _fail(path, f"betas is {betas!r}")
            for b in betas:
                _number(b, path, "a beta", low=0, high=1, high_open=True)
    base = state.get("baseline")
    if not isinstance(base, dict) or not isinstance(base.get("history"), dict):
        raise _fail(path, "baseline is missing or malformed")
    if base.get("ema_value") is not None:
        _number(base["ema_value"], path, "baseline.ema_value")
    for k, values in base["history"].items():
        if not k.lstrip("-").isdigit() or not isinstance(values, list):
            raise _fail(path, f"baseline.history[{k!r}] is malformed")
        for v in values:
            _number(v, path, f"a baseline.history[{k!r}] value")
    for key in ("j_norms", "eval_rewards"):
        table = state.get(key)
        if not isinstance(table, dict) or not all(k.isdigit() for k in table):
            raise _fail(path, f"{key} is missing or malformed")
        for k, v in table.items():
            if v is not None or key == "j_norms":
                _number(v, path, f"{key}[{k}]")
    best = state.get("best")  # {"step", "reward"} of lora_best.safetensors (absent in older checkpoints)
    if best is not None:
        if not isinstance(best, dict) or (best and set(best) != {"step", "reward"}):
            raise _fail(path, f"best is malformed: {best!r}")
        if best:
            _number(best["step"], path, "best.step", low=0, integer=True)
            _number(best["reward"], path, "best.reward")
    if "loss_scale" in state:
        ls = state["loss_scale"]
        if not isinstance(ls, dict):
            raise _fail(path, "loss_scale is malformed")
        _number(ls.get("scale"), path, "loss_scale.scale", low=0, low_open=True)
        _number(ls.get("good_steps"), path, "loss_scale.good_steps", low=0, integer=True)
    entries = state.get("optimizer_entries")
    if entries is not None:
        _number(entries, path, "optimizer_entries", low=0, integer=True)
    sums = state.get("sha256")
    if sums is not None and (not isinstance(sums, dict) or set(sums) != set(FILES)):
        raise _fail(path, "sha256 does not list the checkpoint's files")
    return state


def _load_file(ckpt: Path, name: str, state: dict) -> dict[str, torch.Tensor]:
    import hashlib

    path = ckpt / name
    if path.is_symlink():
        raise _fail(path, "is a symbolic link")
    if not path.is_file():
        raise _fail(path, "is missing")
    sums = state.get("sha256")
    if sums is not None and hashlib.sha256(path.read_bytes()).hexdigest() != sums[name]:
        raise _fail(path, "its SHA-256 differs from the one recorded in state.json (the file changed after it "
                          "was written)")
    try:
        return load_tensors(path)[0]  # header, dtypes, offsets and finiteness
    except InvalidModelFile as e:
        raise InvalidCheckpoint(f"{e}; the checkpoint cannot be resumed from") from None


def _check_optimizer(path: Path, tensors: dict[str, torch.Tensor], params: list[torch.Tensor],
                     state: dict) -> dict[int, dict]:
    per_param: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name or int(idx) >= len(params):
            raise _fail(path, f"tensor {key!r} does not belong to any of the run's {len(params)} LoRA tensors")
        per_param.setdefault(int(idx), {})[name] = v
    expected = state.get("optimizer_entries")
    if expected is None:  # an older checkpoint: Adam state must be there once updates were made
        expected = len(params) if state["step"] > 0 and per_param else len(per_param)
    if len(per_param) != expected or (expected and len(per_param) != len(params)):
        raise _fail(path, f"holds optimizer state for {len(per_param)} of {len(params)} LoRA tensors (expected "
                          f"{expected}); Adam's moments are missing")
    for idx, entries in per_param.items():
        p = params[idx]
        for name, v in entries.items():
            if name == "step":
                if v.numel() != 1 or float(v) < 0 or float(v) != int(float(v)):
                    raise _fail(path, f"tensor '{idx}.step' is {v.tolist()}, not a step count")
            elif v.shape != p.shape or not v.is_floating_point():
                raise _fail(path, f"tensor '{idx}.{name}' has shape {list(v.shape)} and dtype {v.dtype}, the LoRA "
                                  f"tensor {list(p.shape)} and a floating dtype")
            if name.endswith("_sq") and (v < 0).any():
                raise _fail(path, f"tensor '{idx}.{name}' holds negative second moments")
    return per_param


def load_checkpoint(ckpt: Path, named_params: Sequence[tuple[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict:
    """Check checkpoint ``ckpt`` whole, then load it into the parameters, the optimizer and the generator;
    returns its (checked) state. Nothing is changed when it is refused."""
    state = read_state(ckpt, optimizer)
    lora = _load_file(ckpt, "lora.safetensors", state)
    names = [n for n, _ in named_params]
    missing, extra = sorted(set(names) - set(lora)), sorted(set(lora) - set(names))
    if missing or extra:
        which = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which this run does not"
        raise _fail(ckpt / "lora.safetensors", f"{which} ({len(missing)} missing, {len(extra)} unexpected; "
                                               "different rank or targets?)")
    for n, p in named_params:
        if lora[n].shape != p.shape or lora[n].dtype != p.dtype:
            raise _fail(ckpt / "lora.safetensors", f"tensor {n!r} is {list(lora[n].shape)} {lora[n].dtype}, the "
                                                   f"run's {list(p.shape)} {p.dtype}")
    params = [p for _, p in named_params]
    per_param = _check_optimizer(ckpt / "optim.safetensors", _load_file(ckpt, "optim.safetensors", state), params,
                                 state)
    rng = _load_file(ckpt, "rng.safetensors", state).get("generator")
    want = generator.get_state()
    if rng is None or rng.dtype != want.dtype or rng.shape != want.shape:
        raise _fail(ckpt / "rng.safetensors", f"tensor 'generator' must be {want.dtype} of shape {list(want.shape)}")
    try:
        test = torch.Generator()
        test.set_state(rng)
    except RuntimeError as e:
        raise _fail(ckpt / "rng.safetensors", f"not a generator state ({str(e).splitlines()[0]})") from None
    with torch.no_grad():
        for n, p in named_params:
            p.copy_(lora[n])
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    generator.set_state(rng)
    return state
