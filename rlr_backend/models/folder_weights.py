"""A diffusers folder's components read straight into another precision, one tensor at a time.

diffusers and transformers read a component's ``.safetensors`` file whole and cast afterwards, so a
folder that has fp32 weights only (no ``*.fp16.safetensors`` variant), loaded in fp16 or bf16, peaks at
the fp32 file *plus* the half-precision model: 2.2x the loaded model for SD1.5 (measured,
docs/models.md). :func:`load_cast_components` builds such a component on the meta device from its
config and reads its tensors with :func:`rlr_backend.models.weights.read_tensors` (each read and cast
on its own), as the single-file loader does, so the peak is the loaded model plus one tensor. The
pipeline is then assembled by diffusers with these modules passed in.

A component is only taken over when its file keys are exactly its module's parameters and persistent
buffers (today's diffusers/transformers layout). Anything else (old-format keys diffusers renames on
load, such as a VAE's ``query``/``key``/``value`` attention weights, tied or fp32-kept modules, a
library we do not know) is left to the library, with one debug line: correct, just with the higher peak.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..safe_io import InvalidModelFile
from .weights import assign_weights, empty_weights, header_tensors, read_tensors

logger = logging.getLogger(__name__)

#: buffers some transformers versions wrote into the files and later ones dropped (not persistent now)
_DROPPED_BUFFERS = ("position_ids",)


def _component_class(index: dict, comp: str) -> Any | None:
    spec = index.get(comp)
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers")):
        return None
    return getattr(importlib.import_module(spec[0]), spec[1], None)


def _build_on_meta(cls: Any, folder: Path) -> torch.nn.Module:
    with empty_weights():
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # a diffusers model
            return cls.from_config(cls.load_config(str(folder)))
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(str(folder), local_files_only=True))


def _check_shapes(module: torch.nn.Module, headers: dict[Path, dict[str, torch.Tensor]]) -> None:
    """Every tensor of the files has its module tensor's shape, or one line names the file, the key and both."""
    want = {k: list(t.shape) for k, t in module.state_dict().items()}
    for f, tensors in headers.items():
        for k, t in tensors.items():
            if k in want and list(t.shape) != want[k]:
                raise InvalidModelFile(f"{f}: tensor {k!r} has shape {list(t.shape)}; the component's "
                                       f"config.json needs {want[k]}: the file and the config do not match")


def load_cast_component(folder: Path, comp: str, cls: Any, headers: dict[Path, dict[str, torch.Tensor]],
                        dtype: torch.dtype) -> torch.nn.Module | None:
    """``folder/comp`` built on the meta device and filled from its non-variant weight files (``headers``: file ->
    its tensors as meta tensors, :func:`~rlr_backend.models.weights.header_tensors`), floating tensors cast to
    ``dtype`` one at a time; None when the files' keys are not the module's own (the caller then lets the
    library load it)."""
    if getattr(cls, "_keep_in_fp32_modules", None) or getattr(cls, "_tied_weights_keys", None):
        return None
    module = _build_on_meta(cls, folder / comp)
    expected = set(module.state_dict())
    found = {k for tensors in headers.values() for k in tensors}
    extra = {k for k in found - expected if not k.endswith(_DROPPED_BUFFERS)}
    if extra or expected - found:
        logger.debug("%s: %d file keys are not the module's own (%d missing); the library loads it",
                     comp, len(extra), len(expected - found))
        return None
    _check_shapes(module, headers)
    state: dict[str, torch.Tensor] = {}
    for f, tensors in headers.items():
        state.update(read_tensors(f, {k: dtype for k in tensors if k in expected}))
    assign_weights(module, state)
    return module.eval()


def load_cast_components(folder: Path, components: tuple[str, ...], dtypes: dict[str, torch.dtype],
                         files_of) -> dict[str, torch.nn.Module]:
    """The components of ``folder`` whose weights files hold floating tensors of another dtype than asked
    (``dtypes``: component -> dtype, ``"default"`` for the rest), each read tensor by tensor
    (:func:`load_cast_component`); ``files_of(comp)`` lists a component's non-variant weight files.
    Components already in their dtype, and those the library must convert, are not in the result."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    out: dict[str, torch.nn.Module] = {}
    for comp in components:
        dtype = dtypes.get(comp, dtypes["default"])
        files = files_of(comp)
        cls = _component_class(index, comp)
        if cls is None or not files:
            continue
        headers = {f: header_tensors(f) for f in files}
        if {t.dtype for h in headers.values() for t in h.values() if t.is_floating_point()} <= {dtype}:
            continue
        module = load_cast_component(folder, comp, cls, headers, dtype)
        if module is not None:
            out[comp] = module
            logger.debug("%s: read tensor by tensor into %s", comp, dtype)
    return out
