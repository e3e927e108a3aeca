"""The ComfyUI node pack of rlr-backend (V3 API). ``nodes.py`` needs ComfyUI; ``logic.py`` does not."""


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing the RLR nodes."""
    from .nodes import RLRExtension

    return RLRExtension()
