"""What the app shows of a job, free of any UI library: the before/now pictures, the reward curve,
the status line, and the copies of a run's results that the app may serve."""

from __future__ import annotations

import hashlib
import html
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

from rlr_backend.images import grid_image, to_pil
from rlr_backend.safe_io import atomic_path, child, refuse_symlinks
from rlr_backend.train.runner import eval_captions

from .form import Settings

def before_vs_now(run) -> list[tuple[object, str]]:
    """One picture per evaluation prompt: its fixed-seed samples before training (top row) and now
    (bottom row), so the same seed is in the same column."""
    if run.before is None:
        return []
    k = run.config.eval_seeds
    scale = max(1, 128 // run.before.shape[-1])
    before, now = to_pil(run.before, scale), to_pil(run.latest, scale)
    return [(grid_image(before[p * k:(p + 1) * k] + now[p * k:(p + 1) * k], k, gap=4, row_gap=12),
             f"{caption}: step 0 (top) vs step {run.latest_step} (bottom)")
            for p, caption in enumerate(eval_captions(run.config)[::k])]


def curve_figure(job):
    """The live reward curve: per run, the batch reward of every update (faint) and the eval reward on
    the fixed seeds (dots). Matplotlib's object API, no pyplot: safe from any thread. (Gradio 6.31's
    LinePlot stops drawing lines when its data is updated, so the app sends this as an image.)"""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3), dpi=100)
    ax = fig.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, run in enumerate(job.runs):
        c = colors[i % len(colors)]
        if run.train_rewards:
            ax.plot(*zip(*run.train_rewards), color=c, alpha=0.35, lw=1, label=f"{run.label}: batch reward")
        evals = [(s, v) for s, v in run.eval_rewards if math.isfinite(v)]
        if evals:
            ax.plot(*zip(*evals), "o-", color=c, lw=2, ms=4, label=f"{run.label}: eval reward (fixed seeds)")
    ax.set_xlabel("update")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def curve_image(job):
    from PIL import Image

    buf = io.BytesIO()
    curve_figure(job).savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def status_html(job, settings: Settings, note: str = "") -> str:
    if job is None:
        body = "<b>idle</b>: no run yet. Set up on the left and press <b>Train</b>."
        return f"<div id='rlr-status'>{body}{_note(note)}</div>"
    run = job.current
    idx = job.runs.index(run) + 1
    state = "running" if not job.finished else ("failed" if run.status == "failed" else run.status)
    if job.stop_event.is_set() and not job.finished:
        state = "stopping"
    head = f"<b>{state}</b> · {html.escape(run.label)}"
    if len(job.runs) > 1:
        head += f" (run {idx} of {len(job.runs)})"
    head += f" · update {run.step} / {run.total}"
    sps = run.seconds_per_step()
    if sps:
        head += f" · {sps:.2f} s/update ({60 / sps:.1f} per min)"
        if not job.finished:
            left = (run.total - run.step) + sum(r.total for r in job.runs[idx:] if r.status == "queued")
            head += f" · ETA {_duration(left * sps)}"
    if job.first_preview_at is not None:
        head += f" · first refreshed gallery {job.first_preview_at - job.created:.1f} s after Train"
    done = sum(r.step for r in job.runs)
    total = sum(r.total for r in job.runs)
    bar = f"<progress value='{done}' max='{total}' style='width:100%'></progress>"
    err = "".join(f"<div style='color:#c00'>{html.escape(scrub(r.label + ': ' + r.error, settings))}</div>"
                  for r in job.runs if r.error)
    return f"<div id='rlr-status'>{head}{bar}{err}{_note(note)}</div>"


def _note(note: str) -> str:
    return f"<div><i>{html.escape(note)}</i></div>" if note else ""


def scrub(text: str, settings: Settings) -> str:
    """Hide host paths in messages shown in the page (they stay in the log)."""
    for path, label in ((settings.output_dir, "<output>"), (settings.models_dir, "<models>"), (Path.home(), "~")):
        if path is not None:
            text = text.replace(str(path), label)
    return text


def served_folder(settings: Settings) -> Path:
    """The app's cache folder: the only folder it serves files from (``rlr-app`` sets it to a private
    temporary folder; without it, Gradio's own default)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")


def stage_downloads(settings: Settings, run_dir: Path, names=("lora.safetensors", "before_after.png",
                                                              "reward_curve.png")) -> list[str]:
    """Copy a run's results into the served folder. Each copy replaces the last atomically, so a browser
    still downloading the previous copy reads it whole. A run folder holding a symbolic link is refused
    (ValueError): a link could make the app serve any file of the machine."""
    refuse_symlinks(run_dir)
    dest = served_folder(settings) / "downloads" / run_dir.name
    out = []
    for name in names:
        src = child(run_dir, name)
        if src.is_file():
            short = run_dir.name.encode()[:100].decode(errors="ignore")  # file names stay under 255 bytes
            target = dest / f"{short}-{name}"
            with atomic_path(target) as tmp:
                shutil.copy2(src, tmp)
            out.append(str(target))
    return out


def png_file(image, settings: Settings) -> str:
    """``image`` (PIL) as a PNG in the served folder, named by its content and written atomically.

    The app hands Gradio file paths, not PIL images: Gradio 6.31 saves a PIL output to a path named by its
    hash with a plain truncating write, so an unchanged image (the "before" row, re-sent with every
    refresh) was rewritten while a browser downloaded it ("Too much data for declared Content-Length")."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    target = served_folder(settings) / "images" / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not target.is_file():
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return str(target)
