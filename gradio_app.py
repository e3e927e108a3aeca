"""The Gradio app: pick prompts and rewards, press Train, watch the samples improve.

    python gradio_app.py [--host 127.0.0.1] [--port 7860] [--models-dir DIR] [--output-dir runs] [--auth USER:PASS]

An adapter only: it turns form values into a ``TrainConfig``, hands it to the backend's ``RunManager``
(a worker thread owned by the app, one job at a time) and renders the job's state. Closing or
reloading the page does not stop a run; a reopened page shows it. Gradio is imported inside
``build_ui`` and ``main``, so the form helpers here work without it and the backend never needs it.
"""

from __future__ import annotations

import argparse
import functools
import html
import inspect
import io
import ipaddress
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path

from rlr_backend.estimators import ESTIMATORS
from rlr_backend.rewards import REWARD_HELP, REWARDS, make_reward
from rlr_backend.train import TrainConfig, parse_prompt
from rlr_backend.train.runner import RunInProgress, RunManager, eval_captions

logger = logging.getLogger("rlr_app")

DEFAULT_MODEL = "default (embedded)"
MAX_PROMPTS, MAX_PROMPT_CHARS = 64, 1000
_CFG = {f.name: f for f in fields(TrainConfig)}
MAIN_FIELDS = ("steps", "lr", "lora_rank", "seed", "eval_every")
ADVANCED_FIELDS = ("batch_size", "images_per_prompt", "num_inference_steps", "eta", "guidance_scale", "h",
                   "fo_steps", "zo_mode", "nu", "truncation", "chain_len", "grad_clip", "grad_accum", "lora_alpha",
                   "eval_seeds", "ckpt_every")
#: Form keys in the order of the Train event's inputs (gradio_client callers pass them positionally).
FORM_KEYS: tuple[str, ...] = ("model", "prompts", *(f"w:{r}" for r in REWARDS), "estimator", *MAIN_FIELDS,
                              *ADVANCED_FIELDS, "ho_from", "ho_to")
LABELS = {"steps": "Steps (optimizer updates)", "lr": "Learning rate", "lora_rank": "LoRA rank",
          "eval_every": "Refresh the gallery every N updates", "lora_alpha": "LoRA alpha (0: the rank)"}
APP_DEFAULTS = {"eval_every": 5}  # the app evaluates more often than the CLI so the gallery moves
# Held while models or rewards are built: diffusers' loaders patch torch.nn globally for a moment (new
# parameters land on the "meta" device) and its lazy imports are not thread-safe, so two threads must
# not load at once (seen: a reward built during a pipeline load failed with "Cannot copy out of meta tensor").
_MODEL_LOCK = threading.RLock()


@dataclass(frozen=True)
class Settings:
    output_dir: Path
    models_dir: Path | None = None


# -- choices the server computes (never a user-typed path) ----------------------------------------
def list_models(models_dir: Path | None) -> dict[str, Path | None]:
    """Dropdown label -> model folder: the embedded default, then diffusers folders under ``models_dir``."""
    out: dict[str, Path | None] = {DEFAULT_MODEL: None}
    if models_dir is not None and models_dir.is_dir():
        for index in sorted(models_dir.glob("*/model_index.json")) + sorted(models_dir.glob("*/*/model_index.json")):
            rel = index.parent.relative_to(models_dir).as_posix()
            if not any(part.startswith(".") for part in rel.split("/")):
                out[rel] = index.parent
    return out


def list_runs(output_dir: Path, with_lora: bool = False) -> list[str]:
    """Run folders under ``output_dir`` (newest first); ``with_lora``: only those with a LoRA."""
    if not output_dir.is_dir():
        return []
    runs = [p for p in output_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            and (p / "config.json").is_file() and (not with_lora or (p / "lora.safetensors").is_file())]
    return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def _int_field(name: str) -> bool:
    return _CFG[name].type == "int"


def _reward_weights(spec: str) -> dict[str, float]:
    weights = {}
    for item in spec.split(","):
        name, _, w = item.strip().partition("=")
        weights[name.strip()] = float(w) if w else 1.0
    return weights


def config_to_form(cfg: TrainConfig, settings: "Settings") -> dict[str, object]:
    """Form values that reproduce ``cfg`` (a reopened page shows the settings of the run in progress)."""
    models = {None if p is None else str(p): label for label, p in list_models(settings.models_dir).items()}
    values: dict[str, object] = {"model": models.get(cfg.model, DEFAULT_MODEL),
                                 "prompts": "\n".join(" | ".join(p.versions()) if p.scheduled else p.fine
                                                      for p in cfg.prompts)}
    weights = _reward_weights(cfg.reward)
    values.update({f"w:{r}": weights.get(r, 0.0) for r in REWARDS})
    values["estimator"] = cfg.estimator
    for name in (*MAIN_FIELDS, *ADVANCED_FIELDS):
        values[name] = getattr(cfg, name)
    values["lora_alpha"] = cfg.lora_alpha or 0
    values["ho_from"], values["ho_to"] = cfg.ho_range or (0, 0)
    return values


def form_defaults() -> dict[str, object]:
    values = config_to_form(TrainConfig(), Settings(Path("runs")))
    values.update(APP_DEFAULTS)
    return values


# -- form -> TrainConfig, with one message per field -----------------------------------------------
def _number(value, integer: bool) -> tuple[float | int | None, str | None]:
    if value is None or value == "":
        return None, "enter a number"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None, f"must be a number, got {value!r}"
    if not math.isfinite(x):
        return None, f"must be a finite number, got {value}"
    if integer:
        if x != int(x):
            return None, f"must be a whole number, got {value}"
        return int(x), None
    return x, None


def parse_prompts(text: str) -> list:
    lines = [ln.strip() for ln in (text or "").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError("enter at least one prompt (one per line)")
    if len(lines) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts, got {len(lines)}")
    for i, line in enumerate(lines, 1):
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt {i} has {len(line)} characters; at most {MAX_PROMPT_CHARS}")
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in line):
            raise ValueError(f"prompt {i} contains control characters")
    return [parse_prompt(line) for line in lines]


@functools.lru_cache(maxsize=None)
def _reward_facts(name: str) -> tuple[bool, bool]:
    """(differentiable, is a model reward with local weights) of a registry reward."""
    with _MODEL_LOCK:
        reward = REWARDS[name]()  # model rewards touch no file until checked
    return bool(reward.differentiable), callable(getattr(reward, "check", None))


def _differentiable(name: str) -> bool:
    return _reward_facts(name)[0]


def _is_model_reward(name: str) -> bool:
    return _reward_facts(name)[1]


def check_form(values: dict, settings: Settings, estimator: str | None = None) -> tuple[dict[str, str], dict]:
    """(errors by form key, TrainConfig keyword arguments). Nothing here loads a model or writes a file."""
    errors: dict[str, str] = {}
    kw: dict[str, object] = {}
    models = list_models(settings.models_dir)
    model = values.get("model")
    if model not in models:
        errors["model"] = f"unknown model {model!r}; choose one from the list"
    elif models[model] is not None and not (models[model] / "model_index.json").is_file():
        errors["model"] = f"model folder {model!r} is missing; press refresh"
    else:
        kw["model"] = None if models[model] is None else str(models[model])
    try:
        kw["prompts"] = tuple(parse_prompts(values.get("prompts", "")))
    except ValueError as e:
        errors["prompts"] = str(e)
    parts = []
    for r in REWARDS:
        w, err = _number(values.get(f"w:{r}"), integer=False)
        if err:
            errors[f"w:{r}"] = f"weight {err}"
        elif w:
            parts.append((r, w))
    if not parts and not any(k.startswith("w:") for k in errors):
        errors[f"w:{next(iter(REWARDS))}"] = "set at least one reward weight (not 0)"
    kw["reward"] = ",".join(f"{r}={w!r}" for r, w in parts)
    for r, _ in parts:
        if _is_model_reward(r):
            try:  # model rewards check their weight files (headers only; no model is built)
                make_reward(r)
            except (ValueError, FileNotFoundError) as e:
                errors[f"w:{r}"] = str(e).replace("\n", " ")
    est = estimator or values.get("estimator")
    if est not in ESTIMATORS:
        errors["estimator"] = f"unknown estimator {est!r}; choose one of {sorted(ESTIMATORS)}"
    else:
        kw["estimator"] = est
        if parts and ESTIMATORS[est].needs_differentiable_reward and not all(_differentiable(r) for r, _ in parts):
            errors["estimator"] = f"{est} back-propagates the reward; choose differentiable rewards or rlr/ddpo/zo"
    for name in (*MAIN_FIELDS, *ADVANCED_FIELDS):
        if "choices" in _CFG[name].metadata:
            if values.get(name) not in _CFG[name].metadata["choices"]:
                errors[name] = f"choose one of {list(_CFG[name].metadata['choices'])}"
            kw[name] = values.get(name)
            continue
        x, err = _number(values.get(name), _int_field(name))
        lo = _CFG[name].metadata.get("min")
        if err is None and lo is not None and x < lo:
            err = f"must be >= {lo}, got {x}"
        if err:
            errors[name] = err
        kw[name] = x
    if "lora_alpha" not in errors:
        kw["lora_alpha"] = kw["lora_alpha"] or None
    a, err_a = _number(values.get("ho_from"), True)
    b, err_b = _number(values.get("ho_to"), True)
    if err_a or err_b:
        errors["ho_from" if err_a else "ho_to"] = err_a or err_b
    elif a or b:
        n = kw.get("num_inference_steps")
        if not (isinstance(n, int) and 1 <= a <= b <= n):
            errors["ho_from"] = f"need 1 <= from <= to <= sampling steps, got {a}..{b}"
        kw["ho_range"] = (a, b)
    if not errors:
        try:
            TrainConfig(**kw, output_dir=settings.output_dir, run_name="check")
        except ValueError as e:
            msg = str(e)
            key = next((k for k in FORM_KEYS if msg.startswith(k) or f"({k})" in msg.split(" must")[0]), "estimator")
            errors[key] = msg
    return errors, kw


def new_run_name(output_dir: Path, tag: str) -> str:
    base = time.strftime("%Y%m%d-%H%M%S") + "-" + tag
    name, i = base, 2
    while (output_dir / name).exists():
        name, i = f"{base}-{i}", i + 1
    return name


# -- rendering (plain data; build_ui wraps it in components) --------------------------------------
def _to_pil(images, scale: int):
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST) for a in arr]


def before_vs_now(run) -> list[tuple[object, str]]:
    """One picture per evaluation prompt: its fixed-seed samples before training (top row) and now
    (bottom row), so the same seed is in the same column."""
    from PIL import Image

    if run.before is None:
        return []
    k = run.config.eval_seeds
    scale = max(1, 128 // run.before.shape[-1])
    before, now = _to_pil(run.before, scale), _to_pil(run.latest, scale)
    w, h, gap, mid = before[0].width, before[0].height, 4, 12
    items = []
    for p, caption in enumerate(eval_captions(run.config)[::k]):
        canvas = Image.new("RGB", (k * w + (k - 1) * gap, 2 * h + mid), "white")
        for j in range(k):
            canvas.paste(before[p * k + j], (j * (w + gap), 0))
            canvas.paste(now[p * k + j], (j * (w + gap), h + mid))
        items.append((canvas, f"{caption}: step 0 (top) vs step {run.latest_step} (bottom)"))
    return items


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


def stage_downloads(settings: Settings, run_dir: Path, names=("lora.safetensors", "before_after.png",
                                                              "reward_curve.png")) -> list[str]:
    """Copy a run's results into the app's cache folder, the only folder the app serves files from."""
    dest = Path(os.environ.get("GRADIO_TEMP_DIR", settings.output_dir / ".gradio")) / "downloads" / run_dir.name
    out = []
    for name in names:
        src = run_dir / name
        if src.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / f"{run_dir.name}-{name}"
            shutil.copy2(src, target)
            out.append(str(target))
    return out


# -- the page ---------------------------------------------------------------------------------------
def build_ui(settings: Settings, manager: RunManager | None = None):
    """The gr.Blocks page; ``manager`` owns the training worker (one per app)."""
    import gradio as gr

    def trainer(cfg, **kw):
        from rlr_backend.train import Trainer

        with _MODEL_LOCK:  # loads the pipeline and the reward
            return Trainer(cfg, **kw)

    manager = manager or RunManager(trainer)
    for name in REWARDS:
        _reward_facts(name)  # now, before requests come: later a pipeline load may hold the lock
    defaults = form_defaults()
    compare_cache: dict[str, object] = {}

    def component(name: str):
        f = _CFG[name]
        label, info = LABELS.get(name, name.replace("_", " ").capitalize()), f.metadata["help"]
        info = None if info.lower() == label.lower() else info
        if "choices" in f.metadata:
            return gr.Dropdown(list(f.metadata["choices"]), value=defaults[name], label=label, info=info)
        return gr.Number(value=defaults[name], label=label, info=info, step=1 if _int_field(name) else None)

    def live(job, note="", last=None):
        """Outputs (status, gallery, curve, log, files); unchanged parts are skipped."""
        last = last if last is not None else {}
        out = {"status": status_html(job, settings, note)}
        if job is not None:
            run = job.current
            out["gallery"] = ("g", job.id, job.runs.index(run), run.latest_step, run.before is not None)
            out["curve"] = ("c", job.id, sum(len(r.train_rewards) + len(r.eval_rewards) for r in job.runs))
            out["log"] = ("l", job.id, len(job.log))
            out["files"] = ("f", job.id, job.finished)
        values = [out["status"]]
        for key in ("gallery", "curve", "log", "files"):
            if job is None or out[key] == last.get(key):
                values.append(gr.skip())
                continue
            last[key] = out[key]
            if key == "gallery":
                values.append(before_vs_now(job.current))
            elif key == "curve":
                values.append(curve_image(job))
            elif key == "log":
                values.append(scrub("\n".join(job.log[-200:]), settings))
            else:
                files = [f for r in job.runs if r.status in ("done", "stopped")
                         for f in stage_downloads(settings, r.config.run_dir)] if job.finished else []
                values.append(files or None)
        return values

    def stream(note=""):
        job, seen, last = manager.job, -1, {}
        if job is None:
            yield live(None, note, last)
            return
        while True:
            seen = job.wait(seen, timeout=1.0)
            snap = job.snapshot()
            yield live(snap, note, last)
            if snap.finished:
                return

    def start(values: tuple, runs_for) -> object:
        form = dict(zip(FORM_KEYS, values))
        errors, kw = check_form(form, settings, estimator=runs_for[0][1])
        if errors:
            raise gr.Error("; ".join(f"{k.removeprefix('w:')}: {v}" for k, v in errors.items()))
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        runs = []
        for label, est, tag in runs_for:
            cfg = TrainConfig(**{**kw, "estimator": est}, output_dir=settings.output_dir,
                              run_name=new_run_name(settings.output_dir, tag))
            runs.append((label, cfg))
        try:
            manager.start(runs)
            return ""
        except RunInProgress as e:
            return str(e)

    def train(*values):
        est = values[FORM_KEYS.index("estimator")]
        yield from stream(start(values, [(est, est, est)]))

    def compare(*values):
        *form, baseline = values
        yield from stream(start(tuple(form), [("rlr", "rlr", "cmp-rlr"), (baseline, baseline, f"cmp-{baseline}")]))

    def validate(*values):
        errors, _ = check_form(dict(zip(FORM_KEYS, values)), settings)
        return [gr.validate(k not in errors, errors.get(k, "")) for k in FORM_KEYS]

    def validate_compare(*values):
        *form, baseline = values
        errors, _ = check_form(dict(zip(FORM_KEYS, form)), settings, estimator="rlr")
        base_err = "" if baseline in ESTIMATORS and baseline != "rlr" else "choose a baseline other than rlr"
        if not base_err:
            b_errors, _ = check_form(dict(zip(FORM_KEYS, form)), settings, estimator=baseline)
            base_err = b_errors.get("estimator", "")
        return [gr.validate(k not in errors, errors.get(k, "")) for k in FORM_KEYS] + [
            gr.validate(not base_err, base_err)]

    def stop():
        job = manager.stop()
        if job is None or job.finished:
            return "no run in progress"
        return f"stopping after update {job.current.step + 1} (the update in progress); the LoRA will be saved"

    def restore_form():
        job = manager.job
        if job is None:
            return [gr.skip()] * len(FORM_KEYS)
        values = config_to_form(job.runs[0].config, settings)
        return [values[k] for k in FORM_KEYS]

    def refresh_models(current):
        names = list(list_models(settings.models_dir))
        return gr.Dropdown(choices=names, value=current if current in names else DEFAULT_MODEL)

    def refresh_runs(current=None, current_lora=None):
        runs, loras = list_runs(settings.output_dir), list_runs(settings.output_dir, with_lora=True)
        return (gr.Dropdown(choices=runs, value=current if current in runs else (runs[0] if runs else None)),
                gr.Dropdown(choices=loras, value=current_lora if current_lora in loras else (loras[0] if loras else None)))

    def show_run(name):
        if not name:
            return None, None, None, "no run selected"
        if name not in list_runs(settings.output_dir):
            raise gr.Error(f"unknown run {name!r}; press refresh")
        run_dir = settings.output_dir / name
        files = stage_downloads(settings, run_dir)
        pics = {Path(f).name.removeprefix(f"{name}-"): f for f in files}
        cfg = TrainConfig.from_json(json.loads((run_dir / "config.json").read_text()))
        summary = (f"**{html.escape(name)}**: {cfg.estimator}, reward {html.escape(cfg.reward)}, {cfg.steps} updates "
                   f"of batch {cfg.batch_size}" + ("" if (run_dir / "lora.safetensors").is_file()
                                                   else " (no LoRA yet: the run did not finish)"))
        return files or None, pics.get("before_after.png"), pics.get("reward_curve.png"), summary

    def sample_compare(name, prompt, seed, strength, num):
        from rlr_backend.train.pipeline import load_pipeline
        from rlr_backend.train.sample import add_lora_file, sample_images, set_lora_strength

        if name not in list_runs(settings.output_dir, with_lora=True):
            raise gr.Error(f"unknown run {name!r}; choose a finished run (press refresh)")
        try:
            (prompt_spec,) = parse_prompts(prompt)
        except ValueError as e:
            raise gr.Error(f"prompt: {e}") from None
        seed, err = _number(seed, True)
        if err or not 0 <= seed < 2**63:
            raise gr.Error(f"seed: {err or 'must be between 0 and 2^63 - 1'}")
        num, err = _number(num, True)
        if err or not 1 <= num <= 8:
            raise gr.Error(f"images: {err or 'between 1 and 8'}")
        strength, err = _number(strength, False)
        if err or not -2 <= strength <= 3:
            raise gr.Error(f"strength: {err or 'between -2 and 3'}")
        run_dir = settings.output_dir / name
        cfg = TrainConfig.from_json(json.loads((run_dir / "config.json").read_text()))
        models = {None if p is None else str(p): label for label, p in list_models(settings.models_dir).items()}
        if cfg.model not in models:
            raise gr.Error(f"the run's model is not in the model list (models dir {scrub(str(cfg.model), settings)})")
        lora = run_dir / "lora.safetensors"
        key = f"{name}:{lora.stat().st_mtime_ns}"
        if compare_cache.get("key") != key:
            compare_cache.clear()
            with _MODEL_LOCK:
                pipe = load_pipeline(cfg.model)
                add_lora_file(pipe, lora)
            compare_cache.update(key=key, pipe=pipe)
        pipe = compare_cache["pipe"]
        kw = dict(num_per_prompt=num, steps=cfg.num_inference_steps, eta=cfg.eta,
                  guidance_scale=cfg.guidance_scale, seed=seed)
        set_lora_strength(pipe, 0.0)
        base = sample_images(pipe, [prompt_spec.fine], **kw)
        set_lora_strength(pipe, strength)
        tuned = sample_images(pipe, [prompt_spec.fine], **kw)
        scale = max(1, 128 // base.shape[-1])
        return ([(im, f"base #{i + 1}") for i, im in enumerate(_to_pil(base, scale))]
                + [(im, f"base + LoRA x{strength:g} #{i + 1}") for i, im in enumerate(_to_pil(tuned, scale))])

    with gr.Blocks(title="RLR reward fine-tuning", analytics_enabled=False) as demo:
        gr.Markdown("## RLR reward fine-tuning\nPick prompts and a reward, press **Train**, and watch the same "
                    "seeds' samples move toward the reward (top: before training, bottom: now).")
        with gr.Row():
            with gr.Column(scale=2, min_width=360):
                inputs: dict[str, object] = {}
                with gr.Row():
                    inputs["model"] = gr.Dropdown(list(list_models(settings.models_dir)), value=DEFAULT_MODEL,
                                                  label="Model", info="diffusers folders found under --models-dir",
                                                  scale=4)
                    model_refresh = gr.Button("refresh", scale=1, size="sm")
                inputs["prompts"] = gr.Textbox(
                    defaults["prompts"], lines=4, max_lines=12, label="Prompts",
                    info="one per line; 'coarse | mid | fine' gives three versions used over the first, middle and "
                         "last third of the sampling steps (the reward sees the fine one)")
                rule = [r for r in REWARDS if not _is_model_reward(r)]
                learned = [r for r in REWARDS if _is_model_reward(r)]
                for title, names, is_open in (("Rewards (weights; 0 = not used)", rule, True),
                                              ("Reward models (local weights, $RLR_REWARD_MODELS)", learned, False)):
                    if not names:
                        continue
                    with gr.Accordion(title, open=is_open):
                        for i in range(0, len(names), 3):
                            with gr.Row():
                                for r in names[i:i + 3]:
                                    inputs[f"w:{r}"] = gr.Number(defaults[f"w:{r}"], label=r, min_width=100,
                                                                 info=REWARD_HELP.get(r))
                inputs["estimator"] = gr.Dropdown(sorted(ESTIMATORS), value=defaults["estimator"], label="Estimator",
                                                  info="; ".join(f"{k}: {v.summary}" for k, v in ESTIMATORS.items()
                                                                 if k in ("rlr", "ddpo", "truncated_bp")))
                with gr.Row():
                    for name in MAIN_FIELDS:
                        inputs[name] = component(name)
                with gr.Accordion("Advanced", open=False):
                    for i in range(0, len(ADVANCED_FIELDS), 2):
                        with gr.Row():
                            for name in ADVANCED_FIELDS[i:i + 2]:
                                inputs[name] = component(name)
                    with gr.Row():
                        help_ho = _CFG["ho_range"].metadata["help"] + "; 0 and 0: anywhere"
                        inputs["ho_from"] = gr.Number(defaults["ho_from"], label="HO step range: from", info=help_ho,
                                                      step=1)
                        inputs["ho_to"] = gr.Number(defaults["ho_to"], label="HO step range: to", step=1)
                with gr.Accordion("Compare estimators", open=False):
                    gr.Markdown("Train RLR, then a baseline, on the same prompts, seeds and sample budget; "
                                "the live curve overlays both.")
                    baseline = gr.Dropdown([e for e in sorted(ESTIMATORS) if e != "rlr"], value="ddpo",
                                           label="Baseline")
                    compare_btn = gr.Button("Run RLR, then the baseline")
            with gr.Column(scale=3):
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", elem_id="train")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                notice = gr.Markdown(elem_id="notice")
                with gr.Tabs():
                    with gr.Tab("Live"):
                        status = gr.HTML(status_html(None, settings))
                        gallery = gr.Gallery(label="Fixed-seed samples: before (top row) vs now (bottom row)", columns=4, format="png",
                                             height="auto", object_fit="contain", elem_id="gallery")
                        curve = gr.Image(label="Reward", type="pil", format="png", interactive=False,
                                         elem_id="curve", buttons=["download"])
                        log = gr.Textbox(label="Log", lines=5, max_lines=10, autoscroll=True, interactive=False)
                        files = gr.File(label="Downloads (LoRA, grid, curve)", file_count="multiple",
                                        interactive=False)
                    with gr.Tab("Results"):
                        with gr.Row():
                            # custom values: the run list grows after the page loads; a name is used only
                            # if list_runs() finds it under the output folder
                            run_dd = gr.Dropdown([], label="Run", scale=4, allow_custom_value=True)
                            runs_refresh = gr.Button("refresh", scale=1, size="sm")
                        run_summary = gr.Markdown()
                        run_files = gr.File(label="Downloads", file_count="multiple", interactive=False)
                        with gr.Row():
                            run_grid = gr.Image(label="Before / after", type="filepath", interactive=False)
                            run_curve = gr.Image(label="Reward curve", type="filepath", interactive=False)
                    with gr.Tab("Compare"):
                        with gr.Row():
                            cmp_run = gr.Dropdown([], label="Run with a LoRA", scale=4, allow_custom_value=True)
                            cmp_refresh = gr.Button("refresh", scale=1, size="sm")
                        cmp_prompt = gr.Textbox(TrainConfig().prompts[0].fine, label="Prompt", max_lines=1)
                        with gr.Row():
                            cmp_seed = gr.Number(0, label="Seed", step=1)
                            cmp_strength = gr.Slider(-2, 3, value=1.0, step=0.05, label="LoRA strength")
                            cmp_num = gr.Number(4, label="Images", step=1)
                        cmp_btn = gr.Button("Sample base and base + LoRA")
                        cmp_gallery = gr.Gallery(label="Base (first row) vs base + LoRA", columns=4, height="auto", format="png")

        form = [inputs[k] for k in FORM_KEYS]
        for key, comp in inputs.items():
            comp.elem_id = "f-" + key.replace(":", "-")  # stable handles for browser tests and custom CSS
        _name_parameters(train, FORM_KEYS)  # API parameter names; validation messages name the field
        _name_parameters(compare, (*FORM_KEYS, "baseline"))
        outs = [status, gallery, curve, log, files]
        train_btn.click(train, form, outs, api_name="train", validator=validate, concurrency_limit=None,
                        trigger_mode="once", show_progress="hidden")
        compare_btn.click(compare, [*form, baseline], outs, api_name="compare_estimators",
                          validator=validate_compare, concurrency_limit=None, trigger_mode="once",
                          show_progress="hidden")
        stop_btn.click(stop, None, notice, api_name="stop", concurrency_limit=None)
        demo.load(stream, None, outs, api_name="watch", concurrency_limit=None, show_progress="hidden")
        demo.load(restore_form, None, form, api_visibility="private", show_progress="hidden")
        model_refresh.click(refresh_models, inputs["model"], inputs["model"], api_name="refresh_models")
        for btn in (runs_refresh, cmp_refresh):
            btn.click(refresh_runs, [run_dd, cmp_run], [run_dd, cmp_run], api_name=False)
        demo.load(refresh_runs, None, [run_dd, cmp_run], api_name="refresh_runs")
        run_dd.change(show_run, run_dd, [run_files, run_grid, run_curve, run_summary], api_name="show_run")
        cmp_btn.click(sample_compare, [cmp_run, cmp_prompt, cmp_seed, cmp_strength, cmp_num], cmp_gallery,
                      api_name="compare_lora")
    return demo


def _name_parameters(fn, keys) -> None:
    """Give a ``*values`` function named parameters (``w:brightness`` -> ``w_brightness``) for Gradio's API page."""
    params = [inspect.Parameter(k.replace(":", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in keys]
    fn.__signature__ = inspect.Signature(params)


# -- launch -----------------------------------------------------------------------------------------
def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rlr-app", description="The RLR training app in a browser tab.")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only); others need --auth")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    ap.add_argument("--models-dir", type=Path, help="folder whose diffusers model folders the model list shows")
    ap.add_argument("--output-dir", type=Path, default=Path("runs"), help="folder for run folders (default runs)")
    ap.add_argument("--auth", help="USER:PASSWORD required to open the page (or set RLR_APP_AUTH)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    auth_text = args.auth or os.environ.get("RLR_APP_AUTH")
    auth = None
    if auth_text:
        user, _, password = auth_text.partition(":")
        if not user or not password:
            print("rlr-app: error: --auth must be USER:PASSWORD", file=sys.stderr)
            return 2
        auth = (user, password)
    if not _loopback(args.host) and auth is None:
        print(f"rlr-app: error: --host {args.host} would expose the app to the network; set --auth USER:PASSWORD "
              "(or RLR_APP_AUTH), or keep the default 127.0.0.1", file=sys.stderr)
        return 2
    if args.models_dir is not None and not args.models_dir.is_dir():
        print(f"rlr-app: error: --models-dir {args.models_dir} is not a folder", file=sys.stderr)
        return 2
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(output_dir, args.models_dir.resolve() if args.models_dir else None)
    # Gradio's cache (the only folder it serves files from) lives inside the output folder.
    os.environ["GRADIO_TEMP_DIR"] = str(output_dir / ".gradio")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(output_dir / ".gradio" / "examples")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from rlr_backend.models.default_model import DEFAULT_MODEL_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    demo = build_ui(settings)
    threading.Thread(target=_warm_up, name="rlr-warm-up", daemon=True).start()
    blocked = [str(DEFAULT_MODEL_DIR.parent)] + ([str(settings.models_dir)] if settings.models_dir else [])
    logger.info("serving on http://%s:%d (output folder %s)", args.host, args.port, output_dir)
    demo.queue(max_size=32, default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=False, auth=auth, allowed_paths=[],
        blocked_paths=blocked, max_file_size="1mb", show_error=False, ssr_mode=False, run_history=False,
        enable_monitoring=False, mcp_server=False, quiet=True)
    return 0


def _warm_up() -> None:
    """Import the model code while the page loads, so the first Train does not wait for it."""
    from rlr_backend.cli import _quiet_libraries
    from rlr_backend.train.pipeline import load_pipeline

    try:
        with _MODEL_LOCK:
            _quiet_libraries()  # no loading bars or torchvision notices in the app's log
            load_pipeline(None)
            make_reward(TrainConfig().reward)
    except Exception:  # noqa: BLE001 -- only a warm-up; the first run reports any real problem
        logger.exception("warm-up failed")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
