"""Background training for interactive front ends: one job at a time, in a worker thread.

A job is one or more runs trained one after the other (the Gradio app's "compare estimators" trains
RLR, then a baseline, on the same settings). The worker turns the trainer's callbacks into a
``JobState`` that any number of viewers read with ``snapshot()`` and ``wait()``; a viewer that goes
away (a closed browser tab) does not stop the job. ``stop()`` sets the trainer's stop flag: the run
ends after the update in progress, with a checkpoint and the partial LoRA written.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import TrainConfig

logger = logging.getLogger(__name__)

#: Errors a user can fix; shown as their message alone. Anything else also names its type.
USER_ERRORS = (ValueError, OSError)  # OSError: missing files, a full disk (safe_io.StorageError), ...


class RunInProgress(RuntimeError):
    """Raised by ``RunManager.start`` while another job is still training."""


def eval_captions(config: TrainConfig) -> list[str]:
    """Captions of the trainer's evaluation images, in its order (prompt-major, ``eval_seeds`` each)."""
    n = min(len(config.prompts), 4)
    return [config.prompts[i].fine for i in range(n) for _ in range(config.eval_seeds)]


@dataclass
class RunState:
    """What a viewer sees of one run. Rewards are (step, value) pairs; images are (N, 3, H, W) in [0, 1]."""

    label: str
    config: TrainConfig
    status: str = "queued"  # queued, running, done, stopped, failed, skipped
    step: int = 0
    train_rewards: list[tuple[int, float]] = field(default_factory=list)
    eval_rewards: list[tuple[int, float]] = field(default_factory=list)
    before: torch.Tensor | None = None
    latest: torch.Tensor | None = None
    latest_step: int = 0
    loop_started: float | None = None  # after the first evaluation
    finished: float | None = None
    lora_path: Path | None = None
    error: str | None = None

    @property
    def total(self) -> int:
        return self.config.steps

    def seconds_per_step(self) -> float | None:
        if self.loop_started is None or self.step == 0:
            return None
        end = self.finished if self.finished is not None else time.monotonic()
        return (end - self.loop_started) / self.step


class JobState:
    """Runs of one job plus a log; every change bumps ``version`` and wakes waiting viewers."""

    def __init__(self, job_id: int, runs: Sequence[tuple[str, TrainConfig]]):
        self.id = job_id
        self.runs = [RunState(label, cfg) for label, cfg in runs]
        self.log: list[str] = []
        self.created = time.monotonic()
        self.first_preview_at: float | None = None  # first refreshed preview (step > 0)
        self.stop_event = threading.Event()
        self.version = 0
        self.finished = False
        self._cond = threading.Condition()

    def update(self, fn: Callable[[], None]) -> None:
        with self._cond:
            fn()
            self.version += 1
            self._cond.notify_all()

    def add_log(self, line: str) -> None:
        logger.info("%s", line)
        self.update(lambda: self.log.append(line))

    def wait(self, seen_version: int, timeout: float) -> int:
        """Block until ``version`` differs from ``seen_version`` (or ``timeout`` s); return the version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != seen_version or self.finished, timeout=timeout)
            return self.version

    def snapshot(self) -> "JobState":
        """A consistent copy for rendering (lists copied, tensors shared: they are never modified)."""
        with self._cond:
            copy = object.__new__(JobState)
            copy.__dict__.update(self.__dict__)
            copy.runs = [dataclasses.replace(r, train_rewards=list(r.train_rewards),
                                             eval_rewards=list(r.eval_rewards)) for r in self.runs]
            copy.log = list(self.log)
            return copy

    @property
    def current(self) -> RunState:
        """The run in progress, else the last one that started."""
        started = [r for r in self.runs if r.status != "queued"]
        return started[-1] if started else self.runs[0]


class RunManager:
    """Owns the worker thread; at most one job trains at any time (``max_active`` records the peak)."""

    def __init__(self, trainer_factory: Callable[..., object] | None = None):
        if trainer_factory is None:
            from .trainer import Trainer

            trainer_factory = Trainer
        self._factory = trainer_factory
        self._lock = threading.Lock()
        self._job: JobState | None = None
        self._next_id = 1
        self.active = 0
        self.max_active = 0

    @property
    def job(self) -> JobState | None:
        """The job in progress, else the last one (None before the first)."""
        return self._job

    def busy(self) -> bool:
        job = self._job
        return job is not None and not job.finished

    def start(self, runs: Sequence[tuple[str, TrainConfig]]) -> JobState:
        if not runs:
            raise ValueError("a job needs at least one run")
        with self._lock:
            if self.busy():
                cur = self._job.current
                raise RunInProgress(f"a run is already in progress ({cur.label}, step {cur.step} of {cur.total}); "
                                    "wait for it or press Stop")
            job = JobState(self._next_id, runs)
            self._next_id += 1
            self._job = job
            threading.Thread(target=self._work, args=(job,), name=f"rlr-job-{job.id}", daemon=True).start()
            return job

    def stop(self) -> JobState | None:
        job = self._job
        if job is not None and not job.finished:
            job.stop_event.set()
            job.add_log(f"stop requested at step {job.current.step}")
        return job

    def _work(self, job: JobState) -> None:
        try:
            for run in job.runs:
                if job.stop_event.is_set() or any(r.status == "failed" for r in job.runs):
                    job.update(lambda run=run: setattr(run, "status", "skipped"))
                    continue
                self._train(job, run)
        finally:
            job.update(lambda: setattr(job, "finished", True))

    def _train(self, job: JobState, run: RunState) -> None:
        cfg = run.config
        captions = eval_captions(cfg)
        holder: dict[str, object] = {}

        def on_preview(images: torch.Tensor, step: int) -> None:
            images = images.detach().float().cpu().clone()
            trainer = holder.get("trainer")
            reward = float("nan")
            if trainer is not None and getattr(trainer, "reward", None) is not None:
                with torch.no_grad():
                    r = trainer.reward(images, captions)
                finite = r[torch.isfinite(r)]
                reward = float(finite.mean()) if finite.numel() else float("nan")

            def apply() -> None:
                if run.before is None:
                    run.before = images
                    run.loop_started = time.monotonic()
                run.latest, run.latest_step = images, step
                run.eval_rewards.append((step, reward))
                if step > 0 and job.first_preview_at is None:
                    job.first_preview_at = time.monotonic()
            job.update(apply)
            delta = "" if not run.eval_rewards or step == 0 else f" ({reward - run.eval_rewards[0][1]:+.4f})"
            job.add_log(f"{run.label}: step {step}: eval reward {reward:.4f}{delta}")

        def on_step(info) -> None:
            def apply() -> None:
                run.step = info.step
                if "reward_mean" in info.metrics:
                    run.train_rewards.append((info.step, float(info.metrics["reward_mean"])))
            job.update(apply)

        job.update(lambda: setattr(run, "status", "running"))
        job.add_log(f"{run.label}: run {cfg.run_name}: {cfg.estimator}, {cfg.steps} updates of batch "
                    f"{cfg.batch_size}, T={cfg.num_inference_steps}")
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            trainer = self._factory(cfg, on_step=on_step, on_preview=on_preview,
                                    should_stop=job.stop_event.is_set, progress=False)
            holder["trainer"] = trainer
            result = trainer.run()
        except Exception as e:  # noqa: BLE001 -- reported to the user; the traceback goes to the log
            msg = str(e).replace("\n", " ").strip() or type(e).__name__
            if not isinstance(e, USER_ERRORS):
                logger.exception("run %s failed", cfg.run_name)
                msg = f"{type(e).__name__}: {msg}"

            def failed() -> None:
                run.status, run.error, run.finished = "failed", msg, time.monotonic()
            job.update(failed)
            job.add_log(f"{run.label}: failed: {msg}")
            return
        finally:
            with self._lock:
                self.active -= 1

        def done() -> None:
            run.status = "stopped" if result.stopped_early else "done"
            run.step, run.lora_path, run.finished = result.steps_done, result.lora_path, time.monotonic()
        job.update(done)
        job.add_log(f"{run.label}: {run.status} after {result.steps_done} updates; LoRA saved")
