"""The Compare estimators panel: train RLR, then a baseline, on the same prompts, seeds and budget."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from rlr_backend.estimators import ESTIMATORS

from ..form import FORM_KEYS, check_form
from .common import Page, name_parameters
from .form_panel import FormPanel
from .training import Live, start, stream


@dataclass
class ComparePanel:
    baseline: gr.Dropdown
    button: gr.Button


def build() -> ComparePanel:
    with gr.Accordion("Compare estimators", open=False):
        gr.Markdown("Train RLR, then a baseline, on the same prompts, seeds and sample budget; "
                    "the live curve overlays both.")
        baseline = gr.Dropdown([e for e in sorted(ESTIMATORS) if e != "rlr"], value="ddpo", label="Baseline")
        button = gr.Button("Run RLR, then the baseline")
    return ComparePanel(baseline, button)


def wire(page: Page, form: FormPanel, panel: ComparePanel, live: Live) -> None:
    def compare(*values):
        *form_values, baseline = values
        yield from stream(page, start(page, tuple(form_values), [("rlr", "rlr", "cmp-rlr"),
                                                                (baseline, baseline, f"cmp-{baseline}")]))

    def validate_compare(*values):
        *form_values, baseline = values
        form_dict = dict(zip(FORM_KEYS, form_values))
        errors, _ = check_form(form_dict, page.settings, estimator="rlr")
        base_err = "" if baseline in ESTIMATORS and baseline != "rlr" else "choose a baseline other than rlr"
        if not base_err:
            base_err = check_form(form_dict, page.settings, estimator=baseline)[0].get("estimator", "")
        return [gr.validate(k not in errors, errors.get(k, "")) for k in FORM_KEYS] + [
            gr.validate(not base_err, base_err)]

    name_parameters(compare, (*FORM_KEYS, "baseline"))
    panel.button.click(compare, [*form.components, panel.baseline], live.outputs, api_name="compare_estimators",
                       validator=validate_compare, concurrency_limit=None, trigger_mode="once", show_progress="hidden")
