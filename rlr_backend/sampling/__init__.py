"""Samplers with per-step log-probabilities, trajectory recording and per-step grad control."""

from .chain import Trajectory, sample_chain, step_mean
from .ddim import StepOutput, ddim_mean, ddim_step, gaussian_log_prob, predicted_x0_and_eps
from .prompt_schedule import PromptSchedule
from .schedule import DDIMSchedule, paper_to_sampler, sampler_to_paper

__all__ = [
    "DDIMSchedule", "PromptSchedule", "StepOutput", "Trajectory", "ddim_mean", "ddim_step",
    "gaussian_log_prob", "paper_to_sampler", "predicted_x0_and_eps", "sample_chain", "sampler_to_paper",
    "step_mean",
]
