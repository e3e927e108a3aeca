"""The DDIM step, log-probabilities and the sampling loop against diffusers' schedulers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from rlr_backend.sampling import (DDIMSchedule, PromptSchedule, ddim_step, gaussian_log_prob, paper_to_sampler,
                                  sample_chain, sampler_to_paper)


def sd_scheduler(cls, prediction_type):
    extra = {"set_alpha_to_one": False} if cls is DDIMScheduler else {}
    sched = cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                steps_offset=1, prediction_type=prediction_type, **extra)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # compare the math, not fp32 rounding
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    return sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    ref = sd_scheduler(DDIMScheduler, prediction_type)
    ref.set_timesteps(10)
    ours = DDIMSchedule.from_diffusers(ref, 10, eta=eta)
    assert list(ours.timesteps) == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for k, t in enumerate(ref.timesteps.tolist()):
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        want = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        got = ddim_step(out, x, float(ours.alpha_t[k]), float(ours.alpha_prev[k]), float(ours.sigma[k]), noise,
                        prediction_type)
        torch.testing.assert_close(got.prev_sample, want, rtol=1e-10, atol=1e-10)
        x = want


def test_eta_one_is_ddpm_posterior():
    ref = sd_scheduler(DDPMScheduler, "epsilon")
    ref.set_timesteps(10)
    ours = DDIMSchedule.from_diffusers(ref, 10, eta=1.0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for k, t in enumerate(ref.timesteps.tolist()):
        out = torch.randn(x.shape, dtype=torch.float64)
        g = torch.Generator().manual_seed(k)
        want = ref.step(out, t, x, generator=g).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        got = ddim_step(out, x, float(ours.alpha_t[k]), float(ours.alpha_prev[k]), float(ours.sigma[k]), noise)
        if k < len(ref.timesteps) - 1:  # DDPM adds no noise at t = 0
            torch.testing.assert_close(got.prev_sample, want, rtol=1e-10, atol=1e-10)
        x = want


def test_log_prob_is_summed_gaussian_density():
    x, mean, std = torch.randn(3, 2, 5), torch.randn(3, 2, 5), 0.7
    want = torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), want)


def test_index_conventions_round_trip():
    assert paper_to_sampler(1, 50) == 49 and sampler_to_paper(0, 50) == 50
    with pytest.raises(ValueError):
        paper_to_sampler(0, 50)


class ScaleDenoiser(torch.nn.Module):
    """eps_hat = w * x * (t+1)/1000 + cond: a deterministic dummy with one trainable weight."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, cond):
        return self.w * x * (t + 1) / 1000 + cond


def test_sampling_loop_records_replayable_trajectory():
    sched = DDIMSchedule.from_alphas_cumprod(torch.linspace(0.999, 0.01, 1000), 8, eta=0.8)
    model = ScaleDenoiser()
    prompts = PromptSchedule.from_fractions([0.0, 0.1, -0.1], [1 / 3, 1 / 3, 1 / 3], 8)
    x_T = torch.randn(4, 3)
    traj = sample_chain(model, sched, prompts, x_T, generator=torch.Generator().manual_seed(1))
    assert len(traj.latents) == 9 and traj.log_probs.shape == (4, 8)
    replay = sample_chain(model, sched, prompts, x_T, noises=traj.noises)
    for a, b in zip(traj.latents, replay.latents):
        torch.testing.assert_close(a, b)
    # changing the prompt schedule changes the chain: conditioning is really applied per step
    other = sample_chain(model, sched, PromptSchedule.constant(0.0, 8), x_T, noises=traj.noises)
    assert not torch.allclose(other.latents[-1], traj.latents[-1])
    assert not traj.final.requires_grad


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_grad_steps_select_what_backpropagates(use_checkpoint):
    sched = DDIMSchedule.from_alphas_cumprod(torch.linspace(0.999, 0.01, 1000), 6, eta=0.5)
    model, prompts = ScaleDenoiser().double(), PromptSchedule.constant(0.0, 6)
    x_T = torch.randn(2, 3, dtype=torch.float64)
    noises = sample_chain(model, sched, prompts, x_T, generator=torch.Generator().manual_seed(0)).noises
    grads = {}
    for name, steps in {"last": [5], "last2": [4, 5], "all": range(6)}.items():
        model.w.grad = None
        traj = sample_chain(model, sched, prompts, x_T, noises=noises, grad_steps=steps,
                            use_checkpoint=use_checkpoint)
        traj.final.sum().backward()
        grads[name] = model.w.grad.item()
    # finite differences of the full chain match the full-backprop gradient
    def f(w):
        with torch.no_grad():
            model.w.fill_(w)
            return sample_chain(model, sched, prompts, x_T, noises=noises).final.sum().item()
    fd = (f(0.5 + 1e-4) - f(0.5 - 1e-4)) / 2e-4
    model.w.data.fill_(0.5)
    assert math.isclose(grads["all"], fd, rel_tol=1e-6)
    assert len({round(v, 8) for v in grads.values()}) == 3  # truncation changes the gradient


def test_prompt_schedule_must_cover_the_chain():
    with pytest.raises(ValueError, match="cover"):
        PromptSchedule(((0, 3, "a"), (4, 8, "b")), 8)
    with pytest.raises(ValueError, match="covers steps"):
        PromptSchedule(((0, 5, "a"),), 8)
    s = PromptSchedule.from_fractions(["c", "m", "f"], [1 / 3, 1 / 3, 1 / 3], 50)
    assert [s.cond_at(k) for k in (0, 16, 17, 32, 33, 49)] == ["c", "c", "m", "m", "f", "f"]
