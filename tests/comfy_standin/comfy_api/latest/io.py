"""Records of V3 schema declarations (same constructor names and keywords as ComfyUI's ``_io.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class _Decl:
    io_type = "*"

    def __init__(self, id: str | None = None, **kw: Any):
        self.id, self.kw = id, kw

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["kw"][name]
        except KeyError:
            raise AttributeError(name) from None


def _type(io_type: str):
    class T:
        class Input(_Decl):
            pass

        class Output(_Decl):
            pass

    T.io_type = T.Input.io_type = T.Output.io_type = io_type
    return T


Int, Float, String, Boolean, Combo = (_type(t) for t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))
Image, Model, Clip, Vae = (_type(t) for t in ("IMAGE", "MODEL", "CLIP", "VAE"))


def Custom(io_type: str):
    return _type(io_type)


class Hidden:
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"


@dataclass
class Schema:
    node_id: str
    display_name: str = ""
    category: str = ""
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False


class _HiddenValues:
    unique_id = "7"


class ComfyNode:
    hidden = _HiddenValues()


class NodeOutput:
    def __init__(self, *args: Any, ui: Any = None):
        self.args, self.ui = args, ui
