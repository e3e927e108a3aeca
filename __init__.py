"""ComfyUI loads this folder as a custom node pack (``custom_nodes/<this repo>``).

Outside ComfyUI (tests, the Gradio app, ``import rlr_backend``) nothing here runs: the node pack is
imported only when ComfyUI's ``comfy_api`` is importable. Importing has no side effects beyond making
this checkout's ``rlr_backend`` importable when it is not installed.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    if importlib.util.find_spec("rlr_backend") is None:  # not pip-installed: use this checkout
        sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    from .comfy_nodes import comfy_entrypoint  # noqa: F401
