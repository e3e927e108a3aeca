"""Contract tests of the ComfyUI node pack: schemas, and execute() of every node against the real backend
on the embedded default, run under torch.inference_mode() as ComfyUI runs nodes. ComfyUI's host modules
come from tests/comfy_standin (ComfyUI itself: tests/comfyui, ``-m comfyui``)."""

import asyncio
import importlib
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from rlr_backend.choices import ESTIMATOR_CHOICES
from rlr_backend.rewards import REWARDS
from rlr_backend.safe_io import load_tensors
from rlr_backend.train import TrainConfig

STANDIN = Path(__file__).parent / "comfy_standin"
HOST_MODULES = ("comfy_api", "comfy", "folder_paths", "server")
FAST = dict(steps=2, lr=1e-2, lora_rank=2, seed=0, batch_size=2, images_per_prompt=2, num_inference_steps=4,
            guidance_scale=4.0, eta=1.0, preview_every=1, run_name="t")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """comfy_nodes.nodes imported against the stand-in host; ComfyUI's folders in a temp dir."""
    base = tmp_path_factory.mktemp("comfy")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in HOST_MODULES + ("comfy_nodes",)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(STANDIN))
    try:
        import folder_paths

        folder_paths.base = str(base)
        nodes = importlib.import_module("comfy_nodes.nodes")
        yield nodes, base
    finally:
        sys.path.remove(str(STANDIN))
        for k in [k for k in sys.modules if k.split(".")[0] in HOST_MODULES + ("comfy_nodes",)]:
            del sys.modules[k]
        sys.modules.update(saved)


def run(node, **inputs):
    with torch.inference_mode():  # as ComfyUI's executor
        return node.execute(**inputs)


def test_schemas(pack):
    nodes, _ = pack
    import comfy_nodes

    listed = asyncio.run(asyncio.run(comfy_nodes.comfy_entrypoint()).get_node_list())
    assert listed == nodes.NODES
    schemas = {n.define_schema().node_id: n.define_schema() for n in nodes.NODES}
    assert set(schemas) == {"RLR_LoadModel", "RLR_FromComfyModel", "RLR_Reward", "RLR_Estimator",
                            "RLR_PromptSchedule", "RLR_Trainer", "RLR_Sampler", "RLR_SaveLoRA"}
    meta = {f.name: f.metadata for f in fields(TrainConfig)}
    for node_id, s in schemas.items():
        assert s.category == "RLR" and s.display_name.startswith("RLR ") and s.description
        for i in s.inputs:
            assert i.kw.get("tooltip"), f"{node_id}.{i.id} has no tooltip"
            name = {"preview_every": "eval_every"}.get(i.id, i.id)
            if name in meta and "min" in meta[name] and "min" in i.kw:
                assert i.kw["min"] >= meta[name]["min"], f"{node_id}.{i.id} allows less than the config's min"
    combos = {i.id: i.kw["options"] for i in schemas["RLR_Reward"].inputs + schemas["RLR_Estimator"].inputs
              if "options" in i.kw}
    assert combos["reward"] == sorted(REWARDS) and combos["estimator"] == sorted(ESTIMATOR_CHOICES)
    trainer = {i.id: i for i in schemas["RLR_Trainer"].inputs}
    assert trainer["steps"].kw["default"] == TrainConfig.steps and trainer["steps"].kw["min"] == 1
    assert [o.io_type for o in schemas["RLR_Trainer"].outputs] == ["LORA_MODEL", "IMAGE", "IMAGE"]
    assert schemas["RLR_SaveLoRA"].is_output_node


def test_pack_root_is_v3_only_and_inert_outside_comfyui():
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('pack', {str(root / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(root)!r}])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert m.WEB_DIRECTORY == './web' and not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
            "assert not hasattr(m, 'comfy_entrypoint')  # no ComfyUI here\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert (root / "web" / "rlr_reward_chart.js").is_file()


def chain(nodes, reward="prompt_alignment", **prompt_kw):
    model = run(nodes.LoadModel, model="(embedded default)").args[0]
    r = run(nodes.Reward, reward=reward, weight=1.0).args[0]
    r = run(nodes.Reward, reward="saturation", weight=0.2, add_to=r).args[0]
    est = run(nodes.Estimator, estimator="rlr", h=2, fo_steps=1, zo_mode="latent_lr", nu=1e-3, truncation=2,
              chain_len=2).args[0]
    kw = dict(fine="a red circle on a blue background", coarse="a red shape", mid="a red circle", coarse_end=0.3,
              mid_end=0.7, ho_start=0, ho_end=0)
    kw.update(prompt_kw)
    p = run(nodes.PromptSchedule, **kw).args[0]
    p = run(nodes.PromptSchedule, fine="a green square on a white background", coarse="", mid="", coarse_end=0.3,
            mid_end=0.7, ho_start=2, ho_end=3, add_to=p).args[0]
    return model, r, est, p


def test_train_save_sample_chain(pack):
    nodes, base = pack
    import comfy.utils

    model, r, est, p = chain(nodes)
    assert [(t.name, t.weight) for t in r] == [("prompt_alignment", 1.0), ("saturation", 0.2)] and p.ho_range == (2, 3) and len(p.prompts) == 2
    comfy.utils.UPDATES.clear()
    out = run(nodes.Trainer, rlr_model=model, reward=r, prompts=p, estimator=est, **FAST)
    lora, curve, grid = out.args
    from rlr_backend.models.default_model import BASE_MODEL_VERSION

    assert lora.metadata["ss_base_model_version"] == BASE_MODEL_VERSION and lora.metadata["rlr_steps"] == "2"
    assert lora.metadata["ss_learning_rate"] == "0.01"  # a rate given is the rate used
    assert all(k.startswith("lora_unet_") for k in lora) and any(v.abs().sum() > 0 for k, v in lora.items()
                                                                  if k.endswith("lora_up.weight"))
    for img in (curve, grid):
        assert img.dim() == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and 0 <= img.min() <= img.max() <= 1
    bar = [u[1] for u in comfy.utils.UPDATES]
    assert bar == sorted(bar) and bar[-1] == 2 and bar.count(1) >= 1  # the bar counts updates (it stays at 2
    # while the best-LoRA guard's final check evaluates)
    assert comfy.utils.UPDATES[0][1] == 0 and comfy.utils.UPDATES[0][3]  # a preview before the first update
    runs = list((base / "output" / "rlr_runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.jsonl").is_file()

    name = run(nodes.SaveLoRA, lora=lora, filename="my_lora", overwrite=False).args[0]
    path = base / "models" / name  # the embedded default's LoRAs: models/rlr_loras, which no core loader lists
    assert name == "rlr_loras/my_lora.safetensors" and path.is_file()
    assert not (base / "models" / "loras").exists()
    assert "rlr_loras/my_lora.safetensors" in nodes.lora_files()
    saved, meta = load_tensors(path)
    assert saved.keys() == lora.keys() and meta["ss_network_module"] == "networks.lora"
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        run(nodes.SaveLoRA, lora=lora, filename="my_lora", overwrite=False)
    assert path.read_bytes() == before

    kw = dict(rlr_model=model, prompt="a red circle on a blue background", seed=3, num_images=2, steps=4,
              guidance_scale=4.0, eta=1.0)
    base_img = run(nodes.Sampler, **kw).args[0]
    zero = run(nodes.Sampler, lora=lora, strength=0.0, **kw).args[0]
    with_lora = run(nodes.Sampler, lora=lora, strength=1.0, **kw).args[0]
    assert base_img.shape == (2, 32, 32, 3)
    assert torch.equal(base_img, zero) and not torch.equal(base_img, with_lora)


def test_cancel_stops_within_a_model_call_and_keeps_the_last_update(pack):
    nodes, base = pack
    import comfy.model_management as mm
    import comfy.utils

    model, r, est, p = chain(nodes)
    comfy.utils.UPDATES.clear()
    real = comfy.utils.ProgressBar.update_absolute

    def press_cancel_after_first(self, value, total=None, preview=None):
        real(self, value, total, preview)
        if value == 1:
            mm.interrupt_current_processing(True)  # Cancel arrives right after update 1

    comfy.utils.ProgressBar.update_absolute = press_cancel_after_first
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(nodes.Trainer, rlr_model=model, reward=r, prompts=p, estimator=est,
                **{**FAST, "steps": 50, "run_name": "cancel"})
    finally:
        comfy.utils.ProgressBar.update_absolute = real
    assert not mm.processing_interrupted()
    partial = list((base / "models" / "rlr_loras").glob("cancel_interrupted_step*.safetensors"))
    assert len(partial) == 1 and partial[0].name.startswith("cancel_interrupted_step1_")  # update 2 never finished
    tensors, meta = load_tensors(partial[0])
    assert meta["rlr_interrupted_at_step"] == "1" and all(torch.isfinite(v.float()).all() for v in tensors.values())
    from rlr_backend.lora import load_lora
    from rlr_backend.models.default_model import load_default_pipeline

    assert load_lora(load_default_pipeline().unet, partial[0])  # the partial LoRA loads


def test_bad_inputs_give_one_clear_message(pack):
    nodes, base = pack
    model, r, est, p = chain(nodes)
    cases = [
        (lambda: run(nodes.Reward, reward="aesthetics", weight=1.0), ValueError, "unknown reward 'aesthetics'"),
        (lambda: run(nodes.Reward, reward="position", weight=1.0, target="middle"), ValueError,
         "unknown position target"),
        (lambda: run(nodes.Reward, reward="size", weight=1.0, target="1.5"), ValueError, "between 0 and 1"),
        (lambda: run(nodes.Reward, reward="brightness", weight=1.0, target="left"), ValueError, "takes no argument"),
        (lambda: run(nodes.Trainer, rlr_model=model, reward=r, prompts=p, estimator=est,
                     **{**FAST, "kl_weight": -1.0}), ValueError, "kl_weight"),
        (lambda: chain(nodes, fine="   "), ValueError, "fine prompt is empty"),
        (lambda: run(nodes.Sampler, rlr_model=model, prompt="", seed=0, num_images=1, steps=2, guidance_scale=1.0,
                     eta=1.0), ValueError, "prompt is empty"),
        (lambda: run(nodes.LoadModel, model="gone"), FileNotFoundError, "model folder 'gone' does not exist"),
        (lambda: run(nodes.LoadModel, model="../x"), ValueError, "must be the name of a folder"),
        (lambda: run(nodes.Trainer, rlr_model=r, reward=r, prompts=p, estimator=est, **FAST), ValueError,
         "rlr_model input is not an RLR model"),
        (lambda: run(nodes.Trainer, rlr_model=model, reward=p, prompts=p, estimator=est, **FAST), ValueError,
         "reward input is not a reward"),
        (lambda: run(nodes.Trainer, rlr_model=model, reward=r, prompts=p, estimator=est,
                     **{**FAST, "images_per_prompt": 3}), ValueError, "multiple of images_per_prompt"),
        (lambda: run(nodes.Trainer, rlr_model=model, reward=r, prompts=p, estimator=est,
                     **{**FAST, "run_name": "../up"}), ValueError, "run_name"),
        (lambda: run(nodes.PromptSchedule, fine="x", coarse="", mid="", coarse_end=0.8, mid_end=0.5, ho_start=0,
                     ho_end=0), ValueError, "coarse_end < mid_end"),
        (lambda: run(nodes.Estimator, estimator="rlr", h=0, fo_steps=1, zo_mode="latent_lr", nu=1e-3,
                     truncation=2, chain_len=2), ValueError, "h"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_lora_for_another_base_model_is_refused(pack):
    nodes, _ = pack
    model, *_ = chain(nodes)
    sdxl_like = {"lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn1_to_q.lora_down.weight":
                 torch.zeros(4, 1280),
                 "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn1_to_q.lora_up.weight":
                 torch.zeros(1280, 4)}
    with pytest.raises(ValueError, match="another base model"):
        run(nodes.Sampler, rlr_model=model, prompt="a red circle", seed=0, num_images=1, steps=2,
            guidance_scale=1.0, eta=1.0, lora=sdxl_like, strength=1.0)


@pytest.mark.parametrize("name", [
    "../../etc/x", "/tmp/x", "C:\\x", "..\\..\\x", "%2e%2e%2fx", "a/../../b", ".hidden", "x\x00.safetensors", "CON",
    "aux.safetensors", "a" * 300, "a\u2215b", "a\uff0fb", "trailing.", "trailing ", "", "..", "a/b", "~/x", "x y",
])
def test_lora_filenames_are_refused_or_contained(tmp_path, name):
    from comfy_nodes.logic import lora_target

    try:
        target = lora_target(tmp_path, name)
    except ValueError:
        return
    assert target.resolve().parent == (tmp_path / "rlr").resolve() and target.name.endswith(".safetensors")


def test_symlinked_lora_folder_pointing_outside_is_refused(tmp_path):
    from comfy_nodes.logic import lora_target

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "rlr").symlink_to(outside)
    with pytest.raises(ValueError, match="outside"):
        lora_target(tmp_path / "loras", "x")


def test_loading_the_pack_has_no_side_effects(tmp_path):
    """As ComfyUI loads it (package from the repo root, comfy_api importable): no network, no processes and
    no file writes during import, V3 entry point only; the node list and schemas build without writing."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    code = f"""
import asyncio, builtins, importlib.util, os, socket, subprocess, sys
sys.path.insert(0, {str(STANDIN)!r})
import folder_paths
folder_paths.base = {str(tmp_path)!r}

def refuse(*a, **k):
    raise AssertionError("side effect during import: " + repr(a[:2]))

saved = socket.socket, socket.create_connection, subprocess.Popen, os.system
socket.socket = socket.create_connection = subprocess.Popen = os.system = refuse
real_open = builtins.open
def guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        refuse(file, mode)
    return real_open(file, mode, *a, **k)
builtins.open = guarded_open
spec = importlib.util.spec_from_file_location("pack", {str(root / "__init__.py")!r},
                                              submodule_search_locations=[{str(root)!r}])
m = importlib.util.module_from_spec(spec); sys.modules["pack"] = m; spec.loader.exec_module(m)
assert not hasattr(m, "NODE_CLASS_MAPPINGS") and m.WEB_DIRECTORY == "./web"
socket.socket, socket.create_connection, subprocess.Popen, os.system = saved  # asyncio's loop needs a socketpair
nodes = asyncio.run(asyncio.run(m.comfy_entrypoint()).get_node_list())
assert len(nodes) == 8 and all(n.define_schema().node_id.startswith("RLR_") for n in nodes)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(tmp_path.iterdir())  # nothing written, not even the folders


def test_load_model_lists_and_loads_single_file_checkpoints(pack):
    """models/checkpoints/*.safetensors appear as checkpoints/<name> and load offline at a chosen size;
    pickles are not listed, traversal and image_size on a folder are refused."""
    from benchmarks.ldm_export import save_ldm_checkpoint

    from rlr_backend.models.loader import load_model
    from rlr_backend.models.tiny_pipelines import save_tiny_pipeline

    nodes, base = pack
    ckpts = base / "models" / "checkpoints"
    (ckpts / "sd").mkdir(parents=True)
    folder = save_tiny_pipeline("sd1", base / "tiny-sd1")
    save_ldm_checkpoint(load_model(folder).pipe, ckpts / "sd" / "tiny.safetensors")
    (ckpts / "old.ckpt").write_bytes(b"\x80\x02pickle")
    options = next(i for i in nodes.LoadModel.define_schema().inputs if i.id == "model").options
    assert "checkpoints/sd/tiny.safetensors" in options and not any(o.endswith(".ckpt") for o in options)
    source = run(nodes.LoadModel, model="checkpoints/sd/tiny.safetensors", image_size=32).args[0]
    assert source.image_size == 32 and source.load().latent_shape == (4, 16, 16)
    with pytest.raises(ValueError, match="outside"):
        run(nodes.LoadModel, model="checkpoints/../../tiny-sd1/unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(Exception, match="only .safetensors"):
        run(nodes.LoadModel, model="checkpoints/old.ckpt")
    with pytest.raises(ValueError, match="image_size applies to single-file"):
        run(nodes.LoadModel, model="some-folder", image_size=64)


def test_structure_rewards_take_their_target(pack):
    nodes, _ = pack
    r = run(nodes.Reward, reward="position", weight=2.0, target="0.3:0.7").args[0]
    r = run(nodes.Reward, reward="size", weight=1.0, add_to=r).args[0]  # empty target: the default
    assert [(t.name, t.arg, t.weight) for t in r] == [("position", "0.3:0.7", 2.0), ("size", "0.4", 1.0)]
    from comfy_nodes import logic

    assert logic.reward_spec(r) == "position:0.3:0.7=2,size:0.4=1"


def test_a_run_trains_inside_its_sources_training_switch(tmp_path):
    """logic.train enters the source's ``training()`` (ComfyUI's in_training switch for ComfyUI MODELs, whose
    fused kernels have no backward otherwise) around the whole run, and leaves it when the run fails."""
    from comfy_nodes import logic

    seen = []

    class Source:
        name = "fake"

        def training(self):
            import contextlib

            @contextlib.contextmanager
            def switch():
                seen.append("on")
                try:
                    yield
                finally:
                    seen.append("off")
            return switch()

        def load(self):
            seen.append("load")
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        logic.train(Source(), TrainConfig(output_dir=tmp_path, reward="brightness"))
    assert seen == ["on", "load", "off"]
    with pytest.raises(ValueError, match="not an RLR model"):
        logic.check_source(type("NoSwitch", (), {"load": lambda self: None})(), "RLR Trainer")


def test_the_estimator_nodes_step_baseline_switch_reaches_the_run(pack):
    """On by default (TrainConfig's); off gives the paper's estimator: the run's config and metrics say which.
    The learning rate 0 is the estimator's measured rate: 1e-3 with the step baseline, 3e-3 without."""
    import json

    nodes, base = pack
    model, r, _, p = chain(nodes, reward="brightness")
    knobs = dict(estimator="rlr", h=2, fo_steps=1, zo_mode="latent_lr", nu=1e-3, truncation=2, chain_len=2)
    assert run(nodes.Estimator, **knobs).args[0]["step_baseline"] is True
    for on in (True, False):
        est = run(nodes.Estimator, **knobs, step_baseline=on).args[0]
        lora = run(nodes.Trainer, rlr_model=model, reward=r, prompts=p, estimator=est,
                   **dict(FAST, run_name=f"sb-{on}", lr=0.0)).args[0]
        folder = next((base / "output" / "rlr_runs").glob(f"sb-{on}*"))
        saved = json.loads((folder / "config.json").read_text())
        assert saved["step_baseline"] is on and saved["lr"] == (1e-3 if on else 3e-3)
        assert lora.metadata["ss_learning_rate"] == ("0.001" if on else "0.003")
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [("step_baseline_rewards" in row) for row in rows if row["step"] > 0] == [on, on]
