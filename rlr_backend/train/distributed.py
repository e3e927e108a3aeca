"""Data-parallel training across processes: ``accelerate launch --multi_gpu`` or ``torchrun``.

Every process runs the whole trainer with the same seeded ``torch.Generator``, so everything drawn
per batch (prompt ids, x_T, the per-step sampling noise, RLR's sub-chain start j, perturbation
seeds) is drawn identically everywhere; each process then keeps its shard of ``batch_size / N``
samples, made of whole prompt groups. Per-sample draws are made for the whole batch and sliced, so
an N-process run computes what a 1-process run with the same total batch and seed computes:

* the estimators gather the rewards (and prompt ids) of the whole batch for their baselines,
  reward metrics and zeroth-order coefficients (``BatchShard.gather``);
* the losses are means over a shard, so the mean of the shards' gradients (one all-reduce of the
  LoRA gradients per update, ``average_gradients``) is the whole batch's gradient;
* after that every process takes the same optimizer step, so the LoRAs stay identical without a
  DDP wrapper (only the LoRA parameters train, and every process runs the same code);
* files (config, metrics, checkpoints, grids, the LoRA) and evaluation happen on the main process;
  the others wait for its result (``on_main``), and an error there stops every process.

The process group is created through accelerate's ``PartialState`` (``gloo`` for CPU tensors, and
``nccl`` beside it for CUDA tensors on a GPU machine). A run launched without ``WORLD_SIZE > 1``
never touches ``torch.distributed`` and behaves exactly as before.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor

from ..estimators.problem import BatchShard

logger = logging.getLogger(__name__)

T = TypeVar("T")

# exceptions re-raised with their own type on every process when they happen on the main one
_SHARED_ERRORS: dict[str, type[Exception]] = {e.__name__: e for e in (ValueError, FileNotFoundError, FileExistsError)}


_MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size_from_environment() -> int:
    """Number of processes the launcher started (``WORLD_SIZE``, set by torchrun / accelerate launch).

    An MPI launch (``accelerate launch --cpu --mpirun_hostfile``, mpirun) sets no ``WORLD_SIZE``; it is
    refused rather than run as N independent copies writing one run folder.
    """
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        mpi = {k: os.environ[k] for k in _MPI_SIZE_VARIABLES if os.environ.get(k, "1") not in ("", "0", "1")}
        if mpi:
            raise ValueError(f"launched by MPI ({', '.join(f'{k}={v}' for k, v in mpi.items())}), which rlr-train "
                             "does not support: use `accelerate launch --multi_gpu --num_processes N` or torchrun")
        return 1
    try:
        return max(int(value), 1)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a whole number of processes, got {value!r}") from None


def is_main_process() -> bool:
    """True unless this process was launched as rank > 0 (for printing from the command line)."""
    return os.environ.get("RANK", "0") == "0"


def check_batch_split(batch_size: int, images_per_prompt: int, num_processes: int) -> int:
    """Samples per process; raises unless the batch splits into equal shards of whole prompt groups.

    Whole groups keep a prompt's images in one process (its leave-one-out statistics are exact) and
    equal shards make the mean of the shards' mean-losses the whole batch's mean loss.
    """
    groups = batch_size // images_per_prompt
    if num_processes < 1:
        raise ValueError(f"the number of processes must be >= 1, got {num_processes}")
    if groups % num_processes:
        raise ValueError(
            f"batch_size // images_per_prompt = {batch_size} // {images_per_prompt} = {groups} prompt groups "
            f"cannot be split evenly over {num_processes} processes: make it a multiple of {num_processes} "
            f"(e.g. --batch-size {-(-groups // num_processes) * num_processes * images_per_prompt}) "
            "or launch fewer processes"
        )
    return batch_size // num_processes


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run; with ``world_size == 1`` every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # index of this process on its machine (its GPU)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, batch_size: int, images_per_prompt: int) -> "DataParallel":
        """Join the process group the launcher set up (if any), after checking the batch splits.

        The check comes first, so a batch that cannot be split fails on every process at once,
        before any rendezvous or model loading.
        """
        world = world_size_from_environment()
        check_batch_split(batch_size, images_per_prompt, world)
        if world == 1:
            return cls()
        rank, world, local = _init_process_group()
        if rank != 0:  # one copy of the log: the other processes report warnings and errors only
            logging.getLogger("rlr_backend").setLevel(logging.WARNING)
        logger.info("data-parallel training: %d processes, %d samples each", world, batch_size // world)
        return cls(rank, world, local)

    # -- the batch ---------------------------------------------------------------------------------
    def shard(self, batch_size: int) -> BatchShard | None:
        """This process's rows of a batch of ``batch_size`` (None when there is one process)."""
        if not self.enabled:
            return None
        size = batch_size // self.world_size
        return BatchShard(self.rank * size, size, batch_size, self.gather, self.mean)

    def gather(self, per_sample: Tensor) -> Tensor:
        """Concatenate equal-sized per-sample tensors of every process in rank order (dim 0)."""
        if not self.enabled:
            return per_sample
        import torch.distributed as dist

        local = per_sample.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, 0)

    def mean(self, value: Tensor) -> Tensor:
        """Elementwise mean of a tensor over the processes (a new tensor; the input is unchanged)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.div_(self.world_size)

    def average_gradients(self, params: Sequence[Tensor]) -> None:
        """Replace each ``.grad`` by its mean over the processes: one all-reduce per (device, dtype).

        Parameters without a gradient are left alone; every process runs the same code, so the
        same parameters have gradients everywhere.
        """
        if not self.enabled:
            return
        import torch.distributed as dist

        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            if p.grad is not None:
                buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- control -----------------------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (e.g. a stop request)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: T) -> T:
        """The main process's ``obj`` on every process (pickled; for small state, not tensors per step)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process only; every process returns its result (the others wait).

        An exception on the main process is re-raised on every process (a ValueError, FileNotFoundError
        or FileExistsError with its own type, anything else as RuntimeError), so no process is left
        waiting for a main process that has stopped.
        """
        if not self.enabled:
            return fn()
        outcome: tuple[bool, Any] = (True, None)
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
                error, outcome = e, (False, (type(e).__name__, str(e)))
        ok, payload = self.broadcast(outcome)
        if error is not None:
            raise error
        if not ok:
            name, message = payload
            raise _SHARED_ERRORS.get(name, RuntimeError)(f"(on the main process) {message}")
        return payload

    def sync_parameters(self, params: Sequence[Tensor]) -> None:
        """Copy the main process's parameter values to every process (start of a run, after resume)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def max_parameter_difference(self, params: Sequence[Tensor]) -> float:
        """Largest |difference| between this process's parameters and the main process's, over all
        processes (0.0 when they are in sync, as they should be after every identical update)."""
        if not self.enabled:
            return 0.0
        import torch.distributed as dist

        flat = torch.cat([p.detach().reshape(-1).double() for p in params])
        main = flat.clone()
        dist.broadcast(main, src=0)
        diff = torch.tensor([float((flat - main).abs().max()) if flat.numel() else 0.0], dtype=torch.float64,
                            device=flat.device)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff.item())


def _init_process_group() -> tuple[int, int, int]:
    """Initialise torch.distributed through accelerate; returns (rank, world size, local rank).

    Without a usable GPU (or with ``ACCELERATE_USE_CPU``) the group is ``gloo``; with CUDA it is
    ``cuda:nccl,cpu:gloo``, so tensors of either device can be reduced.
    """
    from accelerate import PartialState

    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu) if cpu else PartialState(backend="cuda:nccl,cpu:gloo")
    if state.num_processes < 2:
        raise RuntimeError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but accelerate set up {state.num_processes} "
                           "process(es); launch with `accelerate launch --multi_gpu --num_processes N` or torchrun")
    atexit.unregister(_destroy_process_group)  # once, however many runs this process trains
    atexit.register(_destroy_process_group)
    return state.process_index, state.num_processes, state.local_process_index


def _destroy_process_group() -> None:
    """Tear the group down before the interpreter does: left to exit, gloo's threads were sometimes still
    joinable and the process aborted ("terminate called without an active exception", exit code -6) after
    its runs had finished and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
