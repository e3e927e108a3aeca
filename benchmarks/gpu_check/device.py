"""Device-side measuring: peak tensor bytes and wall time of a call on a CUDA GPU or the CPU, and the
record of the machine the figures come from.

On CUDA, bytes come from the caching allocator's counters (``torch.cuda.reset_peak_memory_stats``,
``memory_allocated``, ``max_memory_allocated``: live tensor bytes, what the memory model predicts; the
allocator's reserve and the CUDA context are not in them) and times are taken between
``torch.cuda.synchronize`` calls. On the CPU the same quantities come from the profiler's allocation
events (``benchmarks.common.live_bytes``: every allocation and free in time order, as CUDA counts).
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Callable, Iterable

import torch
from torch.profiler import record_function

from .. import memory_model as mm
from ..common import live_bytes


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def synchronize(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, with the device's queued work finished on both sides."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(peak tensor bytes allocated on ``device`` while ``fn`` runs, above what was live before; result)."""
    if not is_cuda(device):
        out: list = []
        peak, _ = live_bytes(lambda: out.append(fn()))
        return peak, out[0]
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - base), out


def peak_and_time(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """(peak bytes above the start, seconds, result). One call on CUDA (its counters cost nothing); two on
    the CPU, where the profiler that counts the bytes would inflate the time."""
    if is_cuda(device):
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        seconds, out = timed(fn, device)
        return float(torch.cuda.max_memory_allocated(device) - base), seconds, out
    peak, _ = peak_bytes(fn, device)
    seconds, out = timed(fn, device)
    return peak, seconds, out


def segment(device: torch.device) -> Callable[[Callable[[], torch.Tensor]], mm.SegmentMemory]:
    """The memory model's segment measurement (peak of forward + backward, bytes retained after the
    forward, peak of a no-grad forward; all above what was live before) on ``device``."""

    def run(forward: Callable[[], torch.Tensor], at_forward_end: Callable[[], None]) -> None:
        out = forward()
        at_forward_end()
        out.float().square().mean().backward()  # as memory_model.measure_segment
        del out

    def measure(forward: Callable[[], torch.Tensor]) -> mm.SegmentMemory:
        if is_cuda(device):
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            held: list[int] = []
            run(forward, lambda: (synchronize(device), held.append(torch.cuda.memory_allocated(device))))
            synchronize(device)
            peak, retained = float(torch.cuda.max_memory_allocated(device) - base), float(held[0] - base)
        else:
            def at_end() -> None:
                with record_function(mm.MARK):
                    pass
            peak, retained = live_bytes(lambda: run(forward, at_end), mark=mm.MARK)
        nograd, _ = peak_bytes(lambda: _nograd(forward), device)
        return mm.SegmentMemory(peak, retained, nograd)

    return measure


def _nograd(forward: Callable[[], object]) -> None:
    with torch.no_grad():
        forward()


def tensor_bytes(modules: Iterable[torch.nn.Module] = (), optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the modules' parameters and buffers and the optimizer's state tensors (each storage once)."""
    seen: dict[tuple[int, int], int] = {}
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        seen[(t.untyped_storage().data_ptr(), t.device.index or 0)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def capacity_bytes(device: torch.device) -> float:
    """Bytes a new allocation can still get: CUDA's free memory plus this process's cached blocks; the
    CPU's available RAM."""
    if is_cuda(device):
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return mm.available_bytes()


def _nvidia_smi(field: str) -> str:
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    """GPU, driver, CUDA, cuDNN, torch, diffusers and the rest of the machine record (benchmarks.run)."""
    from ..common import machine

    env = {**machine(), "device": str(device), "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                   compute_capability=f"{props.major}.{props.minor}", driver=_nvidia_smi("driver_version"),
                   gpu_count=torch.cuda.device_count(),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    return env
