"""The Gradio app: pick prompts and rewards, press Train, watch the samples improve.

    python gradio_app.py [--host 127.0.0.1] [--port 7860] [--models-dir DIR] [--output-dir runs] [--auth USER:PASS]

An adapter only: ``rlr_app.form`` turns form values into a ``TrainConfig``, the backend's ``RunManager``
(a worker thread owned by the app, one job at a time) trains it, ``rlr_app.render`` draws the job's
state, and this module wires them to Gradio components. Closing or reloading the page does not stop
a run; a reopened page shows it. Gradio is imported only inside ``build_ui`` and ``main``.
"""

from __future__ import annotations

import argparse
import atexit
import html
import inspect
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from rlr_app.form import (ADVANCED_FIELDS, CFG_FIELDS, DEFAULT_MODEL, FORM_KEYS, LABELS, MAIN_FIELDS, MODEL_LOCK,
                          Settings, check_form, config_to_form, form_defaults, is_int_field, is_model_reward,
                          list_models, list_runs, new_run_name, number, parse_prompts, reward_facts)
from rlr_app.render import (before_vs_now, curve_figure, curve_image, png_file, scrub, stage_downloads, status_html,
                            to_pil)
from rlr_backend.choices import ESTIMATOR_CHOICES, POSITION_TARGETS, REWARD_ARGS
from rlr_backend.estimators import ESTIMATORS
from rlr_backend.rewards import REWARD_HELP, REWARDS, make_reward
from rlr_backend.safe_io import refuse_symlinks
from rlr_backend.train import TrainConfig
from rlr_backend.train.runner import RunInProgress, RunManager

__all__ = ["FORM_KEYS", "Settings", "build_ui", "check_form", "curve_figure", "curve_image", "form_defaults",
           "list_models", "main", "parser"]

logger = logging.getLogger("rlr_app")


# -- the page ---------------------------------------------------------------------------------------
def build_ui(settings: Settings, manager: RunManager | None = None):
    """The gr.Blocks page; ``manager`` owns the training worker (one per app)."""
    import gradio as gr

    def trainer(cfg, **kw):
        from rlr_backend.train import Trainer

        with MODEL_LOCK:  # loads the pipeline and the reward
            return Trainer(cfg, **kw)

    manager = manager or RunManager(trainer)
    for name in REWARDS:
        reward_facts(name)  # now, before requests come: later a pipeline load may hold the lock
    defaults = form_defaults()
    compare_cache: dict[str, object] = {}

    def component(name: str):
        f = CFG_FIELDS[name]
        label, info = LABELS.get(name, name.replace("_", " ").capitalize()), f.metadata["help"]
        info = None if info.lower() == label.lower() else info
        if "choices" in f.metadata:
            return gr.Dropdown(list(f.metadata["choices"]), value=defaults[name], label=label, info=info)
        return gr.Number(value=defaults[name], label=label, info=info, step=1 if is_int_field(name) else None)

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
                values.append([(png_file(im, settings), cap) for im, cap in before_vs_now(job.current)])
            elif key == "curve":
                values.append(png_file(curve_image(job), settings))
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

    def run_advise(*values, progress=gr.Progress()):
        from rlr_backend.advise import advise, format_advice

        errors, kw = check_form(dict(zip(FORM_KEYS, values)), settings)
        if errors:
            raise gr.Error("; ".join(f"{k.removeprefix('w:')}: {v}" for k, v in errors.items()))
        if manager.busy():
            raise gr.Error("a training run is in progress; advise when it has finished (both need the machine)")
        cfg = TrainConfig(**kw, output_dir=settings.output_dir, run_name="advise")
        with MODEL_LOCK:
            result = advise(cfg, batches=4, progress=lambda done, total, what: progress(done / total, desc=what))
        return "```\n" + scrub(format_advice(result), settings) + "\n```"

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
        return (f"stopping at the next model call: update {job.current.step + 1} (in progress) is dropped, the LoRA "
                f"of update {job.current.step} will be saved")

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
        def dropdown(names, value):
            return gr.Dropdown(choices=names, value=value if value in names else (names[0] if names else None))

        return (dropdown(list_runs(settings.output_dir), current),
                dropdown(list_runs(settings.output_dir, with_lora=True), current_lora))

    def show_run(name):
        if not name:
            return None, None, None, "no run selected"
        if name not in list_runs(settings.output_dir):
            raise gr.Error(f"unknown run {name!r}; press refresh")
        run_dir = settings.output_dir / name
        cfg = run_config(run_dir)  # refuses a run folder holding a symbolic link
        files = stage_downloads(settings, run_dir)
        pics = {n: f for f in files for n in ("before_after.png", "reward_curve.png") if f.endswith(f"-{n}")}
        summary = (f"**{html.escape(name)}**: {cfg.estimator}, reward {html.escape(cfg.reward)}, {cfg.steps} updates "
                   f"of batch {cfg.batch_size}" + ("" if (run_dir / "lora.safetensors").is_file()
                                                   else " (no LoRA yet: the run did not finish)"))
        return files or None, pics.get("before_after.png"), pics.get("reward_curve.png"), summary

    def run_config(run_dir: Path) -> TrainConfig:
        try:
            refuse_symlinks(run_dir)
        except ValueError:
            raise gr.Error(f"run {run_dir.name[:80]!r} holds a symbolic link; refused (a run folder holds only its "
                           "own files)") from None
        try:
            return TrainConfig.from_json(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise gr.Error(f"{run_dir.name[:80]}/config.json is not readable ({type(e).__name__})") from None

    def sample_compare(name, prompt, seed, strength, num):
        from rlr_backend.train.pipeline import load_pipeline
        from rlr_backend.train.prompts import resolve_prompt
        from rlr_backend.train.sample import add_lora_file, sample_images, set_lora_strength

        if name not in list_runs(settings.output_dir, with_lora=True):
            raise gr.Error(f"unknown run {name!r}; choose a finished run (press refresh)")
        try:
            (prompt_spec,) = parse_prompts(prompt)
        except ValueError as e:
            raise gr.Error(f"prompt: {e}") from None
        seed, err = number(seed, True)
        if err or not 0 <= seed < 2**63:
            raise gr.Error(f"seed: {err or 'must be between 0 and 2^63 - 1'}")
        num, err = number(num, True)
        if err or not 1 <= num <= 8:
            raise gr.Error(f"images: {err or 'between 1 and 8'}")
        strength, err = number(strength, False)
        if err or not -2 <= strength <= 3:
            raise gr.Error(f"strength: {err or 'between -2 and 3'}")
        run_dir = settings.output_dir / name
        cfg = run_config(run_dir)
        models = {None if p is None else str(p): label for label, p in list_models(settings.models_dir).items()}
        if cfg.model not in models:
            raise gr.Error(f"the run's model is not in the model list (models dir {scrub(str(cfg.model), settings)})")
        lora = run_dir / "lora.safetensors"
        key = f"{name}:{lora.stat().st_mtime_ns}"
        if compare_cache.get("key") != key:
            compare_cache.clear()
            with MODEL_LOCK:
                pipe = load_pipeline(cfg.model, **cfg.single_file_options())
                add_lora_file(pipe, lora)
            compare_cache.update(key=key, pipe=pipe)
        pipe = compare_cache["pipe"]
        kw = dict(num_per_prompt=num, steps=cfg.num_inference_steps, eta=cfg.eta,
                  guidance_scale=cfg.guidance_scale, seed=seed, prompt_split=cfg.prompt_split)
        spec = resolve_prompt(prompt_spec, cfg.prompts)  # a trained 'coarse | mid | fine' prompt: as trained
        set_lora_strength(pipe, 0.0)
        base = sample_images(pipe, [spec], **kw)
        set_lora_strength(pipe, strength)
        tuned = sample_images(pipe, [spec], **kw)
        scale = max(1, 128 // base.shape[-1])
        return ([(png_file(im, settings), f"base #{i + 1}") for i, im in enumerate(to_pil(base, scale))]
                + [(png_file(im, settings), f"base + LoRA x{strength:g} #{i + 1}")
                   for i, im in enumerate(to_pil(tuned, scale))])

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
                rule = [r for r in REWARDS if not is_model_reward(r)]
                learned = [r for r in REWARDS if is_model_reward(r)]
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
                        if any(r in REWARD_ARGS for r in names):
                            with gr.Row():
                                inputs["a:position"] = gr.Dropdown(
                                    list(POSITION_TARGETS), value=defaults["a:position"], allow_custom_value=True,
                                    label="position: target", info="left, right, top, bottom, center, or X:Y in 0-1 "
                                                                   "(0:0 = top left)")
                                inputs["a:size"] = gr.Number(defaults["a:size"], label="size: target fraction",
                                                             info="of the image the shape covers, between 0 and 1",
                                                             minimum=0.01, maximum=0.99, step=0.05)
                inputs["estimator"] = gr.Dropdown(list(ESTIMATOR_CHOICES), value=defaults["estimator"],
                                                  label="Estimator",
                                                  info=CFG_FIELDS["estimator"].metadata["help"] + "; " + "; ".join(
                                                      f"{k}: {v.summary}" for k, v in ESTIMATORS.items()
                                                      if k in ("rlr", "ddpo", "truncated_bp", "full_bp")))
                with gr.Row():
                    for name in MAIN_FIELDS:
                        inputs[name] = component(name)
                with gr.Accordion("Advanced", open=False):
                    for i in range(0, len(ADVANCED_FIELDS), 2):
                        with gr.Row():
                            for name in ADVANCED_FIELDS[i:i + 2]:
                                inputs[name] = component(name)
                    with gr.Row():
                        help_ho = CFG_FIELDS["ho_range"].metadata["help"] + "; 0 and 0: anywhere"
                        inputs["ho_from"] = gr.Number(defaults["ho_from"], label="HO step range: from", info=help_ho,
                                                      step=1)
                        inputs["ho_to"] = gr.Number(defaults["ho_to"], label="HO step range: to", step=1)
                with gr.Accordion("Compare estimators", open=False):
                    gr.Markdown("Train RLR, then a baseline, on the same prompts, seeds and sample budget; "
                                "the live curve overlays both.")
                    baseline = gr.Dropdown([e for e in sorted(ESTIMATORS) if e != "rlr"], value="ddpo",
                                           label="Baseline")
                    compare_btn = gr.Button("Run RLR, then the baseline")
                with gr.Accordion("Which estimator? (rlr-advise)", open=False):
                    gr.Markdown("Measures each estimator's truncation bias, noise x cost and peak memory on this "
                                "model, reward and prompts (4 batches; about 2 minutes on the embedded model on a "
                                "CPU) and recommends one. Trains nothing, writes nothing.")
                    advise_btn = gr.Button("Advise")
                    advice = gr.Markdown(elem_id="advice")
            with gr.Column(scale=3):
                with gr.Row():
                    train_btn = gr.Button("Train", variant="primary", elem_id="train")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                notice = gr.Markdown(elem_id="notice")
                with gr.Tabs():
                    with gr.Tab("Live"):
                        status = gr.HTML(status_html(None, settings))
                        gallery = gr.Gallery(label="Fixed-seed samples: before (top row) vs now (bottom row)",
                                             columns=4, format="png",
                                             height="auto", object_fit="contain", elem_id="gallery")
                        curve = gr.Image(label="Reward", type="filepath", format="png", interactive=False,
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
                        cmp_gallery = gr.Gallery(label="Base (first row) vs base + LoRA", columns=4, height="auto",
                                                 format="png")

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
        _name_parameters(run_advise, FORM_KEYS)
        advise_btn.click(run_advise, form, advice, api_name="advise", trigger_mode="once")
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
    """Give a ``*values`` function named parameters (``w:brightness`` -> ``w_brightness``) for Gradio's API page;
    its own keyword parameters (a ``progress=gr.Progress()``) are kept after them."""
    params = [inspect.Parameter(k.replace(":", "_"), inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in keys]
    params += [q for q in inspect.signature(fn).parameters.values() if q.kind == inspect.Parameter.KEYWORD_ONLY]
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
    # Gradio's cache (the only folder it serves files from, and where Gradio keeps its own state) is a
    # private temporary folder of this process, removed when it exits: nothing lands outside the run folders.
    cache = Path(tempfile.mkdtemp(prefix="rlr-app-"))
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a plain `kill` also runs the clean-up
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(cache / "examples")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from rlr_backend.models.default_model import DEFAULT_MODEL_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    demo = build_ui(settings)
    threading.Thread(target=_warm_up, name="rlr-warm-up", daemon=True).start()
    blocked = [str(DEFAULT_MODEL_DIR.parent)] + ([str(settings.models_dir)] if settings.models_dir else [])
    logger.info("serving on http://%s:%d (output folder %s, cache %s)", args.host, args.port, output_dir, cache)
    demo.queue(max_size=32, default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=False, auth=auth, allowed_paths=[],
        blocked_paths=blocked, max_file_size="1mb", show_error=False, ssr_mode=False, run_history=False,
        enable_monitoring=False, mcp_server=False, quiet=True)
    return 0


def _warm_up() -> None:
    """Import the model code while the page loads, so the first Train does not wait for it."""
    from rlr_backend.cli import quiet_libraries
    from rlr_backend.train.pipeline import load_pipeline

    try:
        with MODEL_LOCK:
            quiet_libraries()  # no loading bars or torchvision notices in the app's log
            load_pipeline(None)
            make_reward(TrainConfig().reward)
    except Exception:  # noqa: BLE001 -- only a warm-up; the first run reports any real problem
        logger.exception("warm-up failed")


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
