"""Reward-model weight files: safetensors headers, shape checks against an architecture, loading.

Nothing here unpickles: every weight file goes through :func:`rlr_backend.safe_io.check_safetensors`
(pickles refused by suffix and by magic bytes). Shapes are compared from the safetensors header
(no tensor is read) against a module built on the ``meta`` device (no memory, no init), so a file of
the wrong architecture is refused before anything is loaded.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ...safe_io import PICKLE_SUFFIXES, InvalidModelFile, check_safetensors, index_shards, load_tensors

logger = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]


def header_shapes(path: str | Path) -> Shapes:
    """Tensor name -> shape, read from the safetensors header only."""
    from safetensors import safe_open

    p = check_safetensors(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for corrupt files
        raise InvalidModelFile(f"{p}: cannot read the safetensors header ({e}); re-create or re-download it") from e


def folder_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformers-format folder (single file or sharded with an index).

    A folder holding only pickled weights (``pytorch_model.bin``) is refused with the conversion hint.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return index_shards(index)  # only .safetensors files of this folder, each checked by its bytes
    single = folder / "model.safetensors"
    if single.is_file():
        return [check_safetensors(single)]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidModelFile(f"{folder}: holds only pickle weights ({', '.join(pickles)}), which are never loaded; "
                               "convert them to model.safetensors (see docs/rewards.md, 'Converting pickles')")
    raise InvalidModelFile(f"{folder}: no model.safetensors (or model.safetensors.index.json) in this folder")


def shapes_of(files: Iterable[Path]) -> Shapes:
    shapes: Shapes = {}
    for f in files:
        shapes.update(header_shapes(f))
    return shapes


def layer_count(shapes: Mapping[str, object], prefix: str) -> int:
    """Number of numbered blocks ``prefix{i}.`` present (0 if none)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes for m in [pat.match(k)] if m}
    return max(found) + 1 if found else 0


def module_shapes(module: nn.Module) -> Shapes:
    """Tensor shapes a module loads, without ``position_ids`` (a constant; persistent in old transformers)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def check_shapes(expected: Shapes, found: Shapes, *, source: object, architecture: str,
                 ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Raise :class:`InvalidModelFile` naming the architecture and up to 5 problems of each kind."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not ignore(k)]
    wrong = [f"{k}: file {list(found[k])}, expected {list(expected[k])}"
             for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("wrong shapes", wrong), ("missing tensors", missing), ("unexpected tensors", unexpected)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label}: {'; '.join(items[:5])}{more}")
    raise InvalidModelFile(f"{source}: does not match the expected architecture, {architecture}. " + ". ".join(parts))


def meta_tensors(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins, so key conversions can run on headers as they run on real tensors."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def load_files(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    """The tensors of ``files`` (finite, checked by ``load_tensors``); weights must be floating point."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        loaded = load_tensors(f)[0]
        for name, t in loaded.items():
            if not t.is_floating_point() and not name.endswith(("position_ids", "num_batches_tracked")):
                raise InvalidModelFile(f"{f}: tensor {name!r} has dtype {t.dtype}; reward-model weights are floating point")
        tensors.update(loaded)
    return tensors


def materialize(module: nn.Module, state_dict: dict[str, torch.Tensor], *, device: torch.device,
                dtype: torch.dtype) -> nn.Module:
    """Fill a module built on the ``meta`` device with ``state_dict`` (every tensor it loads), then freeze it.

    The only non-persistent buffers of the transformers CLIP/BLIP modules are ``position_ids``
    (``arange``); they are rebuilt here. Any other tensor left on ``meta`` is a programming error.
    """
    result = module.load_state_dict(state_dict, strict=False, assign=True)
    problems = [k for k in result.missing_keys if not k.endswith("position_ids")] + list(result.unexpected_keys)
    if problems:
        raise RuntimeError(f"state dict does not fit {type(module).__name__}: {problems[:5]}")
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"buffer {name!r} of {type(sub).__name__} was not loaded")
                sub._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    leftover = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors not loaded: {leftover[:5]}")
    module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def ensure_head_dims(hidden: int, heads: int, what: str, source: object) -> None:
    if heads < 1 or hidden % heads:
        raise InvalidModelFile(f"{source}: {what} width {hidden} cannot be split into attention heads of 64 "
                               "(the layout this loader infers from shapes); use a transformers folder with config.json")
