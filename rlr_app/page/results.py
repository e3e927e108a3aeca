"""The Results tab: a finished (or stopped) run's downloads, before/after grid and reward curve."""

from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from ..form import list_runs
from ..render import stage_downloads
from .common import Page


@dataclass
class ResultsTab:
    run: gr.Dropdown
    refresh: gr.Button
    summary: gr.Markdown
    files: gr.File
    grid: gr.Image
    curve: gr.Image


def build() -> ResultsTab:
    with gr.Row():
        # custom values: the run list grows after the page loads; a name is used only if list_runs() finds it
        # under the output folder
        run = gr.Dropdown([], label="Run", scale=4, allow_custom_value=True)
        refresh = gr.Button("refresh", scale=1, size="sm")
    summary = gr.Markdown()
    files = gr.File(label="Downloads", file_count="multiple", interactive=False)
    with gr.Row():
        grid = gr.Image(label="Before / after", type="filepath", interactive=False)
        curve = gr.Image(label="Reward curve", type="filepath", interactive=False)
    return ResultsTab(run, refresh, summary, files, grid, curve)


def wire(page: Page, demo: gr.Blocks, tab: ResultsTab, lora_run: gr.Dropdown, lora_refresh: gr.Button) -> None:
    """The run lists of this tab and of the Compare tab (``lora_run``: runs with a LoRA) refresh together."""
    settings = page.settings

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
        cfg = page.run_config(run_dir)  # refuses a run folder holding a symbolic link
        files = stage_downloads(settings, run_dir)
        pics = {n: f for f in files for n in ("before_after.png", "reward_curve.png") if f.endswith(f"-{n}")}
        summary = (f"**{html.escape(name)}**: {cfg.estimator}, reward {html.escape(cfg.reward)}, {cfg.steps} updates "
                   f"of batch {cfg.batch_size}" + ("" if (run_dir / "lora.safetensors").is_file()
                                                   else " (no LoRA yet: the run did not finish)"))
        return files or None, pics.get("before_after.png"), pics.get("reward_curve.png"), summary

    lists = [tab.run, lora_run]
    for btn in (tab.refresh, lora_refresh):
        btn.click(refresh_runs, lists, lists, api_name=False)
    demo.load(refresh_runs, None, lists, api_name="refresh_runs")
    tab.run.change(show_run, tab.run, [tab.files, tab.grid, tab.curve, tab.summary], api_name="show_run")
