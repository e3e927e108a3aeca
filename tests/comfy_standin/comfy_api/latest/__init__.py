"""Minimal ``comfy_api.latest``: ``io`` (schema records) and ``ComfyExtension``."""

from . import io  # noqa: F401


class ComfyExtension:
    async def get_node_list(self):
        raise NotImplementedError
