"""What every section of docs/benchmarks.md uses: loading a suite's results, the run's one-line provenance,
saving a figure, formatting."""

from __future__ import annotations

import json
from pathlib import Path

from rlr_backend.safe_io import atomic_path


def _load(results: Path, suite: str) -> dict | None:
    """The full result of a suite if there is one, else the quick one; efficiency files split by
    reward (``efficiency-full-<reward>.json``) are merged."""
    for budget in ("full", "quick"):
        p = results / f"{suite}-{budget}.json"
        parts = sorted(results.glob(f"{suite}-{budget}-*.json"))
        if p.is_file() and not (suite in ("longrun", "flowrun", "guardrun", "flowguard") and parts):
            return json.loads(p.read_text())
        if p.is_file():
            parts = [p, *parts]  # the long-run suite may be split by variant across processes
        if parts:
            return merged([json.loads(q.read_text()) for q in parts])
    return None


def merged(loaded: list[dict]) -> dict:
    """Several result files as one: the first's metadata, all their runs, seconds and commands."""
    out = dict(loaded[0])
    out["runs"] = [run for r in loaded for run in r["runs"]]
    out["seconds"] = sum(r["seconds"] for r in loaded)
    out["command"] = "; ".join(r["command"] for r in loaded)
    return out


def _about(r: dict) -> str:
    m = r["machine"]
    return (f"*{r['budget']} run, {r['started']}, {r['seconds'] / 60:.1f} min; {m['cpu']}, {m['cores']} cores, "
            f"{m['threads']} torch thread(s), load {m['load_at_start']:.2f} -> {r.get('load_at_end', float('nan')):.2f}; "
            f"torch {m['torch']}, diffusers {m['diffusers']}, commit {m['commit']}. Command: `{r['command']}`.*")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _plt().close(fig)


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _dims(rows: list[dict]) -> str:
    """The dimension(s) of the T^2 tests in the rows (one value, or a range)."""
    dims = sorted({x["t2_dims"] for x in rows if x.get("t2_dims") is not None})
    return "-".join(str(d) for d in (dims[:1] + dims[-1:] if len(dims) > 1 else dims)) or "?"


def sync_block(page: Path, name: str, lines: list[str]) -> bool:
    """Replace what ``page`` holds between the markers ``<!-- name -->`` and ``<!-- /name -->`` (each on a line
    of its own) with ``lines``, so a hand-written page shows a generated table without a hand-copied one going
    stale; False, and the page untouched, when it has no such markers."""
    text = page.read_text()
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if begin not in text or end not in text.split(begin, 1)[1]:
        return False
    head, rest = text.split(begin, 1)
    new = head + begin + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1]
    if new != text:
        with atomic_path(page) as tmp:
            Path(tmp).write_text(new)
    return True
