"""Reliability and security: no pickle is ever read. A canary pickle behind a symlink at every entry point
(the CLI, a folder with pickles beside the safetensors, the app, the ComfyUI nodes, the reward loaders), a
scan of the shipped code for calls that can unpickle, and sharded indexes. The other fast cases:
tests/test_reliability.py; the long battery: ``python -m benchmarks.reliability`` (docs/reliability.md)."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks.faults import TINY, model_with_symlinked_pickle, pickle_payloads, tiny_args
from rlr_backend.cli import sample_main, train_main
from rlr_backend.rewards import make_reward
from rlr_backend.safe_io import InvalidModelFile, save_tensors
from rlr_backend.train import TrainConfig
from test_comfy_nodes import pack, run  # noqa: F401 -- the ComfyUI stand-in host's fixture



# -- pickles: a canary behind a symlink at every entry point ---------------------------------------------
@pytest.fixture
def canary(tmp_path, monkeypatch):
    """A canary file path; torch.load and pickle.load(s) raise if anything calls them, and torch's
    weights_only default is switched off (as an unsafe extension would), so only our own checks protect."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle a file")
    for target in (torch, torch.serialization):
        monkeypatch.setattr(target, "load", forbidden)
    import pickle
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    path = tmp_path / "canary"
    yield path
    assert not path.exists(), "a pickle was unpickled"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from rlr_backend.models.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline("sd1", tmp_path_factory.mktemp("model") / "sd1")


def test_cli_refuses_pickles_behind_symlinks(tiny_model, tmp_path, canary, capsys):
    payloads = pickle_payloads(canary)
    planted = model_with_symlinked_pickle(tiny_model, tmp_path / "m", payloads["torch-zip"],
                                          "diffusion_pytorch_model.bin")
    assert train_main(tiny_args(tmp_path / "runs", "r", 2, "--model", str(planted))) == 2
    renamed = model_with_symlinked_pickle(tiny_model, tmp_path / "m2", payloads["pickle-p4"],
                                          "extra.safetensors")  # a pickle under a safetensors name
    assert sample_main(["a red circle", "--model", str(renamed), "--out", str(tmp_path / "x.png")]) == 2
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(payloads["torch-legacy"])
    assert sample_main(["a red circle", "--lora", str(lora), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("pickle" in line for line in err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x.png").exists()


def test_a_pickle_beside_the_safetensors_is_never_read(tiny_model, tmp_path, canary):
    """A full clone of an official repository has .bin files beside the .safetensors ones: the model loads
    from the safetensors and the canary is never unpickled (the fixture checks it after the test)."""
    from rlr_backend.models.loader import load_model

    beside = model_with_symlinked_pickle(tiny_model, tmp_path / "b", pickle_payloads(canary)["torch-zip"],
                                         "diffusion_pytorch_model.bin", beside=True)
    assert load_model(beside).unet is not None


def test_the_app_refuses_a_pickle_behind_a_symlinked_model_folder(tiny_model, tmp_path, canary):
    """The app's path: the model list (folders under --models-dir), the form, the run manager's trainer."""
    from rlr_app.form import Settings, check_form, form_defaults, list_models
    from rlr_backend.train.runner import RunManager

    models = tmp_path / "models"
    models.mkdir()
    real = model_with_symlinked_pickle(tiny_model, tmp_path / "real", pickle_payloads(canary)["torch-zip"],
                                       "diffusion_pytorch_model.bin")
    (models / "linked").symlink_to(real, target_is_directory=True)
    settings = Settings(tmp_path / "runs", models)
    assert "linked" in list_models(models)
    errors, kw = check_form({**form_defaults(), **TINY, "model": "linked", "steps": 2}, settings)
    assert not errors, errors
    manager = RunManager()
    job = manager.start([("x", TrainConfig(**kw, output_dir=settings.output_dir, run_name="x"))])
    while not job.finished:
        job.wait(job.version, timeout=5)
    assert job.runs[0].status == "failed" and "pickle" in job.runs[0].error


def test_comfy_nodes_refuse_pickles_behind_symlinks(pack, tiny_model, canary):
    nodes, base = pack
    payloads = pickle_payloads(canary)
    diffusers_dir = Path(base) / "models" / "diffusers"
    diffusers_dir.mkdir(parents=True, exist_ok=True)
    model_with_symlinked_pickle(tiny_model, diffusers_dir / "planted", payloads["torch-zip"], "diffusion_pytorch_model.bin")
    with pytest.raises(InvalidModelFile, match="pickle"):
        run(nodes.LoadModel, model="planted")
    ckpts = Path(base) / "models" / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    (ckpts / "renamed.safetensors").write_bytes(payloads["torch-legacy"])  # a pickle under a safetensors name
    with pytest.raises(InvalidModelFile, match="pickle"):
        run(nodes.LoadModel, model="checkpoints/renamed.safetensors")
    elsewhere = Path(base) / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "model.safetensors").write_bytes(payloads["torch-zip"])
    (ckpts / "linked").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="points outside"):
        run(nodes.LoadModel, model="checkpoints/linked/model.safetensors")


@pytest.mark.parametrize("reward,name", [("aesthetic", "sac+logos+ava1-l14-linearMSE.safetensors"),
                                         ("hpsv2", "HPS_v2.1_compressed.safetensors"),
                                         ("pickscore", "model.safetensors")])
def test_reward_loaders_refuse_pickles_behind_symlinks(tmp_path, canary, monkeypatch, reward, name):
    monkeypatch.delenv("RLR_REWARD_MODELS", raising=False)
    real = tmp_path / "real"
    real.mkdir()
    (real / name).write_bytes(pickle_payloads(canary)["torch-zip"])
    (real / "weights.pth").write_bytes(pickle_payloads(canary)["pickle-p2"])
    if reward == "pickscore":  # a transformers folder
        (real / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / reward).symlink_to(real, target_is_directory=True)
    with pytest.raises(InvalidModelFile, match="pickle"):
        make_reward(reward, models_dir=tmp_path / "models")


SHIPPED = [Path(__file__).parent.parent / d for d in ("rlr_backend", "rlr_app", "comfy_nodes", "gradio_app.py")]


def unsafe_calls(source: str) -> list[str]:
    """Calls that can unpickle: torch/pickle/dill/joblib load(s), torch.jit.load, np.load(allow_pickle=True),
    trust_remote_code=True, and a model's from_pretrained without use_safetensors=True (configs and
    tokenizers read no weights)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner, name = ast.unparse(node.func.value), node.func.attr
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if (name in ("load", "loads") and owner in ("torch", "pickle", "dill", "joblib", "cloudpickle", "torch.jit",
                                                    "torch.serialization")) \
                or (name == "load" and owner in ("np", "numpy") and kw.get("allow_pickle") == "True") \
                or kw.get("trust_remote_code") == "True" \
                or (name == "from_pretrained" and not owner.endswith(("Config", "Tokenizer"))
                    and kw.get("use_safetensors") != "True"):
            found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_nothing_in_the_shipped_code_can_unpickle():
    files = [f for d in SHIPPED for f in ([d] if d.is_file() else d.rglob("*.py"))]
    found = {str(f): unsafe_calls(f.read_text()) for f in files}
    assert {f: c for f, c in found.items() if c} == {}
    # the check can fail: each of these lines is caught
    for bad in ("torch.load(p)", "pickle.loads(b)", "np.load(p, allow_pickle=True)",
                "StableDiffusionPipeline.from_pretrained(p, local_files_only=True)",
                "AutoModel.from_pretrained(p, trust_remote_code=True, use_safetensors=True)"):
        assert unsafe_calls(bad), bad


def test_a_sharded_index_may_name_only_safetensors_files_of_its_folder(tmp_path):
    from rlr_backend.safe_io import index_shards

    save_tensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    (tmp_path / "weights.data").write_bytes(b"\x80\x02}q\x00.")
    for shard, message in [("weights.data", "only .safetensors"), ("../a.safetensors", "only .safetensors"),
                           ("/etc/passwd", "only .safetensors"), ("b.safetensors", "missing")]:
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
        with pytest.raises((InvalidModelFile, FileNotFoundError), match=message):
            index_shards(tmp_path / "model.safetensors.index.json")
