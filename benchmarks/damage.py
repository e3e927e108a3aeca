"""Ways to damage what the project reads, for the reliability battery and its fast tests: byte-level
mutations of a safetensors file, damaged checkpoints and run folders (and damage a resume recovers
from), traversal names, and planted symlinks. Every case is made on the spot from a good file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Callable

import torch


# -- safetensors bytes ----------------------------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict | bytes, body: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _edit_header(fn: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        header, body = split(data)
        out = fn(header)
        return join(header if out is None else out, body)
    return mutate


def edit_tensors(fn: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        from safetensors.torch import load, save

        tensors = dict(load(data))
        fn(tensors)
        return save(tensors)
    return mutate


def _tensor_edit(fn: Callable[[torch.Tensor], torch.Tensor], key: str | None = None):
    def edit(t: dict) -> None:
        k = key or sorted(t)[0]
        t[k] = fn(t[k])
    return edit


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


def _dup_key(data: bytes) -> bytes:
    header, body = split(data)
    text = json.dumps(header)
    k = _first(header)
    entry = json.dumps({k: header[k]})[1:-1]
    return join((text[:-1] + ", " + entry + "}").encode(), body)


def _many_entries(data: bytes) -> bytes:
    header, body = split(data)
    extra = ",".join(f'"x{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(200_000))
    return join(json.dumps(header)[:-1].encode() + b"," + extra.encode() + b"}", body)


def _overlap(h: dict) -> None:
    keys = [k for k in h if k != "__metadata__"]
    h[keys[1]]["data_offsets"] = list(h[keys[0]]["data_offsets"])


def _header_offset(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


#: (name, bytes -> bytes) mutations of a valid safetensors file; each must be refused with one line
FILE_MUTATIONS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("truncated to 0 bytes", lambda d: b""),
    ("truncated to 1 byte", lambda d: d[:1]),
    ("truncated to 7 bytes", lambda d: d[:7]),
    ("truncated to 8 bytes", lambda d: d[:8]),
    ("truncated to 9 bytes", lambda d: d[:9]),
    ("truncated inside the header", lambda d: d[:_header_offset(d) - 1]),
    ("truncated after the header", lambda d: d[:_header_offset(d) + 1]),
    ("truncated mid-data", lambda d: d[:(len(d) + _header_offset(d)) // 2]),
    ("last byte missing", lambda d: d[:-1]),
    ("trailing garbage", lambda d: d + b"\x00" * 8),
    ("header length 2^63", lambda d: struct.pack("<Q", 2**63) + d[8:]),
    ("header length past the end", lambda d: struct.pack("<Q", len(d)) + d[8:]),
    ("header does not start with {", lambda d: d[:8] + b"[" + d[9:]),
    ("header not UTF-8", lambda d: d[:9] + b"\xff\xfe" + d[11:]),
    ("header is a JSON list", lambda d: join(b"[" + b" " * (_header_offset(d) - 10) + b"]", d[_header_offset(d):])),
    ("duplicate tensor name", _dup_key),
    ("overlapping offsets", _edit_header(_overlap)),
    ("offsets past the data", _edit_header(lambda h: h[_first(h)].update(data_offsets=[0, 10**9]))),
    ("negative offset", _edit_header(lambda h: h[_first(h)].update(data_offsets=[-4, 0]))),
    ("unknown dtype", _edit_header(lambda h: h[_first(h)].update(dtype="F128"))),
    ("shape does not match the bytes", _edit_header(lambda h: h[_first(h)].update(shape=[10**6]))),
    ("negative dimension", _edit_header(lambda h: h[_first(h)].update(shape=[-1]))),
    ("200,000 entries", _many_entries),
    ("metadata value not text", _edit_header(lambda h: h.update(__metadata__={"a": 1}))),
    ("NaN value", edit_tensors(_tensor_edit(_nan))),
    ("inf value", edit_tensors(_tensor_edit(_inf))),
]


# -- checkpoint mutations -------------------------------------------------------------------------------
def _reseal(ckpt: Path) -> None:
    """Update state.json's checksums, so only the content checks can catch a change."""
    state_path = ckpt / "state.json"
    state = json.loads(state_path.read_text())
    if "sha256" in state:
        state["sha256"] = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in state["sha256"]}
        state_path.write_text(json.dumps(state))


def _ckpt_file(name: str, mutate: Callable[[bytes], bytes], reseal: bool = True) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        ckpt = latest(run)
        p = ckpt / name
        p.write_bytes(mutate(p.read_bytes()))
        if reseal:
            _reseal(ckpt)
    return apply


def _state(fn: Callable[[dict], object], whole: bool = False) -> Callable[[Path], None]:
    """Edit the newest checkpoint's state.json in place (``whole``: replace it by what ``fn`` returns)."""
    def apply(run: Path) -> None:
        p = latest(run) / "state.json"
        state = json.loads(p.read_text())
        out = fn(state)
        p.write_text(json.dumps(out if whole else state))  # json.dumps writes NaN as a NaN token
    return apply


def latest(run: Path) -> Path:
    return run / "ckpt" / (run / "ckpt" / "LATEST").read_text().strip()


def _set(d: dict, path: str, value) -> None:
    *head, last = path.split(".")
    for k in head:
        d = d[k] if not isinstance(d, list) else d[int(k)]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def _drop(key: str) -> Callable[[dict], None]:
    return lambda t: t.pop(sorted(k for k in t if k.startswith(key))[0])


def _write(rel: str, text: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        (run / rel).write_text(text)
    return apply


def _config(fn: Callable[[dict], object], whole: bool = False) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        p = run / "config.json"
        cfg = json.loads(p.read_text())
        out = fn(cfg)
        p.write_text(json.dumps(out if whole else cfg))
    return apply


_T = edit_tensors
CHECKPOINT_MUTATIONS: list[tuple[str, Callable[[Path], None]]] = [
    *[(f"lora.safetensors: {n}", _ckpt_file("lora.safetensors", m)) for n, m in FILE_MUTATIONS[::3]],
    ("lora: changed bytes, checksum not updated",
     _ckpt_file("lora.safetensors", _T(_tensor_edit(lambda t: t + 1)), reseal=False)),
    ("lora: NaN", _ckpt_file("lora.safetensors", _T(_tensor_edit(_nan)))),
    ("lora: inf", _ckpt_file("lora.safetensors", _T(_tensor_edit(_inf)))),
    ("lora: wrong shape", _ckpt_file("lora.safetensors", _T(_tensor_edit(lambda t: t[:1].clone())))),
    ("lora: float16", _ckpt_file("lora.safetensors", _T(_tensor_edit(lambda t: t.half())))),
    ("lora: integer tensor", _ckpt_file("lora.safetensors", _T(_tensor_edit(lambda t: t.long())))),
    ("lora: tensor missing", _ckpt_file("lora.safetensors", _T(_drop("")))),
    ("lora: extra tensor", _ckpt_file("lora.safetensors", _T(lambda t: t.update(extra=torch.zeros(2))))),
    ("lora: replaced by a pickle", _ckpt_file("lora.safetensors", lambda d: pickle.dumps({"w": [1.0]}))),
    ("optim: NaN first moment", _ckpt_file("optim.safetensors", _T(_tensor_edit(_nan, "0.exp_avg")))),
    ("optim: inf second moment", _ckpt_file("optim.safetensors", _T(_tensor_edit(_inf, "0.exp_avg_sq")))),
    ("optim: negative second moment",
     _ckpt_file("optim.safetensors", _T(_tensor_edit(lambda t: -t - 1, "0.exp_avg_sq")))),
    ("optim: empty (Adam state lost)", _ckpt_file("optim.safetensors", _T(lambda t: t.clear()))),
    ("optim: one tensor's state missing",
     _ckpt_file("optim.safetensors", _T(lambda t: [t.pop(k) for k in list(t) if k.startswith("1.")]))),
    ("optim: wrong shape", _ckpt_file("optim.safetensors", _T(_tensor_edit(lambda t: t[:1].clone(), "0.exp_avg")))),
    ("optim: negative step count", _ckpt_file("optim.safetensors", _T(_tensor_edit(lambda t: -t, "0.step")))),
    ("optim: NaN step count",
     _ckpt_file("optim.safetensors", _T(_tensor_edit(lambda t: t * float("nan"), "0.step")))),
    ("optim: state of a tensor the run lacks",
     _ckpt_file("optim.safetensors", _T(lambda t: t.update({"9999.exp_avg": torch.zeros(1)})))),
    ("optim: truncated", _ckpt_file("optim.safetensors", lambda d: d[:len(d) // 2])),
    ("rng: wrong size", _ckpt_file("rng.safetensors", _T(_tensor_edit(lambda t: t[:100].clone())))),
    ("rng: float instead of bytes", _ckpt_file("rng.safetensors", _T(_tensor_edit(lambda t: t.float())))),
    ("rng: tensor missing", _ckpt_file("rng.safetensors", _T(lambda t: t.clear()))),
    ("rng: truncated", _ckpt_file("rng.safetensors", lambda d: d[:20])),
    ("state.json: not JSON", lambda r: (latest(r) / "state.json").write_text("{not json")),
    ("state.json: empty", lambda r: (latest(r) / "state.json").write_text("")),
    ("state.json: a list", _state(lambda s: [s], whole=True)),
    ("state.json: step missing", _state(lambda s: s.pop("step"))),
    ("state.json: negative step", _state(lambda s: _set(s, "step", -4))),
    ("state.json: step as text", _state(lambda s: _set(s, "step", "4"))),
    ("state.json: step of another folder", _state(lambda s: _set(s, "step", s["step"] + 1))),
    ("state.json: step 10^30", _state(lambda s: _set(s, "step", 10**30))),
    ("state.json: NaN learning rate", _state(lambda s: _set(s, "param_groups.0.lr", float("nan")))),
    ("state.json: negative learning rate", _state(lambda s: _set(s, "param_groups.0.lr", -1.0))),
    ("state.json: learning rate as text", _state(lambda s: _set(s, "param_groups.0.lr", "0.01"))),
    ("state.json: beta of 1.5", _state(lambda s: _set(s, "param_groups.0.betas", [1.5, 0.999]))),
    ("state.json: NaN eps", _state(lambda s: _set(s, "param_groups.0.eps", float("nan")))),
    ("state.json: param_groups missing", _state(lambda s: s.pop("param_groups"))),
    ("state.json: other parameter indices", _state(lambda s: _set(s, "param_groups.0.params", [0, 1]))),
    ("state.json: baseline missing", _state(lambda s: s.pop("baseline"))),
    ("state.json: NaN baseline", _state(lambda s: _set(s, "baseline.ema_value", float("nan")))),
    ("state.json: baseline history not a list", _state(lambda s: _set(s, "baseline.history", {"0": 3}))),
    ("state.json: j_norms as text", _state(lambda s: _set(s, "j_norms", "x"))),
    ("state.json: eval_rewards key not a step", _state(lambda s: _set(s, "eval_rewards", {"x": 1.0}))),
    ("state.json: version 99", _state(lambda s: _set(s, "version", 99))),
    ("state.json: checksums of other files", _state(lambda s: _set(s, "sha256", {"a": "b"}))),
    ("state.json: optimizer entries as text", _state(lambda s: _set(s, "optimizer_entries", "64"))),
    ("LATEST: ../../../../etc", _write("ckpt/LATEST", "../../../../etc")),
    ("LATEST: absolute path", _write("ckpt/LATEST", "/etc/passwd")),
    ("LATEST: step-000004/../..", _write("ckpt/LATEST", "step-000004/../..")),
    ("LATEST: garbage", _write("ckpt/LATEST", "\x00\xff garbage")),
    ("config.json: not JSON", _write("config.json", "{")),
    ("config.json: a list", _config(lambda c: [c], whole=True)),
    ("config.json: unknown option", _config(lambda c: c.update(evil=1))),
    ("config.json: steps as text", _config(lambda c: c.update(steps="x"))),
    ("config.json: prompts missing", _config(lambda c: c.pop("prompts"))),
    ("config.json: NaN learning rate", _config(lambda c: c.update(lr=float("nan")))),
    ("config.json: other learning rate", _config(lambda c: c.update(lr=0.5))),
]

#: damage a resume recovers from (the run continues and ends bitwise equal to an uninterrupted one)
RECOVERABLE_MUTATIONS: list[tuple[str, Callable[[Path], None]]] = [
    ("metrics.jsonl: a line cut short", lambda r: open(r / "metrics.jsonl", "a").write('{"step": 5, "rew')),
    ("metrics.jsonl: garbage lines", lambda r: open(r / "metrics.jsonl", "a").write("garbage\n[1]\n{}\n")),
    ("LATEST names a checkpoint never completed", _write("ckpt/LATEST", "step-000099")),
    ("LATEST missing", lambda r: (r / "ckpt" / "LATEST").unlink()),
    ("temporary files left", lambda r: [(r / "ckpt" / ".tmp-step-000006-1").mkdir(),
                                        (r / ".tmp-metrics.jsonl.x").write_text("x")]),
]


# -- names and symlinks ---------------------------------------------------------------------------------
TRAVERSAL_NAMES = ["../x", "../../etc/x", "/tmp/x", "/etc/passwd", "a/../../b", "a/b", "..", ".", "", ".hidden",
                   "..\\..\\x", "C:\\x", "x\x00y", "x\ny", "\x1b[31mred", " lead", "trail ", "a" * 129, "é" * 200,
                   "a" * 300, "~/../x", "./x", "x/", "/", "\\", "a\\b"]


def plant_symlinks(run: Path, outside: Path) -> list[tuple[str, Callable[[], None]]]:
    """Ways to plant a symbolic link in (or as) a run folder, each pointing at ``outside``."""
    def replace(rel: str, target: Path, is_dir: bool = False) -> Callable[[], None]:
        def apply() -> None:
            p = run / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif os.path.lexists(p):
                p.unlink()
            p.symlink_to(target, target_is_directory=is_dir)
        return apply

    return [("metrics.jsonl -> outside file", replace("metrics.jsonl", outside / "file")),
            ("grids/ -> outside folder", replace("grids", outside, True)),
            ("ckpt/ -> outside folder", replace("ckpt", outside, True)),
            ("config.json -> outside file", replace("config.json", outside / "file")),
            ("lora.safetensors -> /etc/passwd", replace("lora.safetensors", Path("/etc/passwd"))),
            ("before_after.png -> outside file", replace("before_after.png", outside / "file")),
            ("ckpt/LATEST -> outside file", replace("ckpt/LATEST", outside / "file")),
            ("a checkpoint folder -> outside folder", lambda: replace(f"ckpt/{latest(run).name}", outside, True)())]
