"""The training loop: sample -> reward -> estimator -> optimizer step, with evaluation and checkpoints.

The trainer knows nothing about user interfaces. It reports through callbacks: ``on_step(StepInfo)``
after every update, ``on_preview(images, step)`` after every evaluation, and stops early when
``should_stop()`` returns True (a checkpoint and the LoRA are still written).

Launched as several processes (``accelerate launch --multi_gpu``, torchrun) it trains data-parallel:
each process samples a shard of every batch, gradients are averaged, and files, evaluation and the
callbacks happen on the main process (see ``distributed.py``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..estimators import ChainProblem, describe_estimator, get_estimator
from ..estimators.kl import draw_steps, kl_to_base
from ..lora import save_kohya
from ..models.loader import load_pipeline, model_for_pipeline
from ..models.trainable import TrainableModel, prompt_schedule
from ..rewards import Reward, make_reward
from ..rewards.models.local import load_weights
from ..safe_io import clean_temp_files, fault_point, save_json
from ..sampling import PromptSchedule, sample_chain
from .best_lora import RECHECK_SEED, BestKeeper
from .checkpoint import repair_latest
from .config import TrainConfig
from .distributed import DataParallel
from .memory import (DynamicLossScale, autocast, load_dtypes, make_optimizer, prepare_model, resolve_device,
                     reward_models_in_precision)
from .prompts import schedule_metadata
from .report import diversity, progress_bar, save_before_after, save_grid, save_reward_curve
from .run_folder import append_metrics, open_run_folder, read_metrics, resume_lr, rewrite_metrics
from .state import TrainState
from .stopping import StopCheckingDenoiser, StopRequested

logger = logging.getLogger(__name__)

EVAL_SEED = 1234


class RewardFailure(ValueError):
    """The reward gave no finite value for ``max_nonfinite_batches`` batches in a row; the run stopped."""


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
    eval_images: int = 0  # images behind each evaluation reward
    best_step: int | None = None  # the update whose LoRA is in lora_best.safetensors
    best_reward: float | None = None  # its evaluation reward


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
        self.lr_given = config.lr is not None  # a resume without it continues at the run's own rate
        config = self.config = config.resolve(self.reward.differentiable)  # "auto" -> one estimator; lr None -> its rate
        self.spec = get_estimator(config.estimator)
        if self.spec.needs_differentiable_reward and not self.reward.differentiable:
            raise ValueError(f"estimator {config.estimator!r} back-propagates the reward, but {self.reward.name!r} "
                             "is not differentiable; use rlr, ddpo or zo")
        self.est_config = config.estimator_config()
        # options that bias the estimator, settings the reward overrides: one line each per run, and in the LoRA
        self.estimator_notes = describe_estimator(self.est_config, self.reward.differentiable)
        self.estimator_notes.log(once=False)
        self.prompt_split = tuple(float(f) for f in config.prompt_split)
        if any(p.scheduled for p in config.prompts):  # validates the split (plain prompts: one segment)
            PromptSchedule.from_fractions([None] * 3, self.prompt_split, config.num_inference_steps)
        if model is None:
            if pipeline is None:  # read straight into the precision asked for (peak memory ~ the loaded model)
                pipeline = load_pipeline(config.model, **load_dtypes(config.precision, config.offload_text_encoders),
                                         **config.single_file_options())
            model = model_for_pipeline(pipeline)
        flow = bool(getattr(model, "flow", False))
        config.check_model_options(flow)  # DDIM options on a flow model or the reverse: refused before any file
        self.t2i = model
        self.pipe = getattr(model, "pipe", None)  # the diffusers pipeline, when there is one
        self.named_params = model.add_lora(config.lora_rank, config.lora_alpha, config.seed)
        self.params = [p for _, p in self.named_params]
        self.device = prepare_model(model, self.params, device=device, precision=config.precision,
                                    gradient_checkpointing=config.gradient_checkpointing,
                                    offload_text_encoders=config.offload_text_encoders,
                                    base_precision=config.base_precision)
        self.schedule = model.schedule(config.num_inference_steps, **config.schedule_options(flow))
        self.model = model.denoiser(config.guidance_scale)
        if should_stop is not None and not self.dp.enabled:  # stop within one model call (one process only)
            self.model = StopCheckingDenoiser(self.model, should_stop)
        self.latent_shape = tuple(model.latent_shape)
        reward_models_in_precision(self.reward, self.device, config.precision)
        # everything a run resumes from (checkpoints, the roll-back after a stop, the data-parallel start)
        self.state = TrainState(self.named_params, make_optimizer(config.optimizer, self.params, config.lr),
                                torch.Generator().manual_seed(config.seed), j_sampler=self.est_config.j_sampler(),
                                loss_scale=DynamicLossScale() if config.precision == "fp16" else None)
        self._update_start: tuple | None = None
        self.best = BestKeeper(self.state.best, self.params,
                               lambda meta: self._save_lora(self.config.run_dir / "lora_best.safetensors", meta),
                               config.early_stop_drop, config.best_recheck_seeds)
        self.est_config.check(self.problem([0]))  # estimator settings against the chain, before any file is touched

    # -- model pieces ---------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (differentiable)."""
        return self.t2i.decode(latents)

    def problem(self, prompt_ids: list[int]) -> ChainProblem:
        specs = [self.config.prompts[i] for i in prompt_ids]
        captions = [s.fine for s in specs]
        prompts = prompt_schedule(self.t2i, specs, self.config.num_inference_steps, self.prompt_split)

        def reward(latents: torch.Tensor) -> torch.Tensor:
            return self.reward(self.decode(latents), captions)

        return ChainProblem(self.model, self.schedule, prompts, reward, self.params,
                            reward_differentiable=self.reward.differentiable,
                            groups=torch.tensor(prompt_ids, device=self.device))

    # -- evaluation -------------------------------------------------------------------------------
    @property
    def eval_images(self) -> int:
        """Images per evaluation: eval_seeds fixed seeds for each of the first (up to) 4 prompts."""
        return min(len(self.config.prompts), 4) * self.config.eval_seeds

    @torch.no_grad()
    def evaluate(self, seed: int = EVAL_SEED, per_prompt: int | None = None) -> tuple[float, torch.Tensor]:
        """(mean reward, images) of eval_seeds (or ``per_prompt``) fixed-seed images for each of the first (up
        to) 4 prompts; the seed's noise is never used in training (another ``seed`` gives a second held-out set)."""
        cfg = self.config
        ids = [i for i in range(min(len(cfg.prompts), 4)) for _ in range(per_prompt or cfg.eval_seeds)]
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn((len(ids), *self.latent_shape), generator=g).to(self.device)
        problem = self.problem(ids)
        with autocast(self.device, cfg.precision):
            traj = sample_chain(self.model, self.schedule, problem.prompts, x_T, generator=g)
            images = self.decode(traj.final)
            rewards = self.reward(images, [cfg.prompts[i].fine for i in ids]).float()
        return float(rewards[torch.isfinite(rewards)].mean()), images.float().cpu()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> TrainResult:
        cfg, run_dir, dp, state = self.config, self.config.run_dir, self.dp, self.state
        metrics_path = run_dir / "metrics.jsonl"
        load_weights(self.reward)  # damaged reward weights are refused before anything is written
        history = dp.on_main(lambda: self._open_run(resume))
        if dp.enabled:  # every process starts from the main process's state (it alone read the checkpoint)
            state.load_shared(dp.broadcast(state.shared() if dp.is_main else None))
            dp.sync_parameters(self.params)
        start = state.step
        sb = " with the step baseline" if getattr(self.est_config, "step_baseline", False) else ""
        logger.info("run %s: %s%s, lr %g, %d updates x batch %d, T=%d, reward %s, %d LoRA parameters", run_dir,
                    cfg.estimator, sb, cfg.lr, cfg.steps, cfg.batch_size, cfg.num_inference_steps, self.reward.name,
                    sum(p.numel() for p in self.params))
        try:
            stopped = self._loop(history, metrics_path)
        except StopRequested:  # inside a model call: the update in progress is dropped (no optimizer step)
            stopped = True
            state.optimizer.zero_grad(set_to_none=True)
            if self._update_start is not None:  # back to the end of the last finished update
                state.roll_back(self._update_start)
            if state.step > start:  # resumable from there, bit for bit
                dp.on_main(lambda: state.save(run_dir))
            logger.info("stop requested during a model call; keeping the LoRA of update %d", state.step)
        if dp.enabled:
            drift = dp.max_parameter_difference(self.params)
            if drift and dp.is_main:
                logger.warning("the processes' LoRAs differ by up to %.3g; the main process's is saved", drift)
        if not stopped:  # the best-LoRA guard's final check (best_lora.py)
            images = min(len(cfg.prompts), 4) * cfg.best_recheck_seeds
            dp.on_main(lambda: self.best.finish(state.step, state.eval_rewards.get(state.step),
                                                lambda n: self.evaluate(RECHECK_SEED, n)[0], images))
        lora_path = dp.on_main(lambda: self._write_outputs(history, stopped))
        return TrainResult(run_dir, lora_path, state.eval_rewards, state.step, stopped, self.eval_images,
                           state.best.get("step"), state.best.get("reward"))

    def _loop(self, history: list[dict], metrics_path: Path) -> bool:
        """The initial evaluation and the updates (``state.step`` is the last one done); returns whether the run
        stopped early."""
        cfg, dp, state = self.config, self.dp, self.state
        if state.step == 0:
            first = {"step": 0, **(dp.on_main(lambda: self._evaluate_and_save(0)) or {})}
            state.eval_rewards[0] = first.get("eval_reward")
            history.append(first)
            dp.on_main(lambda: append_metrics(metrics_path, first))
            dp.on_main(lambda: self.best.offer(0, state.eval_rewards[0]))
        bar = progress_bar(cfg.steps, state.step, self.progress and dp.is_main)
        stopped, bad_run, reported = False, 0, set()
        for step in range(state.step + 1, cfg.steps + 1):
            fault_point("step:begin")
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = self.update()
            self._update_start, state.step = None, step
            metrics["seconds"] = time.perf_counter() - t0
            metrics["cpu_seconds"] = time.process_time() - c0  # of this process (all its threads): load-independent
            record = {"step": step, **metrics}
            early = False
            if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
                try:
                    record.update(dp.on_main(lambda: self._evaluate_and_save(step)) or {})
                except StopRequested:  # the update is done, its evaluation is not: its row is kept
                    history.append(record)
                    append_metrics(metrics_path, record)
                    raise
                state.eval_rewards[step] = record.get("eval_reward")
                early = bool(dp.on_main(lambda: self.best.offer(step, state.eval_rewards[step])))
            history.append(record)
            dp.on_main(lambda: append_metrics(metrics_path, record))
            bad_run = bad_run + 1 if metrics.get("skipped_batch") else 0
            self._report_dropped_terms(metrics, step, reported)
            if cfg.max_nonfinite_batches and bad_run >= cfg.max_nonfinite_batches:
                if bar is not None:
                    bar.close()
                raise RewardFailure(
                    f"reward {self.reward.name!r} gave NaN/inf for every image in {bad_run} batches in a row "
                    f"(updates {step - bad_run + 1}-{step}); the run stopped at update {step}, its last checkpoint "
                    "is unchanged: fix the reward (or its inputs) and continue with --resume")
            fault_point("step:after_metrics")
            stopped = dp.any(bool(self.should_stop and self.should_stop()) or early)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopped:
                dp.on_main(lambda: state.save(cfg.run_dir))
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
        return stopped

    @staticmethod
    def _report_dropped_terms(metrics: dict[str, float], step: int, reported: set[str]) -> None:
        """Log each kind of dropped (non-finite) estimator term once per run; metrics.jsonl counts them all."""
        for key, value in metrics.items():
            if key.startswith("dropped_") and key.endswith("_term") and value and key not in reported:
                reported.add(key)
                logger.warning("update %d: a non-finite %s was dropped from the gradient (counted per update as %s "
                               "in metrics.jsonl; not logged again)", step, key[len("dropped_"):].replace("_", " "),
                               key)

    def _open_run(self, resume: bool) -> list[dict]:
        """Create the run folder, or load its latest checkpoint into ``self.state`` (main process only).

        Returns the metrics rows up to the checkpoint's step and leaves ``metrics.jsonl`` holding exactly
        those rows. Everything is checked before the folder changes (see ``run_folder.open_run_folder``);
        a refused start writes nothing.
        """
        cfg = self.config = resume_lr(self.config, resume, self.lr_given)
        for group in self.state.optimizer.param_groups:
            group["lr"] = cfg.lr
        folder = open_run_folder(cfg, resume)
        run_dir, metrics_path = folder.path, folder.path / "metrics.jsonl"
        history: list[dict] = []
        if folder.checkpoint is not None:
            self.state.load(folder.checkpoint)
            history = read_metrics(metrics_path, upto=self.state.step)
            logger.info("resumed %s at step %d (%s)", run_dir, self.state.step, folder.checkpoint.name)
        if run_dir.exists():
            removed = clean_temp_files(run_dir)
            if removed:
                logger.info("%s: removed %d temporary file(s) left by an interrupted run", run_dir, removed)
        if folder.checkpoint is not None:
            repair_latest(run_dir, folder.checkpoint)
        if folder.saved is None or self.state.step == 0:
            save_json(cfg.to_json(), run_dir / "config.json")
        fault_point("open:before_metrics")
        rewrite_metrics(metrics_path, history)  # atomic: drops the rows after the checkpoint
        return history

    def _evaluate_and_save(self, step: int) -> dict[str, float]:
        """Evaluate, write the grid of ``step`` and show it (main process); returns the metrics row's
        evaluation fields (reward, number of images, diversity when there are 2+ seeds per prompt)."""
        reward, images = self.evaluate()
        save_grid(images, self.config.run_dir / "grids" / f"step-{step:06d}.png", nrow=self.config.eval_seeds)
        if self.on_preview:
            self.on_preview(images, step)
        out = {"eval_reward": reward, "eval_images": self.eval_images}
        if self.config.eval_seeds >= 2:
            out["eval_diversity"] = diversity(images, self.config.eval_seeds)
        return out

    def _write_outputs(self, history: list[dict], stopped: bool) -> Path:
        """The LoRA, the reward curve and the before/after grid of a finished run; returns the LoRA's path."""
        cfg, run_dir = self.config, self.config.run_dir
        step, eval_rewards = self.state.step, self.state.eval_rewards
        meta = {"rlr_steps": str(step)}
        if stopped:
            meta["rlr_interrupted_at_step"] = str(step)
        if self.state.best:
            meta.update(rlr_best_update=str(self.state.best["step"]), rlr_best_eval_reward=f"{self.state.best['reward']:.6g}")
            if "recheck" in self.state.best:
                meta["rlr_best_recheck"] = self.state.best["recheck"]
        lora_path = self._save_lora(run_dir / "lora.safetensors", meta)
        save_reward_curve(history, eval_rewards, run_dir / "reward_curve.png", title=f"{cfg.estimator} on {self.reward.name}")
        grids = run_dir / "grids"
        if step in eval_rewards and (grids / f"step-{step:06d}.png").is_file():
            save_before_after(grids / "step-000000.png", grids / f"step-{step:06d}.png", run_dir / "before_after.png",
                              f"before: eval reward {eval_rewards[0]:.3f}",
                              f"after {step} updates: {eval_rewards[step]:.3f}")
        return lora_path

    def _save_lora(self, path: Path, metadata: dict[str, str]) -> Path:
        cfg = self.config
        sd, rank, alpha = self.t2i.lora_state_dict()
        meta = {"rlr_estimator": cfg.estimator, "rlr_reward": self.reward.name, "ss_learning_rate": f"{cfg.lr:g}",
                **self.estimator_notes.metadata(),
                **schedule_metadata(cfg.prompts, self.prompt_split), **metadata}
        return save_kohya(sd, path, rank, alpha, base_model_version=self.t2i.base_model_version, metadata=meta)

    def update(self) -> dict[str, float]:
        cfg, state = self.config, self.state
        self._update_start = state.rollback_point()  # restored when a stop request drops this update
        state.optimizer.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        all_nonfinite = True  # every reward of every micro-batch NaN/inf (the whole batch, on every process)
        shard = self.dp.shard(cfg.batch_size)  # None unless data-parallel
        for _ in range(cfg.grad_accum):
            # whole groups of images per prompt, so the leave-one-out baseline compares like with like
            groups = cfg.batch_size // cfg.images_per_prompt
            ids = torch.randint(0, len(cfg.prompts), (groups,), generator=state.generator)
            ids = ids.repeat_interleave(cfg.images_per_prompt).tolist()
            x_T = torch.randn((cfg.batch_size, *self.latent_shape), generator=state.generator)
            if shard is not None:  # drawn for the whole batch on every process; this one keeps its groups
                ids, x_T = ids[shard.rows], x_T[shard.rows]
            problem = replace(self.problem(ids), shard=shard,  # fp16: the estimator writes scaled gradients
                              loss_scale=state.loss_scale.scale if state.loss_scale else 1.0)
            with autocast(self.device, cfg.precision):
                est = self.spec.fn(problem, x_T.to(self.device), config=self.est_config, generator=state.generator,
                                   baseline_state=state.baseline, j_sampler=state.j_sampler)
                if cfg.kl_weight > 0:
                    steps = draw_steps(self.schedule.stds, cfg.kl_steps, state.generator)
                    est.metrics["kl"] = kl_to_base(problem, est.trajectory, steps, cfg.kl_weight, est.metrics)
            for k, v in est.metrics.items():
                agg[k] = agg.get(k, 0.0) + v / cfg.grad_accum
            all_nonfinite = all_nonfinite and est.metrics.get("nonfinite_rewards", 0) >= cfg.batch_size
        if all_nonfinite:  # nothing to learn from; an optimizer step would still move Adam's moments
            state.optimizer.zero_grad(set_to_none=True)
            agg["skipped_batch"] = 1.0
            logger.warning("every reward of this batch is NaN/inf (reward %s): batch skipped", self.reward.name)
            return agg
        self.dp.average_gradients(self.params)  # the mean of equal shards' mean-loss gradients
        grads = [p.grad for p in self.params if p.grad is not None]
        if cfg.grad_accum > 1:
            for g in grads:
                g.div_(cfg.grad_accum)
        if state.loss_scale is not None and not state.loss_scale.unscale_and_update(self.params):
            agg["skipped_update"] = 1.0  # fp16 overflow: the scale was lowered (the same on every process)
            return agg
        if not all(torch.isfinite(g).all() for g in grads):
            agg["skipped_update"] = 1.0
            logger.warning("non-finite gradient: update skipped")
            return agg
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        agg["grad_norm"] = float(norm)
        state.optimizer.step()
        return agg
