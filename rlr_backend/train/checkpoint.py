"""Checkpoints that resume a run exactly: LoRA, Adam moments, RNG state and counters.

Layout: ``<run>/ckpt/step-NNNNNN/{lora.safetensors, optim.safetensors, rng.safetensors, state.json}``
and ``<run>/ckpt/LATEST`` naming the newest complete checkpoint. Tensors are safetensors, the rest
JSON (never pickle). Every file is written atomically and ``state.json`` last; LATEST moves only
after the checkpoint is complete, so a kill at any moment leaves a loadable LATEST.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..safe_io import atomic_path, load_tensors, save_json, save_tensors

KEEP_LAST = 2


def save_checkpoint(run_dir: Path, step: int, named_params: Sequence[tuple[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, state: dict) -> Path:
    ckpt = run_dir / "ckpt" / f"step-{step:06d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_tensors({n: p.detach().cpu() for n, p in named_params}, ckpt / "lora.safetensors")
    opt_state, opt_tensors = optimizer.state_dict(), {}
    for idx, s in opt_state["state"].items():
        for k, v in s.items():
            opt_tensors[f"{idx}.{k}"] = v.cpu() if isinstance(v, torch.Tensor) else torch.tensor(v)
    save_tensors(opt_tensors, ckpt / "optim.safetensors")
    save_tensors({"generator": generator.get_state()}, ckpt / "rng.safetensors")
    save_json({**state, "step": step, "param_groups": opt_state["param_groups"]}, ckpt / "state.json")
    with atomic_path(run_dir / "ckpt" / "LATEST") as tmp:
        tmp.write_text(ckpt.name)
    _prune(run_dir / "ckpt", keep=ckpt.name)
    return ckpt


def _prune(root: Path, keep: str) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    for old in done[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "ckpt" / "LATEST"
    if not pointer.is_file():
        return None
    ckpt = run_dir / "ckpt" / pointer.read_text().strip()
    if not (ckpt / "state.json").is_file():
        raise ValueError(f"{pointer} names {ckpt.name}, which is incomplete; remove LATEST to start over")
    return ckpt


def load_checkpoint(ckpt: Path, named_params: Sequence[tuple[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict:
    state = json.loads((ckpt / "state.json").read_text())
    lora, _ = load_tensors(ckpt / "lora.safetensors")
    names = [n for n, _ in named_params]
    if sorted(lora) != sorted(names):
        raise ValueError(f"checkpoint {ckpt} holds other LoRA tensors than this run (different rank or targets?)")
    with torch.no_grad():
        for n, p in named_params:
            if lora[n].shape != p.shape:
                raise ValueError(f"checkpoint {ckpt}: {n} has shape {tuple(lora[n].shape)}, the run {tuple(p.shape)}")
            p.copy_(lora[n])
    opt_tensors, _ = load_tensors(ckpt / "optim.safetensors")
    opt_state: dict[int, dict] = {}
    for key, v in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    rng, _ = load_tensors(ckpt / "rng.safetensors")
    generator.set_state(rng["generator"])
    return state
