"""ComfyUI's model folders as the RLR nodes use them: the LoRA lists, where SaveLoRA writes, and the folder
of the embedded default's LoRAs (``models/rlr_loras``). Imported only inside ComfyUI (or with a stand-in)."""

from __future__ import annotations

import os

from . import logic


def folder_paths_module():
    import folder_paths

    return folder_paths


NO_LORA = "(none)"


def lora_files() -> list[str]:
    """LoRA files for RLR Sampler: models/loras, then the embedded default's own folder as rlr_loras/<name>."""
    out = []
    for kind, prefix in (("loras", ""), (logic.EMBEDDED_LORA_FOLDER, logic.EMBEDDED_LORA_FOLDER + "/")):
        try:
            out += [prefix + f for f in folder_paths_module().get_filename_list(kind) if f.endswith(".safetensors")]
        except KeyError:
            pass
    return out


def lora_path(name: str) -> str:
    prefix = logic.EMBEDDED_LORA_FOLDER + "/"
    if name.startswith(prefix):
        return folder_paths_module().get_full_path_or_raise(logic.EMBEDDED_LORA_FOLDER, name[len(prefix):])
    return folder_paths_module().get_full_path_or_raise("loras", name)


def folder_list(kind: str) -> list[str]:
    """ComfyUI's folders for ``kind`` (models/diffusers, models/checkpoints, plus extra_model_paths)."""
    try:
        return list(folder_paths_module().get_folder_paths(kind))
    except KeyError:
        return []


def checkpoint_names() -> list[str]:
    try:
        return list(folder_paths_module().get_filename_list("checkpoints"))
    except KeyError:
        return []


def save_roots() -> tuple[str, str]:
    """(models/loras, models/rlr_loras): where SaveLoRA writes LoRAs of real checkpoints / of the embedded default."""
    fp = folder_paths_module()
    return fp.get_folder_paths("loras")[0], fp.get_folder_paths(logic.EMBEDDED_LORA_FOLDER)[0]


def register_folders() -> None:
    """models/rlr_loras: LoRAs of the embedded default, in a folder of their own (no core loader lists it).
    In-memory only: the folder is created when the first such LoRA is saved."""
    fp = folder_paths_module()
    if logic.EMBEDDED_LORA_FOLDER not in getattr(fp, "folder_names_and_paths", {}):
        fp.add_model_folder_path(logic.EMBEDDED_LORA_FOLDER, os.path.join(fp.models_dir, logic.EMBEDDED_LORA_FOLDER))
