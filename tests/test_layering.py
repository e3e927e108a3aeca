"""The backend is a plain library: importing every module must not pull in ComfyUI or Gradio."""

import pathlib
import pkgutil
import subprocess
import sys

import rlr_backend


def test_backend_imports_without_ui_packages():
    modules = [m.name for m in pkgutil.walk_packages(rlr_backend.__path__, "rlr_backend.")]
    assert len(modules) > 10
    code = (
        "import sys\n"
        "for name in ('comfy', 'comfy_api', 'comfy_nodes', 'folder_paths', 'server', 'gradio', 'gradio_app'):\n"
        "    sys.modules[name] = None\n"
        f"for m in {modules!r}:\n"
        "    __import__(m)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_pickle_loading_in_the_backend():
    import pathlib
    import re

    root = pathlib.Path(rlr_backend.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if re.search(r"\bpickle\.loads?\(|torch\.load\(|allow_pickle=True|trust_remote_code=True", text):
            offenders.append(str(path))
    assert not offenders, offenders


def test_node_logic_imports_without_comfyui():
    """comfy_nodes.logic (what the nodes do) needs only the backend; ComfyUI names stay in nodes.py and glue."""
    code = (
        "import sys\n"
        "for name in ('comfy', 'comfy_api', 'folder_paths', 'server', 'gradio'):\n"
        "    sys.modules[name] = None\n"
        "import comfy_nodes, comfy_nodes.logic\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr[-2000:]


def test_gradio_app_imports_gradio_only_to_build_the_page():
    """The app's form helpers work with gradio poisoned; only build_ui/main import it."""
    code = (
        "import sys\n"
        "for name in ('comfy', 'folder_paths', 'server', 'gradio'):\n"
        "    sys.modules[name] = None\n"
        "import gradio_app, pathlib\n"
        "errors, kw = gradio_app.check_form(gradio_app.form_defaults(), gradio_app.Settings(pathlib.Path('runs')))\n"
        "assert errors == {} and kw['prompts'], errors\n"
        "try:\n"
        "    gradio_app.build_ui(gradio_app.Settings(pathlib.Path('runs')))\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('build_ui ran without gradio')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=pathlib.Path(rlr_backend.__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
