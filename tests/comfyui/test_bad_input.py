"""Bad input, one case per node, in a real ComfyUI: one line in the error panel (a validation error of
the node, or one execution error) and nothing written under models/ or output/."""

from __future__ import annotations

import json

import pytest

from client import Run, record, workflow

pytestmark = pytest.mark.comfyui

TRAIN = ("1", "2", "3", "4", "5", "6", "7", "8")


def files(server) -> dict:
    return {str(p.relative_to(server.base)): p.read_bytes() for d in ("models", "output")
            for p in (server.base / d).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def prepared(server, comfy_inprocess):
    """An SDXL-layout LoRA file (no header) in models/loras and a LoRA named keep in both LoRA folders."""
    import torch
    from safetensors.torch import save_file

    import tiny_comfy
    from comfy_nodes.comfy_source import ComfySource

    loras = server.base / "models" / "loras"
    model, clip, vae = tiny_comfy.build("sdxl")
    with torch.inference_mode(False):
        m = ComfySource(model, clip, vae, 64, 64).load()
        m.add_lora(2, None, 0)
        sd, _, _ = m.lora_state_dict()
        m.release()
    save_file(sd, str(loras / "sdxl_tiny.safetensors"))
    for folder in (loras / "rlr", server.base / "models" / "rlr_loras"):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(folder / "keep.safetensors"))
    server.post("/free", {"unload_models": True})  # the cached lists of files are refreshed per request
    return server


def graph(server, **changes) -> dict:
    base = workflow(server, "rlr_embedded_default")
    g = {k: v for k, v in base.items() if k in TRAIN}
    g["7"]["inputs"].update(steps=1, num_inference_steps=6, batch_size=2, images_per_prompt=2, preview_every=0)
    for key, value in changes.items():
        node, name = key.split(".")
        g[node]["inputs"][name] = value
    return g


def sampler(server, **inputs) -> dict:
    base = workflow(server, "rlr_embedded_default")
    return {"1": base["1"], "13": base["13"],
            "9": {"class_type": "RLR_Sampler", "inputs": {**base["9"]["inputs"], "steps": 2, "num_images": 1,
                                                          **inputs}}}


def from_comfy(server, **inputs) -> dict:
    g = graph(server)
    g["0"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_random.safetensors"}}
    g["1"] = {"class_type": "RLR_FromComfyModel", "inputs": {"model": ["0", 0], "clip": ["0", 1], "vae": ["0", 2],
                                                             "width": 64, "height": 64, **inputs}}
    return g


CASES = {  # node: (graph maker, what the one line says)
    "RLR_LoadModel": (lambda s: graph(s, **{"1.model": "no_such_model"}), "no_such_model"),
    "RLR_FromComfyModel": (lambda s: from_comfy(s, width=100), "multiples of 8"),
    "RLR_Reward": (lambda s: graph(s, **{"3.weight": 0.0}), "non-zero"),
    "RLR_Estimator": (lambda s: graph(s, **{"4.h": 30}), "h"),
    "RLR_PromptSchedule": (lambda s: graph(s, **{"5.coarse_end": 0.8, "5.mid_end": 0.5}), "coarse_end < mid_end"),
    "RLR_Trainer": (lambda s: graph(s, **{"7.run_name": "../up"}), "run_name"),
    "RLR_Sampler": (lambda s: sampler(s, lora_file="sdxl_tiny.safetensors", strength=1.0), "another base model"),
    "RLR_SaveLoRA": (lambda s: graph(s, **{"8.filename": "../../evil"}), "is not accepted"),
    "RLR_SaveLoRA existing": (lambda s: graph(s, **{"8.filename": "keep", "8.overwrite": False}), "already exists"),
    "wrong socket": (lambda s: graph(s, **{"7.rlr_model": ["2", 0]}), "return_type_mismatch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_writes_nothing(prepared, case):
    server = prepared
    make, message = CASES[case]
    before = files(server)
    run = Run(server, make(server))
    if run.status == 400:  # refused before anything runs: one error on one node
        run.ws.close()
        errors = [e for n in run.response.get("node_errors", {}).values() for e in n["errors"]]
        assert len(errors) == 1 and message in json.dumps(errors), (case, run.response)
        outcome = "validation: " + (errors[0].get("details") or errors[0]["message"])
    else:
        run.wait(900)
        errors = run.of("execution_error")
        assert len(errors) == 1 and "execution_success" not in run.types(), (case, run.types())
        text = errors[0]["exception_message"].strip()
        assert message in text and "\n" not in text, (case, text)
        outcome = f"execution error in {errors[0]['node_type']}: {text}"
    assert files(server) == before, sorted(set(files(server)) ^ set(before))
    assert server.get("/system_stats") and server.proc.poll() is None
    record(f"bad_input {case}", outcome[:300])
