"""The form: model, prompts, reward weights and targets, estimator, and the training settings."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from rlr_backend.choices import ESTIMATOR_CHOICES, POSITION_TARGETS, REWARD_ARGS
from rlr_backend.estimators import ESTIMATORS
from rlr_backend.rewards import REWARD_HELP, REWARDS

from ..form import (ADVANCED_FIELDS, CFG_FIELDS, DDIM_FIELDS, DEFAULT_MODEL, FLOW_FIELDS, FORM_KEYS, MAIN_FIELDS,
                    is_model_reward, list_models, model_form_defaults, model_is_flow)
from .common import Page, config_component


@dataclass
class FormPanel:
    inputs: dict  # form key -> component
    model_refresh: gr.Button
    flow_group: gr.Group  # the flow-matching options, shown for flow models only

    @property
    def components(self) -> list:
        """The inputs in FORM_KEYS order (the order of every event's inputs and of the API's parameters)."""
        return [self.inputs[k] for k in FORM_KEYS]


def build(page: Page) -> FormPanel:
    d = page.defaults
    inputs: dict[str, object] = {}
    with gr.Row():
        inputs["model"] = gr.Dropdown(list(list_models(page.settings.models_dir)), value=DEFAULT_MODEL,
                                      label="Model", info="diffusers folders found under --models-dir", scale=4)
        model_refresh = gr.Button("refresh", scale=1, size="sm")
    inputs["prompts"] = gr.Textbox(
        d["prompts"], lines=4, max_lines=12, label="Prompts",
        info="one per line; 'coarse | mid | fine' gives three versions used over the first, middle and "
             "last third of the sampling steps (the reward sees the fine one)")
    _rewards(d, inputs)
    inputs["estimator"] = gr.Dropdown(list(ESTIMATOR_CHOICES), value=d["estimator"], label="Estimator",
                                      info=CFG_FIELDS["estimator"].metadata["help"] + "; " + "; ".join(
                                          f"{k}: {v.summary}" for k, v in ESTIMATORS.items()
                                          if k in ("rlr", "ddpo", "truncated_bp", "full_bp")))
    with gr.Row():
        for name in MAIN_FIELDS:
            inputs[name] = config_component(page, name)
    with gr.Accordion("Advanced", open=False):
        for i in range(0, len(ADVANCED_FIELDS), 2):
            with gr.Row():
                for name in ADVANCED_FIELDS[i:i + 2]:
                    inputs[name] = config_component(page, name)
        with gr.Row():
            help_ho = CFG_FIELDS["ho_range"].metadata["help"] + "; 0 and 0: anywhere"
            inputs["ho_from"] = gr.Number(d["ho_from"], label="HO step range: from", info=help_ho, step=1)
            inputs["ho_to"] = gr.Number(d["ho_to"], label="HO step range: to", step=1)
        with gr.Group(visible=model_is_flow(DEFAULT_MODEL, page.settings)) as flow_group:
            gr.Markdown("Flow-matching models (SD3/SD3.5, FLUX.1, Z-Image)")
            with gr.Row():
                for name in FLOW_FIELDS:
                    inputs[name] = config_component(page, name)
            with gr.Row():
                help_sde = CFG_FIELDS["sde_window"].metadata["help"] + "; 0 and 0: every step"
                inputs["sde_start"] = gr.Number(d["sde_start"], label="SDE window: start", info=help_sde, step=1)
                inputs["sde_size"] = gr.Number(d["sde_size"], label="SDE window: size", step=1)
    for key, comp in inputs.items():
        comp.elem_id = "f-" + key.replace(":", "-")  # stable handles for browser tests and custom CSS
    return FormPanel(inputs, model_refresh, flow_group)


def _rewards(d: dict, inputs: dict) -> None:
    """One weight per reward (rule rewards open, model rewards folded), and the structure rewards' targets."""
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
                        inputs[f"w:{r}"] = gr.Number(d[f"w:{r}"], label=r, min_width=100, info=REWARD_HELP.get(r))
            if any(r in REWARD_ARGS for r in names):
                with gr.Row():
                    inputs["a:position"] = gr.Dropdown(
                        list(POSITION_TARGETS), value=d["a:position"], allow_custom_value=True,
                        label="position: target", info="left, right, top, bottom, center, or X:Y in 0-1 (0:0 = top left)")
                    inputs["a:size"] = gr.Number(d["a:size"], label="size: target fraction",
                                                 info="of the image the shape covers, between 0 and 1",
                                                 minimum=0.01, maximum=0.99, step=0.05)


def wire(page: Page, panel: FormPanel) -> None:
    def refresh_models(current):
        names = list(list_models(page.settings.models_dir))
        return gr.Dropdown(choices=names, value=current if current in names else DEFAULT_MODEL)

    keys = list(model_form_defaults(DEFAULT_MODEL, page.settings))

    def model_changed(label):
        """The picked model's steps, guidance and options; its family's fields shown, the other's hidden."""
        flow, values = model_is_flow(label, page.settings), model_form_defaults(label, page.settings)
        return [values[k] for k in keys] + [gr.Group(visible=flow)] + [gr.Number(visible=not flow)] * len(DDIM_FIELDS)

    model = panel.inputs["model"]
    panel.model_refresh.click(refresh_models, model, model, api_name="refresh_models")
    model.input(model_changed, model, [panel.inputs[k] for k in keys] + [panel.flow_group]
                + [panel.inputs[k] for k in DDIM_FIELDS], api_name="model_defaults")
