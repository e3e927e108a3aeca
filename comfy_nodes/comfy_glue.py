"""ComfyUI's side of a run: progress bar with previews, the reward-chart event, Cancel, folders, memory.

Cancel: the trainer asks ``should_stop`` at every model call, which reads ComfyUI's interrupt flag, so
the run ends within one denoising step with the LoRA of the last finished update; it is copied to
``loras/rlr/`` (``rlr_loras/`` for the embedded default) and the interrupt is re-raised, so ComfyUI
shows the run as interrupted.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths

from . import logic
from .watch import warm_report_imports

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


class RunDisplay:
    """What the Trainer node shows: a text line (phase, model calls, seconds) at most once a second from
    the moment it starts, previews (the model's current estimate every few seconds, the evaluation
    images), the bar in updates, and the reward-chart event. A Cancel seen by ComfyUI's progress hook
    is latched in ``interrupted``: the trainer's should_stop reads it at the next model call."""

    def __init__(self, node_id, total: int):
        self.node_id, self.total = node_id, total
        self.pbar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.interrupted, self.done, self.calls, self.phase = False, 0, 0, "loading the model"
        self.t0, self.last_text = time.monotonic(), 0.0

    def text(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_text < 1.0:
            return
        self.last_text = now
        try:
            from server import PromptServer

            msg = f"{self.phase} · {self.calls} model calls · {now - self.t0:.0f} s"
            PromptServer.instance.send_progress_text(msg, str(self.node_id), PromptServer.instance.client_id)
        except Exception as e:  # no server, or a ComfyUI without progress text
            logger.debug("no progress text: %s", e)

    def _bar(self, preview=None) -> None:
        try:  # ComfyUI's progress hook raises when Cancel was pressed: remember it, stop at the next model call
            self.pbar.update_absolute(self.done, self.total, preview)
        except mm.InterruptProcessingException:
            self.interrupted = True

    def should_stop(self) -> bool:  # asked at every model call (and in backward) and after every update
        self.calls += 1
        self.interrupted = self.interrupted or mm.processing_interrupted()
        if not self.interrupted:
            self.text()
        return self.interrupted

    def on_model_image(self, image) -> None:
        self._bar(_preview(image))

    def on_preview(self, images, step: int) -> None:
        self.phase = f"update {step + 1} of {self.total}" if step < self.total else "finishing"
        self._bar(_preview(images))

    def on_step(self, info) -> None:
        reward_mean = info.metrics.get("reward_mean")
        _send(EVENT, {"node": str(self.node_id), "step": info.step, "total": info.total,
                      "reward": reward_mean if reward_mean == reward_mean else None})
        self.done = info.step
        self.phase = f"update {info.step + 1} of {info.total}" if info.step < info.total else "finishing"
        if not self.interrupted:
            self._bar()
            self.text(force=True)


def run_training(source, reward, prompts, estimator, *, node_id, run_name: str, options: dict) -> logic.TrainOutcome:
    name = (run_name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
        raise ValueError(f"run_name {run_name!r}: use up to 64 letters, digits, '_' or '-'")
    runs = Path(folder_paths.get_output_directory()) / "rlr_runs"
    run_dir = _unique(runs, name)
    config = logic.build_config(prompts=prompts, reward=reward, estimator=estimator, run_dir=run_dir,
                                model_label=getattr(source, "name", None), **options)
    show = RunDisplay(node_id, config.steps)
    show.text(force=True)  # "loading the model", at once
    warm_report_imports()
    show.phase = "evaluation before training"
    try:
        out = logic.train(source, config, on_step=show.on_step, on_preview=show.on_preview,
                          should_stop=show.should_stop, on_model_image=show.on_model_image,
                          reward_models_dir=getattr(folder_paths, "models_dir", None))
    finally:
        free_memory()
    if show.interrupted or out.stopped_early:
        embedded = logic.is_embedded_lora(out.lora)
        kind = logic.EMBEDDED_LORA_FOLDER if embedded else "loras"
        folder = Path(folder_paths.get_folder_paths(kind)[0]) / ("" if embedded else logic.LORA_SUBFOLDER)
        target = _unique(folder, f"{name}_interrupted_step{out.steps_done}", ".safetensors")
        logic.save_lora_file(out.lora, target)
        where = f"{logic.EMBEDDED_LORA_FOLDER}/" if embedded else f"loras/{logic.LORA_SUBFOLDER}/"
        logger.warning("RLR training cancelled after update %d of %d; its LoRA was saved as %s%s",
                       out.steps_done, config.steps, where, target.name)
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
    logic.release_memory()
    mm.soft_empty_cache()
