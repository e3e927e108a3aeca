"""The training loop: sample -> reward -> estimator -> optimizer step, with evaluation and checkpoints.

The trainer knows nothing about user interfaces. It reports through callbacks: ``on_step(StepInfo)``
after every update, ``on_preview(images, step)`` after every evaluation, and stops early when
``should_stop()`` returns True (a checkpoint and the LoRA are still written).

Launched as several processes (``accelerate launch --multi_gpu``, torchrun) it trains data-parallel:
each process samples a shard of every batch, gradients are averaged, and files, evaluation and the
callbacks happen on the main process (see ``distributed.py``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..estimators import BaselineState, ChainProblem, JSampler, get_estimator, loss_scaling
from ..lora import save_kohya
from ..models.trainable import TrainableModel
from ..rewards import Reward, make_reward
from ..safe_io import save_json
from ..sampling import PromptSchedule, sample_chain
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import DataParallel
from .memory import (DynamicLossScale, autocast, make_optimizer, prepare_model, resolve_device,
                     reward_models_in_precision)
from .pipeline import load_pipeline, model_for_pipeline
from .report import save_before_after, save_grid, save_reward_curve
from .stopping import StopCheckingDenoiser, StopRequested

logger = logging.getLogger(__name__)

EVAL_SEED = 1234


@dataclass
class StepInfo:
    step: int
    total: int
    metrics: dict[str, float]
    seconds: float


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Path
    eval_rewards: dict[int, float]
    steps_done: int
    stopped_early: bool


class Trainer:
    def __init__(self, config: TrainConfig, *, on_step: Callable[[StepInfo], None] | None = None,
                 on_preview: Callable[[torch.Tensor, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, progress: bool = True, pipeline=None,
                 reward: Reward | None = None, model: TrainableModel | None = None):
        """``reward`` overrides ``config.reward`` with any object of the Reward interface (e.g. a
        ``CallableReward`` around your own function); ``pipeline`` reuses a loaded StableDiffusion(XL)Pipeline;
        ``model`` trains any ``TrainableModel`` instead (``config.model`` is then only a label)."""
        self.config = config
        self.dp = DataParallel.from_environment(config.batch_size, config.images_per_prompt)  # no-op alone
        self.on_step, self.on_preview, self.should_stop = on_step, on_preview, should_stop
        self.progress = progress
        device = config.device
        if device == "auto" and model is not None and getattr(model, "pipe", None) is None:
            device = "cpu"  # a non-diffusers model (the ComfyUI adapter) runs where its adapter puts it
        elif self.dp.enabled and device == "auto" and torch.cuda.is_available():
            device = f"cuda:{self.dp.local_rank}"  # one GPU per process
        if reward is None:
            reward = make_reward(config.reward, device=resolve_device(device))  # fails before loading
        self.reward = reward
        self.spec = get_estimator(config.estimator)
        if self.spec.needs_differentiable_reward and not self.reward.differentiable:
            raise ValueError(f"estimator {config.estimator!r} back-propagates the reward, but {self.reward.name!r} "
                             "is not differentiable; use rlr, ddpo or zo")
        self.est_config = config.estimator_config()
        self.prompt_split = tuple(float(f) for f in config.prompt_split)
        PromptSchedule.from_fractions([None] * 3, self.prompt_split, config.num_inference_steps)  # validates
        if model is None:
            model = model_for_pipeline(pipeline if pipeline is not None else load_pipeline(config.model, **config.single_file_options()))
        self.t2i = model
        self.pipe = getattr(model, "pipe", None)  # the diffusers pipeline, when there is one
        self.named_params = model.add_lora(config.lora_rank, config.lora_alpha, config.seed)
        self.params = [p for _, p in self.named_params]
        self.device = prepare_model(model, self.params, device=device, precision=config.precision,
                                    gradient_checkpointing=config.gradient_checkpointing,
                                    offload_text_encoders=config.offload_text_encoders)
        self.schedule = model.schedule(config.num_inference_steps, config.eta)
        self.model = model.denoiser(config.guidance_scale)
        if should_stop is not None and not self.dp.enabled:  # stop within one model call (one process only)
            self.model = StopCheckingDenoiser(self.model, should_stop)
        self.latent_shape = tuple(model.latent_shape)
        reward_models_in_precision(self.reward, self.device, config.precision)
        self.optimizer = make_optimizer(config.optimizer, self.params, config.lr)
        self.loss_scale = DynamicLossScale() if config.precision == "fp16" else None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.baseline = BaselineState()
        self._update_start: tuple | None = None
        self.j_sampler = JSampler(getattr(self.est_config, "j_dist", "uniform"),
                                  getattr(self.est_config, "j_range", None))
        # validate estimator settings against the chain before any file is touched
        check = getattr(self.est_config, "check", None)
        if check is not None:
            check(self.problem([0]))

    # -- model pieces ---------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable)."""
        return self.t2i.decode(latents)

    def problem(self, prompt_ids: list[int]) -> ChainProblem:
        specs = [self.config.prompts[i] for i in prompt_ids]
        captions = [s.fine for s in specs]
        n = self.config.num_inference_steps
        if any(s.scheduled for s in specs):
            conds = [self.t2i.conditioning([s.versions()[v] for s in specs]) for v in range(3)]
            prompts = PromptSchedule.from_fractions(conds, self.prompt_split, n)
        else:
            prompts = PromptSchedule.constant(self.t2i.conditioning(captions), n)

        def reward(latents: torch.Tensor) -> torch.Tensor:
            return self.reward(self.decode(latents), captions)

        return ChainProblem(self.model, self.schedule, prompts, reward, self.params,
                            reward_differentiable=self.reward.differentiable,
                            groups=torch.tensor(prompt_ids))

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, torch.Tensor]:
        cfg = self.config
        ids = [i for i in range(min(len(cfg.prompts), 4)) for _ in range(cfg.eval_seeds)]
        g = torch.Generator().manual_seed(EVAL_SEED)
        x_T = torch.randn((len(ids), *self.latent_shape), generator=g).to(self.device)
        problem = self.problem(ids)
        with autocast(self.device, cfg.precision):
            traj = sample_chain(self.model, self.schedule, problem.prompts, x_T, generator=g)
            images = self.decode(traj.final)
            rewards = self.reward(images, [cfg.prompts[i].fine for i in ids]).float()
        return float(rewards[torch.isfinite(rewards)].mean()), images.float().cpu()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        cfg, run_dir, dp = self.config, self.config.run_dir, self.dp
        metrics_path = run_dir / "metrics.jsonl"
        start, history, eval_rewards = dp.on_main(lambda: self._open_run(resume))
        if dp.enabled:
            self._share_state_from_main()
        logger.info("run %s: %s, %d updates x batch %d, T=%d, reward %s, %d LoRA parameters", run_dir,
                    cfg.estimator, cfg.steps, cfg.batch_size, cfg.num_inference_steps, self.reward.name,
                    sum(p.numel() for p in self.params))
        try:
            step, stopped = self._loop(start, history, eval_rewards, metrics_path)
        except StopRequested:  # inside a model call: the update in progress is dropped (no optimizer step)
            step, stopped = history[-1]["step"] if history else start, True
            self.optimizer.zero_grad(set_to_none=True)
            if self._update_start is not None:  # back to the end of the last finished update
                self._restore(self._update_start)
            if step > start:  # resumable from there, bit for bit
                dp.on_main(lambda: self._checkpoint(step, eval_rewards))
            logger.info("stop requested during a model call; keeping the LoRA of update %d", step)
        if dp.enabled:
            drift = dp.max_parameter_difference(self.params)
            if drift and dp.is_main:
                logger.warning("the processes' LoRAs differ by up to %.3g; the main process's is saved", drift)
        lora_path = dp.on_main(lambda: self._write_outputs(history, eval_rewards, step, stopped))
        return TrainResult(run_dir, lora_path, eval_rewards, step, stopped)

    def _loop(self, start: int, history: list[dict], eval_rewards: dict[int, float],
              metrics_path: Path) -> tuple[int, bool]:
        """The initial evaluation and the updates; returns (the last update done, whether stopped early)."""
        cfg, dp = self.config, self.dp
        if start == 0:
            eval_rewards[0] = dp.on_main(lambda: self._evaluate_and_save(0))
        bar = _progress(cfg.steps, start, self.progress and dp.is_main)
        stopped, step = False, start
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            metrics = self.update()
            self._update_start = None
            metrics["seconds"] = time.perf_counter() - t0
            record = {"step": step, **metrics}
            history.append(record)
            dp.on_main(lambda: _append_jsonl(metrics_path, record))
            if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
                eval_rewards[step] = dp.on_main(lambda: self._evaluate_and_save(step))
            stopped = dp.any(bool(self.should_stop and self.should_stop()))
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopped:
                dp.on_main(lambda: self._checkpoint(step, eval_rewards))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}")
            if self.on_step and dp.is_main:
                self.on_step(StepInfo(step, cfg.steps, metrics, metrics["seconds"]))
            if stopped:
                logger.info("stop requested at step %d", step)
                break
        if bar is not None:
            bar.close()
        return step, stopped

    def _checkpoint(self, step: int, eval_rewards: dict[int, float]) -> None:
        save_checkpoint(self.config.run_dir, step, self.named_params, self.optimizer, self.generator,
                        {"baseline": self.baseline.state_dict(), "j_norms": self.j_sampler.norms,
                         **({"loss_scale": self.loss_scale.state_dict()} if self.loss_scale else {}),
                         "eval_rewards": eval_rewards})

    def _rng_and_stats(self) -> tuple:
        """What an update changes besides the LoRA and Adam (those change only at its end)."""
        return (self.generator.get_state(), copy.deepcopy(self.baseline.state_dict()),
                copy.deepcopy(self.j_sampler.norms), self.loss_scale.state_dict() if self.loss_scale else None)

    def _restore(self, state: tuple) -> None:
        generator, baseline, norms, loss_scale = state
        self.generator.set_state(generator)
        self.baseline.load_state_dict(baseline)
        self.j_sampler.norms = norms
        if loss_scale is not None:
            self.loss_scale.load_state_dict(loss_scale)

    def _open_run(self, resume: bool) -> tuple[int, list[dict], dict[int, float]]:
        """Create the run folder, or load its latest checkpoint into this trainer (main process only).

        Returns (the last finished step, the metrics rows up to it, the evaluation rewards so far)
        and leaves ``metrics.jsonl`` holding exactly those rows.
        """
        cfg, run_dir = self.config, self.config.run_dir
        metrics_path, start = run_dir / "metrics.jsonl", 0
        history: list[dict] = []
        eval_rewards: dict[int, float] = {}
        if resume:
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: {run_dir} has no checkpoint to resume from")
            saved = TrainConfig.from_json(json.loads((run_dir / "config.json").read_text()))
            if replace(saved, steps=cfg.steps) != cfg:
                raise ValueError(f"--resume: the options differ from the run's config.json in {run_dir}; "
                                 "resume with the same options (only --steps may change)")
            state = load_checkpoint(ckpt, self.named_params, self.optimizer, self.generator)
            start = state["step"]
            self.baseline.load_state_dict(state["baseline"])
            if self.loss_scale is not None and "loss_scale" in state:
                self.loss_scale.load_state_dict(state["loss_scale"])
            self.j_sampler.norms = {int(k): v for k, v in state["j_norms"].items()}
            eval_rewards = {int(k): v for k, v in state["eval_rewards"].items()}
            if metrics_path.is_file():
                history = [r for r in _read_jsonl(metrics_path) if r["step"] <= start]
            logger.info("resumed %s at step %d", run_dir, start)
        else:
            if run_dir.exists() and any(run_dir.iterdir()):
                raise FileExistsError(f"run folder {run_dir} already exists; use --resume or another --run-name")
            run_dir.mkdir(parents=True, exist_ok=True)
            save_json(cfg.to_json(), run_dir / "config.json")
        with open(metrics_path, "w") as f:  # rewrite: drops steps after the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in history)
        return start, history, eval_rewards

    def _share_state_from_main(self) -> None:
        """Give every process the main process's LoRA, Adam moments, RNG state, baseline and j statistics
        (a resumed checkpoint is read by the main process only, so no shared disk is needed)."""
        dp = self.dp
        state = dp.broadcast({"optim": self.optimizer.state_dict(), "rng": self.generator.get_state(),
                              "baseline": self.baseline.state_dict(), "j_norms": dict(self.j_sampler.norms),
                              "loss_scale": self.loss_scale.state_dict() if self.loss_scale else None}
                             if dp.is_main else None)
        if not dp.is_main:
            if self.loss_scale is not None:
                self.loss_scale.load_state_dict(state["loss_scale"])
            self.optimizer.load_state_dict(state["optim"])
            self.generator.set_state(state["rng"])
            self.baseline.load_state_dict(state["baseline"])
            self.j_sampler.norms = dict(state["j_norms"])
        dp.sync_parameters(self.params)

    def _evaluate_and_save(self, step: int) -> float:
        """Evaluate, write the grid of ``step`` and show it (main process); returns the eval reward."""
        reward, images = self.evaluate()
        save_grid(images, self.config.run_dir / "grids" / f"step-{step:06d}.png", nrow=self.config.eval_seeds)
        if self.on_preview:
            self.on_preview(images, step)
        return reward

    def _write_outputs(self, history: list[dict], eval_rewards: dict[int, float], step: int, stopped: bool) -> Path:
        """The LoRA, the reward curve and the before/after grid of a finished run; returns the LoRA's path."""
        cfg, run_dir = self.config, self.config.run_dir
        sd, rank, alpha = self.t2i.lora_state_dict()
        meta = {"rlr_estimator": cfg.estimator, "rlr_reward": self.reward.name, "rlr_steps": str(step)}
        if stopped:
            meta["rlr_interrupted_at_step"] = str(step)
        lora_path = save_kohya(sd, run_dir / "lora.safetensors", rank, alpha,
                               base_model_version=self.t2i.base_model_version, metadata=meta)
        save_reward_curve(history, eval_rewards, run_dir / "reward_curve.png", title=f"{cfg.estimator} on {self.reward.name}")
        grids = run_dir / "grids"
        if step in eval_rewards and (grids / f"step-{step:06d}.png").is_file():
            save_before_after(grids / "step-000000.png", grids / f"step-{step:06d}.png", run_dir / "before_after.png",
                              f"before: eval reward {eval_rewards[0]:.3f}",
                              f"after {step} updates: {eval_rewards[step]:.3f}")
        return lora_path

    def update(self) -> dict[str, float]:
        cfg = self.config
        self._update_start = self._rng_and_stats()  # restored when a stop request drops this update
        self.optimizer.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        shard = self.dp.shard(cfg.batch_size)  # None unless data-parallel
        for _ in range(cfg.grad_accum):
            # whole groups of images per prompt, so the leave-one-out baseline compares like with like
            groups = cfg.batch_size // cfg.images_per_prompt
            ids = torch.randint(0, len(cfg.prompts), (groups,), generator=self.generator)
            ids = ids.repeat_interleave(cfg.images_per_prompt).tolist()
            x_T = torch.randn((cfg.batch_size, *self.latent_shape), generator=self.generator)
            if shard is not None:  # drawn for the whole batch on every process; this one keeps its groups
                ids, x_T = ids[shard.rows], x_T[shard.rows]
            problem = self.problem(ids)
            if shard is not None:
                problem = replace(problem, shard=shard)
            scaling = loss_scaling(self.loss_scale.scale) if self.loss_scale else contextlib.nullcontext()
            with autocast(self.device, cfg.precision), scaling:
                est = self.spec.fn(problem, x_T.to(self.device), config=self.est_config, generator=self.generator,
                                   baseline_state=self.baseline, j_sampler=self.j_sampler)
            for k, v in est.metrics.items():
                agg[k] = agg.get(k, 0.0) + v / cfg.grad_accum
        self.dp.average_gradients(self.params)  # the mean of equal shards' mean-loss gradients
        grads = [p.grad for p in self.params if p.grad is not None]
        if cfg.grad_accum > 1:
            for g in grads:
                g.div_(cfg.grad_accum)
        if self.loss_scale is not None and not self.loss_scale.unscale_and_update(self.params):
            agg["skipped_update"] = 1.0  # fp16 overflow: the scale was lowered (the same on every process)
            return agg
        if not all(torch.isfinite(g).all() for g in grads):
            agg["skipped_update"] = 1.0
            logger.warning("non-finite gradient: update skipped")
            return agg
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        agg["grad_norm"] = float(norm)
        self.optimizer.step()
        return agg


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a line cut short by a crash is dropped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: dropping an incomplete line", path)
    return rows


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="rlr-train", unit="update")
