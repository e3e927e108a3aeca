"""The pack inside a real headless ComfyUI, driven over its HTTP and websocket API."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from rlr_backend.safe_io import load_tensors

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[2]
NODES = {"RLR_LoadModel", "RLR_FromComfyModel", "RLR_Reward", "RLR_Estimator", "RLR_PromptSchedule", "RLR_Trainer",
         "RLR_Sampler", "RLR_SaveLoRA"}
FIGURES = Path(os.environ.get("RLR_COMFYUI_FIGURES", Path(tempfile.gettempdir()) / "rlr-comfyui-figures.json"))


def record(key: str, value) -> None:
    data = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    data[key] = value
    FIGURES.write_text(json.dumps(data, indent=1, sort_keys=True))


def workflow(name: str) -> dict:
    g = json.loads((REPO / "example_workflows" / name).read_text())
    for node in g.values():
        node.pop("_meta", None)
    return g


class Run:
    """One queued prompt: its websocket messages, until ComfyUI reports it finished."""

    def __init__(self, server, graph: dict, on_message=None):
        import websocket

        self.server, self.messages, self.binary = server, [], 0
        self.client_id, self.prompt_id = str(uuid.uuid4()), str(uuid.uuid4())  # ComfyUI >= 0.4 wants UUIDs
        self.ws = websocket.create_connection(server.url.replace("http", "ws") + f"/ws?clientId={self.client_id}",
                                              timeout=900)
        self.on_message = on_message
        self.status, self.response = server.post("/prompt", {"prompt": graph, "client_id": self.client_id,
                                                             "prompt_id": self.prompt_id})

    def wait(self, timeout: float = 900) -> "Run":
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                frame = self.ws.recv()
                if isinstance(frame, bytes):
                    self.binary += 1
                    continue
                msg = json.loads(frame)
                self.messages.append(msg)
                if self.on_message:
                    self.on_message(msg)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, self.prompt_id):
                    continue
                if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return self
                if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == self.prompt_id:
                    return self
            raise TimeoutError(f"prompt {self.prompt_id} did not finish in {timeout} s")
        finally:
            self.ws.close()

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    def of(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == kind]


class PeakRSS:
    """Peak resident memory of the server process (and its children) while a block runs."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def _rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)

    def __enter__(self):
        self.start = self._rss()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def test_object_info_lists_the_nodes_and_the_chart(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("RLR_")}
    assert set(ours) == NODES
    for name, node in ours.items():
        assert node["category"] == "RLR" and node["python_module"].startswith("custom_nodes.")
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert info["RLR_Trainer"]["output"] == ["LORA_MODEL", "IMAGE", "IMAGE"]
    assert any(e.endswith("/rlr_reward_chart.js") for e in server.get("/extensions"))
    log = server.log_text()
    assert "custom_nodes/rlr-backend" in log and "(IMPORT FAILED)" not in log.split("Import times for custom nodes")[-1]


def test_embedded_default_workflow_end_to_end(server):
    g = workflow("rlr_embedded_default_api.json")
    g["7"]["inputs"].update(steps=6, num_inference_steps=10, batch_size=4, images_per_prompt=2, preview_every=3)
    for n in ("9", "10"):
        g[n]["inputs"].update(steps=10, num_images=2)
    t0 = time.perf_counter()
    with PeakRSS(server.proc.pid) as mem:
        run = Run(server, g).wait()
    seconds = time.perf_counter() - t0
    assert run.status == 200, run.response
    assert "execution_success" in run.types(), [e.get("exception_message") for e in run.of("execution_error")] or run.messages[-3:]
    steps = [d["step"] for d in run.of("rlr.train.step")]
    assert steps == list(range(1, 7))
    assert all(d["reward"] is not None for d in run.of("rlr.train.step"))
    assert len([d for d in run.of("progress") if d.get("node") == "7"]) >= 6
    lora = server.base / "models" / "loras" / "rlr" / "rlr_default.safetensors"
    tensors, meta = load_tensors(lora)
    assert meta["rlr_steps"] == "6" and all(k.startswith("lora_unet_") for k in tensors)
    history = server.get(f"/history/{run.prompt_id}")[run.prompt_id]
    assert history["status"]["status_str"] == "success"
    assert {"11", "12", "13", "14"} <= set(history["outputs"])  # curve, before|after, samples
    record("embedded_default_workflow", {"seconds": round(seconds, 1), "trainer_steps": 6, "T": 10, "batch": 4,
                                         "peak_rss_mb": round(mem.peak / 2**20), "rss_before_mb": round(mem.start / 2**20),
                                         "preview_frames": run.binary})


def test_cancel_stops_within_one_update_and_keeps_a_loadable_lora(server):
    import urllib.request

    g = workflow("rlr_embedded_default_api.json")
    g["7"]["inputs"].update(steps=300, num_inference_steps=10, batch_size=4, preview_every=0, run_name="cancelme")
    g = {k: g[k] for k in ("1", "2", "3", "4", "5", "6", "7", "8")}
    seen = {}

    def on_message(msg):
        if msg["type"] == "rlr.train.step" and msg["data"]["step"] == 2 and "at" not in seen:
            seen["at"] = 2
            urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", data=b"{}", method="POST"))

    run = Run(server, g, on_message).wait()
    assert "execution_interrupted" in run.types(), run.types()[-5:]
    partial = sorted((server.base / "models" / "loras" / "rlr").glob("cancelme_interrupted_step*.safetensors"))
    assert len(partial) == 1
    stopped = int(partial[0].name.split("_step")[1].split("_")[0])
    latency = stopped - seen["at"]
    assert 0 <= latency <= 1
    tensors, meta = load_tensors(partial[0])
    assert meta["rlr_interrupted_at_step"] == str(stopped)
    from rlr_backend.lora import load_lora
    from rlr_backend.models.default_model import load_default_pipeline

    assert load_lora(load_default_pipeline().unet, partial[0])
    assert not (server.base / "models" / "loras" / "rlr" / "rlr_default_x.safetensors").exists()
    assert server.get("/system_stats")  # still serving
    record("cancel", {"interrupt_after_step": seen["at"], "stopped_at_step": stopped, "latency_steps": latency})


def test_comfy_checkpoint_train_then_core_lora_loader_loads_every_key(server):
    g = workflow("rlr_checkpoint_lora_api.json")
    g["1"]["inputs"]["ckpt_name"] = "sd15_random.safetensors"
    g["2"]["inputs"].update(width=64, height=64)
    g["6"]["inputs"].update(steps=1, num_inference_steps=6, batch_size=2, images_per_prompt=2, preview_every=0,
                            lr=1e-2)
    g["3"]["inputs"]["reward"] = "brightness"
    g["11"]["inputs"].update(width=64, height=64)
    g["12"]["inputs"].update(steps=2)
    t0 = time.perf_counter()
    run = Run(server, g).wait(1800)
    train_seconds = time.perf_counter() - t0
    assert "execution_success" in run.types(), [m for m in run.messages if m["type"] == "execution_error"]
    lora = server.base / "models" / "loras" / "rlr" / "rlr_sd15.safetensors"
    tensors, meta = load_tensors(lora)
    modules = len(tensors) // 3
    assert meta["ss_base_model_version"] == "sd_v1" and modules > 0
    log_before = len(server.log_text())
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
    assert "rlr/rlr_sd15.safetensors" in server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"][
        "lora_name"][0]  # the standard loader lists it
    run2 = Run(server, loader).wait(900)
    assert "execution_success" in run2.types(), [m for m in run2.messages if m["type"] == "execution_error"]
    assert "lora key not loaded" not in server.log_text()  # neither Load LoRA Model (graph 1) nor LoraLoader
    assert log_before > 0
    import comfy.lora
    import comfy.sd

    model, *_ = comfy.sd.load_checkpoint_guess_config(
        str(server.base / "models" / "checkpoints" / "sd15_random.safetensors"), output_vae=False, output_clip=False)
    patches = comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(model.model, {}))
    assert len(patches) == modules
    record("sd15_lora_keys", {"modules": modules, "tensors": len(tensors), "loaded_by_comfyui": len(patches),
                              "train_workflow_seconds": round(train_seconds, 1)})


def test_bad_input_gives_one_message_and_changes_nothing(server, comfy_inprocess):
    import tiny_comfy
    from comfy_nodes.comfy_model import ComfySource
    from safetensors.torch import save_file
    import torch

    loras = server.base / "models" / "loras"
    model, clip, vae = tiny_comfy.build("sdxl")
    with torch.inference_mode(False):
        m = ComfySource(model, clip, vae, 64, 64).load()
        m.add_lora(2, None, 0)
        sd, _, _ = m.lora_state_dict()
        m.release()
    save_file(sd, str(loras / "sdxl_tiny.safetensors"))
    (loras / "rlr").mkdir(exist_ok=True)
    save_file(sd, str(loras / "rlr" / "keep.safetensors"))
    snapshot = {p: p.read_bytes() for p in loras.rglob("*") if p.is_file()}
    server.post("/free", {"unload_models": True})  # the object_info cache of loras is refreshed per request

    base = workflow("rlr_embedded_default_api.json")

    def graph(**changes):  # load -> reward -> estimator -> prompts -> trainer -> save: one output, nothing else runs
        g = {k: v for k, v in json.loads(json.dumps(base)).items() if k in ("1", "2", "3", "4", "5", "6", "7", "8")}
        g["7"]["inputs"].update(steps=1, num_inference_steps=6, batch_size=2, images_per_prompt=2, preview_every=0)
        for key, value in changes.items():
            node, name = key.split(".")
            g[node]["inputs"][name] = value
        return g

    cases = {  # refused by ComfyUI's validation (400, node_errors) or by our checks (one execution_error)
        "wrong socket": (graph(**{"7.rlr_model": ["2", 0]}), "return_type_mismatch"),
        "unknown reward": (graph(**{"2.reward": "aesthetics"}), "unknown reward 'aesthetics'"),
        "missing model folder": (graph(**{"1.model": "no_such_model"}), "no_such_model"),
        "empty prompt": (graph(**{"5.fine": "   "}), "fine prompt is empty"),
        "traversal": (graph(**{"8.filename": "../../evil"}), "is not accepted"),
        "existing file": (graph(**{"8.filename": "keep", "8.overwrite": False}), "already exists"),
        "sdxl lora on sd1.5": ({"1": base["1"], "13": base["13"],
                                "9": {"class_type": "RLR_Sampler", "inputs": {
                                    **base["9"]["inputs"], "lora_file": "sdxl_tiny.safetensors", "strength": 1.0,
                                    "steps": 2, "num_images": 1}}}, "another base model"),
    }
    outcomes = {}
    for what, (g, message) in cases.items():
        run = Run(server, g)
        if run.status == 400:
            assert message in json.dumps(run.response), (what, run.response)
            run.ws.close()
            outcomes[what] = "validation"
            continue
        run.wait(600)
        errors = run.of("execution_error")
        assert len(errors) == 1 and "execution_success" not in run.types(), (what, run.types())
        assert message in errors[0]["exception_message"], (what, errors[0]["exception_message"])
        assert "\n" not in errors[0]["exception_message"].strip()
        outcomes[what] = "execution_error"
    record("bad_input", outcomes)
    assert not (server.base / "evil.safetensors").exists() and not (server.base / "models" / "evil.safetensors").exists()
    after = {p: p.read_bytes() for p in loras.rglob("*") if p.is_file() and p in snapshot}
    assert after == snapshot
    assert server.get("/system_stats") and server.proc.poll() is None


@pytest.mark.parametrize("name", ["rlr_embedded_default", "rlr_checkpoint_lora"])
def test_ui_format_workflows_match_the_api_ones(server, name):
    """The UI-format files are what ui_workflow.py makes from the API files with this ComfyUI's /object_info
    (node types, widget order, socket types); regenerate with
    ``RLR_REGENERATE_UI_WORKFLOWS=1 .ci/comfyui -k ui_format``."""
    from ui_workflow import api_to_ui

    folder = REPO / "example_workflows"
    api = json.loads((folder / f"{name}_api.json").read_text())
    committed = json.loads((folder / f"{name}.json").read_text())
    made = api_to_ui(api, server.get("/object_info"))
    if os.environ.get("RLR_REGENERATE_UI_WORKFLOWS"):  # after a node's inputs change: .ci/comfyui -k ui_format
        (folder / f"{name}.json").write_text(json.dumps(made, indent=1) + "\n")
        committed = json.loads((folder / f"{name}.json").read_text())

    def essentials(ui):  # what loading needs; output display names vary between ComfyUI versions (V1 vs V3 nodes)
        for n in ui["nodes"]:
            n["outputs"] = [(o["type"], o["links"]) for o in n["outputs"]]
        return ui

    assert essentials(made) == essentials(committed)
