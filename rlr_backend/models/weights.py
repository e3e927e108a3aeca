"""Model weights read straight into their target dtype, with low peak memory, and the RAM check before a load.

A model is built on the meta device (:func:`empty_weights`: parameters have shapes but no memory),
its tensors are read from the ``.safetensors`` file one at a time (:func:`read_tensors`: a plain read
into a fresh tensor of the file's dtype, cast to the target dtype right away, so the temporary is one
tensor, not the file) and assigned to the module (``load_state_dict(..., assign=True)``). Peak memory
is then the loaded model plus its largest tensor, whatever dtype the file and the model have. A
memory-mapped read would count the touched file pages in the process's resident memory until the
whole file is closed (the file *plus* the model when the dtypes differ), which is why the data is
read, not mapped.

:func:`check_memory` compares what a load needs (from the headers, before a byte of data is read)
with the memory available (``MemAvailable``, and the cgroup's limit when there is one) and refuses
with one line naming both.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..safe_io import InvalidModelFile, nonfinite_count, safetensors_header

#: safetensors dtype name -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
GB = 1e9
#: what a load needs beyond its tensors: the largest tensor read at once, library buffers (measured:
#: SDXL's largest tensor is 0.16 GB in fp32; imports are already resident before the check)
LOAD_OVERHEAD_BYTES = int(0.3 * GB)


class NotEnoughMemory(ValueError):
    """A load would need more memory than is available; the message names both amounts."""


def header_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors (name -> shape and dtype, no data): enough to
    detect an architecture and check every shape before anything is read. The header is checked
    (``safe_io.safetensors_header``: pickles and damaged files are refused)."""
    out = {}
    for name, info in safetensors_header(path).items():
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise InvalidModelFile(f"{path}: tensor {name!r} has dtype {info['dtype']}, which torch cannot read")
        out[name] = torch.empty(info["shape"], dtype=dtype, device="meta")
    return out


def _data_start(f) -> int:
    f.seek(0)
    return 8 + struct.unpack("<Q", f.read(8))[0]


def _read_into(f, t: torch.Tensor) -> None:
    if t.numel() == 0:
        return
    view = memoryview(t.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise InvalidModelFile(f"{f.name}: the file ended while reading tensor data; incomplete: re-create or "
                                   "re-download it")
        done += n


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds NaN or inf, without allocating a tensor of its size (min/max propagate
    both); count them with ``safe_io.nonfinite_count`` when it does."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    lo, hi = torch.aminmax(t.reshape(-1))
    return not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)))


def read_tensors(path: str | Path, dtypes: dict[str, torch.dtype | None], *, finite: bool = True
                 ) -> dict[str, torch.Tensor]:
    """The tensors named in ``dtypes`` (name -> target dtype; None keeps the file's), each read from
    ``path`` on its own and cast at once, in file order. A tensor that keeps its dtype is read straight
    into the tensor returned; one that is cast is read into one reused scratch buffer, so the only
    allocations are the results (no holes for the allocator to leave in resident memory). With
    ``finite``, a floating tensor holding NaN/inf is refused naming the file and the tensor. The header
    must have been checked (see :func:`header_tensors`); names missing from it raise KeyError."""
    p = Path(path)
    header = safetensors_header(p)

    def cast_to(name: str) -> torch.dtype | None:
        file_dtype, target = TORCH_DTYPES[header[name]["dtype"]], dtypes[name]
        return target if target is not None and file_dtype.is_floating_point and target != file_dtype else None

    sizes = [header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in dtypes if cast_to(k) is not None]
    scratch = torch.empty(max(sizes), dtype=torch.uint8) if sizes else None
    out: dict[str, torch.Tensor] = {}
    with open(p, "rb") as f:
        start = _data_start(f)
        for name in sorted(dtypes, key=lambda k: header[k]["data_offsets"][0]):
            info = header[name]
            file_dtype, target = TORCH_DTYPES[info["dtype"]], cast_to(name)
            if target is None:
                t = torch.empty(info["shape"], dtype=file_dtype)
            else:
                n = info["data_offsets"][1] - info["data_offsets"][0]
                t = scratch[:n].view(file_dtype).view(info["shape"])
            f.seek(start + info["data_offsets"][0])
            _read_into(f, t)
            if finite and has_nonfinite(t):
                raise InvalidModelFile(f"{p}: tensor {name!r} holds {nonfinite_count(t)} NaN/inf values (of "
                                       f"{t.numel()}); the weights are damaged")
            out[name] = t if target is None else t.to(target)
    return out


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device (no memory, no random init); buffers stay
    real (e.g. CLIP's position ids, which are not in the weights files)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def assign_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` (already in the target dtype, keys checked) into a module built by :func:`empty_weights`,
    taking the tensors over (no copy); every parameter must be set."""
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise InvalidModelFile(f"{len(left)} tensor(s) of the model have no weights, e.g. {left[:2]}")


def tensor_bytes(tensors: Iterable[torch.Tensor], dtype_of: Callable[[torch.Tensor], torch.dtype | None]) -> int:
    """Bytes ``tensors`` take once read by :func:`read_tensors` (``dtype_of(t)``: its target dtype, None: its own)."""
    total = 0
    for t in tensors:
        dtype = (dtype_of(t) or t.dtype) if t.is_floating_point() else t.dtype
        total += t.numel() * dtype.itemsize
    return total


def available_memory() -> int | None:
    """Bytes this process can still allocate: ``MemAvailable`` of /proc/meminfo, lowered to the cgroup's
    remaining limit when one is set; None where neither can be read (not Linux)."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        return None
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            lim = Path(limit).read_text().strip()
            used = int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < 1 << 60:
            left = int(lim) - used
            avail = left if avail is None else min(avail, left)
        break
    return avail


def check_memory(needed: int, what: str) -> None:
    """Refuse, with one line naming both amounts, to load ``what`` when it needs more bytes than are available
    (``RLR_SKIP_MEMORY_CHECK=1`` turns the check off, e.g. where swap makes up the difference)."""
    if os.environ.get("RLR_SKIP_MEMORY_CHECK") == "1":
        return
    avail = available_memory()
    total = needed + LOAD_OVERHEAD_BYTES
    if avail is not None and total > avail:
        raise NotEnoughMemory(f"not enough memory to load {what}: it needs about {total / GB:.1f} GB of RAM and "
                              f"{avail / GB:.1f} GB is available; close other programs, use --precision bf16 (or "
                              "fp16), or a smaller model (RLR_SKIP_MEMORY_CHECK=1 skips this check)")
