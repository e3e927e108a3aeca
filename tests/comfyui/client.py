"""Talking to the headless ComfyUI of the tier: queue a graph and follow it over the websocket, read
its output images, measure the server's memory; figures go to $RLR_COMFYUI_FIGURES."""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIGURES = Path(os.environ.get("RLR_COMFYUI_FIGURES", Path(tempfile.gettempdir()) / "rlr-comfyui-figures.json"))


def record(key: str, value) -> None:
    data = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    data[key] = value
    FIGURES.write_text(json.dumps(data, indent=1, sort_keys=True))


def workflow(server, name: str) -> dict:
    """The API graph of example workflow ``name`` for this server (generated from its /object_info)."""
    from workflows import api, runnable

    return runnable(api(name, server.get("/object_info")))


class Run:
    """One queued prompt: its websocket messages, until ComfyUI reports it finished."""

    def __init__(self, server, graph: dict, on_message=None):
        import websocket

        self.server, self.messages, self.binary, self.texts, self.previews = server, [], 0, [], []
        self.client_id, self.prompt_id = str(uuid.uuid4()), str(uuid.uuid4())  # ComfyUI >= 0.4 wants UUIDs
        self.ws = websocket.create_connection(server.url.replace("http", "ws") + f"/ws?clientId={self.client_id}",
                                              timeout=900)
        self.on_message = on_message
        self.status, self.response = server.post("/prompt", {"prompt": graph, "client_id": self.client_id,
                                                             "prompt_id": self.prompt_id})

    def wait(self, timeout: float = 900) -> "Run":
        if self.status != 200:  # refused: nothing will run
            self.ws.close()
            raise AssertionError(f"ComfyUI refused the prompt ({self.status}): {self.response}")
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                frame = self.ws.recv()
                if isinstance(frame, bytes):  # ComfyUI's binary events: 4-byte type, then the payload
                    self.binary += 1
                    kind = int.from_bytes(frame[:4], "big")
                    if kind == 3:  # progress text: node id length, node id, text
                        n = int.from_bytes(frame[4:8], "big")
                        self.texts.append((time.perf_counter(), frame[8:8 + n].decode(), frame[8 + n:].decode()))
                        if self.on_message:
                            self.on_message({"type": "_text", "data": {"node": frame[8:8 + n].decode(),
                                                                      "text": frame[8 + n:].decode()}})
                    elif kind in (1, 4):  # a preview image
                        self.previews.append(time.perf_counter())
                    continue
                msg = json.loads(frame)
                msg["_t"] = time.perf_counter()
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




def history(server, prompt_id: str, timeout: float = 30) -> dict:
    """/history of a finished prompt (ComfyUI 0.33 may store it just after the success message)."""
    deadline = time.time() + timeout
    while True:
        entry = server.get(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None or time.time() > deadline:
            if entry is None:
                raise AssertionError(f"ComfyUI has no history of prompt {prompt_id}")
            return entry
        time.sleep(0.1)


def output_images(server, run: Run, node: str) -> list:
    """The images an output node of a finished run shows, as float arrays (H, W, 3) in [0, 1]."""
    import numpy as np
    from PIL import Image

    out = []
    for item in history(server, run.prompt_id)["outputs"][node]["images"]:
        query = urllib.parse.urlencode({k: item[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{server.url}/view?{query}", timeout=60) as r:
            out.append(np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=np.float32) / 255)
    return out


def rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def interrupt(server) -> float:
    """Press Cancel (POST /interrupt); returns when it was pressed (perf_counter)."""
    t = time.perf_counter()
    urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", data=b"{}", method="POST"), timeout=60)
    return t


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the server process so far (all its threads)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system
