"""ComfyUI's side of a run: progress bar with previews, the reward-chart event, Cancel, folders, memory.

Cancel: the trainer's ``should_stop`` reads ComfyUI's interrupt flag, so the run ends after the current
update with a checkpoint and a LoRA; the partial LoRA is copied to ``loras/rlr/`` and the interrupt is
re-raised, so ComfyUI shows the run as interrupted.
"""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths

from . import logic

logger = logging.getLogger(__name__)

EVENT = "rlr.train.step"


def _send(event: str, data: dict) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data, PromptServer.instance.client_id)
    except Exception as e:  # no server (scripts, tests): the chart is optional
        logger.debug("could not send %s: %s", event, e)


def _preview(images):
    from PIL import Image

    grid = logic.to_comfy_image(images[:8])
    row = grid.permute(1, 0, 2, 3).reshape(grid.shape[1], -1, 3)  # side by side
    arr = (row.numpy() * 255).round().astype("uint8")
    return ("JPEG", Image.fromarray(arr), 512)


def _unique(folder: Path, stem: str, suffix: str = "") -> Path:
    for i in range(1, 100_000):
        p = folder / f"{stem}_{i:05d}{suffix}"
        if not p.exists():
            return p
    raise FileExistsError(f"{folder} holds too many runs named {stem!r}")


def run_training(source, reward, prompts, estimator, *, node_id, run_name: str, options: dict) -> logic.TrainOutcome:
    name = (run_name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
        raise ValueError(f"run_name {run_name!r}: use up to 64 letters, digits, '_' or '-'")
    runs = Path(folder_paths.get_output_directory()) / "rlr_runs"
    run_dir = _unique(runs, name)
    config = logic.build_config(prompts=prompts, reward=reward, estimator=estimator, run_dir=run_dir,
                                model_label=getattr(source, "name", None), **options)
    total = config.steps
    pbar = comfy.utils.ProgressBar(total, node_id=node_id)
    state = {"interrupted": False, "preview": None}

    def should_stop() -> bool:
        state["interrupted"] = state["interrupted"] or mm.processing_interrupted()
        return state["interrupted"]

    def on_preview(images, step):
        state["preview"] = _preview(images)

    def on_step(info):
        reward_mean = info.metrics.get("reward_mean")
        _send(EVENT, {"node": str(node_id), "step": info.step, "total": info.total,
                      "reward": reward_mean if reward_mean == reward_mean else None})
        if should_stop():
            return
        try:  # ComfyUI's progress hook raises when Cancel was pressed: remember it, stop after this update
            pbar.update_absolute(info.step, info.total, state.pop("preview", None))
        except mm.InterruptProcessingException:
            state["interrupted"] = True
        state.setdefault("preview", None)

    try:
        out = logic.train(source, config, on_step=on_step, on_preview=on_preview, should_stop=should_stop,
                          reward_models_dir=getattr(folder_paths, "models_dir", None))
    finally:
        free_memory()
    if state["interrupted"] or out.stopped_early:
        loras = Path(folder_paths.get_folder_paths("loras")[0]) / logic.LORA_SUBFOLDER
        target = _unique(loras, f"{name}_interrupted_step{out.steps_done}", ".safetensors")
        logic.save_lora_file(out.lora, target)
        logger.warning("RLR training cancelled after update %d of %d; partial LoRA saved as loras/%s/%s",
                       out.steps_done, total, logic.LORA_SUBFOLDER, target.name)
        mm.interrupt_current_processing(False)
        raise mm.InterruptProcessingException()
    return out


def run_sampling(source, prompt: str, *, node_id, **kwargs):
    steps = kwargs.get("num_steps", 20)
    pbar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def callback(d: dict) -> None:
        pbar.update_absolute(int(d.get("i", 0)) + 1, steps)  # also raises on Cancel

    try:
        return logic.sample(source, prompt, callback=callback, **kwargs)
    finally:
        free_memory()


def free_memory() -> None:
    gc.collect()
    mm.soft_empty_cache()
