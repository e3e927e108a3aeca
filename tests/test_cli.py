"""The command line's own contract: argument errors before any heavy import, readable --help."""

from __future__ import annotations

import json
import re
import subprocess
import sys

BAD_TRAIN = [
    ["--steps", "0"], ["--reward", "foo"], ["--reward", "brightness=x"], ["--estimator", "nope"],
    ["--prompt-split", "1,0,0"], ["--prompt-split", "a,b,c"], ["--device", "gpu"], ["--threads", "0"],
    ["--model", "/nonexistent/model"], ["--model", "weights.ckpt"], ["--lr", "-1"], ["--lr", "nan"],
    ["--eta", "-0.5"], ["--run-name", "../x"], ["--prompt", " "], ["--prompt-file", "/nonexistent.txt"],
    ["--images-per-prompt", "3"], ["--fo-steps", "30"], ["--precision", "fp8"], ["--lora-alpha", "0"],
    ["--num-inference-steps", "2", "--prompt", "a | b | c", "--estimator", "truncated_bp"],
]
BAD_SAMPLE = [
    [" "], ["x", "--lora", "/nonexistent.safetensors"], ["x", "--num", "0"], ["x", "--steps", "0"],
    ["x", "--model", "/nonexistent"], ["x", "--eta", "-1"], ["x", "--image-size", "100"], ["x", "--threads", "0"],
    ["coarse | fine"],
]

BAD_ADVISE = [["--batches", "1"], ["--model", "/nonexistent"], ["--reward", "position:middle"], ["--reward", "size:2"],
              ["--kl-weight", "-1"]]

PROBE = r"""
import contextlib, io, json, sys, time
from rlr_backend.cli import advise_main, sample_main, train_main
cases = json.loads(sys.argv[1])
out = []
for kind, argv in cases:
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            code = {"train": train_main, "sample": sample_main, "advise": advise_main}[kind](argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    out.append({"argv": argv, "code": code, "err": err.getvalue().strip(), "s": time.perf_counter() - t0,
                "heavy": sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)})
print(json.dumps(out))
"""


def test_argument_errors_come_before_torch_is_imported(tmp_path):
    """Every bad argument: exit code 2 and one line, with torch/diffusers/transformers never imported
    (so the error appears at once instead of after 6-10 s of imports), and nothing written."""
    cases = [("train", [*a, "--output-dir", str(tmp_path / "runs")]) for a in BAD_TRAIN]
    cases += [("sample", [*a, "--out", str(tmp_path / "s.png")]) for a in BAD_SAMPLE]
    cases += [("advise", a) for a in BAD_ADVISE]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for r in json.loads(proc.stdout):
        assert r["code"] == 2, r
        assert len(r["err"].splitlines()) == 1 and "error:" in r["err"], r
        assert r["heavy"] == [], r
        assert r["s"] < 1.0, r
    assert list(tmp_path.iterdir()) == []


def test_help_prints_each_default_once_and_readably():
    from rlr_backend.cli import sample_parser, train_parser
    from rlr_backend.train import DEFAULT_PROMPTS

    text = train_parser().format_help()
    flat = re.sub(r"\s+", " ", text)
    options = re.split(r" (?=--[a-z])", flat.split(" options: ", 1)[1].split(" default prompts ", 1)[0])
    for opt in options:
        assert opt.count("default:") <= 1, opt
    assert "0.333" not in text and "1/3,1/3,1/3" in flat
    assert "(default: None)" not in text
    for p in DEFAULT_PROMPTS:
        assert p in text
    assert "--threads" in sample_parser().format_help()


def test_prompt_split_accepts_fractions():
    from rlr_backend.cli import build_config, train_parser

    cfg = build_config(train_parser().parse_args(["--prompt-split", "1/2,1/4,1/4"]))
    assert cfg.prompt_split == (0.5, 0.25, 0.25)


def test_every_config_field_is_an_option():
    from dataclasses import fields

    from rlr_backend.cli import train_parser
    from rlr_backend.train import TrainConfig

    options = {a.dest for a in train_parser()._actions}
    assert {f.name for f in fields(TrainConfig)} - {"prompts"} <= options
