"""The example workflows, written once here and generated for a ComfyUI from its /object_info:

* API format (``tests/comfyui/workflows/<name>_api.json``): for ``POST /prompt``, scripts and the tests;
* UI format (``example_workflows/<name>.json``): what ComfyUI's Templates browser opens, with a
  thumbnail beside it (``<name>.jpg``, a drawing of the graph).

Inputs a workflow does not set take the server's defaults (e.g. ``bypass`` of Load LoRA Model, new in
ComfyUI 0.4), so the files match the node signatures of the server they were made from. Run:

    python tests/comfyui/workflows.py http://127.0.0.1:8188     # a running ComfyUI with this pack
    python tests/comfyui/workflows.py object_info.json          # or its saved /object_info

The committed files come from ComfyUI ``GENERATED_WITH`` (the version CI tests); the real-ComfyUI tier
regenerates them from the live server, compares them with the committed ones on that version, and
runs both formats on any version.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

from ui_workflow import _is_widget, api_to_ui

REPO = Path(__file__).resolve().parents[2]
API_DIR = Path(__file__).resolve().parent / "workflows"
UI_DIR = REPO / "example_workflows"
GENERATED_WITH = "0.3.75"

PROMPT = "a red circle on a blue background"
CAR = "a photo of a red sports car on a mountain road at sunset"

# node id -> (class_type, title, inputs set by the workflow); ["id", slot] is a link
WORKFLOWS: dict[str, dict[str, tuple[str, str, dict]]] = {
    "rlr_embedded_default": {
        "1": ("RLR_LoadModel", "RLR Load Model", {"model": "(embedded default)"}),
        "2": ("RLR_Reward", "RLR Reward", {"reward": "prompt_alignment", "weight": 1.0}),
        "3": ("RLR_Reward", "RLR Reward", {"reward": "brightness", "weight": 1.0, "add_to": ["2", 0]}),
        "4": ("RLR_Estimator", "RLR Estimator", {"estimator": "rlr", "h": 2, "fo_steps": 4, "zo_mode": "latent_lr",
                                                 "nu": 0.001, "truncation": 2, "chain_len": 2,
                                                 "step_baseline": True}),
        "5": ("RLR_PromptSchedule", "RLR Prompt Schedule", {"fine": PROMPT, "coarse": "a red shape",
                                                             "mid": "a red circle", "coarse_end": 0.33,
                                                             "mid_end": 0.67, "ho_start": 0, "ho_end": 0}),
        "6": ("RLR_PromptSchedule", "RLR Prompt Schedule", {"fine": "a green square on a white background",
                                                             "coarse": "", "mid": "", "coarse_end": 0.33,
                                                             "mid_end": 0.67, "ho_start": 0, "ho_end": 0,
                                                             "add_to": ["5", 0]}),
        "7": ("RLR_Trainer", "RLR Trainer", {"rlr_model": ["1", 0], "reward": ["3", 0], "prompts": ["6", 0],
                                             "estimator": ["4", 0], "steps": 60, "lr": 0.0, "lora_rank": 4,
                                             "seed": 0, "batch_size": 8, "images_per_prompt": 4,
                                             "num_inference_steps": 20, "guidance_scale": 4.0, "eta": 1.0,
                                             "preview_every": 10, "run_name": "default"}),
        "8": ("RLR_SaveLoRA", "RLR Save LoRA", {"lora": ["7", 0], "filename": "rlr_default", "overwrite": True}),
        "9": ("RLR_Sampler", "before (strength 0)", {"rlr_model": ["1", 0], "prompt": PROMPT, "seed": 7,
                                                    "num_images": 4, "steps": 20, "guidance_scale": 4.0, "eta": 1.0,
                                                    "strength": 0.0}),
        "10": ("RLR_Sampler", "after (strength 1)", {"rlr_model": ["1", 0], "prompt": PROMPT, "seed": 7,
                                                    "num_images": 4, "steps": 20, "guidance_scale": 4.0, "eta": 1.0,
                                                    "lora": ["7", 0], "strength": 1.0}),
        "11": ("PreviewImage", "reward curve", {"images": ["7", 1]}),
        "12": ("PreviewImage", "evaluation before | after", {"images": ["7", 2]}),
        "13": ("PreviewImage", "before", {"images": ["9", 0]}),
        "14": ("PreviewImage", "after", {"images": ["10", 0]}),
    },
    "rlr_checkpoint_lora": {
        "1": ("CheckpointLoaderSimple", "Load Checkpoint", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
        "2": ("RLR_FromComfyModel", "RLR From Comfy Model", {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "width": 512, "height": 512}),
        "3": ("RLR_Reward", "RLR Reward", {"reward": "saturation", "weight": 1.0}),
        "4": ("RLR_Reward", "RLR Reward", {"reward": "contrast", "weight": 0.5, "add_to": ["3", 0]}),
        "5": ("RLR_PromptSchedule", "RLR Prompt Schedule", {"fine": CAR, "coarse": "a photo of a car",
                                                             "mid": "a photo of a red sports car", "coarse_end": 0.33,
                                                             "mid_end": 0.67, "ho_start": 0, "ho_end": 0}),
        "6": ("RLR_Trainer", "RLR Trainer", {"rlr_model": ["2", 0], "reward": ["4", 0], "prompts": ["5", 0],
                                             "steps": 30, "lr": 0.0005, "lora_rank": 4, "seed": 0, "batch_size": 2,
                                             "images_per_prompt": 2, "num_inference_steps": 20,
                                             "guidance_scale": 5.0, "eta": 1.0, "preview_every": 10,
                                             "run_name": "sd15"}),
        "7": ("RLR_SaveLoRA", "RLR Save LoRA", {"lora": ["6", 0], "filename": "rlr_sd15", "overwrite": True}),
        "8": ("LoraModelLoader", "Load LoRA Model", {"model": ["1", 0], "lora": ["6", 0], "strength_model": 1.0}),
        "9": ("CLIPTextEncode", "positive", {"text": CAR, "clip": ["1", 1]}),
        "10": ("CLIPTextEncode", "negative", {"text": "", "clip": ["1", 1]}),
        "11": ("EmptyLatentImage", "Empty Latent Image", {"width": 512, "height": 512, "batch_size": 1}),
        "12": ("KSampler", "KSampler with the LoRA", {"model": ["8", 0], "seed": 0, "steps": 20, "cfg": 5.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                                                     "positive": ["9", 0], "negative": ["10", 0],
                                                     "latent_image": ["11", 0]}),
        "13": ("VAEDecode", "VAE Decode", {"samples": ["12", 0], "vae": ["1", 2]}),
        "14": ("SaveImage", "with the LoRA", {"images": ["13", 0], "filename_prefix": "rlr_sd15"}),
        "15": ("PreviewImage", "reward curve", {"images": ["6", 1]}),
        "16": ("KSampler", "KSampler without the LoRA", {"model": ["1", 0], "seed": 0, "steps": 20, "cfg": 5.0,
                                                        "sampler_name": "euler", "scheduler": "normal",
                                                        "denoise": 1.0, "positive": ["9", 0], "negative": ["10", 0],
                                                        "latent_image": ["11", 0]}),
        "17": ("VAEDecode", "VAE Decode", {"samples": ["16", 0], "vae": ["1", 2]}),
        "18": ("PreviewImage", "without the LoRA", {"images": ["17", 0]}),
    },
    "rlr_sd35_flow_lora": {
        "1": ("CheckpointLoaderSimple", "Load Checkpoint (SD3.5 medium)",
              {"ckpt_name": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"}),
        "2": ("RLR_FromComfyModel", "RLR From Comfy Model", {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                             "width": 512, "height": 512}),
        "3": ("RLR_Reward", "RLR Reward", {"reward": "saturation", "weight": 1.0}),
        "4": ("RLR_Reward", "RLR Reward", {"reward": "contrast", "weight": 0.5, "add_to": ["3", 0]}),
        "5": ("RLR_PromptSchedule", "RLR Prompt Schedule", {"fine": CAR, "coarse": "a photo of a car",
                                                             "mid": "a photo of a red sports car", "coarse_end": 0.33,
                                                             "mid_end": 0.67, "ho_start": 0, "ho_end": 0}),
        "6": ("RLR_Trainer", "RLR Trainer (flow chain)", {
            "rlr_model": ["2", 0], "reward": ["4", 0], "prompts": ["5", 0], "steps": 30, "lr": 0.0003,
            "lora_rank": 8, "seed": 0, "batch_size": 2, "images_per_prompt": 2, "num_inference_steps": 16,
            "guidance_scale": 4.5, "eta": 1.0, "preview_every": 10, "run_name": "sd35", "flow_step": "flow_sde",
            "flow_eta": 0.7, "sde_start": 0, "sde_size": 0}),
        "7": ("RLR_SaveLoRA", "RLR Save LoRA", {"lora": ["6", 0], "filename": "rlr_sd35", "overwrite": True}),
        "8": ("LoraModelLoader", "Load LoRA Model", {"model": ["1", 0], "lora": ["6", 0], "strength_model": 1.0}),
        "9": ("CLIPTextEncode", "positive", {"text": CAR, "clip": ["1", 1]}),
        "10": ("CLIPTextEncode", "negative", {"text": "", "clip": ["1", 1]}),
        "11": ("EmptySD3LatentImage", "Empty SD3 Latent Image", {"width": 512, "height": 512, "batch_size": 1}),
        "12": ("KSampler", "KSampler with the LoRA", {"model": ["8", 0], "seed": 0, "steps": 20, "cfg": 4.5,
                                                     "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                                                     "positive": ["9", 0], "negative": ["10", 0],
                                                     "latent_image": ["11", 0]}),
        "13": ("VAEDecode", "VAE Decode", {"samples": ["12", 0], "vae": ["1", 2]}),
        "14": ("SaveImage", "with the LoRA", {"images": ["13", 0], "filename_prefix": "rlr_sd35"}),
        "15": ("PreviewImage", "reward curve", {"images": ["6", 1]}),
        "16": ("KSampler", "KSampler without the LoRA", {"model": ["1", 0], "seed": 0, "steps": 20, "cfg": 4.5,
                                                        "sampler_name": "euler", "scheduler": "simple",
                                                        "denoise": 1.0, "positive": ["9", 0], "negative": ["10", 0],
                                                        "latent_image": ["11", 0]}),
        "17": ("VAEDecode", "VAE Decode", {"samples": ["16", 0], "vae": ["1", 2]}),
        "18": ("PreviewImage", "without the LoRA", {"images": ["17", 0]}),
    },
}
# which output nodes show the image without and with the LoRA (the tests compare them)
LORA_BRANCH = {"rlr_embedded_default": ("13", "14"), "rlr_checkpoint_lora": ("18", "14"),
               "rlr_sd35_flow_lora": ("18", "14")}


class WorkflowError(ValueError):
    pass


def _inputs(info: dict) -> dict[str, list]:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _default(spec: list):
    if isinstance(spec[0], list):  # a combo: options inline (old style)
        return spec[1].get("default", spec[0][0] if spec[0] else None) if len(spec) > 1 else spec[0][0]
    options = spec[1].get("options") if len(spec) > 1 else None
    if spec[0] == "COMBO" and options:
        return spec[1].get("default", options[0])
    return spec[1].get("default") if len(spec) > 1 else None


def api(name: str, object_info: dict) -> dict:
    """The API-format graph of workflow ``name`` for the server whose /object_info is given: every
    required input set (the workflow's value or the server's default), links checked against the
    sockets' types; unknown nodes or inputs are refused."""
    graph = {}
    spec = WORKFLOWS[name]
    for node_id, (cls, title, given) in spec.items():
        info = object_info.get(cls)
        if info is None:
            raise WorkflowError(f"{name}: node {node_id} needs {cls}, which this ComfyUI does not have")
        inputs = _inputs(info)
        unknown = sorted(set(given) - set(inputs))
        if unknown:
            raise WorkflowError(f"{name}: {cls} has no input {', '.join(unknown)} in this ComfyUI")
        values = {}
        for inp, ispec in inputs.items():
            if inp in given:
                value = given[inp]
                if isinstance(value, list):
                    src_cls = spec[value[0]][0]
                    out_type = object_info[src_cls]["output"][value[1]]
                    want = ispec[0]
                    if isinstance(want, str) and want not in ("*", out_type) and out_type not in want.split(","):
                        raise WorkflowError(f"{name}: {cls}.{inp} takes {want}, node {value[0]} gives {out_type}")
                values[inp] = value
            elif inp in info["input"].get("required", {}) or _is_widget(ispec):  # as the browser sends it
                default = _default(ispec)
                if default is None and inp in info["input"].get("required", {}):
                    raise WorkflowError(f"{name}: {cls}.{inp} is required and has no default; set it here")
                if default is not None:
                    values[inp] = default
        graph[node_id] = {"inputs": values, "class_type": cls, "_meta": {"title": title}}
    return graph


def runnable(graph: dict) -> dict:
    """The graph as ``POST /prompt`` takes it (without the UI titles)."""
    return {k: {"inputs": dict(v["inputs"]), "class_type": v["class_type"]} for k, v in graph.items()}


def thumbnail(ui: dict, path: Path, size: tuple[int, int] = (512, 384)) -> None:
    """A JPEG drawing of the graph (nodes at their canvas positions, titles, links), as the Templates
    browser shows next to a custom node's workflow (``<name>.jpg`` beside ``<name>.json``)."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = ui["nodes"]
    x0 = min(n["pos"][0] for n in nodes) - 20
    y0 = min(n["pos"][1] for n in nodes) - 20
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + 20
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + 20
    scale = min(size[0] / (x1 - x0), size[1] / (y1 - y0))
    ox, oy = (size[0] - (x1 - x0) * scale) / 2, (size[1] - (y1 - y0) * scale) / 2

    def at(x, y):
        return ox + (x - x0) * scale, oy + (y - y0) * scale

    img = Image.new("RGB", size, (32, 34, 38))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    by_id = {n["id"]: n for n in nodes}
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = by_id[src], by_id[dst]
        draw.line([at(a["pos"][0] + a["size"][0], a["pos"][1] + 20), at(b["pos"][0], b["pos"][1] + 20)],
                  fill=(140, 150, 160), width=2)
    for n in nodes:
        left, top = at(*n["pos"])
        right, bottom = at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        ours = n["type"].startswith("RLR_")
        draw.rounded_rectangle([left, top, right, bottom], radius=4, fill=(46, 70, 110) if ours else (60, 62, 68),
                               outline=(120, 170, 255) if ours else (130, 130, 130))
        title = n.get("title") or n["type"]
        draw.text((left + 3, top + 2), title[: max(int((right - left) / 6), 4)], fill=(235, 235, 235), font=font)
    with open(path, "wb") as f:
        img.save(f, format="JPEG", quality=88)


def object_info_from(source: str) -> dict:
    if source.startswith("http"):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=120) as r:
            return json.loads(r.read())
    return json.loads(Path(source).read_text())


def write_all(object_info: dict, api_dir: Path = API_DIR, ui_dir: Path = UI_DIR) -> list[Path]:
    written = []
    api_dir.mkdir(parents=True, exist_ok=True)
    ui_dir.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOWS:
        graph = api(name, object_info)
        ui = api_to_ui(graph, object_info)
        for path, data in ((api_dir / f"{name}_api.json", graph), (ui_dir / f"{name}.json", ui)):
            path.write_text(json.dumps(data, indent=1) + "\n")
            written.append(path)
        thumbnail(ui, ui_dir / f"{name}.jpg")
        written.append(ui_dir / f"{name}.jpg")
    return written


if __name__ == "__main__":
    for p in write_all(object_info_from(sys.argv[1])):
        print(p.relative_to(REPO))
