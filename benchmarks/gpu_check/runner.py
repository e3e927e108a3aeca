"""Running checks under a time budget: one record per check, saved after each, so a run cut short
(by the budget, a per-check time guard or a killed machine) still leaves every figure it measured.

A check is a function returning a record (a dict with at least ``status``: pass | fail | skipped).
``Checks.run`` skips it when the budget cannot cover its estimated time, stops it with a time guard
when it runs far past the estimate (both recorded as *skipped*, not failed), and records any
exception as a failure with its message, so the script goes on with the next check.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlr_backend.safe_io import atomic_path, save_json

logger = logging.getLogger(__name__)

STATUSES = ("pass", "fail", "skipped")


class CheckTimeout(Exception):
    """A check ran past its time guard."""


class Budget:
    """Wall-clock budget of the whole run, from its creation."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter, start: float | None = None):
        self.seconds, self.clock = float(seconds), clock
        self.start = clock() if start is None else start

    def used(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.seconds - self.used()

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


@contextlib.contextmanager
def time_guard(seconds: float) -> Iterator[None]:
    """Raise CheckTimeout in the main thread after ``seconds`` (SIGALRM; a no-op where there is none).
    Python runs the handler between bytecodes, so a long GPU kernel finishes first."""
    if not hasattr(signal, "setitimer") or seconds <= 0 or not math.isfinite(seconds):
        yield
        return

    def handler(signum, frame):
        raise CheckTimeout(f"stopped by the time guard after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def release_memory() -> None:
    """Free what a finished (or failed) check left: Python garbage, then CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finite(obj):
    """``obj`` with NaN / inf floats replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


class Checks:
    """The records of one run, saved as JSON (and rendered as markdown by ``render``) after each check."""

    def __init__(self, budget: Budget, meta: dict, json_path: Path | None = None, md_path: Path | None = None,
                 render: Callable[[dict], str] | None = None, guard_factor: float = 3.0, guard_min_s: float = 60.0):
        self.budget, self.meta, self.records = budget, meta, []
        self.json_path, self.md_path, self.render = json_path, md_path, render
        self.guard_factor, self.guard_min_s = guard_factor, guard_min_s

    def data(self) -> dict:
        counts = {s: sum(r["status"] == s for r in self.records) for s in STATUSES}
        return finite({**self.meta, "seconds": round(self.budget.used(), 1), "budget_s": self.budget.seconds,
                       "counts": counts, "checks": self.records})

    def save(self) -> None:
        data = self.data()
        if self.json_path is not None:
            save_json(data, self.json_path)
        if self.md_path is not None and self.render is not None:
            with atomic_path(self.md_path) as tmp:
                tmp.write_text(self.render(data))

    def add(self, record: dict) -> dict:
        if record.get("status") not in STATUSES:
            raise ValueError(f"check {record.get('name')!r}: status must be one of {STATUSES}, got "
                             f"{record.get('status')!r}")
        self.records.append(record)
        logger.info("%-44s %-7s %s", record["name"], record["status"], record.get("summary", record.get("reason", "")))
        self.save()
        return record

    def skip(self, name: str, group: str, reason: str, **extra) -> dict:
        return self.add({"name": name, "group": group, "status": "skipped", "reason": reason, **extra})

    def run(self, name: str, group: str, fn: Callable[[], dict], estimate_s: float) -> dict:
        """Run ``fn`` as check ``name`` if the budget covers ``estimate_s``; record what it returns."""
        left = self.budget.left()
        if not self.budget.allows(estimate_s):
            return self.skip(name, group, f"time budget: needs ~{estimate_s:.0f} s, {max(left, 0):.0f} s left")
        t0 = time.perf_counter()
        try:
            with time_guard(min(left, max(self.guard_factor * estimate_s, self.guard_min_s))):
                record = fn()
        except CheckTimeout as e:
            record = {"status": "skipped", "reason": f"time guard: {e}"}
        except Exception as e:  # a check's failure is recorded and the run goes on (its traceback is logged)
            logger.error("check %s failed:\n%s", name, traceback.format_exc())
            record = {"status": "fail", "reason": f"{type(e).__name__}: {e}"}
        finally:
            release_memory()
        return self.add({"name": name, "group": group, **record, "check_seconds": round(time.perf_counter() - t0, 2)})

    def failed(self) -> list[dict]:
        return [r for r in self.records if r["status"] == "fail"]
