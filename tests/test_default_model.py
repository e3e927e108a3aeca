"""The committed embedded default model: complete, small, loads offline, samples."""

import json
import os
import shutil

import pytest
import torch

from rlr_backend.models.default_model import DEFAULT_MODEL_DIR, REQUIRED_FILES, check_model_dir, load_default_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


def test_committed_folder_is_complete_small_and_pickle_free():
    check_model_dir(DEFAULT_MODEL_DIR)
    files = [f for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 15_000_000
    assert not [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["requires_safety_checker"] is False


def test_plain_diffusers_loads_it_offline():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    p = StableDiffusionPipeline.from_pretrained(str(DEFAULT_MODEL_DIR), local_files_only=True, safety_checker=None)
    assert isinstance(p.scheduler, DDIMScheduler)
    cfg = p.scheduler.config
    assert (cfg.beta_schedule, cfg.prediction_type, cfg.num_train_timesteps) == ("scaled_linear", "epsilon", 1000)
    assert p.safety_checker is None


def test_tokenizer_ids_match_openai_clip(pipe):
    # reference ids from OpenAI CLIP's tokenizer
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = pipe.tokenizer("a red circle on a blue background").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 9
    assert len(pipe.tokenizer) == 49408
    assert pipe.tokenizer.model_max_length <= pipe.text_encoder.config.max_position_embeddings


def test_sampling_gives_finite_images_of_the_right_shape(pipe):
    out = pipe(
        ["a red circle on a blue background", "a white triangle on a black background"],
        num_inference_steps=5,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (out[0] - out[1]).abs().mean() > 0.05  # the caption changes the image


def test_sampling_is_seeded(pipe):
    kw = dict(num_inference_steps=3, output_type="pt")
    a = pipe("a green square on a yellow background", generator=torch.Generator().manual_seed(1), **kw).images
    b = pipe("a green square on a yellow background", generator=torch.Generator().manual_seed(1), **kw).images
    torch.testing.assert_close(a, b)


def test_missing_or_incomplete_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_default_pipeline(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(DEFAULT_MODEL_DIR / "model_index.json", partial / "model_index.json")
    with pytest.raises(FileNotFoundError, match="unet/diffusion_pytorch_model.safetensors"):
        load_default_pipeline(partial)


def test_corrupt_index_is_a_value_error(tmp_path):
    bad = tmp_path / "bad"
    for f in REQUIRED_FILES:
        (bad / f).parent.mkdir(parents=True, exist_ok=True)
        (bad / f).write_text("{}")
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json"):
        load_default_pipeline(bad)


def test_committed_tokenizer_files_follow_the_clip_layout():
    from rlr_backend.models.build_tokenizer import BOS, EOS, N_MERGES, VOCAB_SIZE, bytes_to_unicode

    vocab = json.loads((DEFAULT_MODEL_DIR / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    lines = (DEFAULT_MODEL_DIR / "tokenizer" / "merges.txt").read_text(encoding="utf-8").rstrip("\n").split("\n")
    assert lines[0].startswith("#version") and len(lines) - 1 == N_MERGES
    assert len(vocab) == VOCAB_SIZE and vocab[BOS] == 49406 and vocab[EOS] == 49407
    chars = list(bytes_to_unicode().values())
    assert len(set(chars)) == 256
    assert [vocab[c] for c in chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in chars] == list(range(256, 512))
    for i in (0, 1000, N_MERGES - 1):
        assert vocab["".join(lines[1 + i].split())] == 512 + i


def test_corrupt_weights_are_a_value_error_naming_the_folder(tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(DEFAULT_MODEL_DIR, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="could not load the default model"):
        load_default_pipeline(bad)
