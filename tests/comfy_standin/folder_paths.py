"""``folder_paths`` with one configurable base folder (ComfyUI's layout: output/, models/loras, ...)."""

import os

base = os.environ.get("RLR_STANDIN_BASE", "/nonexistent")


def get_output_directory():
    return os.path.join(base, "output")


def get_folder_paths(name):
    return [os.path.join(base, "models", name)]
