"""Consumer-GPU memory options on the CPU: precision, gradient checkpointing, per-image VAE decode, fp16 loss
scaling, the optimizer choice and the device option. CUDA itself is not available here; what is tested is
that each option keeps the gradient (or changes it only by rounding) and lowers what it claims to lower."""

import sys
import types

import pytest
import torch

from benchmarks.common import peak_allocated
from rlr_backend.estimators import Gradients
from rlr_backend.safe_io import load_tensors
from rlr_backend.train import TrainConfig, Trainer
from rlr_backend.train.memory import DynamicLossScale, make_optimizer, resolve_device

TINY = dict(batch_size=2, images_per_prompt=2, fo_steps=1, num_inference_steps=4, eval_every=0, eval_seeds=1,
            ckpt_every=2, lr=1e-2)


def one_update_grads(tmp_path, name, **options):
    """LoRA gradients of the first update of a tiny run (same seed, so the same batch), and its metrics."""
    trainer = Trainer(TrainConfig(steps=1, output_dir=tmp_path, run_name=name, **{**TINY, **options}), progress=False)
    metrics = trainer.update()
    return [p.grad.clone() for p in trainer.params], metrics, trainer


def max_rel_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(float(x.abs().max()) for x in a)


def test_gradient_checkpointing_gives_the_same_gradient_with_one_step_in_memory(tmp_path):
    opts = dict(estimator="rlr", fo_steps=2, h=2, batch_size=4)
    plain, m_plain, _ = one_update_grads(tmp_path, "plain", **opts)
    ckpt, m_ckpt, trainer = one_update_grads(tmp_path, "ckpt", gradient_checkpointing=True, **opts)
    assert max_rel_diff(plain, ckpt) < 1e-5
    assert m_plain["steps_in_memory"] == 2 and m_ckpt["steps_in_memory"] == 1
    assert m_ckpt["model_calls"] == m_plain["model_calls"] + 4  # one more forward per backpropagated step
    assert trainer.t2i.decode_one_at_a_time and trainer.t2i.unet.is_gradient_checkpointing
    assert trainer.t2i.vae.is_gradient_checkpointing


def test_gradient_checkpointing_lowers_the_peak_memory_of_an_update(tmp_path):
    peaks = {}
    for ckpt in (False, True):
        trainer = Trainer(TrainConfig(steps=1, output_dir=tmp_path, run_name=f"m{ckpt}", gradient_checkpointing=ckpt,
                                      **{**TINY, "estimator": "rlr", "fo_steps": 4, "h": 2, "num_inference_steps": 6,
                                         "batch_size": 4}), progress=False)
        trainer.update()  # warm-up (caches, lazy init)
        peaks[ckpt] = peak_allocated(trainer.update)
    assert peaks[True] < 0.8 * peaks[False], peaks


def test_gradient_checkpointing_covers_the_vae_decoder(tmp_path):
    """The decode + reward backward is the largest activation term at full size (docs/memory.md): the option
    checkpoints the decoder's blocks as well as slicing it per image."""
    trainer = Trainer(TrainConfig(steps=1, output_dir=tmp_path, run_name="v", gradient_checkpointing=True, **TINY),
                      progress=False)
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def decode_backward():
        trainer.decode(z).sum().backward()
    decode_backward()  # warm-up
    with_vae = peak_allocated(decode_backward)
    from rlr_backend.train.memory import set_decoder_checkpointing

    set_decoder_checkpointing(trainer.t2i.vae, False)
    without_vae = peak_allocated(decode_backward)
    assert with_vae < 0.8 * without_vae, (with_vae, without_vae)


def test_sliced_decode_equals_batched_decode_with_its_gradient(tmp_path):
    trainer = Trainer(TrainConfig(steps=1, output_dir=tmp_path, run_name="d", **TINY), progress=False)
    z = torch.randn(3, *trainer.latent_shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.rand(3, 3, 1, 1)
    outs = []
    for sliced in (False, True):
        trainer.t2i.decode_one_at_a_time = sliced
        z.grad = None
        images = trainer.decode(z)
        (images * weights).sum().backward()
        outs.append((images.detach(), z.grad.clone()))
    with torch.no_grad():  # evaluation images: one at a time too
        outs.append((trainer.decode(z), outs[1][1]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[2][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_fp32_lora_on_half_weights(tmp_path, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ref, _, _ = one_update_grads(tmp_path, "fp32")
    grads, metrics, trainer = one_update_grads(tmp_path, precision, precision=precision)
    assert all(p.dtype == torch.float32 for p in trainer.params)
    frozen = [p for p in trainer.t2i.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == dtype for p in frozen)
    assert all(p.dtype == dtype for p in trainer.t2i.vae.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.pipe.text_encoder.parameters())  # offloaded: fp32
    assert metrics.get("skipped_update", 0) == 0 and torch.isfinite(torch.tensor(metrics["reward_mean"]))
    # half precision changes the gradient by rounding only: same direction
    cos = sum(float((a * b).sum()) for a, b in zip(ref, grads)) / (
        sum(float(a.pow(2).sum()) for a in ref) ** 0.5 * sum(float(b.pow(2).sum()) for b in grads) ** 0.5)
    assert cos > 0.9, cos
    result = trainer.run()
    tensors, _ = load_tensors(result.lora_path)
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    if precision == "fp16":
        state = (result.run_dir / "ckpt").glob("step-*/state.json")
        assert any('"loss_scale"' in s.read_text() for s in state)


def test_loss_scaling_scales_every_gradient_and_the_scaler_recovers_from_overflow():
    w = torch.zeros(3, requires_grad=True)
    grads = Gradients([w], {}, scale=1024.0)
    assert grads.add_loss((w * torch.tensor([1.0, 2.0, 3.0])).sum(), "test") == 0.0  # the unscaled loss value
    grads.add_direction([torch.ones(3)], 0.5)
    torch.testing.assert_close(w.grad, torch.tensor([1.5, 2.5, 3.5]) * 1024)
    scaler = DynamicLossScale(scale=1024.0, growth_interval=2)
    assert scaler.unscale_and_update([w]) and torch.allclose(w.grad, torch.tensor([1.5, 2.5, 3.5]))
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not scaler.unscale_and_update([w]) and scaler.scale == 512.0
    w.grad = torch.ones(3)
    assert scaler.unscale_and_update([w]) and scaler.unscale_and_update([w]) and scaler.scale == 1024.0


def test_optimizer_choice_and_a_clear_error_without_bitsandbytes(monkeypatch):
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adam", p, 1e-3), torch.optim.Adam)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        make_optimizer("adam8bit", p, 1e-3)
    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(Adam8bit=lambda params, lr: ("Adam8bit", lr))
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    assert make_optimizer("adam8bit", p, 1e-3) == ("Adam8bit", 1e-3)
    with pytest.raises(ValueError, match="unknown optimizer"):
        TrainConfig(optimizer="sgd")


def test_device_option(tmp_path):
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        TrainConfig(device="gpu0")
    with pytest.raises(ValueError, match="unknown precision"):
        TrainConfig(precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Trainer(TrainConfig(device="cuda", output_dir=tmp_path, **TINY), progress=False)
        assert not any(tmp_path.iterdir())  # refused before anything is written


def test_the_defaults_leave_the_model_as_loaded(tmp_path):
    """Defaults on a CPU machine: fp32 weights, no checkpointing, batched decode; the text-encoder offload
    changes nothing on the CPU (bit-identical gradient to keeping them "on the device")."""
    a, _, trainer = one_update_grads(tmp_path, "a")
    assert all(p.dtype == torch.float32 for p in trainer.t2i.unet.parameters())
    assert not trainer.t2i.decode_one_at_a_time and not trainer.t2i.unet.is_gradient_checkpointing
    assert not trainer.t2i.vae.is_gradient_checkpointing
    b, _, _ = one_update_grads(tmp_path, "b", device="cpu", offload_text_encoders=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_reward_models_follow_the_precision_on_a_gpu_only():
    from rlr_backend.rewards import make_reward
    from rlr_backend.rewards.base import WeightedSum
    from rlr_backend.rewards.models.local import LocalModelReward
    from rlr_backend.train.memory import reward_models_in_precision

    class Scorer(LocalModelReward):  # never loaded here: only its precision is set
        name = "scorer"

    model, plain = Scorer(), make_reward("brightness")
    both = WeightedSum([(model, 1.0), (plain, 0.5)])
    assert reward_models_in_precision(both, torch.device("cpu"), "bf16") == 0 and model.dtype == torch.float32
    assert reward_models_in_precision(both, torch.device("cuda"), "fp32") == 0
    assert reward_models_in_precision(both, torch.device("cuda"), "fp16") == 1 and model.dtype == torch.float16
    alone = Scorer()
    assert reward_models_in_precision(alone, torch.device("cuda"), "bf16") == 1 and alone.dtype == torch.bfloat16


def _small_kl_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=8,
                         block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3).eval()


def test_decoder_sub_block_checkpointing_lowers_the_decode_peak_with_the_same_gradient():
    """`--gradient-checkpointing` puts every resnet, attention and upsampler of an AutoencoderKL decoder under
    its own checkpoint inside diffusers' up-block checkpoints: the same gradient, a lower peak (the backward of
    an up-block holds one sub-block's activations at a time), and off again restores the class's forward."""
    import copy

    from rlr_backend.train.memory import set_decoder_checkpointing

    vae = _small_kl_vae()
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads, peaks = {}, {}
    for mode in ("blocks", "sub-blocks"):
        if mode == "blocks":
            vae.enable_gradient_checkpointing()
        else:
            # mid block: 2 resnets + 1 attention; 3 up-blocks of 3 resnets; 2 upsamplers
            assert set_decoder_checkpointing(vae, True) == 2 + 1 + 3 * 3 + 2

        def decode_backward():
            z.grad = None
            vae.decode(z).sample.square().mean().backward()
        decode_backward()  # warm-up
        peaks[mode] = peak_allocated(decode_backward)
        grads[mode] = z.grad.clone()
    torch.testing.assert_close(grads["blocks"], grads["sub-blocks"], atol=1e-6, rtol=1e-5)
    assert peaks["sub-blocks"] < 0.8 * peaks["blocks"], peaks
    twin = copy.deepcopy(vae)  # the partial rebinds to the copy's own modules
    assert twin.decoder.up_blocks[0].resnets[0].forward.args[0] is twin.decoder.up_blocks[0].resnets[0]
    assert set_decoder_checkpointing(vae, False) == 0 and not vae.is_gradient_checkpointing
    assert "forward" not in vae.decoder.mid_block.resnets[0].__dict__


def test_decoder_sub_block_checkpointing_leaves_other_vaes_to_diffusers():
    from rlr_backend.train.memory import set_decoder_checkpointing

    class VideoVAE(torch.nn.Module):  # stands for the cached-frame VAEs (Wan, Qwen-Image): only diffusers' switch
        is_gradient_checkpointing = False

        def enable_gradient_checkpointing(self):
            self.is_gradient_checkpointing = True

        def disable_gradient_checkpointing(self):
            self.is_gradient_checkpointing = False

    v = VideoVAE()
    v.decoder = _small_kl_vae().decoder
    assert set_decoder_checkpointing(v, True) == 0 and v.is_gradient_checkpointing
    assert "forward" not in v.decoder.mid_block.resnets[0].__dict__
