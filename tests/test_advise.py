"""rlr-advise on the embedded model with a tiny budget."""

import pytest

from rlr_backend.advise import CANDIDATES, Measured, advise, format_advice, recommend
from rlr_backend.train import TrainConfig

TINY = dict(batch_size=2, images_per_prompt=2, num_inference_steps=5, fo_steps=2, prompts=TrainConfig().prompts[:2])


def test_advise_measures_every_candidate_and_flags_truncation_bias(capsys):
    """The position reward's gradient lives in the early steps, so truncated backprop is flagged as biased
    and an unbiased estimator is recommended; every candidate gets a variance and a time (the peak memory, which
    runs under the profiler and triples the time, is measured through the app's Advise button:
    tests/test_gradio_app.py)."""
    calls = []
    result = advise(TrainConfig(reward="position:left", **TINY), batches=2, progress=lambda *a: calls.append(a),
                    measure_memory=False)
    names = [m.name for m in result.measured]
    assert names == list(CANDIDATES) and calls[-1][0] == calls[-1][1] == len(calls)
    for m in result.measured:
        assert m.variance > 0 and m.seconds > 0 and m.peak_mb != m.peak_mb, m  # not measured: NaN
    trunc = next(m for m in result.measured if m.name.startswith("truncated_bp"))
    full = next(m for m in result.measured if m.name == "full_bp + ckpt")
    assert trunc.cosine[0] < 0.9 and trunc.share[0] < 0.5 and full.share[0] == pytest.approx(1.0)
    assert result.recommended != trunc.name and "biased for this reward" in " ".join(result.reasons)
    assert sum(result.step_share) == pytest.approx(1.0)
    text = format_advice(result)
    assert "recommended:" in text and "noise x cost" in text


def test_advise_without_a_differentiable_reward_compares_likelihood_ratio_estimators():
    result = advise(TrainConfig(reward="jpeg_compressibility", **TINY), batches=2, measure_memory=False)
    assert [m.name for m in result.measured] == ["rlr", "rlr paper (fo_steps=1)", "ddpo"]
    assert all(m.cosine is None for m in result.measured) and not result.step_share


def test_recommendation_rule():
    def m(name, unbiased, var, secs, cos=None, share=None):
        return Measured(name, unbiased, var, secs, 1.0, cos and (cos, 0.0), share and (share, 0.0))

    nearly = [m("rlr", True, 10.0, 1.0), m("full_bp + ckpt", True, 2.0, 2.0), m("truncated_bp (K=2)", False, 1.0, 0.5,
                                                                                0.95, 0.8)]
    assert recommend(nearly)[0] == "truncated_bp (K=2)"
    biased = nearly[:2] + [m("truncated_bp (K=2)", False, 1.0, 0.5, 0.5, 0.1)]
    assert recommend(biased)[0] == "full_bp + ckpt"


def test_the_advice_names_rlr_train_options_that_give_each_candidate_and_its_learning_rate():
    """Every candidate's printed options, parsed by rlr-train, give that candidate's settings; the learning rate
    shown is the one the run will use (the estimator's measured rate unless --lr is given)."""
    from rlr_backend.advise import candidate_flags
    from rlr_backend.cli import build_config, train_parser
    from rlr_backend.train import TrainConfig

    for name, kw in CANDIDATES.items():
        text = candidate_flags(name, TrainConfig(), True)
        flags, lr = text.split(" (lr ")
        cfg = build_config(train_parser().parse_args(flags.split()))
        assert all(getattr(cfg, k) == v for k, v in kw.items()), (name, flags)
        assert float(lr.split(",")[0]) == cfg.resolve(True).lr, (name, text)
    assert candidate_flags("rlr", TrainConfig(), True).endswith("--estimator rlr (lr 0.001, its default)")
    assert candidate_flags("rlr", TrainConfig(), False).endswith("--estimator rlr (lr 0.003, its default)")
    assert "--fo-steps 1 --no-step-baseline (lr 0.003" in candidate_flags("rlr paper (fo_steps=1)", TrainConfig(), True)
    assert candidate_flags("ddpo", TrainConfig(lr=2e-4), False).endswith("(lr 0.0002)")
