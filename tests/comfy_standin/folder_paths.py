"""``folder_paths`` with one configurable base folder (ComfyUI's layout: output/, models/loras, ...)."""

import os

base = os.environ.get("RLR_STANDIN_BASE", "/nonexistent")
folder_names_and_paths: dict = {}
registered: list = []


def __getattr__(name):
    if name == "models_dir":
        return os.path.join(base, "models")
    raise AttributeError(name)


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    registered.append((folder_name, full_folder_path))  # get_folder_paths already maps any name into base


def get_output_directory():
    return os.path.join(base, "output")


def get_folder_paths(name):
    return [os.path.join(base, "models", name)]


def get_filename_list(name):
    root = get_folder_paths(name)[0]
    if not os.path.isdir(root):
        return []
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def get_full_path_or_raise(name, filename):
    path = os.path.join(get_folder_paths(name)[0], filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Model in folder '{name}' with filename '{filename}' not found.")
    return path
