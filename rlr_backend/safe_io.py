"""File safety: safetensors only (never pickle), atomic writes (temp file + rename).

A crash or a full disk during a save leaves the previous file untouched: data goes to a temporary
file in the same folder, is flushed to disk, and only then renamed over the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch is imported by the functions that need it: the CLI's checks stay light
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")


class InvalidModelFile(ValueError):
    """A weights file that is not a valid safetensors file (or is a pickle)."""


def check_safetensors(path: str | Path) -> Path:
    """Return ``path`` if it is a safetensors file; refuse pickles and corrupt files by their bytes."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModelFile(f"{p}: pickle-based checkpoints (.ckpt/.pt/.pth/.bin) are not accepted; "
                               "convert it to .safetensors")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(9)
    # A valid header first: its 8-byte length may itself start with b"\x80" or b"PK" (a file is never
    # unpickled here, so accepting a safetensors-shaped file is safe; safetensors parses it).
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n <= p.stat().st_size - 8 and n <= 100_000_000:
            return p
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise InvalidModelFile(f"{p}: this is a pickle (torch.save) file, not safetensors; convert it to .safetensors")
    if len(head) < 9:
        raise InvalidModelFile(f"{p}: file is too short to be safetensors (incomplete download?)")
    raise InvalidModelFile(f"{p}: not a safetensors file (bad header)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    p = check_safetensors(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several error types for corrupt files
        raise InvalidModelFile(f"{p}: cannot read safetensors file ({e}); re-create or re-download it") from e


def save_json(obj: object, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
