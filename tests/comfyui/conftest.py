"""The real-ComfyUI tier: ComfyUI importable in-process, and a headless server with this pack loaded.

Run with ``.ci/comfyui`` (prepares ComfyUI outside the repo and sets RLR_COMFYUI_PATHS). Nothing here
imports ComfyUI at collection time, so the default suite collects and deselects these tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def comfy_paths() -> dict:
    raw = os.environ.get("RLR_COMFYUI_PATHS")
    if not raw:
        raise RuntimeError("the ComfyUI tier runs through .ci/comfyui, which prepares ComfyUI and sets RLR_COMFYUI_PATHS")
    return json.loads(raw)


@pytest.fixture(scope="session")
def comfy_inprocess(comfy_paths):
    """ComfyUI's modules importable here, on the CPU, one thread."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, comfy_paths["comfyui_dir"])
    sys.path.insert(0, str(HERE))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401

    return comfy_paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, base: Path, log: Path):
        self.url, self.proc, self.base, self.log = url, proc, base, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = r.read()
                return r.status, json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def server(comfy_inprocess, tmp_path_factory):
    """ComfyUI main.py --cpu on a free loopback port with --base-directory in a temp dir (models, output,
    custom_nodes with this repo symlinked in as a pack); an SD1.5-shaped random checkpoint made for the test."""
    import tiny_comfy

    base = tmp_path_factory.mktemp("comfyui")
    for d in ("models/checkpoints", "models/loras", "models/diffusers", "custom_nodes", "output", "temp", "input",
              "user"):  # no models/rlr_loras: the pack registers it and the first save creates it
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / "rlr-backend").symlink_to(REPO, target_is_directory=True)
    t0 = time.perf_counter()
    tiny_comfy.save_sd15_shaped_checkpoint(base / "models" / "checkpoints" / "sd15_random.safetensors")
    print(f"[comfyui tier] SD1.5-shaped checkpoint written in {time.perf_counter() - t0:.1f} s")
    port = _free_port()
    log = base / "server.log"
    env = {**os.environ, "PYTHONPATH": comfy_inprocess["stub"], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [comfy_inprocess["python"], "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch", "--preview-method", "none",
           "--database-url", "sqlite:///:memory:"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=comfy_inprocess["comfyui_dir"], env=env, stdout=f, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", proc, base, log)
    srv.version = comfy_inprocess.get("version", "")
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({proc.returncode}):\n{srv.log_text()[-4000:]}")
        try:
            srv.get("/system_stats")
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"ComfyUI did not start in 240 s:\n{srv.log_text()[-4000:]}")
    yield srv
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
