"""Where the memory model's measurements and page live, how they are read, and the byte unit of its tables."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent.parent / "results" / "memory-model.json"
QUICK_RESULTS = Path(__file__).parent.parent / "results" / "memory-model-quick.json"
DOC = Path(__file__).parent.parent.parent / "docs" / "memory.md"
GB = 1e9


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
