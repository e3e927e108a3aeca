"""The Compare tab: the same seeds sampled with the base model and with a run's LoRA at a chosen strength."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from rlr_backend.choices import ConfigError
from rlr_backend.images import to_pil
from rlr_backend.train import TrainConfig
from rlr_backend.train.prompts import parse_prompt

from ..form import MODEL_LOCK, list_models, list_runs, number
from ..render import png_file, scrub
from .common import Page


@dataclass
class LoraTab:
    run: gr.Dropdown
    refresh: gr.Button
    prompt: gr.Textbox
    seed: gr.Number
    strength: gr.Slider
    num: gr.Number
    button: gr.Button
    gallery: gr.Gallery


def build() -> LoraTab:
    with gr.Row():
        run = gr.Dropdown([], label="Run with a LoRA", scale=4, allow_custom_value=True)
        refresh = gr.Button("refresh", scale=1, size="sm")
    prompt = gr.Textbox(TrainConfig().prompts[0].fine, label="Prompt", max_lines=1)
    with gr.Row():
        seed = gr.Number(0, label="Seed", step=1)
        strength = gr.Slider(-2, 3, value=1.0, step=0.05, label="LoRA strength")
        num = gr.Number(4, label="Images", step=1)
    button = gr.Button("Sample base and base + LoRA")
    gallery = gr.Gallery(label="Base (first row) vs base + LoRA", columns=4, height="auto", format="png")
    return LoraTab(run, refresh, prompt, seed, strength, num, button, gallery)


def _checked(name, prompt, seed, strength, num, page: Page):
    """(prompt spec, seed, strength, images) of the tab's fields, or a gr.Error naming the field."""
    if name not in list_runs(page.settings.output_dir, with_lora=True):
        raise gr.Error(f"unknown run {name!r}; choose a finished run (press refresh)")
    try:
        spec = parse_prompt(prompt)
    except ConfigError as e:
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
    return spec, seed, strength, num


def wire(page: Page, tab: LoraTab) -> None:
    def sample_compare(name, prompt, seed, strength, num):
        from rlr_backend.models.loader import load_pipeline
        from rlr_backend.train.prompts import resolve_prompt
        from rlr_backend.train.sample import add_lora_file, sample_images, set_lora_strength

        prompt_spec, seed, strength, num = _checked(name, prompt, seed, strength, num, page)
        settings, cache = page.settings, page.compare_cache
        run_dir = settings.output_dir / name
        cfg = page.run_config(run_dir)
        models = {None if p is None else str(p): label for label, p in list_models(settings.models_dir).items()}
        if cfg.model not in models:
            raise gr.Error(f"the run's model is not in the model list (models dir {scrub(str(cfg.model), settings)})")
        lora = run_dir / "lora.safetensors"
        key = f"{name}:{lora.stat().st_mtime_ns}"
        if cache.get("key") != key:
            cache.clear()
            with MODEL_LOCK:
                pipe = load_pipeline(cfg.model, **cfg.single_file_options())
                add_lora_file(pipe, lora)
            cache.update(key=key, pipe=pipe)
        pipe = cache["pipe"]
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

    tab.button.click(sample_compare, [tab.run, tab.prompt, tab.seed, tab.strength, tab.num], tab.gallery,
                     api_name="compare_lora")
