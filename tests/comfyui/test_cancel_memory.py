"""Cancel and memory in a real ComfyUI: Cancel during the first evaluation and during an update stops
within a model call and keeps a loadable LoRA (time from Cancel to idle measured); five runs and a
/free leave the server as large as after the first run."""

from __future__ import annotations

import json
import os
import time

import pytest

from client import Run, cpu_seconds, interrupt, record, rss, workflow
from rlr_backend.safe_io import load_tensors

pytestmark = pytest.mark.comfyui

TRAIN_ONLY = ("1", "2", "3", "4", "5", "6", "7", "11")  # the trainer and the preview of its reward curve


def trainer_graph(server, **changes) -> dict:
    g = workflow(server, "rlr_embedded_default")
    g = {k: g[k] for k in TRAIN_ONLY}
    g["7"]["inputs"].update(changes)
    return g


@pytest.mark.parametrize("phase,when,steps_done", [
    ("evaluation", lambda text: "evaluation before training" in text, 0),
    ("update", lambda text: text.startswith("update 2 of"), 1),
])
def test_cancel_within_a_model_call_keeps_a_loadable_lora(server, phase, when, steps_done):
    name = f"cancel_{phase}"
    g = trainer_graph(server, steps=300, num_inference_steps=10 if phase == "update" else 100, batch_size=4,
                      preview_every=0, run_name=name, seed=11 if phase == "update" else 12)
    pressed = {}

    def on_message(msg):
        if msg["type"] == "_text" and msg["data"]["node"] == "7" and "t" not in pressed and when(msg["data"]["text"]):
            pressed["text"] = msg["data"]["text"]
            pressed["cpu"] = cpu_seconds(server.proc.pid)
            pressed["t"] = interrupt(server)

    run = Run(server, g, on_message).wait()
    assert "t" in pressed, f"never saw the {phase} phase: {[t for _, _, t in run.texts][:5]}"
    assert "execution_interrupted" in run.types(), run.types()[-5:]
    interrupted = next(m["_t"] for m in run.messages if m["type"] == "execution_interrupted")
    deadline = time.perf_counter() + 30
    while server.get("/queue")["queue_running"] and time.perf_counter() < deadline:
        time.sleep(0.02)
    idle = time.perf_counter()  # the queue is empty: ComfyUI takes the next prompt
    cpu = cpu_seconds(server.proc.pid) - pressed["cpu"]  # the work Cancel costs; ~wall time on a quiet core
    load = os.getloadavg()[0]
    assert server.get("/queue")["queue_running"] == []
    latency = idle - pressed["t"]
    partial = sorted((server.base / "models" / "rlr_loras").glob(f"{name}_interrupted_step*.safetensors"))
    assert len(partial) == 1, partial
    stopped = int(partial[0].name.split("_step")[1].split("_")[0])
    assert stopped == steps_done, (stopped, pressed["text"])  # the update in progress never finished
    tensors, meta = load_tensors(partial[0])
    assert meta["rlr_interrupted_at_step"] == str(stopped)
    from rlr_backend.lora import load_lora
    from rlr_backend.models.default_model import load_default_pipeline

    assert load_lora(load_default_pipeline().unet, partial[0])
    assert latency < 10.0, f"Cancel took {latency:.1f} s to reach idle"
    record(f"cancel_{phase}", {"text_when_pressed": pressed["text"], "stopped_at_update": stopped,
                               "cancel_to_interrupted_message_s": round(interrupted - pressed["t"], 2),
                               "cancel_to_idle_s": round(latency, 2), "server_cpu_s": round(cpu, 2),
                               "load_average": round(load, 1)})


def test_memory_is_given_back_after_runs_and_free(server):
    """RSS after five runs and a /free is within 10% of RSS after the first run."""
    sizes = []
    for i in range(5):
        g = trainer_graph(server, steps=2, num_inference_steps=6, batch_size=4, images_per_prompt=2, preview_every=0,
                          run_name=f"mem{i}", seed=100 + i)
        run = Run(server, g).wait()
        assert "execution_success" in run.types(), [e.get("exception_message") for e in run.of("execution_error")]
        time.sleep(1.0)
        sizes.append(rss(server.proc.pid))
    status, _ = server.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    time.sleep(5.0)  # the prompt worker frees between prompts
    after_free = rss(server.proc.pid)
    record("memory", {"rss_after_each_run_mb": [round(s / 2**20) for s in sizes],
                      "rss_after_free_mb": round(after_free / 2**20)})
    assert after_free <= 1.10 * sizes[0], json.dumps([round(s / 2**20) for s in sizes + [after_free]])
    assert max(sizes) <= 1.10 * sizes[0], json.dumps([round(s / 2**20) for s in sizes])
