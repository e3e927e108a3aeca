"""File safety: safetensors only (never pickle), checked headers and finite tensors, atomic and
deterministic writes, paths checked after resolving symlinks.

* Reads: :func:`check_safetensors` decides by the bytes, not the name: pickles (any suffix) are refused,
  and the header is validated (size, JSON, dtypes, shapes, offsets) before safetensors reads a byte of
  data; :func:`load_tensors` also refuses NaN/inf values, naming the file and the tensor.
* Writes: data goes to a ``.tmp-*`` file in the same folder, is flushed to disk and only then renamed
  over the target, so a crash or a full disk leaves the previous file untouched. A failed write raises
  :class:`StorageError` naming the path (disk full, read-only folder). Identical tensors and metadata
  give identical bytes (the metadata is sorted; safetensors itself writes it in hash order).
* Paths: :func:`refuse_symlinks` and :func:`child` keep run folders free of links that would send a
  read or a write elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # torch is imported by the functions that need it: the CLI's checks stay light
    import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100_000_000  # ComfyUI's cap
MAX_TENSORS = 100_000  # an SDXL single file holds ~2,600
#: safetensors dtype -> bytes per element (the dtypes torch reads)
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: write errors that say "this folder cannot take the file", reported as one line naming it
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                   errno.ENAMETOOLONG, errno.EIO, errno.ELOOP}
TEMP_PREFIX = ".tmp-"


class InvalidModelFile(ValueError):
    """A weights or state file that is not a valid, finite safetensors file (or is a pickle)."""


class StorageError(OSError):
    """A file could not be written (disk full, read-only folder, ...); the message names the path."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def one_line(text: object) -> str:
    """``text`` on one line (library messages often span several)."""
    return " ".join(str(text).split())


# -- reading ----------------------------------------------------------------------------------------
def _looks_pickled(head: bytes) -> bool:
    return head[:2] == b"PK" or head[:1] == b"\x80"  # a zip (torch.save) or a pickle protocol >= 2


def check_safetensors(path: str | Path) -> Path:
    """Return ``path`` if its bytes are a well-formed safetensors file; refuse pickles and damaged files.

    Only the header is read. Every tensor entry must have a known dtype, a shape of non-negative
    integers and data offsets that tile the data section exactly."""
    safetensors_header(path)
    return Path(path)


def safetensors_header(path: str | Path) -> dict[str, dict]:
    """The checked header of a safetensors file (see :func:`check_safetensors`): name -> {dtype, shape,
    data_offsets}, without ``__metadata__``."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidModelFile(f"{p}: pickle-based checkpoints (.ckpt/.pt/.pth/.bin) are not accepted; "
                               "convert it to .safetensors")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        ok_len = len(head) == 9 and head[8:9] == b"{" and 2 <= n <= min(size - 8, MAX_HEADER_BYTES)
        if not ok_len:
            if _looks_pickled(head):
                raise InvalidModelFile(f"{p}: this is a pickle (torch.save) file, not safetensors; convert it to "
                                       ".safetensors")
            if len(head) < 9:
                raise InvalidModelFile(f"{p}: file is too short to be safetensors (incomplete download?)")
            if head[8:9] == b"{" and n > size - 8 and n <= MAX_HEADER_BYTES:
                raise InvalidModelFile(f"{p}: the file is cut short (header of {n} bytes, file of {size}); "
                                       "incomplete: re-create or re-download it")
            raise InvalidModelFile(f"{p}: not a safetensors file (bad header)")
        raw = head[8:] + f.read(n - 1)
    return _check_header(p, raw, size - 8 - n)


def _check_header(p: Path, raw: bytes, data_size: int) -> dict[str, dict]:
    def pairs(items):
        keys = [k for k, _ in items]
        if len(keys) != len(set(keys)):
            raise InvalidModelFile(f"{p}: the header names a tensor twice; not a valid safetensors file")
        return dict(items)

    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise InvalidModelFile(f"{p}: the header lists more than {MAX_TENSORS} tensors; refused")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, InvalidModelFile):
            raise
        raise InvalidModelFile(f"{p}: not a safetensors file (the header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise InvalidModelFile(f"{p}: not a safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InvalidModelFile(f"{p}: the header's __metadata__ must map text to text")
    spans = []
    for name, info in header.items():
        where = f"{p}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidModelFile(f"{where}: malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise InvalidModelFile(f"{where}: unsupported dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise InvalidModelFile(f"{where}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise InvalidModelFile(f"{where}: bad data offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise InvalidModelFile(f"{where}: shape {shape} of {dtype} does not match its {offsets[1] - offsets[0]} "
                                   "bytes of data")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise InvalidModelFile(f"{p}: tensor {name!r}: its data overlaps another tensor or leaves a gap")
        end = stop
    if end > data_size:
        raise InvalidModelFile(f"{p}: the file is cut short ({data_size} of {end} bytes of tensor data); incomplete: "
                               "re-create or re-download it")
    if end != data_size:
        raise InvalidModelFile(f"{p}: {data_size - end} bytes after the last tensor; not a valid safetensors file")
    return header


def index_shards(index: str | Path) -> list[Path]:
    """The shard files a sharded-weights index (``*.safetensors.index.json``) names, each checked by
    :func:`check_safetensors`. Only ``.safetensors`` files directly in the index's own folder are accepted."""
    index = Path(index)
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InvalidModelFile(f"{index}: not a sharded-weights index (no weight_map: {type(e).__name__})") from None
    out = []
    for shard in sorted(shards, key=str):
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or "\x00" in shard \
                or not shard.endswith(".safetensors"):
            raise InvalidModelFile(f"{index}: names the shard {str(shard)[:80]!r}; only .safetensors files in the "
                                   "index's own folder are accepted")
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index}: its shard {shard} is missing")
        out.append(check_safetensors(path))
    return out


def nonfinite_count(t: torch.Tensor) -> int:
    """Number of NaN/inf values of a floating tensor (0 for other dtypes)."""
    import torch

    if not (t.is_floating_point() or t.is_complex()):
        return 0
    import torch

    return int((~torch.isfinite(t)).sum())


def load_tensors(path: str | Path, *, finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (checked by :func:`check_safetensors`); with ``finite``
    a tensor holding NaN or inf is refused, naming the file and the tensor."""
    from safetensors import safe_open

    p = check_safetensors(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several error types for corrupt files
        raise InvalidModelFile(f"{p}: cannot read safetensors file ({one_line(e)}); re-create or re-download it") \
            from e
    if finite:
        for name, t in tensors.items():
            bad = nonfinite_count(t)
            if bad:
                raise InvalidModelFile(f"{p}: tensor {name!r} holds {bad} NaN/inf values (of {t.numel()}); the file "
                                       "is damaged or was saved from a diverged run")
    return tensors, meta


# -- writing ----------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def storage_errors(path: str | Path) -> Iterator[None]:
    """Turn a failed write under ``path`` (disk full, read-only, name too long, ...) into :class:`StorageError`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        reason = (e.strerror or str(e)).lower()
        raise StorageError(e.errno, f"cannot write {path}: {reason}; files written before are unchanged") from e


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    target = Path(path)
    tmp = None
    try:
        with storage_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name[:64]}.", dir=target.parent)
            os.close(fd)
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
            fault_point("atomic:before_replace")
            os.replace(tmp, target)  # replaces a symlink at ``target`` itself, never writes through it
            _fsync_dir(target.parent)
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def write_bytes(data: bytes, path: str | Path) -> str:
    """Write ``data`` to ``path`` atomically; returns its SHA-256 (hex)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def serialize_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors``; the header is written in a fixed order (metadata sorted,
    tensors by offset), so identical inputs always give identical bytes."""
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    n = struct.unpack("<Q", raw[:8])[0]
    entries = json.loads(raw[8:8 + n])
    entries.pop("__metadata__", None)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    header.update(sorted(entries.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0])))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as safetensors, atomically; returns the file's SHA-256. A tensor holding NaN or
    inf is refused (ValueError) before anything is written."""
    for name, t in tensors.items():
        bad = nonfinite_count(t.detach())
        if bad:
            raise ValueError(f"not saving {path}: tensor {name!r} holds {bad} NaN/inf values")
    return write_bytes(serialize_tensors(tensors, metadata), path)


def finite_json(obj: object) -> object:
    """``obj`` with NaN/inf floats replaced by None (JSON ``null``) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj: object, **kw) -> str:
    """Strict JSON (never a ``NaN`` token): non-finite numbers become ``null``."""
    return json.dumps(finite_json(obj), allow_nan=False, **kw)


def save_json(obj: object, path: str | Path) -> str:
    return write_bytes(dumps_json(obj, indent=2, sort_keys=True).encode(), path)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to ``path`` (created if absent), refusing to follow a symlink at ``path``."""
    p = Path(path)
    with storage_errors(p):
        try:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"{p} is a symbolic link; refusing to write through it") from None
            raise
        try:
            os.write(fd, (line.rstrip("\n") + "\n").encode())
        finally:
            os.close(fd)


# -- paths --------------------------------------------------------------------------------------------
def refuse_symlinks(root: str | Path, what: str = "run folder") -> None:
    """Raise ValueError if ``root`` is a symlink or holds one anywhere inside (links are not followed)."""
    root = Path(root)
    if root.is_symlink():
        raise ValueError(f"{what} {root} is a symbolic link; refused (give the real folder)")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            if full.is_symlink():
                raise ValueError(f"{what} {root} contains a symbolic link, {full.relative_to(root)}; refused (a "
                                 f"{what} holds only its own files; remove the link)")


def child(root: str | Path, name: str, what: str = "file") -> Path:
    """``root/name`` for a plain file name, refusing links, separators and anything that resolves outside ``root``."""
    root = Path(root)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"{what} name {name!r} is not a plain file name inside {root}; refused")
    p = root / name
    if p.is_symlink():
        raise ValueError(f"{p} is a symbolic link; refused")
    if p.resolve().parent != root.resolve():
        raise ValueError(f"{p} resolves outside {root}; refused")
    return p


def clean_temp_files(root: str | Path) -> int:
    """Delete ``.tmp-*`` files and folders left under ``root`` by a killed process; returns how many."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if name.startswith(TEMP_PREFIX):
                full = os.path.join(dirpath, name)
                with storage_errors(full), contextlib.suppress(FileNotFoundError):
                    if os.path.isdir(full) and not os.path.islink(full):
                        dirnames.remove(name)
                        shutil.rmtree(full)
                    else:
                        os.unlink(full)
                count += 1
    return count


# -- a test hook: kill this process at a named point ----------------------------------------------------
FAULT_ENV = "RLR_TEST_KILL_AT"
_fault_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: with ``RLR_TEST_KILL_AT=<name>`` (or ``<name>@<n>``, the n-th time) the process kills itself
    with SIGKILL here, as ``kill -9`` would. Unset (always, outside the reliability tests) it does nothing."""
    target = os.environ.get(FAULT_ENV)
    if not target:
        return
    point, _, nth = target.partition("@")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
