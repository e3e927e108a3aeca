"""The node pack's previews of the model's current estimate (``comfy_nodes.watch``): the x_0 a preview
decodes, on a DDIM chain and on a flow chain (no ComfyUI needed)."""

import torch

from comfy_nodes.watch import WatchedDenoiser, predicted_x0
from rlr_backend.sampling import FLOW_TIME_SCALE, DDIMSchedule, FlowSchedule
from rlr_backend.train import PromptSpec, TrainConfig


class FlowStub:
    flow = True

    def schedule(self, num_steps, eta, *, kind="flow_sde", sde_window=None):
        return FlowSchedule.create(num_steps, shift=3.0, kind=kind, eta=eta, sde_window=sde_window)

    def decode(self, latents):
        return latents[:, :3].sigmoid()


class DDIMStub:
    def schedule(self, num_steps, eta):
        return DDIMSchedule.from_alphas_cumprod(torch.linspace(0.99, 0.01, 1000), num_steps, eta=eta,
                                                prediction_type="epsilon", steps_offset=1)


CONFIG = TrainConfig(num_inference_steps=4, h=1, fo_steps=1, prompts=(PromptSpec("a"),), reward="brightness")


def test_flow_preview_is_x_minus_sigma_v_at_the_chains_times():
    model = FlowStub()
    x0_of = predicted_x0(model, CONFIG)
    sched = model.schedule(4, CONFIG.flow_eta)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    for t, sigma in zip(sched.timesteps, sched.sigmas[:-1].tolist()):
        assert torch.allclose(x0_of(v, x, t), x - sigma * v)
        assert float(sigma) == t / FLOW_TIME_SCALE and 0 < sigma <= 1
    assert x0_of(v, x, 123.0) is None  # not a time of this chain: no preview


def test_ddim_preview_recovers_x0_from_eps():
    x0_of = predicted_x0(DDIMStub(), CONFIG)
    sched = DDIMStub().schedule(4, 1.0)
    t, abar = int(sched.timesteps[1]), float(sched.alpha_t[1])
    x0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    xt = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps
    assert torch.allclose(x0_of(eps, xt, t), x0, atol=1e-5)


def test_watched_flow_denoiser_shows_the_decoded_estimate_and_returns_the_output_unchanged():
    model, shown = FlowStub(), []
    sched = model.schedule(4, CONFIG.flow_eta)
    inner = lambda x, t, cond: x * 0.5  # noqa: E731
    watched = WatchedDenoiser(inner, model, predicted_x0(model, CONFIG), shown.append, {}, interval=0.0)
    x = torch.randn(2, 4, 2, 2)
    t = sched.timesteps[0]
    assert torch.equal(watched(x, t, None), x * 0.5)
    sigma = t / FLOW_TIME_SCALE
    assert len(shown) == 1 and torch.allclose(shown[0], model.decode(x[:1] - sigma * x[:1] * 0.5))
