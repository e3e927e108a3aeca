"""Guards against instability and reward hacking: the KL term, the best LoRA, early stop, diversity."""

from __future__ import annotations

import json

import pytest
import torch

from rlr_backend.estimators import ChainProblem
from rlr_backend.estimators.kl import draw_steps, kl_to_base, step_probabilities
from rlr_backend.estimators.analytic_chain import make_analytic_chain
from rlr_backend.safe_io import load_tensors
from rlr_backend.sampling import sample_chain
from rlr_backend.train import TrainConfig, Trainer

TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_seeds=2, ckpt_every=100,
            lr=1e-2, prompts=TrainConfig().prompts[:2])


def _chain_and_traj(batch: int = 32):
    chain = make_analytic_chain(d=3, num_steps=6, seed=1)
    with torch.no_grad():
        chain.model.u.fill_(0.4)
        chain.model.v.copy_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    problem = ChainProblem(chain.model, chain.schedule, chain.prompts(), chain.reward, chain.params)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        traj = sample_chain(chain.model, chain.schedule, chain.prompts(), chain.sample_x_T(batch, g), generator=g)
    return chain, problem, traj


def _exact_kl(chain, traj) -> torch.Tensor:
    """Closed form: mu_theta - mu_base = kappa_k u x_k + beta_k v (the analytic chain's parametrisation)."""
    u, v, total = chain.model.u, chain.model.v, 0.0
    for k in range(chain.num_steps):
        diff = chain.kappa[k] * u * traj.latents[k] + chain.beta[k] * v
        total = total + (diff**2).sum(1).mean() / (2 * chain.schedule.sigma[k] ** 2)
    return total


def kl_to_base_uniform(chain, traj, steps) -> float:
    """The same estimate from uniformly drawn steps (T/m times their sum), for comparison."""
    with torch.no_grad():
        return sum(float(((chain.kappa[k] * chain.model.u * traj.latents[k] + chain.beta[k] * chain.model.v) ** 2)
                         .sum(1).mean() / (2 * chain.schedule.sigma[k] ** 2)) for k in steps) * chain.num_steps / len(steps)


def test_kl_term_is_the_closed_form_and_its_step_subsets_are_unbiased():
    chain, problem, traj = _chain_and_traj()
    exact = _exact_kl(chain, traj)
    (gu, gv) = torch.autograd.grad(0.7 * exact, [chain.model.u, chain.model.v])
    for p in chain.params:
        p.grad = None
    probs = step_probabilities(chain.schedule.sigma)
    value = 0.0
    for k in range(chain.num_steps):  # the expectation over one drawn step, written out: sum_k p_k KL_k / p_k
        value += float(probs[k]) * kl_to_base(problem, traj, [k], 0.7 * float(probs[k]), {})
    assert value == pytest.approx(float(exact.detach()), rel=1e-9)
    assert torch.allclose(chain.model.u.grad, gu) and torch.allclose(chain.model.v.grad, gv)
    assert float(chain.model.u.detach()) == 0.4  # the LoRA-off pass restored the parameters exactly
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([kl_to_base(problem, traj, draw_steps(chain.schedule.sigma, 2, g), 0.0, {})
                          for _ in range(400)], dtype=torch.float64)
    assert abs(float(draws.mean()) - float(exact.detach())) < 4 * float(draws.std()) / 400**0.5
    uniform = torch.tensor([kl_to_base_uniform(chain, traj, torch.randperm(6, generator=g)[:2].tolist())
                            for _ in range(400)], dtype=torch.float64)
    assert float(draws.std()) < float(uniform.std())  # drawing steps by their share of the KL lowers the noise


def test_kl_steps_skip_deterministic_steps_and_a_chain_without_noise_is_refused():
    """A flow chain's ODE steps (std 0) have no Gaussian transition: the guard draws only stochastic steps."""
    probs = step_probabilities([0.0, 0.5, 0.0, 0.25])  # e.g. an SDE window on steps 1 and 3
    assert probs.tolist() == pytest.approx([0.0, 0.2, 0.0, 0.8])
    assert set(draw_steps([0.0, 0.5, 0.0, 0.25], 50, torch.Generator().manual_seed(0))) == {1, 3}
    with pytest.raises(ValueError, match="every sampler step is deterministic"):
        step_probabilities([0.0, 0.0])


def test_best_lora_is_kept_and_early_stop_fires_when_the_eval_reward_falls(tmp_path, monkeypatch):
    """A scripted evaluation that rises, peaks at update 3 and falls: lora_best.safetensors holds the LoRA of
    update 3 (update number in its metadata), and early stop ends the run when the reward drops past the guard."""
    script = iter([0.10, 0.20, 0.30, 0.50, 0.40, 0.10, 0.05, 0.0])
    snapshots = {}
    real = Trainer.evaluate

    def evaluate(self):
        _, images = real(self)
        return next(script), images

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    cfg = TrainConfig(steps=7, eval_every=1, early_stop_drop=0.3, output_dir=tmp_path, run_name="g", **TINY)
    trainer = Trainer(cfg, progress=False,
                      on_step=lambda info: snapshots.update({info.step: dict(trainer.t2i.lora_state_dict()[0])}))
    result = trainer.run()
    assert result.best_step == 3 and result.best_reward == pytest.approx(0.5)
    assert result.steps_done == 5 and result.stopped_early  # 0.10 at update 5 is 0.4 below the best
    best, meta = load_tensors(tmp_path / "g" / "lora_best.safetensors")
    assert meta["rlr_best_update"] == "3"
    assert best.keys() == snapshots[3].keys() and all(torch.equal(best[k], snapshots[3][k]) for k in best)
    assert not all(torch.equal(best[k], snapshots[5][k]) for k in best)
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_reward"] for r in rows] == pytest.approx([0.10, 0.20, 0.30, 0.50, 0.40, 0.10])
    assert all(r["eval_diversity"] > 0 for r in rows)


@pytest.mark.parametrize("check,recheck_seeds", [((0.9, 0.5), 3), ((0.5, 0.9), 3), ((0.9, 0.5), 0)])
def test_the_final_check_keeps_the_better_of_lora_best_and_the_last_lora(tmp_path, monkeypatch, check, recheck_seeds):
    """The evaluations peak at update 2 (8 images, noisy); at the end both LoRAs are scored on a fresh seed set
    (``check``: the last LoRA's then the best's score): the better becomes lora_best.safetensors, the last
    LoRA's parameters are back in place for lora.safetensors, and ``best_recheck_seeds=0`` checks nothing."""
    from rlr_backend.train.best_lora import RECHECK_SEED

    script, checks, calls = iter([0.1, 0.2, 0.5, 0.3, 0.4]), iter(check), []
    real = Trainer.evaluate

    def evaluate(self, seed=None, per_prompt=None):
        if seed == RECHECK_SEED:
            calls.append((per_prompt, [p.detach().clone() for p in self.params]))
            return next(checks), None
        return next(script), real(self)[1]

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    snapshots = {}
    cfg = TrainConfig(steps=4, eval_every=1, best_recheck_seeds=recheck_seeds, output_dir=tmp_path, run_name="c",
                      **TINY)
    trainer = Trainer(cfg, progress=False,
                      on_step=lambda info: snapshots.update({info.step: dict(trainer.t2i.lora_state_dict()[0])}))
    result = trainer.run()
    best, meta = load_tensors(tmp_path / "c" / "lora_best.safetensors")
    last, last_meta = load_tensors(result.lora_path)
    assert all(torch.equal(last[k], snapshots[4][k]) for k in last)  # the last LoRA is back in place
    if not recheck_seeds:
        assert calls == [] and result.best_step == 2 and "rlr_best_recheck" not in meta
        return
    assert [n for n, _ in calls] == [recheck_seeds] * 2
    assert not all(torch.equal(a, b) for a, b in zip(calls[0][1], calls[1][1]))  # two different LoRAs scored
    last_wins = check[0] >= check[1]
    assert result.best_step == (4 if last_wins else 2) and meta["rlr_best_update"] == str(result.best_step)
    assert all(torch.equal(best[k], snapshots[result.best_step][k]) for k in best)
    assert last_meta["rlr_best_recheck"] == f"update 4: {check[0]:g}, update 2: {check[1]:g} on {2 * recheck_seeds} images"
    assert ("rlr_best_recheck" in meta) == last_wins  # lora_best is rewritten only when the last LoRA wins


def test_kl_weight_keeps_the_lora_nearer_the_base_and_is_logged(tmp_path):
    runs = {}
    for w in (0.0, 1.0):
        cfg = TrainConfig(steps=4, eval_every=0, kl_weight=w, reward="brightness", output_dir=tmp_path,
                          run_name=f"kl{w}", **{**TINY, "lr": 3e-2})
        result = Trainer(cfg, progress=False).run()
        lora = load_tensors(result.lora_path)[0]
        runs[w] = sum(float(t.float().norm() ** 2) for k, t in lora.items() if "lora_up" in k) ** 0.5
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(("kl" in r) == (w > 0) for r in rows if r["step"] > 0)
    assert runs[1.0] < runs[0.0]


@pytest.mark.parametrize("kw,field", [(dict(kl_weight=-1.0), "kl_weight"), (dict(kl_weight=0.1, eta=0.0,
                                      estimator="truncated_bp"), "kl_weight"), (dict(early_stop_drop=-0.1),
                                      "early_stop_drop"), (dict(kl_steps=0), "kl_steps")])
def test_bad_guard_options_name_their_field(kw, field):
    from rlr_backend.choices import ConfigError

    with pytest.raises(ConfigError) as e:
        TrainConfig(**kw)
    assert e.value.field == field and field in str(e.value)
