"""Stand-in for the few ``comfy_api.latest`` names the RLR nodes use, for the contract tests.

It records what the nodes declare; ComfyUI itself is exercised by the real-ComfyUI tier
(tests/comfyui, ``-m comfyui``), which checks the same schemas through ``/object_info``.
"""
