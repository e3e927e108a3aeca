"""Samplers with per-step log-probabilities, trajectory recording and per-step grad control."""

from .chain import Trajectory, model_output, model_step, sample_chain
from .ddim import ddim_mean, ddim_step, predicted_x0_and_eps
from .denoiser import Denoiser, classifier_free_guidance, norm_rescaled_guidance
from .flow import FLOW_STEP_KINDS, FLOW_TIME_SCALE, FlowSchedule, flow_sigmas, flow_step
from .prompt_schedule import PromptSchedule
from .schedule import DDIMSchedule, Schedule, paper_to_sampler, sampler_to_paper
from .step import StepOutput, gaussian_log_prob, gaussian_step

__all__ = [
    "DDIMSchedule", "Denoiser", "FLOW_STEP_KINDS", "FLOW_TIME_SCALE", "FlowSchedule", "PromptSchedule", "Schedule",
    "StepOutput", "Trajectory", "classifier_free_guidance", "ddim_mean", "ddim_step", "flow_sigmas", "flow_step",
    "gaussian_log_prob", "gaussian_step", "model_output", "model_step", "norm_rescaled_guidance", "paper_to_sampler",
    "predicted_x0_and_eps", "sample_chain", "sampler_to_paper",
]
