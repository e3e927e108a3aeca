"""A run's folder: what may be in it, when a start may use it, and its metrics file.

A run folder holds only its own files: a symbolic link anywhere in it (or the folder itself being
one) is refused, so no read or write can be sent outside. Starting a run in ``OUTPUT_DIR/RUN_NAME``:

* no folder, an empty one, or one left by a run killed before its first checkpoint (same options):
  the run starts at step 0, with or without ``--resume``;
* a folder with a checkpoint: ``--resume`` continues from it (checked whole first), a plain start is
  refused;
* other options than the folder's ``config.json`` (apart from ``steps``, and the folder's own place,
  so a moved or copied run folder can be resumed): refused, naming the options that differ.

Nothing in the folder changes until all of this has been checked. ``metrics.jsonl`` is strict JSON
(``null`` for NaN), appended one line per update and, on resume, rewritten atomically up to the
checkpoint's step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..safe_io import TEMP_PREFIX, append_line, child, dumps_json, one_line, refuse_symlinks, write_bytes
from .checkpoint import latest_checkpoint
from .config import TrainConfig

logger = logging.getLogger(__name__)

#: config fields a resumed run may change: the length, and where the folder lives
MAY_CHANGE = ("steps", "output_dir", "run_name")


@dataclass(frozen=True)
class RunFolder:
    path: Path
    saved: TrainConfig | None  # config.json, None for a new folder
    checkpoint: Path | None  # the checkpoint to resume from


def read_config(run_dir: Path) -> TrainConfig | None:
    """The folder's ``config.json`` as a TrainConfig (None if absent); one-line errors when it is damaged."""
    path = run_dir / "config.json"
    if not path.exists() and not path.is_symlink():
        return None
    path = child(run_dir, "config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return TrainConfig.from_json(data)
    except KeyError as e:
        raise ValueError(f"{path} is damaged (it has no {e.args[0]!r}); it cannot be resumed") from None
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path} is damaged ({one_line(e)[:200]}); it cannot be resumed") from None
    except ValueError as e:
        raise ValueError(f"{path} holds an invalid config ({one_line(e)[:200]})") from None


def config_differences(saved: TrainConfig, given: TrainConfig) -> list[str]:
    """'name (run: a, now: b)' for every option that differs, apart from :data:`MAY_CHANGE`."""
    out = []
    for f in fields(TrainConfig):
        a, b = getattr(saved, f.name), getattr(given, f.name)
        if f.name not in MAY_CHANGE and a != b:
            show = (lambda v: [p.fine for p in v]) if f.name == "prompts" else (lambda v: v)
            out.append(f"{f.name} (run: {show(a)!r}, now: {show(b)!r})")
    return out


def resume_lr(config: TrainConfig, resume: bool, lr_given: bool) -> TrainConfig:
    """``--resume`` without ``--lr``: ``config`` at the rate in the run's config.json (its estimator's default
    when it started may differ from today's: runs saved before the per-estimator defaults trained at 3e-3);
    else ``config`` unchanged. A damaged config.json is named here as ``open_run_folder`` would."""
    run_dir = config.run_dir
    if lr_given or not resume or run_dir.is_symlink() or not run_dir.is_dir():
        return config
    saved = read_config(run_dir)
    if saved is None or saved.lr is None or saved.lr == config.lr:
        return config
    logger.info("--resume without --lr: the run's learning rate %g (config.json), not today's default %g",
                saved.lr, config.lr)
    return replace(config, lr=saved.lr)


def _only_temporary(run_dir: Path) -> bool:
    return all(p.name.startswith(TEMP_PREFIX) for p in run_dir.iterdir())


def open_run_folder(config: TrainConfig, resume: bool) -> RunFolder:
    """Check that ``config`` may start (or, with ``resume``, continue) in its run folder; writes nothing."""
    out, run_dir = Path(config.output_dir), config.run_dir
    if run_dir.is_symlink():
        raise ValueError(f"run folder {run_dir} is a symbolic link; refused (choose another --run-name)")
    if out.exists() and run_dir.resolve().parent != out.resolve():
        raise ValueError(f"run folder {run_dir} resolves outside {out}; refused")
    if not run_dir.exists():
        if resume:
            logger.info("%s does not exist yet: nothing to resume, starting at step 0", run_dir)
        return RunFolder(run_dir, None, None)
    if not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} exists and is not a folder; choose another --run-name")
    refuse_symlinks(run_dir)
    saved = read_config(run_dir)
    if saved is None:
        if _only_temporary(run_dir):  # killed before config.json was written
            return RunFolder(run_dir, None, None)
        raise FileExistsError(f"{run_dir} already exists and is not a run folder (no config.json); choose another "
                              "--run-name")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise FileExistsError(f"run folder {run_dir} already exists; use --resume or another --run-name")
    diff = config_differences(saved, config)
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ValueError(f"{'--resume: ' if resume else ''}the options differ from {run_dir / 'config.json'} in "
                         f"{'; '.join(diff[:3])}{more}; use the run's options (only --steps may change) or another "
                         "--run-name")
    if ckpt is None:
        logger.info("%s has no checkpoint yet (killed before the first one?): starting at step 0", run_dir)
    return RunFolder(run_dir, saved, ckpt)


# -- metrics.jsonl ------------------------------------------------------------------------------------
def read_metrics(path: Path, upto: int) -> list[dict]:
    """Rows of ``metrics.jsonl`` with 0 <= step <= ``upto``, one per step (step 0 is the evaluation before
    training; a line cut short by a crash, or anything that is not a row, is dropped with a warning)."""
    if not path.is_file():
        return []
    rows: dict[int, dict] = {}
    dropped = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            dropped += bool(line.strip())
            continue
        if step <= upto:
            rows[step] = row
    if dropped:
        logger.warning("%s: dropped %d line(s) that are not metrics rows (cut short by a crash?)", path, dropped)
    return [rows[s] for s in sorted(rows)]


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    write_bytes("".join(dumps_json(r) + "\n" for r in rows).encode(), path)


def append_metrics(path: Path, row: dict) -> None:
    append_line(path, dumps_json(row))

