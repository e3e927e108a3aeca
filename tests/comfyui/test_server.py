"""The pack inside a real headless ComfyUI, driven over its HTTP and websocket API: the node list, the
templates browser, and every example workflow in both formats."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from client import REPO, PeakRSS, Run, history, output_images, record, workflow
from rlr_backend.safe_io import load_tensors

pytestmark = pytest.mark.comfyui

NODES = {"RLR_LoadModel", "RLR_FromComfyModel", "RLR_Reward", "RLR_Estimator", "RLR_PromptSchedule", "RLR_Trainer",
         "RLR_Sampler", "RLR_SaveLoRA"}


def test_object_info_lists_the_nodes_and_the_chart(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("RLR_")}
    assert set(ours) == NODES
    aliases = "search_aliases" in info["KSampler"] or any("search_aliases" in v for v in info.values())
    for name, node in ours.items():
        assert node["category"] == "RLR" and node["python_module"].startswith("custom_nodes.")
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
        if aliases:  # ComfyUI >= 0.10 lists them and its search uses them
            assert len(node.get("search_aliases") or []) >= 3, name
    assert any("lora train" in a for a in ours["RLR_Trainer"].get("search_aliases") or ["lora train"])
    assert info["RLR_Trainer"]["output"] == ["LORA_MODEL", "IMAGE", "IMAGE"]
    seed = info["RLR_Trainer"]["input"]["required"]["seed"][1]
    assert seed["control_after_generate"] is False and seed["default"] == 0  # fixed: queueing again reuses the LoRA
    assert any(e.endswith("/rlr_reward_chart.js") for e in server.get("/extensions"))
    log = server.log_text()
    assert "custom_nodes/rlr-backend" in log and "(IMPORT FAILED)" not in log.split("Import times for custom nodes")[-1]
    record("comfyui", {"version": server.version, "search_aliases": aliases})


def test_templates_browser_lists_ui_workflows_with_thumbnails(server):
    """ComfyUI lists example_workflows/*.json per pack and the browser shows <name>.jpg beside each."""
    from PIL import Image

    from workflows import WORKFLOWS

    listed = server.get("/workflow_templates")["rlr-backend"]
    assert sorted(listed) == sorted(WORKFLOWS)  # UI format only: no *_api files there
    for name in listed:
        base = f"{server.url}/api/workflow_templates/rlr-backend/{name}"
        with urllib.request.urlopen(base + ".json", timeout=60) as r:
            ui = json.loads(r.read())
        assert {"nodes", "links"} <= set(ui) and all("type" in n for n in ui["nodes"])
        with urllib.request.urlopen(base + ".jpg", timeout=60) as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            import io

            img = Image.open(io.BytesIO(r.read()))
        assert img.format == "JPEG" and img.width >= 256


def test_committed_workflows_match_this_comfyui(server, tmp_path):
    """The committed API and UI files are what tests/comfyui/workflows.py makes from the /object_info of
    ComfyUI GENERATED_WITH; regenerate with ``RLR_REGENERATE_WORKFLOWS=1 .ci/comfyui -k committed``."""
    from workflows import API_DIR, GENERATED_WITH, UI_DIR, WORKFLOWS, write_all

    info = server.get("/object_info")
    if os.environ.get("RLR_REGENERATE_WORKFLOWS"):
        write_all(info)
    made = write_all(info, tmp_path / "api", tmp_path / "ui")  # raises on a node or input this ComfyUI lacks
    assert len(made) == 3 * len(WORKFLOWS)
    if server.version != GENERATED_WITH:
        pytest.skip(f"the committed files come from ComfyUI {GENERATED_WITH}; this is {server.version}")
    for name in WORKFLOWS:
        for fresh, committed in ((tmp_path / "api" / f"{name}_api.json", API_DIR / f"{name}_api.json"),
                                 (tmp_path / "ui" / f"{name}.json", UI_DIR / f"{name}.json")):
            assert json.loads(fresh.read_text()) == json.loads(committed.read_text()), committed


# the example workflows, shrunk to run in seconds on a CPU (the same changes for both formats)
SHRINK = {
    "rlr_embedded_default": {"7": dict(steps=2, num_inference_steps=6, batch_size=4, images_per_prompt=2,
                                       preview_every=1, lr=0.03),
                             "9": dict(steps=6, num_images=2), "10": dict(steps=6, num_images=2)},
    "rlr_checkpoint_lora": {"1": dict(ckpt_name="sd15_random.safetensors"), "2": dict(width=64, height=64),
                            "3": dict(reward="brightness"),
                            "6": dict(steps=1, num_inference_steps=6, batch_size=2, images_per_prompt=2,
                                      preview_every=0, lr=0.05),
                            "11": dict(width=64, height=64), "12": dict(steps=2), "16": dict(steps=2)},
}
SEEDS = {"rlr_embedded_default": ("9", "10"), "rlr_checkpoint_lora": ("12", "16")}


def shrunk(name: str, graph: dict, seed_shift: int = 0) -> dict:
    g = json.loads(json.dumps(graph))
    for node, changes in SHRINK[name].items():
        g[node]["inputs"].update(changes)
    for node in SEEDS[name]:
        g[node]["inputs"]["seed"] += seed_shift
    return g


def run_and_check(server, name: str, graph: dict) -> tuple[Run, float, float]:
    from workflows import LORA_BRANCH

    t0 = time.perf_counter()
    run = Run(server, graph).wait(1800)
    seconds = time.perf_counter() - t0
    assert run.status == 200 and not run.response.get("node_errors"), run.response
    assert "execution_success" in run.types(), [e.get("exception_message") for e in run.of("execution_error")]
    done = history(server, run.prompt_id)
    outputs = {k for k, v in graph.items() if v["class_type"] in ("PreviewImage", "SaveImage", "RLR_SaveLoRA")}
    assert outputs <= set(done["outputs"]), sorted(outputs - set(done["outputs"]))  # no branch dropped
    without, with_lora = (output_images(server, run, n) for n in LORA_BRANCH[name])
    diff = max(float(abs(a - b).mean()) for a, b in zip(without, with_lora))
    assert diff > 1 / 255, f"{name}: the LoRA branch changes the image by only {diff * 255:.2f}/255"
    return run, diff, seconds


@pytest.mark.parametrize("name", ["rlr_embedded_default", "rlr_checkpoint_lora"])
def test_example_workflow_runs_in_both_formats(server, name):
    """The API graph generated from this server's /object_info runs and the LoRA changes the image; the
    committed UI file, converted as the browser does, is the same graph and runs too (the trainer's
    result is reused, the samplers run again with other seeds)."""
    from ui_workflow import ui_to_api

    from workflows import UI_DIR

    info = server.get("/object_info")
    api = workflow(server, name)
    ui = ui_to_api(json.loads((UI_DIR / f"{name}.json").read_text()), info)
    assert ui == api, {k: (ui.get(k), api.get(k)) for k in set(ui) | set(api) if ui.get(k) != api.get(k)}
    old_api = shrunk(name, api)
    if name == "rlr_embedded_default":  # an API graph saved before the Estimator's step_baseline input existed
        del old_api["4"]["inputs"]["step_baseline"]
    with PeakRSS(server.proc.pid) as mem:
        run, diff, seconds = run_and_check(server, name, old_api)
    run_ui, diff_ui, seconds_ui = run_and_check(server, name, shrunk(name, ui, seed_shift=1))
    figures = {"seconds": round(seconds, 1), "ui_run_seconds": round(seconds_ui, 1),
               "lora_changes_image_by_255": round(diff * 255, 2), "ui_run_changes_by_255": round(diff_ui * 255, 2),
               "peak_rss_mb": round(mem.peak / 2**20), "rss_before_mb": round(mem.start / 2**20)}
    if name == "rlr_embedded_default":
        steps = [d["step"] for d in run.of("rlr.train.step")]
        assert steps == [1, 2] and all(d["reward"] is not None for d in run.of("rlr.train.step"))
        lora = server.base / "models" / "rlr_loras" / "rlr_default.safetensors"  # not under loras/: no core loader
        tensors, meta = load_tensors(lora)
        assert meta["rlr_steps"] == "2" and all(k.startswith("lora_unet_") for k in tensors)
        assert meta["ss_base_model_version"] == "rlr_default_shapes32_v1"
        start = next(m["_t"] for m in run.messages if m["type"] == "executing" and m["data"].get("node") == "7")
        texts = [t for t, node, _ in run.texts if node == "7"]
        assert texts and run.previews, "the trainer showed no progress text or preview"
        figures.update(first_text_s=round(texts[0] - start, 2), first_preview_s=round(run.previews[0] - start, 2),
                       texts=len(texts), previews=len(run.previews))
        assert texts[0] - start < 1.0  # "loading the model" at once
        assert "rlr/rlr_default.safetensors" not in json.dumps(server.get("/object_info/LoraLoader"))
    else:
        lora = server.base / "models" / "loras" / "rlr" / "rlr_sd15.safetensors"
        tensors, meta = load_tensors(lora)
        assert meta["ss_base_model_version"] == "sd_v1" and len(tensors) // 3 > 0
    record(f"workflow_{name}", figures)


def test_sd15_lora_loads_in_the_core_lora_loader(server):
    """After the checkpoint workflow: ComfyUI's standard LoraLoader lists rlr/rlr_sd15 and loads every key."""
    lora = server.base / "models" / "loras" / "rlr" / "rlr_sd15.safetensors"
    if not lora.is_file():
        pytest.skip("needs test_example_workflow_runs_in_both_formats[rlr_checkpoint_lora] first")
    tensors, _ = load_tensors(lora)
    modules = len(tensors) // 3
    loader = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_random.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                     "lora_name": "rlr/rlr_sd15.safetensors", "strength_model": 1.0,
                                                     "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a car", "clip": ["2", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                                   "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    assert "rlr/rlr_sd15.safetensors" in json.dumps(server.get("/object_info/LoraLoader"))
    run = Run(server, loader).wait(900)
    assert "execution_success" in run.types(), [m for m in run.messages if m["type"] == "execution_error"]
    assert "lora key not loaded" not in server.log_text()
    import comfy.lora
    import comfy.sd

    model, *_ = comfy.sd.load_checkpoint_guess_config(
        str(server.base / "models" / "checkpoints" / "sd15_random.safetensors"), output_vae=False, output_clip=False)
    patches = comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert len(patches) == modules
    record("sd15_lora_keys", {"modules": modules, "tensors": len(tensors), "loaded_by_comfyui": len(patches)})


def test_registry_metadata_parses_with_comfyuis_own_parser(comfy_inprocess):
    """[tool.comfy] and [project] as the Comfy Registry reads them (ComfyUI >= 0.3.4x ships the parser)."""
    import re

    parser = pytest.importorskip("comfy_config.config_parser")
    config = parser.extract_node_configuration(str(REPO))
    project, comfy = config.project, config.tool_comfy
    assert re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", project.name) and "comfyui" not in project.name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version) and project.description and project.license.text
    assert comfy.publisher_id == "rlr-backend" and comfy.display_name and comfy.web is None  # WEB_DIRECTORY loads the JS
    assert getattr(project, "supported_comfyui_version", ">=0.3.64") == ">=0.3.64"  # fields of newer parsers
    assert getattr(project, "supported_os", ["OS Independent"]) == ["OS Independent"]
