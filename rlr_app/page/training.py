"""Train and Stop, and the Live tab: status, fixed-seed gallery, reward curve, log and downloads of the job."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from rlr_backend.train import TrainConfig
from rlr_backend.train.runner import RunInProgress

from ..form import DDIM_FIELDS, FORM_KEYS, check_form, config_to_form, model_is_flow, new_run_name
from ..render import before_vs_now, curve_image, png_file, scrub, stage_downloads, status_html
from .common import Page, name_parameters
from .form_panel import FormPanel


@dataclass
class Controls:
    train: gr.Button
    stop: gr.Button
    notice: gr.Markdown


@dataclass
class Live:
    status: gr.HTML
    gallery: gr.Gallery
    curve: gr.Image
    log: gr.Textbox
    files: gr.File

    @property
    def outputs(self) -> list:
        return [self.status, self.gallery, self.curve, self.log, self.files]


def build_controls() -> Controls:
    with gr.Row():
        train = gr.Button("Train", variant="primary", elem_id="train")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
    return Controls(train, stop, gr.Markdown(elem_id="notice"))


def build_live(page: Page) -> Live:
    status = gr.HTML(status_html(None, page.settings))
    gallery = gr.Gallery(label="Fixed-seed samples: before (top row) vs now (bottom row)", columns=4, format="png",
                         height="auto", object_fit="contain", elem_id="gallery")
    curve = gr.Image(label="Reward", type="filepath", format="png", interactive=False, elem_id="curve",
                     buttons=["download"])
    log = gr.Textbox(label="Log", lines=5, max_lines=10, autoscroll=True, interactive=False)
    files = gr.File(label="Downloads (LoRA, grid, curve)", file_count="multiple", interactive=False)
    return Live(status, gallery, curve, log, files)


def live_values(page: Page, job, note: str = "", last: dict | None = None) -> list:
    """Outputs (status, gallery, curve, log, files) for a job snapshot; parts unchanged since ``last`` are skipped."""
    settings, last = page.settings, last if last is not None else {}
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


def stream(page: Page, note: str = ""):
    """Yield the Live outputs of the current job until it finishes (a page without a job gets one update)."""
    job, seen, last = page.manager.job, -1, {}
    if job is None:
        yield live_values(page, None, note, last)
        return
    while True:
        seen = job.wait(seen, timeout=1.0)
        snap = job.snapshot()
        yield live_values(page, snap, note, last)
        if snap.finished:
            return


def start(page: Page, values: tuple, runs_for) -> str:
    """Start a job of one run per (label, estimator, folder tag); a note when another job is in progress."""
    kw = page.checked(values, estimator=runs_for[0][1])
    out = page.settings.output_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = [(label, TrainConfig(**{**kw, "estimator": est}, output_dir=out, run_name=new_run_name(out, tag)))
            for label, est, tag in runs_for]
    try:
        page.manager.start(runs)
        return ""
    except RunInProgress as e:
        return str(e)


def wire_train(page: Page, form: FormPanel, controls: Controls, live: Live) -> None:
    def train(*values):
        est = values[FORM_KEYS.index("estimator")]
        yield from stream(page, start(page, values, [(est, est, est)]))

    def validate(*values):
        errors, _ = check_form(dict(zip(FORM_KEYS, values)), page.settings)
        return [gr.validate(k not in errors, errors.get(k, "")) for k in FORM_KEYS]

    name_parameters(train, FORM_KEYS)  # API parameter names; validation messages name the field
    controls.train.click(train, form.components, live.outputs, api_name="train", validator=validate,
                         concurrency_limit=None, trigger_mode="once", show_progress="hidden")


def wire_stop(page: Page, controls: Controls) -> None:
    def stop():
        job = page.manager.stop()
        if job is None or job.finished:
            return "no run in progress"
        return (f"stopping at the next model call: update {job.current.step + 1} (in progress) is dropped, the LoRA "
                f"of update {job.current.step} will be saved")

    controls.stop.click(stop, None, controls.notice, api_name="stop", concurrency_limit=None)


def wire_page_load(page: Page, demo: gr.Blocks, form: FormPanel, live: Live) -> None:
    """A (re)opened page watches the job in progress and shows its settings in the form."""
    def watch():
        yield from stream(page)

    def restore_form():
        job = page.manager.job
        if job is None:
            return [gr.skip()] * (len(FORM_KEYS) + 1 + len(DDIM_FIELDS))
        values = config_to_form(job.runs[0].config, page.settings)
        flow = model_is_flow(values["model"], page.settings)
        return [values[k] for k in FORM_KEYS] + [gr.Group(visible=flow)] + [gr.Number(visible=not flow)] * len(DDIM_FIELDS)

    demo.load(watch, None, live.outputs, api_name="watch", concurrency_limit=None, show_progress="hidden")
    demo.load(restore_form, None, form.components + [form.flow_group] + [form.inputs[k] for k in DDIM_FIELDS],
              api_visibility="private", show_progress="hidden")
